"""The random-vector reference of a model and run settings (docs/method.md, "Generic channels").

Random vectors get first channels as sparse as real neurons do, so a channel's numbers only
mean something against what random vectors get under the same settings. The reference holds,
per channel index, the faithfulness that random vectors' channels reach; the generic
directions of U that those channels converge to; and the tokens on the tails of many of them
(for the optional up-front down-weighting). Computed once, kept under data/ and in the store.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from channelscope.method import measures, rotate

# A direction is generic when channels of this share of the random vectors converge to it
# (the "incinnati" direction of SmolLM2 caught 8 of 32).
GENERIC_SHARE = 0.06
# Tokens claimed by the first channels of more than this share of the random vectors (34 tokens
# on SmolLM2 in one reading; 24 here, the "incinnati" fragments) are the ones `downweight_generic`
# down-weights. First channels only: counted over all C channels, no token reaches a quarter once
# C > 4 (a vector's channels claim disjoint tokens), and per vector the set grows to hundreds of
# punctuation and byte tokens by C = 10.
TAIL_SHARE = 0.25
# Part of the cache key: bump when the reference's computation changes.
REFERENCE_VERSION = 7  # 4: the centred loss (rotate.py); 5: keeps the channel vectors; 6: the fused step;
# 7: batch-invariant CPU products (rotate.Projection)


@dataclass
class Reference:
    faithfulness: np.ndarray  # [R, C] faithfulness of random vectors' channels
    kurtosis: np.ndarray  # [R, C]
    generic: torch.Tensor  # [G, d] generic directions (unit)
    tail_tokens: list[int]  # tokens claimed by > TAIL_SHARE of the random vectors' first channels
    # [R * C, d] every channel of the random vectors, unit, vector by vector: sparse directions of
    # U that nothing in particular put there, the pool of measures.faithfulness_at_cosines.
    channels: torch.Tensor

    def percentile(self, index: int, value: float) -> float:
        return measures.percentile(value, self.faithfulness[:, min(index, self.faithfulness.shape[1] - 1)])


def reference_key(
    settings: rotate.Settings, model_sha256: str, projection: str, count: int, seed: int
) -> str:
    """Everything the reference's numbers depend on (the channel count C too)."""
    blob = json.dumps(
        [asdict(settings), model_sha256, projection, count, seed, REFERENCE_VERSION], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def random_unit_vectors(count: int, d: int, seed: int) -> torch.Tensor:
    """The reference's random vectors [count, d], unit, on the CPU: the same for a seed on any
    machine, so the neuron score's scale can be rebuilt from a stored reference."""
    vectors = torch.randn(count, d, generator=torch.Generator().manual_seed(seed))
    return vectors / vectors.norm(dim=-1, keepdim=True)


def min_owners(count: int) -> int:
    """How many of `count` random vectors must converge to a direction for it to be generic."""
    return max(3, math.ceil(GENERIC_SHARE * count))


def compute_reference(
    proj: rotate.Projection,
    m0: torch.Tensor,
    settings: rotate.Settings,
    count: int = 64,
    seed: int = 0,
    on_channel=None,
) -> Reference:
    """Decompose `count` random unit vectors with the run's settings. Every measure is
    scale-invariant, so unit vectors stand for "random vectors of the same norm"."""
    vectors = random_unit_vectors(count, proj.exact.shape[0], seed).to(proj.exact.device)
    seeds = [rotate.neuron_seed(seed, -1, "random", i) for i in range(count)]
    channels = rotate.decompose(vectors, proj, m0, seeds, settings, on_channel=on_channel)

    scored = m0 == 1
    own_zs = rotate.z_scores(proj.forward(vectors, exact=True), scored)
    faith = np.zeros((count, settings.channels))
    kurt = np.zeros((count, settings.channels))
    residuals, owners, units = [], [], []
    claimed_by = torch.zeros(len(m0), dtype=torch.long)
    for r, found in enumerate(channels):
        vecs = torch.stack([ch.vector for ch in found]).to(vectors.device)
        zs = rotate.z_scores(proj.forward(vecs, exact=True), scored)
        for k, ch in enumerate(found):
            sign = measures.tail_sign(ch.skew)
            top, _ = measures.top_tokens(zs[k], scored, sign)
            faith[r, k] = float(measures.faithfulness(own_zs[r], top, sign))
            kurt[r, k] = ch.kurtosis
        residuals.append(measures.residual_directions(vectors[r], vecs).cpu())
        units.append((vecs / vecs.norm(dim=-1, keepdim=True)).cpu())
        owners += [r] * len(found)
        claimed_by[found[0].masked] += 1
    generic = measures.generic_directions(
        torch.cat(residuals), torch.tensor(owners), min_owners=min_owners(count)
    )
    tail_tokens = torch.nonzero(claimed_by > TAIL_SHARE * count).flatten().tolist()
    return Reference(faith, kurt, generic, tail_tokens, torch.cat(units))


def held_out_best(reference: Reference, vectors: torch.Tensor) -> np.ndarray:
    """[R] each random vector's best_percentile with itself held out: its channels' percentiles
    among the other vectors' channels only, its generic flags from the directions that the other
    vectors converge to. A real neuron is scored against a reference it is not part of; scoring
    a reference vector against one that contains it would flatter it (its own channels set the
    generic directions it is then exempted from). vectors: random_unit_vectors(R, d, seed)."""
    count, per = reference.faithfulness.shape  # [R, C]
    units = reference.channels.reshape(count, per, -1).double()  # [R, C, d]
    vectors = vectors.double().cpu()
    residuals = torch.cat(
        [measures.residual_directions(vectors[r], units[r]) for r in range(count)]
    )  # [R*C, d]
    owners = torch.arange(count).repeat_interleave(per)  # [R*C]
    best = np.zeros(count)
    for r in range(count):
        others = owners != r
        directions = measures.generic_directions(residuals[others], owners[others], min_owners(count))
        flags = measures.generic_flags(residuals[~others], directions).tolist()
        rest = np.delete(reference.faithfulness, r, axis=0)  # [R-1, C]
        percentiles = [measures.percentile(reference.faithfulness[r, k], rest[:, k]) for k in range(per)]
        best[r] = measures.best_percentile(percentiles, flags)
    return best


def downweighted(m0: torch.Tensor, reference: Reference, settings: rotate.Settings) -> torch.Tensor:
    """m0 with the reference's tail tokens down-weighted to the mask weight (the option)."""
    m = m0.clone()
    ids = torch.tensor(reference.tail_tokens, dtype=torch.long, device=m.device)
    m[ids] = torch.clamp(m[ids], max=settings.mask_weight)
    return m


def save(reference: Reference, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "faithfulness": reference.faithfulness,
            "kurtosis": reference.kurtosis,
            "generic": reference.generic,
            "tail_tokens": reference.tail_tokens,
            "channels": reference.channels,
        },
        tmp,
    )
    tmp.replace(path)  # atomic: a killed process never leaves half a file


def load(path: Path) -> Reference | None:
    if not path.exists():
        return None
    blob = torch.load(path, weights_only=False)
    return Reference(
        blob["faithfulness"], blob["kurtosis"], blob["generic"], blob["tail_tokens"], blob["channels"]
    )
