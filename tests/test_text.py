"""What a neuron does on real text, on its page: top contexts shaded by activation, densities,
and each channel checked at the peaks against the corpus's own share of its tokens
(method/behaviour.py); a JSON twin; revalidated, never cached forever."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from channelscope.core import db
from channelscope.method import behaviour
from channelscope.method.intervention import load_language_model
from channelscope.method.weights import load_model
from channelscope.worker import activations, corpus
from tests.fixtures.ablation_store import LAYER, fill_store, make_app
from tests.test_activations import TEXTS

PEAK = 2  # the peak's index in the windows below


def _windows(peak_tokens: list[int], after: list[int] | None = None) -> np.ndarray:
    windows = np.full((len(peak_tokens), 5), 9, dtype=np.int64)
    windows[:, PEAK] = peak_tokens
    if after is not None:
        windows[:, PEAK + 1] = after
    return windows


def test_a_planted_token_at_the_peaks_is_found_and_its_sign_decides_the_verdict():
    counts = np.full(100, 10)  # every token 1 % of the corpus
    planted = _windows([7] * 12 + [3] * 8)  # token 7 at 12 of 20 peaks: 60 % against 1 %
    up = behaviour.at_peaks(planted, PEAK, "gate", np.array([7, 8]), counts, raises=True)
    assert (up.hits, up.contexts, up.chance) == (12, 20, pytest.approx(0.02))
    assert up.verdict == "as expected" and up.p_value < 1e-10 and up.low > up.chance
    assert up.hit_rows == list(range(12))  # which contexts: the page links them
    down = behaviour.at_peaks(planted, PEAK, "gate", np.array([7, 8]), counts, raises=False)
    assert down.verdict == "opposite"  # the neuron should have avoided those tokens


def test_tokens_at_their_corpus_share_give_no_evidence_and_absent_ones_are_untestable():
    counts = np.full(100, 10)
    counts[5] = 100 * 10  # token 5: 10 * 100 / (99 * 10 + 1000) ~ 50 % of the corpus
    at_chance = _windows([5] * 10 + [1] * 10)
    found = behaviour.at_peaks(at_chance, PEAK, "in", np.array([5]), counts, raises=True)
    assert found.verdict == "no evidence" and found.p_value > 0.5
    counts[6] = 0
    assert (
        behaviour.at_peaks(at_chance, PEAK, "in", np.array([6]), counts, raises=True).verdict == "untestable"
    )


def test_out_is_judged_on_the_token_after_the_peak():
    counts = np.full(100, 10)
    windows = _windows([1] * 20, after=[7] * 15 + [2] * 5)
    assert behaviour.at_peaks(windows, PEAK, "out", np.array([7]), counts, raises=True).hits == 15
    assert behaviour.at_peaks(windows, PEAK, "gate", np.array([7]), counts, raises=True).hits == 0
    windows[:, PEAK + 1] = -1  # the peak ends its document: no next token to count
    assert behaviour.at_peaks(windows, PEAK, "out", np.array([7]), counts, raises=True).contexts == 0


@pytest.fixture(scope="module")
def text_client(tmp_path_factory, tiny_gguf):
    folder = tmp_path_factory.mktemp("text-store")
    url = f"sqlite:///{folder / 'store.db'}"
    db.upgrade(url)
    run_hash = fill_store(url, tiny_gguf, folder, activation_pass=False)
    app = make_app(url, [tiny_gguf.parent])
    with TestClient(app) as client:
        app.state.data_dir = folder  # where the activation pass below leaves its per-token sums
        client.run_hash = run_hash
        client.url = url
        client.folder = folder
        yield client


def test_the_page_says_how_to_compute_a_pass_until_one_is_stored_then_shows_it(text_client, tiny_gguf):
    page = f"/m/tiny-llama/{LAYER}/1/text"
    before = text_client.get(page + ".json").json()
    assert before["stored"] is False and "channelscope activations tiny-llama" in before["message"]
    assert text_client.get(page).status_code == 200
    neuron_page = text_client.get(f"/m/tiny-llama/{LAYER}/1.json?run={text_client.run_hash}").json()
    assert neuron_page["text_url"] == page  # linked, not embedded: a pinned page is cached forever

    model, lm = load_model(tiny_gguf), load_language_model(tiny_gguf)
    engine = db.make_engine(text_client.url)
    texts = (*TEXTS, TEXTS[0])  # a copy of a document: its context is shown once
    activations.run(
        engine, model, lm, corpus.Built("c0ffee", texts, ("test",) * len(texts)), text_client.folder
    )
    engine.dispose()

    response = text_client.get(page + ".json")
    assert response.headers["cache-control"] == "no-cache"  # a later pass must show up
    found = response.json()
    assert found["stored"] and found["corpus"] == "c0ffee" and found["documents"] == len(texts)
    assert len(found["contexts"]) == len(TEXTS)  # one per document, the copy's left out
    peaks = [c["peak"] for c in found["contexts"]]
    assert peaks == sorted(peaks, reverse=True)
    for context in found["contexts"]:
        top = context["tokens"][context["peak_index"]]["activation"]
        assert top == context["peak"] == max(t["activation"] for t in context["tokens"])
    assert [d["signal"] for d in found["densities"]] == list(activations.SIGNALS)
    assert all(sum(d["counts"]) == found["tokens"] for d in found["densities"])
    # Three sides x three channels of the stored run, each checked against its tokens' share.
    assert {(c["side"], c["index"]) for c in found["channels"]} == {
        (s, i) for s in ("gate", "in", "out") for i in range(3)
    }
    for channel in found["channels"]:
        assert 0 < channel["chance"] < 1 and channel["expected"] == pytest.approx(
            channel["contexts"] * channel["chance"], abs=1e-3
        )
        assert channel["position"] == ("next" if channel["side"] == "out" else "peak")
        assert channel["verdict"] in ("as expected", "opposite", "no evidence", "untestable")
        assert len(channel["hit_contexts"]) == channel["hits"]
        for context in found["contexts"]:  # a context names the channel exactly where it is a hit
            named = f"{channel['side']} {channel['index']}" in context["channels"]
            assert named == (context["number"] in channel["hit_contexts"])
    assert [c["number"] for c in found["contexts"]] == list(range(1, len(TEXTS) + 1))
    # Every channel's test over every position, from the pass's per-token sums.
    for channel in found["channels"]:
        every = channel["every_position"]
        assert every["random_sets"] == behaviour.RANDOM_SETS and every["positions"] >= 0
        assert (every["passed"] is None) == (every["percentile"] is None)
        if every["passed"] is not None:
            assert every["passed"] == (every["percentile"] >= behaviour.PASS)
            assert every["positions"] >= behaviour.MIN_POSITIONS
    assert text_client.get(page + ".json").json()["channels"] == found["channels"]  # seeded: the same again

    html = text_client.get(page).text
    assert html.count('class="act ') >= sum(len(c["tokens"]) for c in found["contexts"])
    assert html.count(' peak"') == len(TEXTS) and "Density: activation" in html
    assert "90th percentile" in html and found["channels"][0]["url"] in html
    assert "at every position" in html and "5 % of channels pass by chance" in html
    assert_twin_explains(text_client, page)


def assert_twin_explains(client, url: str) -> None:
    """The text page's numbers and links are in its JSON twin (as tests/test_twins.py checks for
    the pages of its store)."""
    import html as html_module

    from tests.test_twins import HREF, NUMBER, contents, explained, shown_text, template_text

    page, twin = client.get(url), client.get(url + ".json")
    numbers: set[float] = set()
    strings: set[str] = set()
    contents(twin.json(), numbers, strings)
    literal = template_text()
    shown = NUMBER.findall(shown_text(page.text))
    assert shown and not [n for n in shown if not explained(n, numbers) and n not in literal]
    for href in {html_module.unescape(h) for h in HREF.findall(page.text)}:
        # "#context-3": a place on this page, not data
        assert href in strings or f'href="{href}"' in literal or href.startswith(("/static/", "#")), href


# --- the behavioural test over every position (reports/behaviour.md) --------------------------------


def positions_stats(x, act, tokens, following, vocab) -> behaviour.TokenStats:
    """TokenStats summed in plain numpy from every position: x [N, d], act [N, d_mlp], tokens [N],
    following [N] (-1 at a document's end)."""
    rows = np.arange(vocab)  # every token its own row
    followed = following >= 0
    x_sum = np.zeros((vocab, x.shape[1]))
    np.add.at(x_sum, tokens, x)
    act_next = np.zeros((act.shape[1], vocab))
    np.add.at(act_next.T, following[followed], act[followed])
    return behaviour.TokenStats(
        rows=rows,
        count=np.bincount(tokens, minlength=vocab),
        next_count=np.bincount(following[followed], minlength=vocab),
        x_sum=x_sum,
        x_mean=x.mean(0),
        x_cov=np.cov(x.T, bias=True),
        act_next_sum=act_next,
        act_mean=act.mean(0),
        act_std=act.std(0),
    )


def test_a_pre_activation_planted_on_a_token_set_passes_and_noise_does_not():
    rng = np.random.default_rng(0)
    vocab, d = 400, 6
    tokens = rng.integers(0, vocab, 20_000)
    counts = np.bincount(tokens, minlength=vocab)
    bins = behaviour.frequency_bins(counts)
    planted = np.array([3, 17, 42])
    w = np.zeros(d)
    w[0] = 1.0
    x = rng.normal(size=(tokens.size, d))
    x[:, 0] += 1.5 * np.isin(tokens, planted)  # x . w is high where the set is
    stats = positions_stats(x, np.zeros((tokens.size, 1)), tokens, np.full(tokens.size, -1), vocab)
    sets = behaviour.matched_sets(planted, bins, behaviour.RANDOM_SETS, rng)

    def test(members, raises, random_sets):
        return behaviour.every_position(stats, "gate", 0, w, members, raises, random_sets)

    found = test(planted, True, sets)
    assert found.passed and found.percentile == 100 and found.value > 1.0
    assert not test(planted, False, sets).passed  # the sign must agree
    # Sets of other tokens: about 5 % pass by chance, no more.
    others = [
        test(np.array(s), True, behaviour.matched_sets(np.array(s), bins, 100, rng))
        for s in rng.integers(50, vocab, (60, 3))
    ]
    assert sum(t.passed for t in others) <= 9
    # Frequency-matched: every replacement is another token of its token's bin.
    assert (bins[sets] == bins[planted]).all() and not np.isin(sets, planted).any()


def test_the_write_side_reads_the_activation_before_the_channels_tokens():
    rng = np.random.default_rng(1)
    vocab, n = 300, 10_000
    following = rng.integers(0, vocab, n)
    active = rng.random(n) < 0.1
    following[active & (rng.random(n) < 0.5)] = 7  # active positions are often followed by 7
    for token in range(8, 40):  # as common as 7, but wherever
        following[rng.choice(np.flatnonzero(following != 7), 500, replace=False)] = token
    act = (active * 3.0 + rng.normal(scale=0.3, size=n))[:, None]
    never = vocab - 1
    following[following == never] = 0
    stats = positions_stats(np.zeros((n, 2)), act, following, following, vocab)
    counts = np.bincount(following, minlength=vocab)
    sets = behaviour.matched_sets(np.array([7]), behaviour.frequency_bins(counts), 200, rng)
    found = behaviour.every_position(stats, "out", 0, np.zeros(2), np.array([7]), True, sets)
    assert found.passed and found.value > 1.0
    assert not behaviour.every_position(stats, "out", 0, np.zeros(2), np.array([7]), False, sets).passed
    tested = behaviour.every_position(stats, "out", 0, np.zeros(2), np.array([never]), True, sets)
    assert tested.passed is None  # nothing to rest on: untestable, not failed


def test_the_behaviour_report_runs_end_to_end_and_renders_from_its_json(tiny_gguf, tmp_path):
    from channelscope.experiments import behaviour_report
    from channelscope.method import rotate
    from channelscope.method.decomposer import Decomposer

    model, lm = load_model(tiny_gguf), load_language_model(tiny_gguf)
    decomposer = Decomposer(
        model, rotate.with_overrides(rotate.Settings(), channels=2), reference_count=8, cache_dir=tmp_path
    )
    result = behaviour_report.evaluate(
        model, lm, decomposer, list(TEXTS) * 3, "test", [1], aligned=1, random=1, log=lambda _: None
    )
    assert len(result["channels"]) == 2 * 2 * len(model.sides)  # (aligned + random) x channels x sides
    assert {c["kind"] for c in result["channels"]} == {"aligned", "random"}
    for c in result["channels"]:
        assert c["passed"] is None or (0 <= c["percentile"] <= 100 and c["passed"] == (c["percentile"] >= 95))
        # the same test for directions at the channel's cosine: one verdict each
        assert len(c["at_cosine_passed"]) == behaviour_report.DIRECTIONS == len(c["at_cosine_percentile"])
    path = behaviour_report.write(result, tmp_path)
    text = path.read_text()
    assert "5 % of channels pass by chance" in text and "aligned (highest raw kurtosis)" in text
    assert "directions at the same cosine" in text
    path.unlink()
    assert behaviour_report.render(tmp_path).read_text() == text
