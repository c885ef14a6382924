"""The GEMM precision of the solver, chosen for the machine, and the thread count of a process.

bf16 products against U are 2-3x faster than fp32 where the hardware has native bf16 (CUDA,
CPUs with AVX-512 BF16 or AMX), and several times slower where it has not: one AMD EPYC with
AVX2 only ran a [64, 576] x [576, 49,152] product 3.6x slower in bf16 (bench/README.md). So
`auto` asks the hardware, then confirms with a short timed product, cached under data/ per CPU
and torch version. A run stores the precision it resolved to, and every later extension of the
run uses the stored one (worker/plan.py), so a run never mixes precisions.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16")
# bf16 must beat fp32 by this much to be chosen: its products are less exact, so a tie goes to fp32.
MARGIN = 1.2
SHAPE = (64, 576, 49_152)  # rows x d_model x V of SmolLM2: the solver's product


def cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(count: int | None) -> int:
    """torch's intra-op threads for this process; `count` None or 0 means every core it may use.
    Several torch processes on one machine each spin up a thread per core and slow each other
    down far more than their share, so a process that shares the machine asks for fewer."""
    count = count or cores()
    torch.set_num_threads(max(1, count))
    return torch.get_num_threads()


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware multiplies bf16 natively (the timed check below has the last word)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # x86: AVX-512 BF16 or AMX; ARM: the bf16 extension (Linux names it "bf16").
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & _cpu_flags())


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gemm_rate(device: torch.device, precision: str, repeats: int = 3) -> float:
    """FLOP/s of the solver's product at this precision, best of `repeats` after a warm-up."""
    rows, d, V = SHAPE
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(rows, d, device=device).to(dtype)
    b = torch.randn(d, V, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * rows * d * V / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Choice:
    precision: str  # what `auto` resolves to here
    device: str
    cpu: str
    native_bf16: bool
    gflops: dict[str, float]  # measured rate of the solver's product per precision
    threads: int
    torch: str


def measure(device: torch.device) -> Choice:
    """Time both precisions and choose (about a second on a CPU)."""
    native = native_bf16(device)
    gflops = {p: gemm_rate(device, p) / 1e9 for p in PRECISIONS}
    faster = native and gflops["bf16"] > MARGIN * gflops["fp32"]
    return Choice(
        precision="bf16" if faster else "fp32",
        device=str(device),
        cpu=cpu_model(),
        native_bf16=native,
        gflops={p: round(r, 1) for p, r in gflops.items()},
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )


def choose(device: torch.device, cache_dir: Path | None, fresh: bool = False) -> Choice:
    """`auto` for this device: measured once per machine, torch version and thread count (or
    again when `fresh`), then read from cache_dir/precision.json."""
    key = f"{device.type}-{torch.__version__}-{torch.get_num_threads()}-{cpu_model()}"
    if cache_dir is None:
        return measure(device)
    path = cache_dir / "precision.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # One process measures, the others wait and read its answer: two commands started together
    # (two `decompose` on one database) timing the machine at once, under each other's load,
    # could choose differently and so create two runs.
    with open(cache_dir / "precision.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = {}
        if path.exists():
            try:
                cached = json.loads(path.read_text())
            except ValueError:
                cached = {}
        if key in cached and not fresh:
            return Choice(**cached[key])
        found = measure(device)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**cached, key: asdict(found)}, indent=1))
        tmp.replace(path)  # atomic: a reader never sees half a file
    return found
