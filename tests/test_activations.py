"""What neurons do on real text: the corpus build, and the activation pass's stored top contexts
recomputed with an independent forward pass written in plain numpy; the pass resumes where a
killed one stopped."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import func, select

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.method.intervention import load_language_model
from channelscope.method.weights import load_model
from channelscope.worker import activations as A
from channelscope.worker import corpus, token_sums
from tests import tiny

TEXTS = tuple(tiny._CORPUS) + (
    "Lists hold items in order; a tuple cannot change once made.",
    "The river rose overnight and the bridge was closed until noon.",
    "for i in range(10):\n    total += i * i\nprint(total)",
    "Whereas the first report was cautious, the second one was not.",
)


def numpy_activations(lm, ids: list[int], layer: int, with_input: bool = False):
    """act(g) * u of every neuron of `layer` at every position: a Llama forward pass in float64
    numpy, read off the weights alone (RMSNorm, rotary attention with grouped KV heads, SiLU MLP).
    [T, d_mlp]; with_input: (the MLP input x [T, d], act)"""
    state = {k: v.double().numpy() for k, v in lm.model.state_dict().items()}
    config = lm.model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head = config.hidden_size // heads
    eps = config.rms_norm_eps

    def rms(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    steps = len(ids)
    inv = 1.0 / (config.rope_parameters["rope_theta"] ** (np.arange(0, head, 2) / head))
    angles = np.arange(steps)[:, None] * inv[None]  # [T, head/2]
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))

    def rope(x):  # [T, n, head]
        half = head // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos[:, None] + rotated * sin[:, None]

    h = state["model.embed_tokens.weight"][ids]
    causal = np.triu(np.full((steps, steps), -np.inf), 1)
    for index in range(layer + 1):
        p = f"model.layers.{index}."
        x = rms(h, state[p + "input_layernorm.weight"])
        q = rope((x @ state[p + "self_attn.q_proj.weight"].T).reshape(steps, heads, head))
        k = rope((x @ state[p + "self_attn.k_proj.weight"].T).reshape(steps, kv_heads, head))
        v = (x @ state[p + "self_attn.v_proj.weight"].T).reshape(steps, kv_heads, head)
        k, v = np.repeat(k, heads // kv_heads, 1), np.repeat(v, heads // kv_heads, 1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(head) + causal
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended = np.einsum("hts,shd->thd", weights, v).reshape(steps, -1)
        h = h + attended @ state[p + "self_attn.o_proj.weight"].T
        x = rms(h, state[p + "post_attention_layernorm.weight"])
        g, u = x @ state[p + "mlp.gate_proj.weight"].T, x @ state[p + "mlp.up_proj.weight"].T
        act = g / (1 + np.exp(-g)) * u
        if index == layer:
            return (x, act) if with_input else act
        h = h + act @ state[p + "mlp.down_proj.weight"].T
    raise AssertionError("unreachable")


def test_stored_contexts_agree_with_an_independent_numpy_forward_pass(sqlite_url, tiny_folder, tmp_path):
    model, lm = load_model(tiny_folder), load_language_model(tiny_folder)
    built = corpus.Built("test", TEXTS, ("test",) * len(TEXTS))
    engine = db.make_engine(sqlite_url)
    summary = A.run(engine, model, lm, built, tmp_path)
    assert summary["documents"] == len(TEXTS) and summary["tokens"] > 100
    sequences = [lm.encode(text)[: A.MAX_TOKENS] for text in TEXTS]
    with db.session(engine) as session:
        for layer, neuron in [(0, 3), (1, 77), (1, 120)]:
            found = A.neuron(session, session.scalar(select(T.Model.id)), layer, neuron)
            assert found.corpus == "test" and len(found.values) == len(TEXTS)  # one context per document
            assert list(found.values) == sorted(found.values, reverse=True)
            row = session.scalar(select(T.ActivationLayer).where(T.ActivationLayer.layer == layer))
            docs = T.unpack(row.top_doc, "int32")
            for k, doc in enumerate(docs.reshape(-1, A.CONTEXTS)[neuron][: len(found.values)]):
                expected = numpy_activations(lm, sequences[doc], layer)[:, neuron]
                peak = int(np.argmax(expected))
                assert found.values[k] == pytest.approx(expected[peak], rel=1e-4, abs=1e-4)
                window = found.window_values[k]
                for offset, value in enumerate(window):
                    position = peak - A.BEFORE + offset
                    if 0 <= position < len(expected):
                        assert found.window_tokens[k, offset] == sequences[doc][position]
                        assert value == pytest.approx(expected[position], rel=1e-2, abs=1e-2)
                    else:
                        assert found.window_tokens[k, offset] == -1 and value == 0
            # The density counts every position once per signal; the threshold is the 90th
            # percentile of |activation|.
            assert found.counts.sum(1).tolist() == [summary["tokens"]] * 3
            every = np.concatenate([numpy_activations(lm, s, layer)[:, neuron] for s in sequences])
            width = 2 * found.ranges[0] / A.BINS
            assert abs(found.threshold - np.quantile(np.abs(every), A.QUANTILE)) <= width  # of |activation|
    engine.dispose()


def test_the_per_token_sums_give_the_same_effects_as_every_position_of_a_numpy_forward_pass(
    sqlite_url, tiny_folder, tmp_path
):
    """The behavioural test reads sums, not positions: its effects for any token set must be the
    ones computed position by position from an independent forward pass."""
    from channelscope.method import behaviour

    model, lm = load_model(tiny_folder), load_language_model(tiny_folder)
    built = corpus.Built("test", TEXTS, ("test",) * len(TEXTS))
    engine = db.make_engine(sqlite_url)
    A.run(engine, model, lm, built, tmp_path)
    engine.dispose()
    sequences = [lm.encode(text)[: A.MAX_TOKENS] for text in TEXTS]
    layer, neuron = 1, 40
    xs, acts, tokens, following = [], [], [], []
    for seq in sequences:
        x, act = numpy_activations(lm, seq, layer, with_input=True)
        xs.append(x)
        acts.append(act[:, neuron])
        tokens += seq
        following += seq[1:] + [-1]
    x, act = np.concatenate(xs), np.concatenate(acts)
    tokens, following = np.array(tokens), np.array(following)
    stats = token_sums.read_stats(tmp_path, model, "test", layer)
    in_memory = A.token_stats(lm, sequences, [layer], model.vocab_size)[layer]
    common = np.bincount(tokens).argsort()[::-1]
    absent = np.setdiff1d(np.arange(model.vocab_size), tokens)[0]  # a token the corpus never holds
    sets = np.stack([common[:3], common[3:6], common[[0, 7, 9]], np.array([common[2], absent, common[11]])])
    w = model.vectors(layer, "in")[neuron].double().numpy()
    pre = x @ w
    # A second pass swaps its sums in beside a reader that holds the first pass's mapped.
    token_sums.write_stats(tmp_path, model, "test", {layer: in_memory})
    assert np.array_equal(
        np.asarray(stats.x_sum), np.asarray(token_sums.read_stats(tmp_path, model, "test", layer).x_sum)
    )
    assert not list(tmp_path.glob("activations/*.new")) and not list(tmp_path.glob("activations/*.old"))
    for found in (stats, in_memory):
        effect, n = behaviour.read_effect(found, w, sets)
        for s, members in enumerate(sets):
            at = np.isin(tokens, members)
            assert n[s] == at.sum()
            assert effect[s] == pytest.approx((pre[at].mean() - pre.mean()) / pre.std(), rel=1e-3, abs=1e-4)
        effect, n = behaviour.write_effect(found, neuron, sets)
        for s, members in enumerate(sets):
            before = np.isin(following, members) & (following >= 0)
            assert n[s] == before.sum()
            assert effect[s] == pytest.approx(
                (act[before].mean() - act.mean()) / act.std(), rel=1e-3, abs=1e-4
            )


def test_a_killed_pass_resumes_to_the_same_result(sqlite_url, tiny_folder, tmp_path, monkeypatch):
    model, lm = load_model(tiny_folder), load_language_model(tiny_folder)
    built = corpus.Built("test", TEXTS, ("test",) * len(TEXTS))
    monkeypatch.setattr(A, "BLOCK", 4)
    monkeypatch.setattr(A, "BATCH", 2)
    monkeypatch.setattr(A, "SAVE_SECONDS", 0.0)  # saved after every block
    engine = db.make_engine(sqlite_url)

    def die(done, total):
        raise KeyboardInterrupt  # killed after the first block was saved

    with pytest.raises(KeyboardInterrupt):
        A.run(engine, model, lm, built, tmp_path / "a", on_block=die)
    blocks = []
    A.run(engine, model, lm, built, tmp_path / "a", on_block=lambda done, total: blocks.append(done))
    assert blocks == [8, len(TEXTS)]  # went on from the block after the saved one
    resumed = {r.layer: (r.top_value, r.thresholds) for r in _rows(engine)}
    A.run(engine, model, lm, built, tmp_path / "b")  # uninterrupted, same batches
    assert {r.layer: (r.top_value, r.thresholds) for r in _rows(engine)} == resumed
    with db.session(engine) as session:
        assert session.scalar(select(func.count()).select_from(T.ActivationLayer)) == model.n_layers
    engine.dispose()


def _rows(engine):
    with db.session(engine) as session:
        return session.scalars(select(T.ActivationLayer)).all()


def test_the_corpus_is_built_from_this_python_deduplicated_and_named_by_its_manifest(tmp_path):
    (tmp_path / "notes.txt").write_text(
        "A note of mine about parsing.\\n\\n" * 3 + "Another paragraph, longer than forty characters."
    )
    corpus.add(tmp_path, tmp_path / "notes.txt")
    manifest = corpus.build(tmp_path)
    built = corpus.load_built(tmp_path)
    assert manifest["key"] == built.key and manifest["documents"] == len(built.texts)
    assert {"python-docs", "docstrings", "stdlib-source", "generated", "added"} <= set(manifest["characters"])
    assert sum(manifest["characters"].values()) >= 1_200_000  # ~300,000 tokens at ~4 characters each
    assert len(set(built.texts)) == len(built.texts)  # deduplicated
    assert all(len(text) <= corpus.DOCUMENT_CHARS for text in built.texts)
    assert corpus.build(tmp_path)["key"] == manifest["key"]  # deterministic
    assert json.loads((tmp_path / "corpus" / "manifest.json").read_text())["python"]


def test_the_threshold_is_of_the_magnitude_and_an_older_passs_is_folded_from_its_histogram(
    sqlite_url, tiny_folder, tmp_path
):
    """ "Active" is |activation| above its 90th percentile: a neuron that writes -w_out strongly
    is active there too. A pass stored before that (version 1) kept the signed quantile; its
    histogram gives the magnitude one when read."""
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=5000), -8 + rng.normal(size=800)])[None]  # a heavy negative tail
    h = np.array([2 * np.abs(values).max()])
    bins = ((values + h[:, None]) / (2 * h[:, None]) * A.BINS).astype(int).clip(0, A.BINS - 1)
    counts = np.stack([np.bincount(b, minlength=A.BINS) for b in bins])
    width = 2 * h[0] / A.BINS
    found = A.magnitude_quantile(counts, h, A.QUANTILE)[0]
    assert abs(found - np.quantile(np.abs(values), A.QUANTILE)) <= width
    assert found > 5  # the negative tail sets it; the signed quantile would sit near 1.2

    model, lm = load_model(tiny_folder), load_language_model(tiny_folder)
    engine = db.make_engine(sqlite_url)
    A.run(engine, model, lm, corpus.Built("test", TEXTS, ("test",) * len(TEXTS)), tmp_path)
    with db.session(engine) as session:
        model_id = session.scalar(select(T.Model.id))
        stored = A.layer_thresholds(session, model_id)
    with db.session(engine) as session, session.begin():  # as a version-1 pass stored them
        for row in session.scalars(select(T.ActivationLayer)):
            row.version, row.thresholds = 1, T.pack(np.zeros(len(stored[row.layer])), "float32")
    with db.session(engine) as session:
        assert {k: v.tolist() for k, v in A.layer_thresholds(session, model_id).items()} == {
            k: v.tolist() for k, v in stored.items()
        }
        assert A.threshold(session, model_id, 1, 5).value == pytest.approx(float(stored[1][5]))
    engine.dispose()
