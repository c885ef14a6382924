"""The activation pass on SmolLM2: what it costs next to the model's own forward, and whether the
stored top contexts are the activations a separate forward pass gives.

    .venv/bin/python bench/activations.py [--documents 64] [--check 6] [--out bench/results/activations.json]

- Cost: over the first `--documents` documents of the corpus, in the pass's batches, the forward
  alone and the whole pass (forward + histograms + top contexts + per-token sums); the ratio,
  and both extrapolated to the whole corpus by positions.
- Check (after `channelscope activations smollm2`): for `--check` neurons drawn at random, each
  stored top context's peak and window against transformers run on that one document alone, in
  float64, unpadded (not the pass's batching, padding, masking or window cutting).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sqlalchemy import select  # noqa: E402

from channelscope.core import db  # noqa: E402
from channelscope.core import tables as T  # noqa: E402
from channelscope.core.config import config  # noqa: E402
from channelscope.method.intervention import load_language_model  # noqa: E402
from channelscope.method.precision import cpu_model  # noqa: E402
from channelscope.method.weights import load_model  # noqa: E402
from channelscope.worker import activations as A  # noqa: E402
from channelscope.worker import corpus, token_sums  # noqa: E402


def cost(lm, model, sequences: list[list[int]], every: list[list[int]]) -> dict:
    _, lookup = token_sums.compact_rows(every, model.vocab_size)
    started = time.perf_counter()
    for s in range(0, len(sequences), A.BATCH):
        ids, mask = corpus.padded(sequences[s : s + A.BATCH])
        with torch.inference_mode():
            lm.model.base_model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
    forward = time.perf_counter() - started
    states: dict = {}
    started = time.perf_counter()
    for s in range(0, len(sequences), A.BATCH):
        batch = sequences[s : s + A.BATCH]
        A._pass(lm, batch, states, list(range(s, s + len(batch))), lookup)
    whole = time.perf_counter() - started
    positions, corpus_positions = sum(map(len, sequences)), sum(map(len, every))
    scale = corpus_positions / positions / 60
    return {
        "documents": len(sequences),
        "positions": positions,
        "forward_s": round(forward, 2),
        "pass_s": round(whole, 2),
        "pass_over_forward": round(whole / forward, 2),
        "corpus_positions": corpus_positions,
        "corpus_forward_min": round(forward * scale, 1),
        "corpus_pass_min": round(whole * scale, 1),
    }


def check(lm, model, sequences: list[list[int]], neurons: int, seed: int) -> dict:
    lm.model.double()
    engine = db.make_engine(config().database)
    rng = np.random.default_rng(seed)
    worst_peak, worst_window, contexts = 0.0, 0.0, 0
    with db.session(engine) as session:
        model_id = session.scalar(select(T.Model.id).where(T.Model.name == model.name))
        for _ in range(neurons):
            layer, neuron = int(rng.integers(model.n_layers)), int(rng.integers(model.d_mlp))
            row = session.scalar(
                select(T.ActivationLayer)
                .where(T.ActivationLayer.model_id == model_id, T.ActivationLayer.layer == layer)
                .order_by(T.ActivationLayer.created_at.desc())
            )
            if row is None:
                raise SystemExit("no stored pass: run `channelscope activations smollm2` first")
            docs = T.unpack(row.top_doc, "int32").reshape(-1, A.CONTEXTS)[neuron]
            found = A.neuron(session, model_id, layer, neuron)
            for k, doc in enumerate(docs[: len(found.values)][:5]):
                seen = {}
                hook = lm.mlp(layer).down_proj.register_forward_pre_hook(
                    lambda _m, args, seen=seen, n=neuron: seen.update(act=args[0][0, :, n].numpy())
                )
                with torch.inference_mode():
                    lm.model.base_model(input_ids=torch.tensor([sequences[doc]]), use_cache=False)
                hook.remove()
                act = seen["act"]
                peak = int(np.argmax(act))
                worst_peak = max(worst_peak, abs(found.values[k] - act[peak]) / max(abs(act[peak]), 1e-6))
                span = [peak - A.BEFORE + i for i in range(A.WINDOW)]
                inside = [i for i, p in enumerate(span) if 0 <= p < len(act)]
                window = act[[span[i] for i in inside]]
                worst_window = max(worst_window, float(np.abs(found.window_values[k][inside] - window).max()))
                contexts += 1
    engine.dispose()
    return {
        "neurons": neurons,
        "contexts": contexts,
        "dtype": str(next(lm.model.parameters()).dtype),
        "worst_peak_relative_error": worst_peak,
        "worst_window_abs_error": worst_window,  # the windows are stored in float16
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument(
        "--check", type=int, default=6, help="neurons whose stored contexts to recompute (0: none)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "activations.json")
    args = parser.parse_args()
    model = load_model("smollm2")
    lm = load_language_model(model.source, "cpu")
    built = corpus.ensure_built(config().data_dir)
    every = [lm.encode(text)[: A.MAX_TOKENS] for text in built.texts]
    report = {
        "machine": f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "corpus": built.key,
        "cost": cost(lm, model, [s for s in every[: args.documents] if s], every),
    }
    if args.check:
        report["check"] = check(lm, model, every, args.check, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
