"""Configuration, read once from the environment (and a .env file if present)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Config(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    # SQLite under data/ by default; PostgreSQL in production (postgresql://user@host/db).
    database_url: str = Field("", alias="DATABASE_URL")
    data_dir: Path = Field(Path("data"), alias="CHANNELSCOPE_DATA_DIR")
    # Where the web app may load models from (os.pathsep-separated); the SmolLM2 wheel is always allowed.
    model_dirs: str = Field("", alias="CHANNELSCOPE_MODEL_DIRS")
    device: str = Field("auto", alias="CHANNELSCOPE_DEVICE")

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'channelscope.db'}"


@lru_cache
def config() -> Config:
    return Config()
