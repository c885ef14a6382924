"""The real model in the web process, for the ablation page.

Loaded once per model file, lazily (the first ablation that asks for it; SmolLM2 takes ~13 s
and ~1.2 GB), on CPU unless CHANNELSCOPE_DEVICE says otherwise or a GPU is present, and only
from the SmolLM2 wheel or a directory listed in CHANNELSCOPE_MODEL_DIRS: a run records the path
its model was read from, and the web process must not open whatever path a database row names.

Runs are admitted up to CHANNELSCOPE_MODEL_RUNS at a time (running plus waiting; beyond that,
Busy, which the page answers with 429 and Retry-After) and execute one at a time under a lock:
hooks are registered on shared modules, and two forward passes on two cores gain nothing. Each
run has a deadline (CHANNELSCOPE_MODEL_TIMEOUT seconds, waiting included), checked between
layers of the forward pass, so a stopped run frees the model within one layer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from channelscope.core.config import config
from channelscope.method.intervention import LanguageModel, ModelTimeout, load_language_model
from channelscope.method.weights import SMOLLM2_FILE, ModelError, load_model, smollm2_path

Result = TypeVar("Result")
log = logging.getLogger("channelscope.web")


class ModelUnavailable(Exception):
    """The model cannot be run here; the message says why, for the page."""


class Busy(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"{retry_after}")
        self.retry_after = retry_after


class ModelRuntime:
    def __init__(
        self,
        model_dirs: list[Path] | None = None,
        device: str = "auto",
        max_runs: int = 2,
        timeout_s: float = 10.0,
    ):
        self.model_dirs = [Path(d).expanduser().resolve() for d in (model_dirs or [])]
        self.device = device
        self.timeout_s = timeout_s
        self.max_runs = max_runs
        self._slots = threading.BoundedSemaphore(max_runs)
        self._run_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._models: dict[str, LanguageModel] = {}
        self.last_run_s = 1.0  # for Retry-After

    @classmethod
    def from_config(cls) -> ModelRuntime:
        cfg = config()
        dirs = [Path(d) for d in cfg.model_dirs.split(os.pathsep) if d.strip()]
        return cls(dirs, cfg.device, cfg.model_runs, cfg.model_timeout)

    # --- where a model may come from ----------------------------------------------------------

    def _wheel(self) -> Path | None:
        try:
            return smollm2_path().resolve()
        except ModelError:
            return None

    def allowed(self, path: Path) -> bool:
        resolved = path.expanduser().resolve()
        return resolved == self._wheel() or any(resolved.is_relative_to(d) for d in self.model_dirs)

    def locate(self, source: str, sha256: str) -> Path:
        """The model file or folder a stored model came from, on this server. Messages name the
        file, never its directory: server paths are for the log, not for visitors."""
        path = Path(source)
        name = path.name
        if Path(source).name == SMOLLM2_FILE and not path.exists() and self._wheel() is not None:
            path = self._wheel()  # the same wheel, installed at another path on this machine
        if not self.allowed(path):
            log.warning("ablation: %s is outside CHANNELSCOPE_MODEL_DIRS", source)
            raise ModelUnavailable(
                f"The model {name} is outside the directories this server may load models "
                "from (CHANNELSCOPE_MODEL_DIRS), so only the weight-level preview is shown."
            )
        if not path.exists():
            log.warning("ablation: the model file %s is missing", source)
            raise ModelUnavailable(
                f"The model file {name} is missing on this server, so only the weight-level preview is shown."
            )
        return path

    def model(self, source: str, sha256: str) -> LanguageModel:
        """The loaded model, loading it on first use (and checking it is the stored one)."""
        found = self._models.get(sha256)
        if found is not None:
            return found
        path = self.locate(source, sha256)
        with self._load_lock:
            found = self._models.get(sha256)
            if found is None:
                try:
                    if load_model(path).sha256 != sha256:
                        log.warning("ablation: %s is not the stored model (sha256 %s)", path, sha256)
                        raise ModelUnavailable(
                            f"The file {path.name} on this server is not the model this run was "
                            "computed from (its sha256 differs), so only the weight-level preview "
                            "is shown."
                        )
                    found = load_language_model(path, _device(self.device))
                except ModelError as error:
                    log.warning("ablation: cannot load %s: %s", path, error)
                    raise ModelUnavailable(
                        f"The model {path.name} cannot be loaded on this server (its log says why), "
                        "so only the weight-level preview is shown."
                    ) from None
                self._models[sha256] = found
        return found

    # --- admission and execution ----------------------------------------------------------------

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Admit a request that will run the model, or raise Busy at once."""
        if not self._slots.acquire(blocking=False):
            raise Busy(max(1, round(self.last_run_s * self.max_runs)))
        try:
            yield
        finally:
            self._slots.release()

    def run(self, lm: LanguageModel, work: Callable[[LanguageModel, float], Result]) -> Result:
        """work(lm, deadline) under the run lock; ModelTimeout once the deadline passes."""
        deadline = time.monotonic() + self.timeout_s
        if not self._run_lock.acquire(timeout=self.timeout_s):
            raise ModelTimeout("the model was busy for longer than the time limit")
        started = time.monotonic()
        try:
            return work(lm, deadline)
        finally:
            self.last_run_s = time.monotonic() - started
            self._run_lock.release()


def _device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
