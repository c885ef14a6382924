"""Would an active token set make a solver step cheaper (issue 12, item 5)?

- Cost: a full pass [n, d] x [d, V] against the same rows projected onto per-neuron sets of k
  tokens (U's columns gathered per neuron, then a batched product), at SmolLM2's shapes, fp32
  and bf16. Best of 5.
- Accuracy: the share of sum(x^4) (x the centred, weighted projection; the kurtosis's numerator)
  carried by the top k tokens, for the stored channels of the default database (where a solve
  ends) and for their neurons' w (where it starts), if any are stored.

    .venv/bin/python bench/active_set.py [--out bench/results/active-set.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402
from sqlalchemy import select  # noqa: E402

from channelscope.core import db  # noqa: E402
from channelscope.core import tables as T  # noqa: E402
from channelscope.core.config import config  # noqa: E402
from channelscope.method import rotate  # noqa: E402
from channelscope.method.precision import cpu_model  # noqa: E402
from channelscope.method.weights import load_model  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "active-set.json")
args = parser.parse_args()
torch.manual_seed(0)
n, d, V = 256, 576, 49152
out = {"machine": cpu_model(), "threads": torch.get_num_threads(), "rows": n}
for dtype in (torch.float32, torch.bfloat16):
    U = torch.randn(d, V).to(dtype)
    UT = U.T.contiguous()  # [V, d]
    c = torch.randn(n, d).to(dtype)

    def best(f, *operands, repeats=5):
        f(*operands)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            f(*operands)
            times.append(time.perf_counter() - started)
        return min(times)

    full = best(torch.matmul, c, U)
    row = {"full_pass_ms": round(full * 1e3, 2)}
    for k in (256, 1024, 4096):
        idx = torch.stack([torch.randperm(V)[:k] for _ in range(n)])  # [n, k]
        gather = best(UT.__getitem__, idx)  # [n, k, d]
        US = UT[idx]
        inner = best(torch.bmm, US, c.unsqueeze(-1))  # [n, k, 1]
        row[f"k{k}_gather_ms"] = round(gather * 1e3, 2)
        row[f"k{k}_step_ms"] = round(inner * 1e3, 2)
        row[f"k{k}_step_vs_full"] = round(inner / full, 3)
    out[str(dtype).split(".")[-1]] = row


def tail_shares(vectors: list, U: torch.Tensor, m0: torch.Tensor) -> dict:
    c = torch.tensor(np.stack(vectors)).float()
    z = c @ U  # [n, V]
    mu = (z * m0).sum(-1, keepdim=True) / m0.sum()
    x4 = ((z - mu) * m0).pow(4)
    ordered = x4.sort(-1, descending=True).values
    total = x4.sum(-1)
    return {
        "vectors": len(vectors),
        **{
            f"top{k}_median_share": round(float((ordered[:, :k].sum(-1) / total).median()), 3)
            for k in (64, 256, 1024, 4096)
        },
    }


engine = db.make_engine(config().database)
with db.session(engine) as session:
    channels = [T.channel_vector(v) for v in session.scalars(select(T.Channel.vector).limit(2000))]
    neurons = [T.neuron_vector(v) for v in session.scalars(select(T.Neuron.vector).limit(2000))]
engine.dispose()
if channels:
    model = load_model("smollm2")
    U = model.projection("unembedding").float()
    m0 = rotate.initial_token_weights(U, model.vocabulary.kinds, rotate.Settings())
    out["x4_share_channels"] = tail_shares(channels, U, m0)
    out["x4_share_neuron_w"] = tail_shares(neurons, U, m0)
args.out.write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out, indent=1))
