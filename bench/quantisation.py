"""What the quantisation of the default SmolLM2 file does to the weights the method reads.

    .venv/bin/python bench/quantisation.py [--out bench/results/quantisation.json]

The shipped file stores the MLP matrices in Q4_1 (blocks of 32 weights: w = d * q + m, q in 0..15,
d and m float16) and U (the tied embedding) in Q8_0 (w = d * q, q in -127..127). The original
float weights are not on the machine, so the error is estimated from the blocks themselves:
rounding to the nearest level leaves an error spread evenly over one step d, whose RMS is
d / sqrt(12) (the grid's own resolution; for Q4_1 the block's min and max are exact). Reported
per kind of matrix over all 30 layers: that RMS divided by the RMS of the dequantised weights
(a relative error of the weights), and the same for one neuron's vector (its norm's share).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from channelscope.method.precision import cpu_model  # noqa: E402
from channelscope.method.weights import smollm2_path  # noqa: E402

LAYOUT = {"Q4_1": (20, 32), "Q8_0": (34, 32)}  # bytes per block, weights per block


def blocks(data: np.ndarray, kind: str):
    """(d, dequantised weights) of every block: d [blocks], weights [blocks, 32]."""
    size, count = LAYOUT[kind]
    raw = data.reshape(-1, size)
    d = raw[:, :2].copy().view(np.float16).astype(np.float64)[:, 0]
    if kind == "Q4_1":
        m = raw[:, 2:4].copy().view(np.float16).astype(np.float64)[:, 0]
        packed = raw[:, 4:]
        q = np.concatenate([packed & 0x0F, packed >> 4], 1).astype(np.float64)  # low nibbles first
        return d, d[:, None] * q + m[:, None]
    q = raw[:, 2:].copy().view(np.int8).astype(np.float64)
    return d, d[:, None] * q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantisation.json")
    args = parser.parse_args()
    from gguf import GGUFReader

    reader = GGUFReader(smollm2_path())
    kinds = {"ffn_gate": "gate", "ffn_up": "in", "ffn_down": "out", "token_embd": "U (token_embd)"}
    sums: dict[str, list[float]] = {}
    types = {}
    for tensor in reader.tensors:
        role = next((label for key, label in kinds.items() if f"{key}.weight" in tensor.name), None)
        if role is None:
            continue
        kind = tensor.tensor_type.name
        types[role] = kind
        d, weights = blocks(np.asarray(tensor.data), kind)
        error_sq = (d**2 / 12).sum() * LAYOUT[kind][1]
        total = sums.setdefault(role, [0.0, 0.0])
        total[0] += error_sq
        total[1] += float((weights**2).sum())
    result = {
        role: {"type": types[role], "relative_rms_error": round(float(np.sqrt(e / w)), 4)}
        for role, (e, w) in sums.items()
    }
    report = {"file": smollm2_path().name, "machine": cpu_model(), "matrices": result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
