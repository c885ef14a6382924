"""The committed corpus (corpus/texts.jsonl, written by corpus/make_corpus.py) and what is
computed over it once per model: each neuron's activation threshold.

A neuron is active at a position when its activation act(g) * u is above its own 90th
percentile over this corpus (docs/method.md, "Selectivity"). The thresholds of every layer come from
one pass over the corpus and are stored per layer (tables.ActivationThreshold), so the ablation
page and the evaluation never run the corpus themselves.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from channelscope.core import tables as T
from channelscope.method.intervention import LanguageModel

CORPUS = Path(__file__).resolve().parents[2] / "corpus" / "texts.jsonl"
QUANTILE = 0.9
MAX_TOKENS = 192  # per text: the generated texts are ~100 tokens; this only guards the cost


@dataclass(frozen=True)
class Corpus:
    key: str  # sha256 prefix of the file: thresholds name the corpus they were computed on
    texts: tuple[str, ...]


@lru_cache
def load(path: Path = CORPUS) -> Corpus:
    blob = path.read_bytes()
    texts = tuple(json.loads(line)["text"] for line in blob.decode("utf-8").splitlines() if line.strip())
    return Corpus(hashlib.sha256(blob).hexdigest()[:16], texts)


def encode(
    lm: LanguageModel, texts: tuple[str, ...] | list[str], max_tokens: int = MAX_TOKENS
) -> list[list[int]]:
    return [lm.encode(text)[:max_tokens] for text in texts]


@lru_cache(maxsize=1)
def _trigrams() -> dict[str, frozenset[int]]:
    """Which corpus texts hold each 3-character string (built once, ~0.1 s)."""
    index: dict[str, set[int]] = {}
    for i, text in enumerate(load().texts):
        for j in range(len(text) - 2):
            index.setdefault(text[j : j + 3], set()).add(i)
    return {gram: frozenset(ids) for gram, ids in index.items()}


@lru_cache(maxsize=65536)
def texts_containing(word: str) -> tuple[int, ...]:
    """The corpus texts a token string occurs in: only texts that hold all of its trigrams are
    read, so the ablation page's example prompts cost a few set intersections instead of corpus scans."""
    texts, index = load().texts, _trigrams()
    grams = [index.get(word[j : j + 3], frozenset()) for j in range(len(word) - 2)]
    candidates = sorted(frozenset.intersection(*grams)) if grams else range(len(texts))
    return tuple(i for i in candidates if word in texts[i])


@torch.inference_mode()
def layer_inputs(lm: LanguageModel, sequences: list[list[int]], layers: dict[int, str], batch_size: int = 8):
    """One pass over the token sequences, keeping per requested layer either the MLP's input
    ("mlp_input", [N, d]) or every neuron's activation ("activation", [N, d_mlp], float16 to
    halve the memory of all 30 layers of SmolLM2 at once). N counts real (unpadded) positions,
    sequence after sequence. Padding sits on the right, where causal attention never lets it
    reach a real position."""
    kept: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = []
    mask_now: dict[str, torch.Tensor] = {}

    def keeper(layer: int, what: str):
        def hook(_module, args):
            x = args[0][mask_now["mask"]]  # [n real positions, features]
            kept[layer].append(x.to(torch.float16) if what == "activation" else x.clone())

        return hook

    for layer, what in layers.items():
        mlp = lm.mlp(layer)
        module = mlp.down_proj if what == "activation" else mlp
        handles.append(module.register_forward_pre_hook(keeper(layer, what)))
    try:
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            width = max(len(s) for s in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.bool)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = True
            mask_now["mask"] = mask.to(lm.device)
            lm.model.base_model(
                input_ids=ids.to(lm.device), attention_mask=mask.long().to(lm.device), use_cache=False
            )
    finally:
        for handle in handles:
            handle.remove()
    return {layer: torch.cat(parts).cpu() for layer, parts in kept.items()}


def activation_thresholds(lm: LanguageModel, sequences: list[list[int]], quantile: float = QUANTILE):
    """[n_layers, d_mlp] float32: each neuron's activation quantile over every corpus position."""
    acts = layer_inputs(lm, sequences, {layer: "activation" for layer in range(lm.n_layers)})
    out = []
    for layer in range(lm.n_layers):
        values = acts.pop(layer)
        # torch.quantile refuses inputs above 2^24 elements: go by blocks of neurons.
        out.append(
            torch.cat([torch.quantile(block.float(), quantile, dim=0) for block in values.split(1024, dim=1)])
        )
    return torch.stack(out)


def store_thresholds(
    session: Session, model_id: int, corpus_key: str, quantile: float, tokens: int, thresholds: torch.Tensor
) -> None:
    """Replace the model's thresholds for this corpus and quantile (one row per layer)."""
    old = session.scalars(
        select(T.ActivationThreshold).where(
            T.ActivationThreshold.model_id == model_id,
            T.ActivationThreshold.corpus == corpus_key,
            T.ActivationThreshold.quantile == quantile,
        )
    ).all()
    for row in old:
        session.delete(row)
    session.flush()
    for layer, values in enumerate(thresholds):
        session.add(
            T.ActivationThreshold(
                model_id=model_id,
                corpus=corpus_key,
                quantile=quantile,
                layer=layer,
                tokens=tokens,
                thresholds=T.pack(values.numpy(), T.THRESHOLDS),
            )
        )
    session.flush()


@dataclass
class Threshold:
    value: float
    corpus: str
    tokens: int


def threshold(session: Session, model_id: int, layer: int, neuron: int, quantile: float = QUANTILE):
    """The neuron's stored activation threshold (the newest corpus's), or None."""
    row = session.scalars(
        select(T.ActivationThreshold)
        .where(
            T.ActivationThreshold.model_id == model_id,
            T.ActivationThreshold.quantile == quantile,
            T.ActivationThreshold.layer == layer,
        )
        .order_by(T.ActivationThreshold.created_at.desc(), T.ActivationThreshold.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    values = T.unpack(row.thresholds, T.THRESHOLDS)
    return Threshold(float(values[neuron]), row.corpus, row.tokens) if neuron < len(values) else None


def layer_thresholds(
    session: Session, model_id: int, corpus_key: str | None = None, quantile: float = QUANTILE
) -> dict[int, np.ndarray]:
    """Every stored layer's thresholds for the model (of one corpus, or the newest), by layer."""
    query = select(T.ActivationThreshold).where(
        T.ActivationThreshold.model_id == model_id, T.ActivationThreshold.quantile == quantile
    )
    if corpus_key is not None:
        query = query.where(T.ActivationThreshold.corpus == corpus_key)
    rows = session.scalars(query.order_by(T.ActivationThreshold.created_at, T.ActivationThreshold.id)).all()
    return {row.layer: T.unpack(row.thresholds, T.THRESHOLDS) for row in rows}


def ensure_thresholds(
    engine, model, lm: LanguageModel, recompute: bool = False, log=print
) -> dict[int, np.ndarray]:
    """The model's thresholds over the committed corpus, computed and stored if missing. `model`
    is method.weights.Model (its row is added to the store if new, as a run would)."""
    from channelscope.core import db
    from channelscope.worker import store

    text = load()
    with db.session(engine) as session:
        model_row = store.ensure_model(session, model)
        have = session.scalars(
            select(T.ActivationThreshold.layer).where(
                T.ActivationThreshold.model_id == model_row.id,
                T.ActivationThreshold.corpus == text.key,
                T.ActivationThreshold.quantile == QUANTILE,
            )
        ).all()
        if recompute or len(have) < model.n_layers:
            started = time.monotonic()
            sequences = encode(lm, text.texts)
            values = activation_thresholds(lm, sequences)
            positions, elapsed = sum(map(len, sequences)), time.monotonic() - started
            log(
                f"activation thresholds of {model.n_layers} layers over {len(sequences)} texts "
                f"({positions:,} positions, corpus {text.key}): {elapsed:.0f} s"
            )
            store_thresholds(session, model_row.id, text.key, QUANTILE, positions, values)
        session.commit()
        return layer_thresholds(session, model_row.id, text.key)
