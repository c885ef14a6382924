"""The measures of docs/method.md, each with its random baseline. Pure functions on tensors.

Every measure here is scale-invariant in the neuron vector w, so "random vectors of the same
norm" and random unit vectors give the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from channelscope.method import rotate

TOP_K = 20  # tokens per channel in top lists, faithfulness and the token index
# Stored with each neuron side: 1 = the isotropic percentile only; 2 = with the percentile
# against random directions at the same cosine to w; 3 = with the calibrated neuron score. Not
# part of the run's hash: a backfill (worker/remeasure.py) brings old runs up to date without
# recomputing channels.
MEASURES_VERSION = 3


def top_tokens(zs: torch.Tensor, scored: torch.Tensor, sign: float, k: int = TOP_K):
    """The k tokens furthest out on one tail of z-scores zs [V], scored tokens only.
    Returns (ids [k], z [k]) with z as signed z-scores."""
    oriented = torch.where(scored, zs * sign, torch.tensor(float("-inf"), device=zs.device))
    values, ids = torch.topk(oriented, min(k, int(scored.sum())))
    return ids, values * sign


def tail_sign(skew: float) -> float:
    """A channel's tokens are on its dominant tail, the sign of its skew."""
    return 1.0 if skew >= 0 else -1.0


def faithfulness(neuron_zs: torch.Tensor, channel_top: torch.Tensor, sign) -> torch.Tensor:
    """Mean z-score, in the neuron's own projection w @ U, of the channel's top tokens, oriented
    by the channel's skew (docs/method.md, "Faithfulness and its percentile"). Generic channels score ~0.7 on
    SmolLM2, real ones ~2.2. Batched: neuron_zs [..., V], channel_top [..., k], sign a number or
    [..., 1]; returns [...]."""
    return (torch.gather(neuron_zs, -1, channel_top) * sign).mean(-1)


def percentile(value: float, reference: np.ndarray) -> float:
    """Share (0-100) of the reference below value, ties counted half."""
    reference = np.asarray(reference, dtype=np.float64)
    reference = reference[np.isfinite(reference)]
    if reference.size == 0 or not np.isfinite(value):
        return float("nan")
    below, ties = np.sum(reference < value), np.sum(reference == value)
    return float(100.0 * (below + 0.5 * ties) / reference.size)


def best_percentile(percentiles, generic) -> float:
    """A neuron's best channel: the largest faithfulness percentile (against the reference) over
    its non-generic channels; 0 when every channel is generic."""
    return max(
        (float(p) for p, g in zip(percentiles, generic, strict=True) if not g and np.isfinite(p)), default=0.0
    )


def neuron_score(best: float, scale: np.ndarray) -> float:
    """The calibrated neuron score (docs/method.md, "Neuron score"): the percentile of a neuron's
    best_percentile among the same statistic of held-out random vectors (reference.held_out_best).
    A maximum over C channels is high for random vectors too (median ~87 at C = 5); on this
    scale a random vector's neuron scores ~50 whatever C is."""
    return percentile(best, scale)


# --- reconstruction ------------------------------------------------------------------------------


def reconstruction(w: torch.Tensor, channels: torch.Tensor) -> list[float]:
    """|P_k w| / |w| for k = 1..C, P_k the projection onto span(c_1..c_k). w [d], channels [C, d]."""
    q, _ = torch.linalg.qr(channels.double().T)  # [d, C], columns span c_1..c_k in order
    coords = q.T @ w.double()
    return (coords.pow(2).cumsum(0).sqrt() / w.double().norm()).tolist()


def random_at_cosines(w: torch.Tensor, cosines: torch.Tensor, generator: torch.Generator):
    """Random vectors with |c| = |w| at the given cosines to w: cos w^ + sin xi, xi a random unit
    vector orthogonal to w. [C, d]"""
    w_hat = w / w.norm()
    xi = torch.randn(len(cosines), w.shape[0], generator=generator, dtype=w.dtype)
    xi = xi - (xi @ w_hat).unsqueeze(-1) * w_hat
    xi = xi / xi.norm(dim=-1, keepdim=True)
    cos = cosines.to(w.dtype).unsqueeze(-1)
    return w.norm() * (cos * w_hat + (1 - cos.pow(2)).clamp_min(0).sqrt() * xi)


# --- faithfulness against random directions at the same cosine to this w ----------------------------


@dataclass(frozen=True)
class DirectionPool:
    """Directions r_i and their projections, made once per decomposer: every neuron's random
    directions at a channel's cosine are built from these and w (docs/method.md, "Faithfulness
    against directions at the same cosine"), so a neuron costs no products of its own. The pool
    is the reference's channels: sparse directions of U, as channels are, that no neuron put there."""

    directions: torch.Tensor  # [R, d] float64, any norms
    projected: torch.Tensor  # [R, V] directions @ U, float32


def direction_pool(directions: torch.Tensor, project) -> DirectionPool:
    """project: [n, d] -> [n, V], the exact projection of the run."""
    directions = directions.double().cpu()
    return DirectionPool(directions, project(directions.float()).float().cpu())


def pool_at_cosine(
    w: torch.Tensor,  # [d]
    z_w: torch.Tensor,  # [V] w @ U
    cosine: float,
    pool: DirectionPool,
    rows: torch.Tensor | None = None,  # which of the pool's directions; all by default
) -> torch.Tensor:
    """[R, V] the projections d_i @ U of the unit directions d_i = c w^ + sqrt(1 - c^2) r_i, r_i
    the pool's i-th direction made orthogonal to w and unit, without a product of their own."""
    w = w.double().cpu()
    norm = w.norm()
    w_hat_u = (z_w.double().cpu() / norm).float()  # [V] w^ @ U (the projection is linear)
    dots = pool.directions @ (w / norm)  # [R] r_i . w^
    lengths = (
        (pool.directions.pow(2).sum(-1) - dots.pow(2)).clamp_min(1e-24).sqrt()
    )  # [R] |r_i - (r_i.w^) w^|
    projected = pool.projected
    if rows is not None:
        dots, lengths, projected = dots[rows], lengths[rows], projected[rows]
    s = math.sqrt(max(0.0, 1.0 - cosine * cosine))
    # d_i @ U = c w^U + s (r_i U - (r_i.w^) w^U) / |...|: a combination of the two projections.
    a = (cosine - s * dots / lengths).float().unsqueeze(-1)  # [R, 1]
    b = (s / lengths).float().unsqueeze(-1)  # [R, 1]
    return a * w_hat_u + b * projected


def faithfulness_at_cosines(
    w: torch.Tensor,  # [d]
    z_w: torch.Tensor,  # [V] w @ U
    zs_w: torch.Tensor,  # [V] its z-scores over the scored tokens
    cosines: torch.Tensor,  # [C] each channel's cos(w, c)
    pool: DirectionPool,
    scored: torch.Tensor,  # [V] bool
) -> torch.Tensor:
    """[C, R] the faithfulness of directions d_i = c w^ + sqrt(1 - c^2) r_i, r_i the pool's i-th
    direction made orthogonal to w and unit, one row per channel's cosine c: measured exactly as a
    channel's (top 20 tokens on d's own dominant tail, their mean oriented z in w's projection).
    A channel's percentile among its row asks whether its tokens lie further out on w than a
    sparse direction of U that happened to sit as close to w would put its own."""
    out = torch.empty(len(cosines), pool.directions.shape[0], dtype=torch.float64)
    for k, c in enumerate(cosines.double().cpu().clamp(-1.0, 1.0).tolist()):
        top, sign = tokens_at_cosine(w, z_w, c, pool, scored)
        out[k] = (zs_w.cpu().double()[top] * sign.double().unsqueeze(-1)).mean(-1)
    return out


def tokens_at_cosine(
    w: torch.Tensor, z_w: torch.Tensor, cosine: float, pool: DirectionPool, scored: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top tokens of the pool's directions at `cosine` to w, each taken as a channel's are
    (TOP_K on its own dominant tail, scored tokens only): (ids [R, K], tail sign [R])."""
    z = pool_at_cosine(w, z_w, cosine, pool)  # [R, V]
    zs = rotate.z_scores(z, scored)
    sign = torch.where(rotate.tail_skew(z, scored) >= 0, 1.0, -1.0)  # [R]
    oriented = torch.where(scored, zs * sign.unsqueeze(-1), torch.tensor(float("-inf")))
    return torch.topk(oriented, min(TOP_K, int(scored.sum())), dim=-1).indices, sign


def vocabulary_coverage(neuron_zs: torch.Tensor, scored: torch.Tensor, masked: list[torch.Tensor]):
    """Share of the neuron's vocabulary mass sum(z_w^2) on tokens some channel claimed, after
    1..C channels (over scored tokens)."""
    mass = torch.where(scored, neuron_zs.pow(2), torch.zeros_like(neuron_zs))
    covered = torch.zeros_like(scored)
    curve = []
    for ids in masked:
        covered[ids] = True
        curve.append(float(mass[covered].sum() / mass.sum()))
    return curve


def claimed_union_sizes(masked: list[torch.Tensor]) -> list[int]:
    """|T_1 ∪ ... ∪ T_k| for k = 1..C: how many tokens coverage[k] counts."""
    union: set[int] = set()
    sizes = []
    for ids in masked:
        union.update(ids.tolist())
        sizes.append(len(union))
    return sizes


def coverage_of_directions(
    neuron_zs: torch.Tensor,  # [V] z-scores of w @ U over the scored tokens
    scored: torch.Tensor,  # [V] bool
    directions_z: torch.Tensor,  # [C, V] projections of C directions, in channel order
    sizes: list[int],  # [C] the channels' union sizes, claimed_union_sizes
) -> list[float]:
    """The coverage curve that token sets of the channels' sizes would get if direction k claimed
    channel k's tokens (docs/method.md, "Reconstruction and coverage"): direction k adds, to the
    union so far, as many new tokens as channel k did, the scored ones furthest out on its own
    dominant tail among those not yet claimed (a claimed token is masked for the next channel).
    The union after k has exactly sizes[k] tokens, so the curve differs from the channels' only
    by which tokens they are."""
    mass = torch.where(scored, neuron_zs.pow(2), torch.zeros_like(neuron_zs))
    zs = rotate.z_scores(directions_z, scored)  # [C, V]
    signs = torch.where(rotate.tail_skew(directions_z, scored) >= 0, 1.0, -1.0)  # [C]
    taken = torch.zeros_like(scored)
    curve = []
    for k, size in enumerate(sizes):
        wanted = size - int(taken.sum())
        if wanted > 0:
            oriented = torch.where(scored & ~taken, zs[k] * signs[k], torch.tensor(float("-inf")))
            taken[torch.topk(oriented, wanted).indices] = True
        curve.append(float(mass[taken].sum() / mass.sum()))
    return curve


# --- ablation and selectivity ----------------------------------------------------------------------


def alpha_star(
    neuron_z: torch.Tensor,
    channel_z: torch.Tensor,
    channel_zs: torch.Tensor,
    scored: torch.Tensor,
    grid: int = 1000,
) -> float:
    """The paper's subtraction rule for w' = w - alpha c: alpha in [0, 1] on a grid of `grid`
    values minimising kurt(r) + 5 * mean(|r| over c's tokens with |z| >= 7), r = w' @ U, and 0 if
    no alpha lowers the kurtosis. Raw projections neuron_z, channel_z [V]; channel z-scores
    channel_zs [V]; measured over the scored tokens."""
    return float(alpha_stars(neuron_z[None], channel_z[None], channel_zs[None], scored, grid)[0])


def alpha_stars(neuron_z, channel_z, channel_zs, scored: torch.Tensor, grid: int = 1000) -> torch.Tensor:
    """alpha_star for n pairs at once: neuron_z, channel_z, channel_zs [n, V] -> [n]."""
    alphas = torch.linspace(0, 1, grid, dtype=torch.float64, device=neuron_z.device)  # [grid]
    a, b = neuron_z[:, scored].double(), channel_z[:, scored].double()  # [n, S]
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    # r - mean(r) = a - alpha b, so its moments are polynomials in alpha: eight sums over the
    # vocabulary instead of a [grid, V] matrix (which was a third of the worker's time).
    e = {
        (i, j): (a**i * b**j).mean(-1, keepdim=True)  # [n, 1]
        for i, j in [(2, 0), (1, 1), (0, 2), (4, 0), (3, 1), (2, 2), (1, 3), (0, 4)]
    }
    m2 = e[2, 0] - 2 * alphas * e[1, 1] + alphas**2 * e[0, 2]  # [n, grid]
    m4 = (e[4, 0] - 4 * alphas * e[3, 1] + 6 * alphas**2 * e[2, 2] - 4 * alphas**3 * e[1, 3]
          + alphas**4 * e[0, 4])  # fmt: skip
    kurt = m4 / m2**2 - 3  # [n, grid]
    strong = (channel_zs.abs() >= 7) & scored  # [n, V]
    chosen = torch.zeros(len(kurt), dtype=torch.float64, device=kurt.device)
    for row in range(len(kurt)):  # a few dozen strong tokens a row: [grid, strong] each
        if not (kurt[row, 1:] < kurt[row, 0]).any():
            continue
        r = neuron_z[row, strong[row]].double() - alphas.unsqueeze(-1) * channel_z[row, strong[row]].double()
        penalty = r.abs().mean(-1) if strong[row].any() else torch.zeros_like(kurt[row])
        chosen[row] = alphas[torch.argmin(kurt[row] + 5 * penalty)]
    return chosen


def selectivity(
    delta: torch.Tensor, targets: torch.Tensor, sign: torch.Tensor | float, among: torch.Tensor
) -> float:
    """S = mean over targets of the oriented drop (-sign * delta) / mean over the other tokens of
    |delta| (docs/method.md, "Selectivity"). delta [V]; targets: ids; sign: the skew sign(s) of the
    channel(s) that claimed them; among: bool [V], the tokens to compare (scored ones)."""
    if len(targets) == 0:
        return float("nan")
    is_target = torch.zeros_like(among)
    is_target[targets] = True
    drop = (-torch.as_tensor(sign, dtype=delta.dtype) * delta[targets]).mean()
    others = delta[among & ~is_target].abs().mean()
    return float(drop / others) if others > 0 else float("nan")


# --- seed consistency ------------------------------------------------------------------------------


def residual_directions(w: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The part of each channel orthogonal to w, unit length: c - (c.w^) w^. [C, d]"""
    w_hat = w / w.norm()
    part = channels - (channels @ w_hat).unsqueeze(-1) * w_hat
    return part / part.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def matched_cosines(a: torch.Tensor, b: torch.Tensor):
    """One-to-one matching (Hungarian on |cos|) of two sets of unit vectors; returns the matched
    pairs' index arrays and their |cos|."""
    cos = (a @ b.T).abs().numpy()
    rows, cols = linear_sum_assignment(-cos)
    return rows, cols, cos[rows, cols]


def seed_consistency(w, channels_a, channels_b, top_a: list[set], top_b: list[set]):
    """Mean matched |cos| of the residual parts, and the mean Jaccard overlap of the matched
    channels' top tokens."""
    rows, cols, cos = matched_cosines(residual_directions(w, channels_a), residual_directions(w, channels_b))
    jaccard = [
        len(top_a[i] & top_b[j]) / max(1, len(top_a[i] | top_b[j])) for i, j in zip(rows, cols, strict=True)
    ]
    return float(np.mean(cos)), float(np.mean(jaccard))


def consistency_between(w_a, channels_a, w_b, channels_b) -> float:
    """The seed-consistency matching between the channels of two different neurons (each
    channel's part orthogonal to its own w): what "consistent" reaches with no shared cause."""
    return float(
        np.mean(
            matched_cosines(residual_directions(w_a, channels_a), residual_directions(w_b, channels_b))[2]
        )
    )


def seed_consistency_baseline(w, cos_a: torch.Tensor, cos_b: torch.Tensor, generator) -> float:
    """The same matching for random vectors at the real channels' cosines to w."""
    a = random_at_cosines(w, cos_a, generator)
    b = random_at_cosines(w, cos_b, generator)
    return float(np.mean(matched_cosines(residual_directions(w, a), residual_directions(w, b))[2]))


# --- generic directions ----------------------------------------------------------------------------


def generic_directions(
    residuals: torch.Tensor, owners: torch.Tensor, min_owners: int, threshold: float = 0.9
) -> torch.Tensor:
    """Directions that the channels of many different random vectors converge to.

    residuals [M, d]: unit residual parts of the reference channels; owners [M]: which random
    vector each came from. A direction is generic when channels of at least `min_owners`
    different random vectors lie within |cos| > threshold of it. Greedy: take the most shared
    one, remove its neighbours, repeat. Returns [G, d] unit vectors (sign-aligned means)."""
    cos = residuals @ residuals.T  # [M, M]
    near = cos.abs() > threshold
    owner_of = torch.nn.functional.one_hot(owners, int(owners.max()) + 1).to(residuals.dtype)  # [M, R]
    shared = ((near.to(residuals.dtype) @ owner_of) > 0).sum(-1)  # [M] different owners nearby
    alive = torch.ones(len(residuals), dtype=torch.bool)
    found = []
    for i in torch.argsort(shared, descending=True, stable=True).tolist():
        if shared[i] < min_owners:
            break  # sorted: no later one is shared enough either
        if not alive[i]:
            continue
        members = near[i] & alive
        direction = (residuals[members] * torch.sign(cos[i, members]).unsqueeze(-1)).mean(0)
        found.append(direction / direction.norm())
        alive &= ~members
    return torch.stack(found) if found else torch.zeros(0, residuals.shape[1])


def generic_flags(residuals: torch.Tensor, directions: torch.Tensor, threshold: float = 0.9):
    """True where a channel's residual part lies within |cos| > threshold of a generic direction."""
    if len(directions) == 0:
        return torch.zeros(len(residuals), dtype=torch.bool)
    return (residuals @ directions.T).abs().amax(-1) > threshold
