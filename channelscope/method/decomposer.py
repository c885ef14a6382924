"""From a model and run settings to finished neuron records: channels, top tokens and measures.

The one path that both `channelscope rotate` and the decompose worker take, so a neuron's
numbers are the same wherever they were computed.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from channelscope.core.config import config
from channelscope.method import measures, precision, reference, rotate
from channelscope.method.weights import Model

TOP_K = measures.TOP_K


@dataclass
class ChannelRecord:
    index: int  # discovery order, from 0
    vector: np.ndarray  # [d] float32
    kurtosis: float
    skew: float
    cos: float
    loss: float
    masked: np.ndarray  # token ids the channel claimed (T_k)
    step: int
    history: list[float]
    alpha: float  # the paper's subtraction rule, fitted on the original w
    faithfulness: float
    faithfulness_percentile: float  # against random vectors' channels (the reference)
    percentile_local: float  # against random directions at the same cosine to w
    generic: bool
    top_ids: np.ndarray  # [TOP_K] on the dominant tail
    top_z: np.ndarray


@dataclass
class NeuronRecord:
    layer: int
    side: str
    neuron: int
    vector: np.ndarray  # [d] float32
    norm: float
    kurtosis: float
    skew: float
    top_ids: np.ndarray  # highest z (positive tail)
    top_z: np.ndarray
    bottom_ids: np.ndarray  # lowest z (negative tail)
    bottom_z: np.ndarray
    reconstruction: list[float]  # |P_k w| / |w|, k = 1..C
    reconstruction_baseline: list[float]  # the same for random vectors at the channels' cosines
    coverage: list[float]  # share of sum(z_w^2) on tokens claimed by channels 1..k
    channels: list[ChannelRecord]
    best_percentile: float  # measures.best_percentile of the channels
    score: float  # measures.neuron_score: 50 = as good as a random vector


def keep_freed_memory() -> None:
    """Keep freed memory in the heap instead of handing it back to the OS.

    glibc serves the solver's [N, V] temporaries (tens of MB) with mmap and unmaps them on free,
    so every new one is page-faulted in again: elementwise work ran 4x slower for it (measured on
    a 2-core CPU: 175 ms -> 41 ms for the kurtosis gradient of 256 x 49,152). Once per process;
    a no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 2**30)  # M_MMAP_THRESHOLD: serve allocations up to 1 GiB from the heap
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never trim the heap back


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_batch_size(device: torch.device) -> int:
    """Neurons per solver batch. On CUDA every batch is padded to this many rows (rotate.py,
    "Determinism"), so it is also what a GPU run's shards should hold."""
    return 1024 if device.type == "cuda" else 256


class Decomposer:
    """A model's projection, token weights and random-vector reference, ready to decompose."""

    def __init__(
        self,
        model: Model,
        settings: rotate.Settings,
        *,
        projection: str = "unembedding",
        device: str = "auto",
        cache_dir: Path | None = None,
        reference_count: int = 64,
        seed: int = 0,
        batch_size: int | None = None,
        progress=None,
    ):
        keep_freed_memory()
        self.device = pick_device(device)
        if settings.precision == "auto":  # a run resolves it before (worker/plan.py); else the machine does
            settings = replace(settings, precision=precision.choose(self.device, config().data_dir).precision)
        self.model, self.settings, self.seed = model, settings, seed
        self.batch_size = batch_size or default_batch_size(self.device)
        U = model.projection(projection).to(self.device)
        self.proj = rotate.Projection(U, settings.precision)
        self.m0 = rotate.initial_token_weights(U, model.vocabulary.kinds, settings)
        self.reference_key = reference.reference_key(
            settings, model.sha256, projection, reference_count, seed
        )
        self.reference, self.m0 = self._reference(projection, reference_count, cache_dir, progress)
        self.scored = self.m0 == 1
        # Shared by every neuron: its random directions at each channel's cosine are made from it.
        # (U itself, not self.proj: this product is no pass of the solver's.)
        self.directions = measures.direction_pool(
            self.reference.channels, lambda x: (x.to(self.device) @ self.proj.exact).cpu()
        )
        # The neuron score's scale: the reference's own vectors, each held out of it.
        self.score_scale = reference.held_out_best(
            self.reference, reference.random_unit_vectors(reference_count, model.d_model, seed)
        )

    def _reference(self, projection, count, cache_dir, progress):
        settings, m0 = self.settings, self.m0
        if settings.downweight_generic:  # needs the tail tokens of the plain reference first
            base = replace(settings, downweight_generic=False)
            plain = Decomposer(
                self.model,
                base,
                projection=projection,
                device=str(self.device),
                cache_dir=cache_dir,
                reference_count=count,
                seed=self.seed,
                progress=progress,
            )
            m0 = reference.downweighted(m0, plain.reference, settings)
        path = cache_dir / f"{self.model.name}-{self.reference_key}.pt" if cache_dir else None
        found = reference.load(path) if path else None
        self.reference_cached = found is not None  # a report's wall time says whether it computed one
        if found is None:
            on_channel = progress(count * settings.channels, "random-vector reference") if progress else None
            found = reference.compute_reference(self.proj, m0, settings, count, self.seed, on_channel)
            if path:
                reference.save(found, path)
        return found, m0

    def neurons(self, layer: int, side: str, ids: list[int], on_channel=None) -> list[NeuronRecord]:
        return self.anywhere([(layer, side, i) for i in ids], on_channel)

    def anywhere(self, coords: list[tuple[int, str, int]], on_channel=None) -> list[NeuronRecord]:
        """Neurons from any layers and sides, (layer, side, neuron) each, in shared batches: a
        neuron's channels do not depend on its batch-mates, and a sample scattered over the
        model would otherwise run in batches of one."""
        parts = dict.fromkeys((layer, side) for layer, side, _ in coords)
        matrices = {part: self.model.vectors(*part) for part in parts}
        w = torch.stack([matrices[layer, side][i] for layer, side, i in coords])
        return self.vectors(w, coords, on_channel)

    def vectors(
        self, w: torch.Tensor, coords: list[tuple[int, str, int]], on_channel=None
    ) -> list[NeuronRecord]:
        """Any vectors w [n, d], each named by its (layer, side, index), which also seeds it: a
        model's neurons, or random vectors held out of the reference (layer -1, side "random")."""
        w = w.to(self.device)
        seeds = [rotate.neuron_seed(self.seed, layer, side, i) for layer, side, i in coords]
        measured = _Measured(self, w)
        found = rotate.decompose(
            w, self.proj, self.m0, seeds, self.settings, self.batch_size, on_channel, on_projection=measured
        )
        return [
            self._record(layer, side, i, w[n], found[n], seeds[n], measured.of(n))
            for n, (layer, side, i) in enumerate(coords)
        ]

    def _record(self, layer, side, neuron, w, channels, seed, measured: dict) -> NeuronRecord:
        vectors = torch.stack([ch.vector for ch in channels]).to(self.device)
        generic = measures.generic_flags(
            measures.residual_directions(w, vectors).cpu(), self.reference.generic
        )
        cosines = torch.tensor([ch.cos for ch in channels], dtype=torch.float64)
        at_cosines = measures.faithfulness_at_cosines(
            w.cpu(),
            measured["z_w"].cpu(),
            measured["zs_w"].cpu(),
            cosines,
            self.directions,
            self.scored.cpu(),
        )  # [C, R]
        records = []
        for k, ch in enumerate(channels):
            faith = float(measured["faithfulness"][k])
            records.append(
                ChannelRecord(
                    index=k,
                    vector=ch.vector.numpy(),
                    kurtosis=ch.kurtosis,
                    skew=ch.skew,
                    cos=ch.cos,
                    loss=ch.loss,
                    masked=ch.masked.numpy().astype(np.int32),
                    step=ch.step,
                    history=ch.history,
                    alpha=float(measured["alpha"][k]),
                    faithfulness=faith,
                    faithfulness_percentile=self.reference.percentile(k, faith),
                    percentile_local=measures.percentile(faith, at_cosines[k].numpy()),
                    generic=bool(generic[k]),
                    top_ids=_ints(measured["top_ids"][k]),
                    top_z=_floats(measured["top_z"][k]),
                )
            )
        best = measures.best_percentile(
            [r.faithfulness_percentile for r in records], [r.generic for r in records]
        )
        generator = torch.Generator().manual_seed(seed)
        w_cpu = w.cpu().double()
        baseline = measures.random_at_cosines(w_cpu, cosines, generator)
        return NeuronRecord(
            layer=layer,
            side=side,
            neuron=neuron,
            vector=w.cpu().numpy().astype(np.float32),
            norm=float(w.norm()),
            kurtosis=float(measured["kurtosis"]),
            skew=float(measured["skew"]),
            top_ids=_ints(measured["top"][0]),
            top_z=_floats(measured["top"][1]),
            bottom_ids=_ints(measured["bottom"][0]),
            bottom_z=_floats(measured["bottom"][1]),
            reconstruction=measures.reconstruction(w_cpu, vectors.cpu().double()),
            reconstruction_baseline=measures.reconstruction(w_cpu, baseline),
            coverage=[float(x) for x in measured["coverage"]],
            channels=records,
            best_percentile=best,
            score=measures.neuron_score(best, self.score_scale),
        )


class _Measured:
    """The measures of every channel from the projection z the solver's batch made of it
    (rotate.decompose's on_projection), batched over neurons: no pass over U but the neurons'
    own w @ U, one per batch ("Measures from the solver's projections")."""

    def __init__(self, decomposer: Decomposer, w: torch.Tensor):
        self.proj, self.scored, self.w = decomposer.proj, decomposer.scored, w
        self.rows: dict[int, dict] = {}
        self.batch: dict = {}

    def __call__(self, start: int, k: int, z: torch.Tensor, claimed: torch.Tensor) -> None:
        n, scored = z.shape[0], self.scored
        if k == 0:  # a new batch: the neurons' own projections, [n, V]
            z_w = self.proj.forward(self.w[start : start + n], exact=True)
            zs_w = rotate.z_scores(z_w, scored)
            mass = torch.where(scored, zs_w.pow(2), torch.zeros_like(zs_w))
            self.batch = {"z_w": z_w, "zs_w": zs_w, "mass": mass, "covered": torch.zeros_like(claimed)}
            top, bottom = measures.top_tokens(zs_w, scored, 1.0), measures.top_tokens(zs_w, scored, -1.0)
            kurt, skew = rotate.excess_kurtosis(z_w), rotate.skewness(z_w)
            for i in range(n):
                self.rows[start + i] = {
                    "z_w": z_w[i],  # [V] for the baseline at each channel's cosine (_record)
                    "zs_w": zs_w[i],
                    "kurtosis": kurt[i],
                    "skew": skew[i],
                    "top": (top[0][i], top[1][i]),
                    "bottom": (bottom[0][i], bottom[1][i]),
                    **{key: [] for key in ("top_ids", "top_z", "faithfulness", "alpha", "coverage")},
                }
        b = self.batch
        zs = rotate.z_scores(z, scored)  # [n, V]
        sign = torch.where(rotate.tail_skew(z, scored) >= 0, 1.0, -1.0).unsqueeze(-1)  # [n, 1]
        top, top_z = measures.top_tokens(zs, scored, sign)  # [n, TOP_K] each
        faith = measures.faithfulness(b["zs_w"], top, sign)  # [n]
        alpha = measures.alpha_stars(b["z_w"], z, zs, scored)  # [n]
        b["covered"] |= claimed
        coverage = (b["mass"] * b["covered"]).sum(-1) / b["mass"].sum(-1)  # [n]
        for i in range(n):
            row = self.rows[start + i]
            for key, value in (("top_ids", top), ("top_z", top_z), ("faithfulness", faith),
                               ("alpha", alpha), ("coverage", coverage)):  # fmt: skip
                row[key].append(value[i])

    def of(self, n: int) -> dict:
        return self.rows.pop(n)


def _ints(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy().astype(np.int32)


def _floats(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy().astype(np.float32)
