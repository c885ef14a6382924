"""Ablation (issue 6): the grid rule, sequential ablation, selectivity and its baseline, and the
real model run through hooks on a tiny Llama."""

import copy

import numpy as np
import pytest
import torch

from channelscope.core import stats
from channelscope.method import ablation, intervention, measures, rotate
from channelscope.method.weights import load_model
from channelscope.worker import corpus


def grid_rule(neuron_z, channel_z, channel_zs, grid=1000):
    """The grid rule of docs/method.md ("Alpha* and ablation") written out plainly, to check
    measures.alpha_star against."""
    alphas = np.linspace(0, 1, grid)
    strong = np.abs(channel_zs) >= 7
    kurts, values = [], []
    for alpha in alphas:
        r = neuron_z - alpha * channel_z
        c = r - r.mean()
        kurt = (c**4).mean() / (c**2).mean() ** 2 - 3
        kurts.append(kurt)
        values.append(kurt + 5 * np.abs(r[strong]).mean())
    if min(kurts[1:]) >= kurts[0]:
        return 0.0  # no alpha lowers the kurtosis
    return float(alphas[int(np.argmin(values))])


def spiky(V=2000, seed=0):
    g = np.random.default_rng(seed)
    channel = g.normal(size=V) * 0.3
    channel[:5] += 12.0  # five tokens far out on the positive tail
    neuron = g.normal(size=V) + 0.4 * channel
    return neuron, channel


def test_alpha_star_follows_the_grid_rule_on_known_inputs():
    neuron, channel = spiky()
    scored = torch.ones(len(neuron), dtype=torch.bool)
    channel_zs = (channel - channel.mean()) / channel.std()
    got = measures.alpha_star(torch.tensor(neuron), torch.tensor(channel), torch.tensor(channel_zs), scored)
    assert got == pytest.approx(grid_rule(neuron, channel, channel_zs), abs=1e-9)
    assert 0.3 < got < 0.5  # it removes the channel's share of the spike (0.4), not more


def test_alpha_star_is_zero_when_no_alpha_lowers_the_kurtosis():
    neuron, channel = spiky()
    scored = torch.ones(len(neuron), dtype=torch.bool)
    flipped = -channel  # subtracting it makes the spike larger: the kurtosis only rises
    zs = (flipped - flipped.mean()) / flipped.std()
    assert measures.alpha_star(torch.tensor(neuron), torch.tensor(flipped), torch.tensor(zs), scored) == 0.0
    assert grid_rule(neuron, flipped, zs) == 0.0


def test_several_channels_apply_one_after_another_each_alpha_refitted_on_the_current_w():
    g = torch.Generator().manual_seed(1)
    d, V = 16, 400
    U = torch.randn(d, V, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    channels = torch.randn(3, d, generator=g, dtype=torch.float64)
    scored = torch.ones(V, dtype=torch.bool)
    got = ablation.ablate(w, channels, U, scored, first_alpha=0.25)

    current, alphas = w.clone(), []
    zs = rotate.z_scores(channels @ U, scored)
    for k in range(3):
        alpha = 0.25 if k == 0 else measures.alpha_star(current @ U, channels[k] @ U, zs[k], scored)
        current = current - alpha * channels[k]
        alphas.append(alpha)
    assert got.alphas == alphas
    assert torch.allclose(got.vector, current)


def test_selectivity_of_removing_a_token_spike_is_high_and_its_random_baseline_is_low():
    g = torch.Generator().manual_seed(2)
    d, V = 32, 3000
    U = torch.randn(d, V, generator=g, dtype=torch.float64)
    target_ids = torch.arange(10)
    # Ten tokens whose columns of U lie far along one direction e: a channel along e claims them.
    e = torch.randn(d, generator=g, dtype=torch.float64)
    e = e / e.norm()
    U[:, target_ids] += 20 * e.unsqueeze(-1)
    w = torch.randn(d, generator=g, dtype=torch.float64) + e * 3
    c = e * w.norm()
    scored = torch.ones(V, dtype=torch.bool)
    result = ablation.Ablation(w - 0.5 * c, [0.5])
    T = (target_ids, torch.ones(10))
    draws = ablation.random_draws(w, c.unsqueeze(0), [10], U, scored, 8, torch.Generator().manual_seed(3))
    effect = ablation.weight_effect(w, result, T, draws, U, scored)
    assert effect.selectivity > 3 * stats.median(effect.baseline)
    # Random directions sit at the channel's cosine to w, as docs/method.md asks.
    cos = rotate.cosine(draws.directions[:, 0], w.unsqueeze(0))
    assert torch.allclose(cos, rotate.cosine(c, w).expand(8))
    assert torch.allclose(draws.directions[:, 0].norm(dim=-1), w.norm().expand(8))


def test_target_positions_are_those_whose_token_or_next_token_is_in_T():
    ids = torch.tensor([5, 9, 7, 5, 1])
    positions, signs = ablation.token_positions(ids, torch.tensor([7, 1]), torch.tensor([1.0, -1.0]))
    # position 1: next token 7; 2: own 7; 3: next token 1; 4: own 1
    assert positions.tolist() == [1, 2, 3, 4]
    assert signs.tolist() == [1.0, 1.0, -1.0, -1.0]


def test_logit_selectivity_pools_positions_and_tokens():
    delta = torch.tensor([[-2.0, 0.5, -0.5], [-4.0, 0.5, 0.5]])
    s = ablation.logit_selectivity(
        delta, torch.tensor([0]), torch.tensor([1.0]), torch.ones(3, dtype=torch.bool)
    )
    assert s == pytest.approx(3.0 / 0.5)


# --- the real model, through hooks ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_gguf):
    return intervention.load_language_model(tiny_gguf)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("side", ["gate", "in", "out"])
def test_a_hooked_run_equals_the_model_with_that_one_vector_replaced(lm, side):
    layer, neuron = 1, 5
    ids = lm.encode("The capital of France is Paris. She went to the market.")
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(lm.model.config.hidden_size, generator=g)
    before = _state(lm.model)
    probe = intervention.forward(lm, ids, layer, side, neuron, torch.stack([torch.zeros_like(delta), delta]))

    patched = copy.deepcopy(lm.model)
    mlp = patched.model.layers[layer].mlp
    with torch.no_grad():
        if side == "out":
            mlp.down_proj.weight[:, neuron] += delta
        else:
            getattr(mlp, intervention.SIDE_MODULE[side]).weight[neuron] += delta
        expected = patched.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        clean = lm.model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    assert torch.allclose(probe.hidden[1], expected, atol=1e-4)
    assert torch.allclose(probe.hidden[0], clean, atol=1e-5)
    after = _state(lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert _no_hooks(lm.model)


@pytest.mark.parametrize("side", ["gate", "in"])
def test_ablating_a_read_vector_changes_only_the_targeted_neuron(lm, side):
    layer, neuron = 1, 7
    ids = lm.encode("def main():\n    print('hello world')")
    seen = []  # every neuron's activation act(g) * u: the input of down_proj
    handle = lm.mlp(layer).down_proj.register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].detach().clone())
    )
    try:
        delta = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        intervention.forward(lm, ids, layer, side, neuron, torch.stack([torch.zeros_like(delta), delta]))
    finally:
        handle.remove()
    out = seen[0]  # [2, T, d_mlp]
    changed = (out[1] - out[0]).abs().amax(0)  # [d_mlp]
    assert changed[neuron] > 0
    assert torch.count_nonzero(changed) == 1


def test_ablating_the_out_vector_changes_the_mlp_output_by_the_neurons_activation_only(lm):
    layer, neuron = 0, 3
    ids = lm.encode("In 1999, the numbers rose from 12 to 345.")
    seen = []
    mlp = lm.mlp(layer)
    handle = mlp.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    try:
        delta = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(2))
        probe = intervention.forward(
            lm, ids, layer, "out", neuron, torch.stack([torch.zeros_like(delta), delta])
        )
    finally:
        handle.remove()
    change = seen[0][1] - seen[0][0]  # [T, d]
    expected = probe.activation[0].unsqueeze(-1) * delta
    assert torch.allclose(change, expected, atol=1e-5)


def test_a_run_stopped_by_its_deadline_leaves_the_model_untouched(lm):
    before = _state(lm.model)
    ids = lm.encode("Once upon a time")
    delta = torch.ones(2, lm.model.config.hidden_size)
    with pytest.raises(intervention.ModelTimeout):
        intervention.forward(lm, ids, 1, "gate", 0, delta, deadline=0.0)
    after = _state(lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _no_hooks(lm.model)


def test_layer_inputs_of_a_padded_batch_are_each_sequences_own(lm):
    texts = ["The capital of France is Paris.", "def main():\n    return 0", "She bought apples and pears."]
    sequences = corpus.encode(lm, texts)
    batched = corpus.layer_inputs(lm, sequences, list(range(lm.n_layers)))  # batched, right-padded
    for layer in range(lm.n_layers):
        alone = []
        for seq in sequences:  # one sequence at a time, no padding
            kept = []
            handle = lm.mlp(layer).register_forward_pre_hook(lambda _m, a, kept=kept: kept.append(a[0][0]))
            try:
                with torch.inference_mode():
                    lm.model.model(input_ids=torch.tensor([seq]))
            finally:
                handle.remove()
            alone.append(kept[0])
        assert torch.allclose(batched[layer], torch.cat(alone), atol=1e-4, rtol=1e-4)


def test_ablation_effect_on_the_write_side_measures_s_at_active_positions(lm, tiny_gguf):
    model = load_model(tiny_gguf)
    U = model.projection()
    scored = torch.ones(model.vocab_size, dtype=torch.bool)
    w = model.vectors(1, "out")[4]
    c = w + 0.5 * torch.randn(w.shape[0], generator=torch.Generator().manual_seed(4))
    c = c / c.norm() * w.norm()
    T = (torch.topk(c @ U, 10).indices, torch.ones(10))
    ids = lm.encode("The capital of France is Paris. The capital of Japan is Tokyo.")
    delta = -0.5 * c
    draws = ablation.random_draws(w, c.unsqueeze(0), [10], U, scored, 2, torch.Generator().manual_seed(5))
    random_deltas = ablation.apply(w, draws.directions, [0.5]) - w

    def effect_at(threshold):
        return intervention.ablation_effect(
            lm, ids, 1, "out", 4, delta, random_deltas, T, draws.targets, scored, threshold=threshold
        )

    acts = effect_at(None).activation[0]  # no threshold: every position counts
    threshold = float(acts.abs().median())
    effect = effect_at(threshold)
    active = effect.activation[0].abs() > threshold  # large negative activations count too
    assert torch.equal(effect.active, active) and 0 < int(active.sum()) < len(active)
    assert torch.equal(effect.activation[0], effect.activation[1])  # the write side reads nothing new
    assert len(effect.baseline) == 2
    assert len(effect.next_before) == intervention.TOP_NEXT
    if active.any():
        assert np.isfinite(effect.selectivity)


def test_a_hugging_face_folder_runs_the_same_as_its_gguf(lm, tiny_folder):
    folder = intervention.load_language_model(tiny_folder)
    ids = lm.encode("The capital of Japan is Tokyo.")
    delta = torch.randn(2, lm.model.config.hidden_size, generator=torch.Generator().manual_seed(6))
    delta[0] = 0
    a = intervention.forward(lm, ids, 1, "in", 2, delta)
    b = intervention.forward(folder, ids, 1, "in", 2, delta)
    assert torch.allclose(a.hidden, b.hidden, atol=1e-4)
    assert torch.allclose(a.pre_activation, b.pre_activation, atol=1e-4)
