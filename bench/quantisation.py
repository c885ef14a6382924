"""What the quantisation of the default SmolLM2 file does to the weights the method reads.

    .venv/bin/python bench/quantisation.py [--out bench/results/quantisation.json]

The shipped file stores the MLP and attention matrices in Q4_1 (blocks of 32 weights:
w = d * q + m, q in 0..15, d and m float16) and U (the tied embedding) in Q8_0 (w = d * q,
q in -127..127). Per kind of matrix over all 30 layers: the estimated RMS rounding error
relative to the RMS of the dequantised weights (method/weights.py, `quantisation`, which
`channelscope eval-ablation` also reports).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from channelscope.method.precision import cpu_model  # noqa: E402
from channelscope.method.weights import quantisation, smollm2_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantisation.json")
    args = parser.parse_args()
    report = {**quantisation(smollm2_path()), "machine": cpu_model()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
