"""The faithfulness percentile against random directions at the same cosine to this w
(measures.faithfulness_at_cosines): equal to measuring explicit directions one by one, and able
to tell a planted channel of the neuron's own tokens from a direction as close to w that carries
tokens of its own (what a generic channel is)."""

from __future__ import annotations

import math

import torch

from channelscope.method import measures, rotate

V, D = 3000, 512


def _setup(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(D, V, generator=gen, dtype=torch.float64)
    scored = torch.ones(V, dtype=torch.bool)
    scored[:7] = False  # glitch tokens are in no top list

    def project(x):
        return x.double() @ U

    return gen, U, scored, project


def _sparse_direction(U, tokens, avoid=None):
    """A unit direction whose projection is high on `tokens` (their columns of U, summed),
    orthogonal to `avoid`."""
    p = U[:, tokens].sum(-1)
    if avoid is not None:
        a = avoid / avoid.norm()
        p = p - (p @ a) * a
    return p / p.norm()


def test_the_pool_shortcut_equals_measuring_each_direction_explicitly():
    gen, U, scored, project = _setup()
    w = torch.randn(D, generator=gen, dtype=torch.float64)
    z_w = project(w)
    zs_w = rotate.z_scores(z_w.unsqueeze(0), scored)[0]
    pool = measures.direction_pool(project, D, seed=3, count=16)
    cosines = torch.tensor([0.2, 0.65, 0.95])
    fast = measures.faithfulness_at_cosines(w, z_w, zs_w, cosines, pool, scored)
    w_hat = w / w.norm()
    for k, c in enumerate(cosines.tolist()):
        for i, g in enumerate(pool.g):
            r = g - (g @ w_hat) * w_hat
            d = c * w_hat + math.sqrt(1 - c * c) * r / r.norm()
            z = project(d)
            zs = rotate.z_scores(z.unsqueeze(0), scored)[0]
            sign = measures.tail_sign(float(rotate.tail_skew(z.unsqueeze(0), scored)[0]))
            top, _ = measures.top_tokens(zs, scored, sign)
            assert abs(fast[k, i] - measures.faithfulness(zs_w, top, sign)) < 1e-4
            assert abs(float(d @ w_hat) - c) < 1e-9


def test_a_planted_channel_scores_high_and_a_direction_with_tokens_of_its_own_low():
    gen, U, scored, project = _setup(1)
    own, elsewhere = list(range(100, 120)), list(range(2000, 2020))  # as many as a top list
    noise = torch.randn(D, generator=gen, dtype=torch.float64)
    planted = _sparse_direction(U, own)
    w = 0.6 * planted + 0.8 * noise / noise.norm()  # a neuron with a sparse part: its own tokens
    z_w = project(w)
    zs_w = rotate.z_scores(z_w.unsqueeze(0), scored)[0]
    w_hat = w / w.norm()
    cos_planted = float(planted @ w_hat)
    # As close to w as the planted channel, but its tail is tokens the neuron does not carry.
    generic = cos_planted * w_hat + math.sqrt(1 - cos_planted**2) * _sparse_direction(U, elsewhere, avoid=w)
    pool = measures.direction_pool(project, D, seed=5)
    draws = measures.faithfulness_at_cosines(w, z_w, zs_w, torch.tensor([cos_planted] * 2), pool, scored)

    def percentile(direction, row):
        z = project(direction)
        zs = rotate.z_scores(z.unsqueeze(0), scored)[0]
        sign = measures.tail_sign(float(rotate.tail_skew(z.unsqueeze(0), scored)[0]))
        top, _ = measures.top_tokens(zs, scored, sign)
        return measures.percentile(measures.faithfulness(zs_w, top, sign), draws[row].numpy())

    assert percentile(planted, 0) >= 95
    assert percentile(generic, 1) <= 5  # seeds 1-5: 100 and 0 each
