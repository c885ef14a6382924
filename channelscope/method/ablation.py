"""Ablating channels from a neuron vector, and what that does (docs/method.md, "Alpha* and ablation" and
"Selectivity"). Pure: tensors in, tensors and small dataclasses out; no model files, no database.

    w [d]       the neuron's vector on one side        U [d, V]   the run's projection matrix
    c [K, d]    the channels to ablate, in order       scored [V] tokens that z-scores use

Ablating channel k: w' = w - alpha* c_k, alpha* from the paper's grid rule (measures.alpha_star);
several channels apply one after another, each alpha* refitted on the current w'.

Selectivity S (measures.selectivity) always comes with its random-direction baseline: the same
ablation with random directions at each channel's cosine to w and the same alpha*, whose
"tokens" are the |T_k| tokens furthest out on their own dominant tail. S is scale-free in alpha,
so the baseline isolates what the channel's direction does that any direction at that cosine
would not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from channelscope.method import measures, rotate


@dataclass
class Ablation:
    vector: torch.Tensor  # w' [d]
    alphas: list[float]  # alpha* per channel, in the order applied


def ablate(
    w: torch.Tensor,
    channels: torch.Tensor,
    U: torch.Tensor,
    scored: torch.Tensor,
    first_alpha: float | None = None,
) -> Ablation:
    """Subtract the channels [K, d] from w one after another. first_alpha: the worker's stored
    alpha* for channels[0], fitted on the same original w (saves one grid search)."""
    z_c = channels @ U  # [K, V]
    zs_c = rotate.z_scores(z_c, scored)
    current, alphas = w.clone(), []
    for k in range(len(channels)):
        if k == 0 and first_alpha is not None:
            alpha = float(first_alpha)
        else:
            alpha = measures.alpha_star(current @ U, z_c[k], zs_c[k], scored)
        current = current - alpha * channels[k]
        alphas.append(alpha)
    return Ablation(current, alphas)


def targets(masked: list[torch.Tensor], signs: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """T = the union of the ablated channels' claimed tokens (ids [n]) with, per token, the
    tail sign of the first channel that claimed it (the orientation of its expected drop)."""
    seen: dict[int, float] = {}
    for ids, sign in zip(masked, signs, strict=True):
        for token in ids.tolist():
            seen.setdefault(int(token), sign)
    ids = torch.tensor(list(seen), dtype=torch.long)
    return ids, torch.tensor(list(seen.values()), dtype=torch.float32)


def token_positions(ids: torch.Tensor, target_ids: torch.Tensor, target_signs: torch.Tensor):
    """The read sides' target positions: those whose token, or next token, is in T.
    Returns (positions [n], signs [n]), a position's sign from its own token first."""
    size = max(int(ids.max()), int(target_ids.max()) if len(target_ids) else 0) + 1
    sign_of = torch.zeros(size)
    sign_of[target_ids] = target_signs
    own = sign_of[ids]
    following = torch.cat([sign_of[ids[1:]], torch.zeros(1)])
    signs = torch.where(own != 0, own, following)
    positions = torch.nonzero(signs != 0).flatten()
    return positions, signs[positions]


@dataclass
class RandomDraws:
    directions: torch.Tensor  # [R, K, d], |r| = |w|, cos(w, r_k) = cos(w, c_k)
    targets: list[tuple[torch.Tensor, torch.Tensor]]  # per draw: own-tail (ids, signs)


def random_draws(
    w: torch.Tensor,
    channels: torch.Tensor,
    sizes: list[int],
    U: torch.Tensor,
    scored: torch.Tensor,
    draws: int,
    generator: torch.Generator,
) -> RandomDraws:
    """Random directions at the channels' cosines to w; each one's "tokens" are the sizes[k]
    tokens furthest out on its own dominant tail (the sign of its projection's skew)."""
    cosines = rotate.cosine(w.unsqueeze(0), channels).double().cpu()
    directions = torch.stack(
        [measures.random_at_cosines(w.double().cpu(), cosines, generator).to(w) for _ in range(draws)]
    )  # [R, K, d]
    z = directions.reshape(-1, w.shape[0]) @ U  # [R K, V]
    zs = rotate.z_scores(z, scored)
    skews = rotate.tail_skew(z, scored)
    found = []
    for r in range(draws):
        masked, signs = [], []
        for k, size in enumerate(sizes):
            row = r * len(sizes) + k
            sign = measures.tail_sign(float(skews[row]))
            ids, _ = measures.top_tokens(zs[row], scored, sign, k=max(1, size))
            masked.append(ids)
            signs.append(sign)
        found.append(targets(masked, signs))
    return RandomDraws(directions, found)


def apply(w: torch.Tensor, directions: torch.Tensor, alphas: list[float]) -> torch.Tensor:
    """w - sum_k alpha_k d_k for directions [..., K, d] -> [..., d]."""
    return w - torch.einsum("k,...kd->...d", torch.tensor(alphas, dtype=w.dtype), directions)


# --- weight level ----------------------------------------------------------------------------------


@dataclass
class WeightEffect:
    before: torch.Tensor  # [V] w @ U
    after: torch.Tensor  # [V] w' @ U
    selectivity: float  # S of delta = after - before over the scored tokens
    baseline: list[float]  # S of each random draw


def weight_effect(
    w: torch.Tensor,
    ablation: Ablation,
    T: tuple[torch.Tensor, torch.Tensor],
    draws: RandomDraws,
    U: torch.Tensor,
    scored: torch.Tensor,
) -> WeightEffect:
    """The vocabulary projection before and after, and S with its random baseline. Deltas are
    (w' - w) @ U, exactly zero where every alpha* is 0 (S undefined, not rounding noise)."""
    before, after = w @ U, ablation.vector @ U
    s = measures.selectivity((ablation.vector - w) @ U, T[0], T[1], scored)
    random_delta = (apply(w, draws.directions, ablation.alphas) - w) @ U  # [R, V]
    baseline = [
        measures.selectivity(random_delta[r], *draws.targets[r], scored) for r in range(len(random_delta))
    ]
    return WeightEffect(before, after, s, baseline)


def moved_tokens(
    before: torch.Tensor, after: torch.Tensor, scored: torch.Tensor, sign: float = 1.0, count: int = 15
):
    """The tokens that lose and gain most, in z units of the original projection, oriented by
    the ablated channels' tail: on a positive tail (sign +1) a token loses when it falls, on a
    negative one (the neuron pushes its tokens down) when it rises back toward the rest.
    Returns (lose, gain): lists of (token id, z before, z after), largest change first."""
    values = before[scored]
    mean, std = values.mean(), values.std(unbiased=False)
    z_before, z_after = (before - mean) / std, (after - mean) / std
    change = torch.where(scored, sign * (z_after - z_before), torch.zeros_like(before))

    def listed(order: torch.Tensor) -> list[tuple[int, float, float]]:
        return [(int(i), float(z_before[i]), float(z_after[i])) for i in order.tolist()]

    lose = torch.topk(-change, count).indices
    gain = torch.topk(change, count).indices
    return listed(lose[change[lose] < 0]), listed(gain[change[gain] > 0])


# --- in the real model -------------------------------------------------------------------------------


def position_selectivity(delta: torch.Tensor, positions: torch.Tensor, signs: torch.Tensor) -> float:
    """Read sides: S over positions of the change of the neuron's pre-activation delta [P]:
    target positions (token or next token in T) against all other positions."""
    return measures.selectivity(delta, positions, signs, torch.ones_like(delta, dtype=torch.bool))


def logit_selectivity(
    delta: torch.Tensor, target_ids: torch.Tensor, target_signs: torch.Tensor, scored: torch.Tensor
) -> float:
    """Write side: S of the change of next-token logits delta [P, V] at the positions where the
    neuron is active, pooled: every (position, token) pair counts once."""
    positions, vocab = delta.shape
    if positions == 0:
        return float("nan")
    offsets = torch.arange(positions).unsqueeze(-1) * vocab
    return measures.selectivity(
        delta.flatten(),
        (offsets + target_ids).flatten(),
        target_signs.repeat(positions),
        scored.repeat(positions),
    )
