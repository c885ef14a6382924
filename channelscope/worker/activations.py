"""`channelscope activations MODEL`: what every neuron does on real text. One pass of the model
over the real corpus (worker/corpus.py, `build`), recording for every neuron of every layer:

- its top CONTEXTS contexts: the documents where its activation act(g) * u peaks, one per
  document, each a WINDOW-token window around the peak with the activation at every token;
- the density of its activation and of its two pre-activations (x . w_gate, x . w_in): a
  histogram of BINS bins over [-h, h], h twice the largest |value| of the first block (values
  beyond fall in the end bins);
- its threshold: the QUANTILE quantile of |activation|, read off that histogram (within a bin's
  width). "Active" (the ablation page and report) means |act(g) * u| above it: a neuron that
  writes -w_out strongly is as active as one that writes +w_out;
- per token, the sums the behavioural test of every channel reads (worker/token_sums.py), as
  files beside the store.

Resumable: the running state is saved under data/activations/ every SAVE_SECONDS (at the end of
a block of documents), and a killed pass goes on from the last saved block. Stored per model,
corpus and layer (tables.ActivationLayer), so the pages name the corpus they show.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.method import behaviour
from channelscope.method.intervention import LanguageModel
from channelscope.worker import corpus, store, token_sums

ACTIVATIONS_VERSION = 2  # 2: with the per-token sums of the behavioural test
CONTEXTS = 20  # top contexts per neuron
WINDOW = 24  # tokens per context: BEFORE before the peak, the peak, the rest after
BEFORE = 16
BINS = 128
QUANTILE = 0.9  # "active": |activation| above this quantile of its own over the corpus
MAX_TOKENS = 256  # per document (a document is ~300 tokens; this only guards the cost)
BATCH = 8  # documents per forward pass
BLOCK = 64  # documents between progress reports (and possible saves)
SAVE_SECONDS = 300.0  # the running state is saved after the first block past this many seconds
SIGNALS = ("activation", "gate", "in")  # act(g) * u, and the read sides' pre-activations


@dataclass
class LayerState:
    """The running record of one layer's d_mlp neurons."""

    ranges: torch.Tensor  # [3, d_mlp] h per signal: bins over [-h, h]
    counts: torch.Tensor  # [3, d_mlp, BINS] int64
    top_value: torch.Tensor  # [d_mlp, CONTEXTS], descending; -inf where empty
    top_doc: torch.Tensor  # [d_mlp, CONTEXTS] int64, -1 where empty
    top_pos: torch.Tensor  # [d_mlp, CONTEXTS] int64, the peak's position in its document
    windows: torch.Tensor  # [d_mlp, CONTEXTS, WINDOW] float16, the activation at each window token
    sums: token_sums.TokenSums  # what the behavioural test of every channel needs


def _new_state(first: dict[str, torch.Tensor], d_mlp: int, distinct: int) -> LayerState:
    ranges = torch.stack([2 * first[s].abs().amax(0).clamp_min(1e-6) for s in SIGNALS])
    return LayerState(
        ranges=ranges,
        counts=torch.zeros(len(SIGNALS), d_mlp, BINS, dtype=torch.int64),
        top_value=torch.full((d_mlp, CONTEXTS), float("-inf")),
        top_doc=torch.full((d_mlp, CONTEXTS), -1, dtype=torch.int64),
        top_pos=torch.zeros(d_mlp, CONTEXTS, dtype=torch.int64),
        windows=torch.zeros(d_mlp, CONTEXTS, WINDOW, dtype=torch.float16),
        sums=token_sums.TokenSums(distinct, first["x"].shape[1], d_mlp),
    )


def _histogram(state: LayerState, signal: int, values: torch.Tensor) -> None:
    """values [n, d_mlp] into the signal's per-neuron histogram (one bincount for all neurons)."""
    d_mlp = values.shape[1]
    h = state.ranges[signal]
    bins = ((values + h) / (2 * h) * BINS).long().clamp_(0, BINS - 1)  # [n, d_mlp]
    flat = bins + torch.arange(d_mlp) * BINS
    state.counts[signal] += torch.bincount(flat.flatten(), minlength=d_mlp * BINS).view(d_mlp, BINS)


def _contexts(state: LayerState, acts: torch.Tensor, mask: torch.Tensor, docs: torch.Tensor) -> None:
    """Merge this batch's per-document peaks into the running top CONTEXTS. acts [B, T, d_mlp],
    mask [B, T] real positions, docs [B] document ids."""
    B, Tn, d_mlp = acts.shape
    masked = acts.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    peak, where = masked.max(1)  # [B, d_mlp] one context per document
    values = torch.cat([state.top_value, peak.T], 1)  # [d_mlp, CONTEXTS + B]
    order = torch.argsort(values, dim=1, descending=True, stable=True)[:, :CONTEXTS]
    new_doc = torch.cat([state.top_doc, docs.expand(d_mlp, B)], 1).gather(1, order)
    new_pos = torch.cat([state.top_pos, where.T], 1).gather(1, order)
    # Windows: kept ones from the old state, new ones cut from this batch's activations.
    offsets = torch.arange(WINDOW) - BEFORE  # [W]
    pos = (where.T.unsqueeze(-1) + offsets).clamp(0, Tn - 1)  # [d_mlp, B, W]
    rows = torch.arange(B).view(1, B, 1).expand(d_mlp, B, WINDOW)
    neuron = torch.arange(d_mlp).view(d_mlp, 1, 1).expand(d_mlp, B, WINDOW)
    cut = acts[rows, pos, neuron].to(torch.float16)  # [d_mlp, B, W]
    unclamped = where.T.unsqueeze(-1) + offsets
    inside = (unclamped >= 0) & (unclamped < Tn) & mask[rows, pos]  # off the document: 0
    cut = cut.masked_fill(~inside, 0)
    windows = torch.cat([state.windows, cut], 1)
    state.windows = windows.gather(1, order.unsqueeze(-1).expand(d_mlp, CONTEXTS, WINDOW))
    state.top_value, state.top_doc, state.top_pos = values.gather(1, order), new_doc, new_pos


def _hooked(lm: LanguageModel, layers, on_layer) -> list:
    """Hooks on the MLPs of `layers` that call on_layer(layer, signals) once per forward pass with
    that layer's x (the MLP input), gate and in pre-activations and activation, each [B, T, ...]
    float32 on the CPU. Returns the handles to remove."""
    handles = []
    for layer in layers:
        mlp, signals = lm.mlp(layer), {}

        def pre(name, signals=signals):
            def hook(_module, args, output):
                if name == "gate":
                    signals["x"] = args[0].float().cpu()  # [B, T, d]
                signals[name] = output.float().cpu()  # [B, T, d_mlp]

            return hook

        def record(_module, args, layer=layer, signals=signals):
            # The layer's last signal: hand it on now, so one layer's tensors live at a time.
            signals["activation"] = args[0].float().cpu()
            on_layer(layer, signals)
            signals.clear()

        handles.append(mlp.gate_proj.register_forward_hook(pre("gate")))
        handles.append(mlp.up_proj.register_forward_hook(pre("in")))
        handles.append(mlp.down_proj.register_forward_pre_hook(record))
    return handles


class _Enough(Exception):
    """Raised by a hook once the last layer wanted is recorded: the rest of the forward is waste."""


@torch.inference_mode()
def _forward(lm: LanguageModel, ids: torch.Tensor, mask: torch.Tensor, handles: list) -> None:
    try:
        lm.model.base_model(
            input_ids=ids.to(lm.device), attention_mask=mask.long().to(lm.device), use_cache=False
        )
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _pass(
    lm: LanguageModel,
    sequences: list[list[int]],
    states: dict[int, LayerState],
    docs: list[int],
    lookup: torch.Tensor,
) -> None:
    """One forward pass over a batch of documents, every layer's signals recorded."""
    ids, mask = corpus.padded(sequences)
    doc_ids = torch.tensor(docs)
    rows, next_rows = token_sums.positions(ids, mask, lookup)

    def on_layer(layer, signals):
        real = {name: value[mask] for name, value in signals.items()}  # [n, ...] real positions
        if layer not in states:
            states[layer] = _new_state(real, real["activation"].shape[1], int(lookup.max()) + 1)
        for i, name in enumerate(SIGNALS):
            _histogram(states[layer], i, real[name])
        _contexts(states[layer], signals["activation"], mask, doc_ids)
        states[layer].sums.add(real["x"], real["activation"], rows, next_rows)

    _forward(lm, ids, mask, _hooked(lm, range(lm.n_layers), on_layer))


def token_stats(
    lm: LanguageModel, sequences: list[list[int]], layers: list[int], vocab_size: int, on_batch=None
) -> dict[int, behaviour.TokenStats]:
    """The per-token sums of `layers` alone over `sequences`, in memory (reports' samples)."""
    rows, lookup = token_sums.compact_rows(sequences, vocab_size)
    sums: dict[int, token_sums.TokenSums] = {}
    for start in range(0, len(sequences), BATCH):
        batch = [s for s in sequences[start : start + BATCH] if s]
        ids, mask = corpus.padded(batch)
        at, following = token_sums.positions(ids, mask, lookup)

        def on_layer(layer, signals, mask=mask, at=at, following=following):
            x, act = signals["x"][mask], signals["activation"][mask]
            if layer not in sums:
                sums[layer] = token_sums.TokenSums(int(lookup.max()) + 1, x.shape[1], act.shape[1])
            sums[layer].add(x, act, at, following)
            if layer == max(layers):
                raise _Enough

        _forward(lm, ids, mask, _hooked(lm, layers, on_layer))
        if on_batch:
            on_batch(min(start + BATCH, len(sequences)), len(sequences))
    return {layer: found.finish(rows) for layer, found in sums.items()}


def magnitude_quantile(counts: np.ndarray, h: np.ndarray, q: float) -> np.ndarray:
    """The q quantile of |value| from a histogram of value over [-h, h] (BINS bins, symmetric
    about 0): the bins folded onto [0, h], then interpolated within the bin the quantile falls in.
    counts [d_mlp, BINS], h [d_mlp] -> [d_mlp]"""
    half = BINS // 2
    folded = counts[:, half:] + counts[:, :half][:, ::-1]  # [d_mlp, half]: bin j holds |v| in [j, j+1) widths
    cumulative = np.cumsum(folded, 1)
    target = q * cumulative[:, -1]
    index = (cumulative < target[:, None]).sum(1).clip(0, half - 1)
    before = np.where(index > 0, np.take_along_axis(cumulative, (index - 1).clip(0)[:, None], 1)[:, 0], 0)
    inside = np.take_along_axis(folded, index[:, None], 1)[:, 0].clip(min=1)
    fraction = ((target - before) / inside).clip(0, 1)
    return ((index + fraction) * 2 * h / BINS).astype(np.float32)


# Stored thresholds are of |activation| from this version of the pass on; an older row's are
# recomputed from its histogram, so every page and report means the same by "active".
MAGNITUDE_SINCE = 2


def _thresholds(session: Session, row) -> np.ndarray:
    """A stored ActivationLayer row's thresholds [d_mlp] (quantiles of |activation|); row: the
    row itself or one of _THRESHOLD_COLUMNS (its histogram is read only for an older row)."""
    if row.version >= MAGNITUDE_SINCE:
        return T.unpack(row.thresholds, "float32")
    old = session.get(T.ActivationLayer, row.id)
    ranges = T.unpack(old.ranges, "float32").reshape(len(SIGNALS), -1)
    counts = T.unpack_compressed(old.counts, "int32").reshape(len(SIGNALS), ranges.shape[1], BINS)
    return magnitude_quantile(counts[0], ranges[0], QUANTILE)


_THRESHOLD_COLUMNS = (
    T.ActivationLayer.id,
    T.ActivationLayer.version,
    T.ActivationLayer.layer,
    T.ActivationLayer.thresholds,
    T.ActivationLayer.corpus,
    T.ActivationLayer.tokens,
)


def _newest(model_id: int, layer: int, *columns):
    """The query for `columns` of a layer's newest stored pass (a later pass supersedes)."""
    return (
        select(*columns)
        .where(T.ActivationLayer.model_id == model_id, T.ActivationLayer.layer == layer)
        .order_by(T.ActivationLayer.created_at.desc(), T.ActivationLayer.id.desc())
        .limit(1)
    )


@dataclass
class Threshold:
    value: float
    corpus: str
    tokens: int


def threshold(session: Session, model_id: int, layer: int, neuron: int) -> Threshold | None:
    """The neuron's activation threshold from the newest stored pass over the real corpus
    (`channelscope activations`), or None: "active" means |act(g) * u| above it."""
    row = session.execute(_newest(model_id, layer, *_THRESHOLD_COLUMNS)).first()
    if row is None:
        return None
    values = _thresholds(session, row)
    return Threshold(float(values[neuron]), row.corpus, row.tokens) if neuron < len(values) else None


def layer_thresholds(session: Session, model_id: int) -> dict[int, np.ndarray]:
    """Every layer's thresholds from the newest stored pass, by layer ({} without one)."""
    rows = session.execute(
        select(*_THRESHOLD_COLUMNS)
        .where(T.ActivationLayer.model_id == model_id)
        .order_by(T.ActivationLayer.created_at, T.ActivationLayer.id)
    ).all()
    return {row.layer: _thresholds(session, row) for row in rows}  # the newest wins


def checkpoint_path(data_dir: Path, model, key: str) -> Path:
    # Versioned: a state saved by an older pass lacks what this one records.
    return data_dir / "activations" / f"{model.name}-{model.sha256[:12]}-{key}-v{ACTIVATIONS_VERSION}.pt"


def run(
    engine: Engine,
    model,
    lm: LanguageModel,
    built: corpus.Built,
    data_dir: Path,
    *,
    on_block: Callable[[int, int], None] | None = None,
    max_documents: int | None = None,
) -> dict:
    """The whole pass, resumable; stores every layer when done and returns a summary."""
    texts = built.texts[:max_documents] if max_documents else built.texts
    path = checkpoint_path(data_dir, model, built.key)
    saved = torch.load(path, weights_only=False) if path.exists() else None
    states: dict[int, LayerState] = saved["states"] if saved else {}
    done, tokens, seconds = (saved["done"], saved["tokens"], saved["seconds"]) if saved else (0, 0, 0.0)
    sequences = [lm.encode(text)[:MAX_TOKENS] for text in texts]
    rows, lookup = token_sums.compact_rows(sequences, model.vocab_size)
    saved_at = time.monotonic()
    while done < len(texts):
        started = time.perf_counter()
        stop = min(done + BLOCK, len(texts))
        for start in range(done, stop, BATCH):
            ids = [i for i in range(start, min(start + BATCH, stop)) if sequences[i]]
            if ids:
                _pass(lm, [sequences[i] for i in ids], states, ids, lookup)
                tokens += sum(len(sequences[i]) for i in ids)
        done, seconds = stop, seconds + time.perf_counter() - started
        # The state holds the per-token sums (GBs for a real model): saved every SAVE_SECONDS,
        # so a killed pass loses at most that much work.
        if time.monotonic() - saved_at >= SAVE_SECONDS or done == len(texts):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"states": states, "done": done, "tokens": tokens, "seconds": seconds}, tmp)
            tmp.replace(path)  # atomic: a killed pass resumes from the last saved block
            saved_at = time.monotonic()
        if on_block:
            on_block(done, len(texts))
    token_sums.write_stats(
        data_dir, model, built.key, {layer: state.sums.finish(rows) for layer, state in states.items()}
    )
    _store(engine, model, built, states, sequences, tokens)
    path.unlink(missing_ok=True)  # stored: the running state (GBs) has done its job
    return {"documents": len(texts), "tokens": tokens, "seconds": round(seconds, 1), "corpus": built.key}


def _store(
    engine: Engine, model, built: corpus.Built, states: dict[int, LayerState], sequences, tokens: int
) -> None:
    padded = [seq + [-1] * (MAX_TOKENS + WINDOW) for seq in sequences]
    with db.session(engine) as session, session.begin():
        model_row = store.ensure_model(session, model)
        model_id = model_row.id
        for table in (T.ActivationLayer, T.ActivationCorpus):
            session.execute(delete(table).where(table.model_id == model_id, table.corpus == built.key))
        # Only the positions the pass went over (documents are cut at MAX_TOKENS).
        every = np.fromiter((t for seq in sequences for t in seq), dtype=np.int64)
        session.add(
            T.ActivationCorpus(
                model_id=model_id,
                corpus=built.key,
                documents=len(sequences),
                tokens=tokens,
                token_counts=T.pack_compressed(
                    np.bincount(every, minlength=model_row.vocab_size).astype(np.int32), "int32"
                ),
            )
        )
        for layer, state in sorted(states.items()):
            docs, pos = state.top_doc.numpy(), state.top_pos.numpy()
            window_tokens = np.full((*docs.shape, WINDOW), -1, dtype=np.int32)
            for n, k in zip(*np.nonzero(docs >= 0), strict=True):
                start = pos[n, k] - BEFORE
                seq = padded[docs[n, k]]
                window_tokens[n, k] = [seq[i] if i >= 0 else -1 for i in range(start, start + WINDOW)]
            counts = state.counts.numpy()
            ranges = state.ranges.numpy()
            session.add(
                T.ActivationLayer(
                    model_id=model_id,
                    corpus=built.key,
                    version=ACTIVATIONS_VERSION,
                    layer=layer,
                    tokens=tokens,
                    documents=len(sequences),
                    ranges=T.pack(ranges, "float32"),
                    counts=T.pack_compressed(counts, "int32"),
                    thresholds=T.pack(magnitude_quantile(counts[0], ranges[0], QUANTILE), "float32"),
                    top_value=T.pack(state.top_value.numpy(), "float32"),
                    top_doc=T.pack(docs, "int32"),
                    top_pos=T.pack(pos, "int32"),
                    window_tokens=T.pack_compressed(window_tokens, "int32"),
                    window_values=T.pack_compressed(state.windows.numpy(), "float16"),
                )
            )


@dataclass(frozen=True)
class Contexts:
    """One neuron's top contexts and density, as stored."""

    corpus: str
    documents: int
    tokens: int  # corpus positions the pass went over
    threshold: float
    values: np.ndarray  # [K] the peaks, descending
    window_tokens: np.ndarray  # [K, WINDOW] token ids, -1 off the document
    window_values: np.ndarray  # [K, WINDOW]
    ranges: np.ndarray  # [3] h of each signal
    counts: np.ndarray  # [3, BINS]


@dataclass(frozen=True)
class _Layer:
    corpus: str
    documents: int
    tokens: int
    thresholds: np.ndarray  # [d_mlp]
    values: np.ndarray  # [d_mlp, K]
    window_tokens: np.ndarray  # [d_mlp, K, WINDOW]
    window_values: np.ndarray  # [d_mlp, K, WINDOW] float16
    ranges: np.ndarray  # [3, d_mlp]
    counts: np.ndarray  # [3, d_mlp, BINS]


# A layer's record is ~6 MB compressed and is decompressed whole: pages keep the last few, by
# database, row id and creation time (rows are replaced, never changed in place, and a replaced
# row's id may come back).
_CACHED_LAYERS = 4
_layers: OrderedDict[tuple, _Layer] = OrderedDict()
_token_counts: OrderedDict[tuple, np.ndarray] = OrderedDict()
_lock = threading.Lock()


def _remember(cache: OrderedDict, key: tuple, make: Callable[[], object]) -> object:
    with _lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    value = make()
    with _lock:
        cache[key] = value
        while len(cache) > _CACHED_LAYERS:
            cache.popitem(last=False)
    return value


def _unpack_layer(session: Session, row_id: int) -> _Layer:
    row = session.get(T.ActivationLayer, row_id)
    values = T.unpack(row.top_value, "float32").reshape(-1, CONTEXTS)
    d_mlp = values.shape[0]
    return _Layer(
        corpus=row.corpus,
        documents=row.documents,
        tokens=row.tokens,
        thresholds=_thresholds(session, row),
        values=values,
        window_tokens=T.unpack_compressed(row.window_tokens, "int32").reshape(d_mlp, CONTEXTS, WINDOW),
        window_values=T.unpack_compressed(row.window_values, "float16").reshape(d_mlp, CONTEXTS, WINDOW),
        ranges=T.unpack(row.ranges, "float32").reshape(len(SIGNALS), d_mlp),
        counts=T.unpack_compressed(row.counts, "int32").reshape(len(SIGNALS), d_mlp, BINS),
    )


def neuron(session: Session, model_id: int, layer: int, neuron_id: int) -> Contexts | None:
    """The newest stored pass's record of one neuron, or None."""
    row = session.execute(
        _newest(model_id, layer, T.ActivationLayer.id, T.ActivationLayer.created_at)
    ).first()
    if row is None:
        return None
    key = (str(session.get_bind().url), row.id, row.created_at)
    found: _Layer = _remember(_layers, key, lambda: _unpack_layer(session, row.id))
    keep = np.isfinite(found.values[neuron_id])
    return Contexts(
        corpus=found.corpus,
        documents=found.documents,
        tokens=found.tokens,
        threshold=float(found.thresholds[neuron_id]),
        values=found.values[neuron_id][keep],
        window_tokens=found.window_tokens[neuron_id][keep],
        window_values=found.window_values[neuron_id][keep].astype(np.float32),
        ranges=found.ranges[:, neuron_id],
        counts=found.counts[:, neuron_id],
    )


def token_counts(session: Session, model_id: int, corpus_key: str) -> np.ndarray | None:
    """How often each token occurs in the positions the pass over this corpus went over, or None
    (a pass stored before the counts were)."""
    row = session.execute(
        select(T.ActivationCorpus.id, T.ActivationCorpus.created_at).where(
            T.ActivationCorpus.model_id == model_id, T.ActivationCorpus.corpus == corpus_key
        )
    ).first()
    if row is None:
        return None
    return _remember(
        _token_counts,
        (str(session.get_bind().url), row.id, row.created_at),
        lambda: T.unpack_compressed(session.get(T.ActivationCorpus, row.id).token_counts, "int32"),
    )
