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
    # The ablation page's model runs: admitted at once (running + waiting; beyond: 429), and the
    # time limit of one run in seconds (waiting for the model included).
    model_runs: int = Field(2, alias="CHANNELSCOPE_MODEL_RUNS", ge=1)
    model_timeout: float = Field(10.0, alias="CHANNELSCOPE_MODEL_TIMEOUT", gt=0)
    # torch threads of this process; 0: every core it may use for a worker or command, half of
    # them for the web app (whose own model work is the ablation page's).
    threads: int = Field(0, alias="CHANNELSCOPE_THREADS", ge=0)
    # `serve`: opening a neuron no run has computed asks for its channels (web/demand.py).
    on_demand: bool = Field(True, alias="CHANNELSCOPE_ON_DEMAND")
    # The web app's answer to a database that is slow or silent: a query that runs longer is
    # stopped by the server (504), and one the server does not answer at all within this plus
    # a margin has its connection cut by the app (503), so no request waits longer.
    query_timeout: float = Field(10.0, alias="CHANNELSCOPE_QUERY_TIMEOUT", gt=0)
    # X-Forwarded-Proto and X-Forwarded-For are believed only from these addresses (comma-
    # separated IPs or networks, `*` for any): from anyone else they could change the scheme
    # of the links in pages that are cached for everyone.
    trusted_proxies: str = Field("", alias="CHANNELSCOPE_TRUSTED_PROXIES")
    # The site's address as visitors see it (https://channels.example.org): absolute links in
    # pages (the permalink box, og:url) use it instead of the request's scheme and Host.
    public_url: str = Field("", alias="CHANNELSCOPE_PUBLIC_URL")

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'channelscope.db'}"


@lru_cache
def config() -> Config:
    return Config()
