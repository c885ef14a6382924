import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return tiny.write_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return tiny.write_gguf(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")
