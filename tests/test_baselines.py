"""The stand-ins of the evaluation's coverage and alpha* baselines (docs/method.md, "Reconstruction
and coverage"): sets of the channels' own sizes, taken from directions at each channel's cosine,
and the pool's directions built for chosen rows only."""

from __future__ import annotations

import math

import pytest
import torch

from channelscope.method import measures, rotate

V, D = 3000, 512


def _neuron(seed: int = 0):
    """A synthetic U and a w with a sparse part on tokens 100-119, its z-scores over the scored."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(D, V, generator=gen, dtype=torch.float64)
    scored = torch.ones(V, dtype=torch.bool)
    scored[:7] = False
    own = U[:, 100:120].sum(-1)
    noise = torch.randn(D, generator=gen, dtype=torch.float64)
    w = 0.6 * own / own.norm() + 0.8 * noise / noise.norm()
    z_w = w @ U
    return gen, U, scored, w, z_w, rotate.z_scores(z_w[None], scored)[0]


def test_union_sizes_count_tokens_claimed_again_once():
    sizes = measures.claimed_union_sizes(
        [torch.tensor([1, 2]), torch.tensor([2, 3]), torch.tensor([], dtype=torch.long)]
    )
    assert sizes == [2, 3, 3]


def test_stand_ins_take_sets_of_the_channels_sizes_from_their_own_tails_without_taking_a_token_twice():
    _, U, scored, w, z_w, zs_w = _neuron()
    sizes = [10, 25]
    # Two stand-ins both along w: the first takes w's 10 furthest tokens, the second the next 15.
    curve = measures.coverage_of_directions(zs_w, scored, torch.stack([z_w, z_w]).float(), sizes)
    mass = torch.where(scored, zs_w.pow(2), torch.zeros_like(zs_w))
    sign = measures.tail_sign(float(rotate.tail_skew(z_w[None], scored)[0]))
    furthest = torch.argsort(torch.where(scored, zs_w * sign, -math.inf), descending=True)
    for k, size in enumerate(sizes):
        assert curve[k] == pytest.approx(float(mass[furthest[:size]].sum() / mass.sum()), rel=1e-5)


def test_the_baseline_can_beat_channels_whose_tokens_are_not_the_neurons():
    gen, U, scored, w, z_w, zs_w = _neuron(1)
    # Channels that claimed tokens far from w's tail (tokens the neuron does not carry) ...
    masked = [torch.arange(2000, 2010), torch.arange(2010, 2030)]
    covered = measures.vocabulary_coverage(zs_w, scored, masked)
    # ... against stand-ins at cosine 0.8 to w whose other part is a random direction.
    stand_ins = measures.random_at_cosines(w, torch.tensor([0.8, 0.8], dtype=torch.float64), gen)
    baseline = measures.coverage_of_directions(
        zs_w, scored, (stand_ins @ U).float(), measures.claimed_union_sizes(masked)
    )
    assert baseline[-1] > 3 * covered[-1]  # 0.074 against 0.009 here


def test_pool_directions_for_chosen_rows_are_those_rows_of_the_whole_pool():
    gen, U, scored, w, z_w, _ = _neuron(2)
    pool = measures.direction_pool(
        torch.randn(16, D, generator=gen, dtype=torch.float64), lambda x: x.double() @ U
    )
    rows = torch.tensor([3, 11])
    every = measures.pool_at_cosine(w, z_w, 0.4, pool, None)
    chosen = measures.pool_at_cosine(w, z_w, 0.4, pool, rows)
    assert torch.equal(chosen, every[rows])
    w_hat = w / w.norm()
    r = pool.directions[11] - (pool.directions[11] @ w_hat) * w_hat
    explicit = (0.4 * w_hat + math.sqrt(1 - 0.4**2) * r / r.norm()) @ U
    assert torch.allclose(chosen[1].double(), explicit, rtol=1e-4, atol=1e-4)
