"""The raw vocabulary projection of every vector of a model: the view LM-Debugger gives, for the
whole model in minutes, before any channel is computed (docs/method.md, "Top tokens and
z-scores"). Per vector: |w|, the mean and standard deviation of z_w = w @ U over the scored tokens
(so any token's raw z-score is one dot product away: raw token search), the excess kurtosis and
skew of z_w over all V (as a channel run's neuron record has them), and its top and bottom tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from channelscope.method import measures, rotate
from channelscope.method.decomposer import keep_freed_memory

# Bump when what is computed here changes: stored overviews of another version are recomputed.
OVERVIEW_VERSION = 1
TOKENS = measures.TOP_K  # top and bottom tokens kept per vector
CHUNK = 256  # vectors per product: a [256, V] fp32 projection is 50 MB on SmolLM2


@dataclass
class LayerOverview:
    layer: int
    side: str
    vectors: np.ndarray  # float16 [d_mlp, d]
    stats: np.ndarray  # float32 [len(OVERVIEW_STATS), d_mlp]: norm, mean, std, kurtosis, skew
    top_ids: np.ndarray  # int32 [d_mlp, TOKENS], highest z first
    top_z: np.ndarray  # float32 [d_mlp, TOKENS]
    bottom_ids: np.ndarray  # int32 [d_mlp, TOKENS], lowest z first
    bottom_z: np.ndarray  # float32 [d_mlp, TOKENS]


def layer_overview(
    layer: int, side: str, W: torch.Tensor, U: torch.Tensor, scored: torch.Tensor, chunk: int = CHUNK
) -> LayerOverview:
    """W [d_mlp, d] and U [d, V] in float32 on one device; scored [V] bool. Exact fp32 products,
    in chunks of vectors so that one [chunk, V] projection is alive at a time. The top tokens are
    those of measures.top_tokens on rotate.z_scores, found on z itself (a z-score is increasing in
    z within a row), which saves two passes over [chunk, V]."""
    stats, tops, bottoms = [], [], []
    for start in range(0, W.shape[0], chunk):
        w = W[start : start + chunk]  # [n, d]
        z = w @ U  # [n, V]
        values = z[:, scored]  # [n, S]
        mean, std = values.mean(-1, keepdim=True), values.std(-1, unbiased=False, keepdim=True)
        stats.append(
            torch.stack(
                [w.norm(dim=-1), mean[:, 0], std[:, 0], rotate.excess_kurtosis(z), rotate.skewness(z)]
            )
        )
        high, high_ids = torch.topk(values, TOKENS)  # [n, K] among the scored tokens
        low, low_ids = torch.topk(values, TOKENS, largest=False)
        ids = torch.nonzero(scored).flatten()  # scored position -> token id
        tops.append((ids[high_ids], (high - mean) / std))
        bottoms.append((ids[low_ids], (low - mean) / std))
    return LayerOverview(
        layer=layer,
        side=side,
        vectors=W.cpu().numpy().astype(np.float16),
        stats=torch.cat(stats, 1).cpu().numpy().astype(np.float32),
        top_ids=torch.cat([ids for ids, _ in tops]).cpu().numpy().astype(np.int32),
        top_z=torch.cat([z for _, z in tops]).cpu().numpy().astype(np.float32),
        bottom_ids=torch.cat([ids for ids, _ in bottoms]).cpu().numpy().astype(np.int32),
        bottom_z=torch.cat([z for _, z in bottoms]).cpu().numpy().astype(np.float32),
    )


def model_overview(
    model, parts: list[tuple[int, str]], device: torch.device, on_part: Callable[[LayerOverview], None]
) -> None:
    """Every (layer, side) of `parts`, one after another, each handed to on_part as it is done
    (so a caller can store it and a killed process resumes where it stopped)."""
    keep_freed_memory()  # [256, V] temporaries, page-faulted in afresh every chunk otherwise
    U = model.projection().to(device)
    scored = rotate.initial_token_weights(U, model.vocabulary.kinds, rotate.Settings()) == 1
    for layer, side in parts:
        on_part(layer_overview(layer, side, model.vectors(layer, side).to(device), U, scored))


def raw_z(
    vectors: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, columns: torch.Tensor
) -> torch.Tensor:
    """Every vector's raw z-score of some tokens: (w . U[:, t] - mean) / std. vectors [n, d] in
    float16 (torch's half product takes ~5 ms for all 138,240 of SmolLM2 on a CPU, numpy's 60x
    longer, and reads the 160 MB once for all the tokens), columns [d, k] = U[:, tokens]; exact up
    to the float16 storage. -> [n, k] float32"""
    return ((vectors @ columns.to(vectors.dtype)).float() - mean.unsqueeze(-1)) / std.unsqueeze(-1)
