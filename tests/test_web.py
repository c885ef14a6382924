"""The web app, in-process, on SQLite and PostgreSQL: every page and its JSON twin, permalinks and
caching, search, keyset pagination, bad input and hostile tokens, query counts."""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select

from channelscope.core import db
from channelscope.core import tables as T
from channelscope.web.main import create_app


@pytest.fixture(scope="module")
def client(store):
    app = create_app(store.url)
    with TestClient(app) as c:
        yield c
    app.state.engine.dispose()


@pytest.fixture
def count_queries(client):
    """Counts the statements the app sends to the database while the block runs."""
    engine = client.app.state.engine
    seen: list[str] = []

    def listener(conn, cursor, statement, *args):
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", listener)
    yield seen
    event.remove(engine, "before_cursor_execute", listener)


def get(client, url, status=200):
    response = client.get(url, follow_redirects=False)
    assert response.status_code == status, (url, response.status_code, response.text[:500])
    return response


def pages_of(store):
    m, a = store.model, store.run_a
    return [
        "/",
        f"/m/{m}",
        f"/m/{m}?run={a}",
        f"/m/{m}/1",
        f"/m/{m}/1?side=gate&sort=kurtosis&order=asc&limit=2",
        f"/m/{m}/0/3",
        f"/m/{m}/0/3?side=in&run={a}",
        f"/m/{m}/1/0?run={a}&min_kurtosis=2.5",
        f"/m/{m}/1/0/out/0",
        f"/m/{m}/1/0/out/2?run={a}",
        f"/m/{m}/1/0/compare",
        f"/m/{m}/1/0/text",
        f"/m/{m}/1/0/compare?a={a}&b={store.run_b}",
        "/search",
        "/search?token=the",
        "/search?token=zzzzqqq",
        "/search/suggest?token=a",
    ]


def json_twin(url: str) -> str:
    path, _, query = url.partition("?")
    path = "/.json" if path == "/" else path + ".json"
    return f"{path}?{query}" if query else path


# --- every page, and its JSON twin ----------------------------------------------------------------


def test_every_page_renders_and_has_a_json_twin_with_the_same_content(client, store):
    for url in pages_of(store):
        page = get(client, url)
        assert page.headers["content-type"].startswith("text/html")
        assert "Traceback" not in page.text
        twin = get(client, json_twin(url))
        assert twin.headers["content-type"] == "application/json"
        data = twin.json()
        assert isinstance(data, dict) and data
    neuron = get(client, f"/m/{store.model}/0/3.json?run={store.run_a}").json()
    page = get(client, f"/m/{store.model}/0/3?run={store.run_a}").text
    assert neuron["layer"] == 0 and neuron["neuron"] == 3 and neuron["side"] == "out"
    assert neuron["data"]["run"] == store.run_a
    assert len(neuron["data"]["channels"]) == 3
    for ch in neuron["data"]["channels"]:  # the numbers the page shows are the twin's numbers
        assert f"{ch['kurtosis']:.1f}" in page
        assert f"{ch['faithfulness']:.2f}" in page
        assert html.escape(neuron["channels"][ch["index"]]["label"], quote=False) in page


def test_home_lists_models_and_runs_with_progress(client, store):
    data = get(client, "/.json").json()
    (entry,) = data["models"]
    assert entry["model"]["name"] == store.model
    runs = {r["hash"]: r for r in entry["runs"]}
    assert runs[store.run_a]["complete"] is True
    assert runs[store.run_b]["complete"] is False
    assert runs[store.run_b]["shards_done"] == 1 and runs[store.run_b]["shards_total"] == 2
    assert runs[store.run_a]["neurons_done"] == 30
    assert "<progress" in get(client, "/").text


def test_home_says_a_run_is_starting_while_bin_up_computes_behind_it(client, tmp_path, monkeypatch):
    from channelscope.core.config import config

    monkeypatch.setenv("CHANNELSCOPE_DATA_DIR", str(tmp_path))
    config.cache_clear()
    try:
        assert get(client, "/.json").json()["starting"] is None
        (tmp_path / "background.pid").write_text(str(os.getpid()))
        assert "A run is starting" in get(client, "/.json").json()["starting"]
        assert "A run is starting" in get(client, "/").text
        (tmp_path / "background.pid").write_text("999999999")  # finished (or killed)
        assert get(client, "/.json").json()["starting"] is None
    finally:
        monkeypatch.delenv("CHANNELSCOPE_DATA_DIR")
        config.cache_clear()


def test_model_page_has_layer_side_heatmaps_linking_to_layers(client, store):
    data = get(client, f"/m/{store.model}.json?run={store.run_a}").json()
    assert {(c["layer"], c["side"]) for c in data["cells"]} == {
        (i, s) for i in (0, 1) for s in ("gate", "in", "out")
    }
    page = get(client, f"/m/{store.model}?run={store.run_a}").text
    assert page.count("<svg") >= 2
    assert f'href="/m/{store.model}/1?side=gate&amp;run={store.run_a}"' in page


def test_neuron_page_shows_the_issue_s_sections(client, store):
    page = get(client, f"/m/{store.model}/0/3?side=gate&run={store.run_a}").text
    for expected in [
        "Top tokens",
        "Bottom tokens",
        "histogram.svg",
        "Kurtosis during optimisation",
        "Kurtosis by channel",
        "min_kurtosis 5",
        "Reconstruction",
        "random baseline",
        "Channel x channel cosine",
        "Run settings",
        "percentile",
        "faithfulness",
        "masked",
        "← previous",
        "next →",
        "random",
        'property="og:title"',
        'property="og:description"',
    ]:
        assert expected in page, expected
    assert 'aria-current="page" class="active">gate' in page


def test_a_neuron_whose_channels_are_all_generic_reads_none_on_its_page_and_the_layer_table(client, store):
    """The store keeps 0 as such a neuron's best percentile (the layer table showed a red 0 while
    its page showed 100 on every channel)."""
    engine = client.app.state.engine
    with engine.begin() as conn:
        row = conn.execute(
            select(T.Neuron.id, T.Neuron.generic_count, T.Neuron.best_percentile).where(
                T.Neuron.layer == 0, T.Neuron.side == "in", T.Neuron.neuron == 4
            )
        ).one()
        was = conn.execute(
            select(T.Channel.channel, T.Channel.generic).where(T.Channel.neuron_id == row.id)
        ).all()
        conn.execute(
            T.Neuron.__table__.update()
            .where(T.Neuron.id == row.id)
            .values(generic_count=len(was), best_percentile=0.0)
        )
        conn.execute(T.Channel.__table__.update().where(T.Channel.neuron_id == row.id).values(generic=True))
    try:
        twin = get(client, f"/m/{store.model}/0/4.json?side=in").json()
        assert twin["best_percentile"] is None
        html_page = get(client, f"/m/{store.model}/0/4?side=in").text
        assert re.search(
            r"best percentile</a></dt><dd><span class=\"pct pct-none\"[^>]*>none</span>", html_page
        )
        table = get(client, f"/m/{store.model}/0.json?side=in&limit=500").json()
        (mine,) = [r for r in table["rows"] if r["neuron"] == 4]
        assert mine["best_percentile"] is None and mine["has_channels"]
        layer_html = get(client, f"/m/{store.model}/0?side=in&limit=500").text
        cells = re.search(
            r'<a href="[^"]*/0/4\?side=in">4</a></td>\s*(?:<td class="label">.*?</td>\s*)?'
            r"<td>[^<]*</td>\s*<td>(.*?)</td>",  # the score, then the best percentile
            layer_html,
            re.S,
        )
        assert ">none<" in cells.group(1)
    finally:
        with engine.begin() as conn:
            conn.execute(
                T.Neuron.__table__.update()
                .where(T.Neuron.id == row.id)
                .values(generic_count=row.generic_count, best_percentile=row.best_percentile)
            )
            for channel, generic in was:
                conn.execute(
                    T.Channel.__table__.update()
                    .where(T.Channel.neuron_id == row.id, T.Channel.channel == channel)
                    .values(generic=generic)
                )
    assert get(client, f"/m/{store.model}/0/4.json?side=in").json()["best_percentile"] is not None


def test_every_chart_has_a_legend_and_every_heatmap_a_colour_scale(client, store):
    pages_with_charts = {
        f"/m/{store.model}": 2,
        f"/m/{store.model}/1/0?run={store.run_a}": 4,
        f"/m/{store.model}/1/0/out/0?run={store.run_a}": 2,  # its histogram and its own curve
    }
    for url, count in pages_with_charts.items():
        page = get(client, url).text
        figures = re.findall(r'(?s)<figure class="plot">\s*<svg.*?</figure>', page)
        assert len(figures) == count, url
        for figure in figures:
            caption = figure.split("<figcaption>")[1]
            if "histogram" not in caption.lower() and "z-scores" not in caption:
                assert 'class="key"' in caption, (url, caption[:200])
    neuron = get(client, f"/m/{store.model}/1/0?run={store.run_a}").text
    curves = re.search(
        r'(?s)<figure class="plot">\s*<svg[^>]*aria-labelledby="t-Kurtosis-during-optimisation".*?</figure>',
        neuron,
    ).group(0)
    channels = get(client, f"/m/{store.model}/1/0.json?run={store.run_a}").json()["data"]["channels"]
    assert all(f"channel {ch['index']}</span>" in curves for ch in channels)
    assert "solver stage change (iteration 50)" in curves and "AdamW" in curves
    by_index = re.search(r'(?s)aria-labelledby="t-Kurtosis-by-channel".*?</figure>', neuron).group(0)
    assert "min_kurtosis 5</text>" not in by_index  # named in the legend, not drawn over the bars
    assert "dashed line: min_kurtosis 5" in by_index
    model = get(client, f"/m/{store.model}").text
    assert model.count("not computed</span>") == 2 and "lowest, " in model and "highest, " in model


def test_the_layer_table_shows_each_neuron_s_best_channel_s_first_tokens(client, store):
    table = get(client, f"/m/{store.model}/1.json?run={store.run_a}&limit=500").json()
    page = get(client, f"/m/{store.model}/1?run={store.run_a}&limit=500").text
    shown = [r for r in table["rows"] if r["has_channels"]]
    assert shown
    for r in shown:
        neuron = get(client, f"/m/{store.model}/1/{r['neuron']}.json?run={store.run_a}").json()
        eligible = [
            (c["faithfulness_percentile"], -c["index"], c)
            for c in neuron["data"]["channels"]
            if not c["generic"]
        ]
        if not eligible:
            assert r["best_channel"] is None
            continue
        best = max(eligible, key=lambda e: e[:2])[2]
        assert r["best_channel"] == best["index"]
        link = next(ch for ch in neuron["channels"] if ch["index"] == best["index"])
        assert r["best_channel_tokens"] == link["label"]
        assert (
            f'href="{html.escape(r["best_channel_url"])}">{html.escape(link["label"], quote=False)}</a>'
            in page
        )


def test_channels_below_half_the_random_percentiles_are_folded_too(client, store):
    seen = 0
    for layer in (0, 1):
        for side in ("gate", "in", "out"):
            for neuron in range(5):
                url = f"/m/{store.model}/{layer}/{neuron}?side={side}&run={store.run_a}&min_kurtosis=-100"
                twin = get(client, json_twin(url)).json()
                page = get(client, url).text
                for ch, link in zip(twin["data"]["channels"], twin["channels"], strict=True):
                    row = re.search(rf'(?s)<tr class="([^"]*)" id="channel-{ch["index"]}">(.*?)</tr>', page)
                    folded = '<details class="fold">' in row.group(2)
                    assert link["below_median"] == (ch["faithfulness_percentile"] < 50)
                    assert folded == (ch["generic"] or link["below_median"]), (url, ch["index"])
                    seen += link["below_median"] and not ch["generic"]
    assert seen  # the tiny model has such channels


def test_min_kurtosis_moves_the_cut_off_and_folds_channels(client, store):
    url = f"/m/{store.model}/0/3.json?run={store.run_a}"
    low = get(client, url + "&min_kurtosis=-1000").json()
    high = get(client, url + "&min_kurtosis=1000").json()
    assert not any(c["below_cutoff"] for c in low["channels"])
    assert all(c["below_cutoff"] for c in high["channels"])
    page = get(client, url.replace(".json", "") + "&min_kurtosis=1000").text
    assert "min_kurtosis 1000" in page
    assert page.count('<details class="fold">') == 3  # every channel folded, one click to open


def test_channel_page_top_100_tokens_histogram_and_nearest(client, store):
    data = get(client, f"/m/{store.model}/0/3/in/1.json?run={store.run_a}").json()
    assert data["channel"]["index"] == 1
    assert len(data["tokens"]) == 100
    zs = [t["z"] for t in data["tokens"]]
    sign = 1 if data["channel"]["skew"] >= 0 else -1
    assert [sign * z for z in zs] == sorted((sign * z for z in zs), reverse=True)
    assert sum(b["count"] for b in data["histogram"]["bins"]) == data["histogram"]["scored_tokens"]
    assert len(data["vector"]) == 64
    nearest = data["nearest"]
    assert nearest and all(not (n["layer"] == 0 and n["side"] == "in" and n["neuron"] == 3) for n in nearest)
    # By |cos| with the sign kept (a channel on the other tail of the same tokens is near), beside
    # what a random direction reaches among as many channels.
    assert [abs(n["cos"]) for n in nearest] == sorted((abs(n["cos"]) for n in nearest), reverse=True)
    assert any(n["cos"] < 0 for n in nearest)
    assert data["nearest_candidates"] > 0 and 0 < data["nearest_baseline"] < 1
    assert get(client, data["ablate_url"]).status_code == 200
    assert "channels=1" in data["ablate_url"]
    # The stored top tokens (from the worker) lead the recomputed top 100.
    stored = [t["id"] for t in data["channel"]["top_tokens"][:5]]
    assert set(stored) <= {t["id"] for t in data["tokens"][:20]}
    page = get(client, f"/m/{store.model}/0/3/in/1?run={store.run_a}").text
    assert "Nearest channels" in page and 'property="og:title"' in page
    assert "opposite tail" in page and f"{data['nearest_baseline']:.3f}" in page
    assert f'href="{html.escape(data["ablate_url"])}"' in page


def test_compare_page_matches_channels_of_two_runs(client, store):
    data = get(client, f"/m/{store.model}/1/2/compare.json?a={store.run_a}&b={store.run_b}").json()
    assert data["run_a"]["hash"] == store.run_a and data["run_b"]["hash"] == store.run_b
    assert sorted(m["a"] for m in data["matches"]) == [0, 1, 2] == sorted(m["b"] for m in data["matches"])
    assert 0 <= data["mean_cos"] <= 1 and 0 <= data["baseline_cos"] <= 1
    # The same matching against other neurons of the layer side in run A (nearest ids first).
    layer = get(client, f"/m/{store.model}/1.json?run={store.run_a}&limit=500").json()
    others = [r for r in layer["rows"] if r["has_channels"] and r["neuron"] != 2]
    assert data["other_neurons"] == min(8, len(others)) > 0 and 0 <= data["other_neurons_cos"] <= 1
    page = get(client, f"/m/{store.model}/1/2/compare?a={store.run_a}&b={store.run_b}").text
    assert f"{data['other_neurons_cos']:.3f}" in page and f"{data['other_neurons']} other out neurons" in page
    only_one = get(client, f"/m/{store.model}/0/2/compare.json").json()
    assert only_one["message"] and not only_one["matches"]


# --- permalinks and caching -----------------------------------------------------------------------


def test_unpinned_pages_show_the_newest_run_with_the_neuron_and_offer_a_permalink(client, store):
    newer = get(client, f"/m/{store.model}/1/2.json").json()
    assert newer["data"]["run"] == store.run_b  # run B is newer and has layer 1 `out`
    assert newer["pinning"] == {"pinned": False, "permalink": f"/m/{store.model}/1/2?run={store.run_b}"}
    older = get(client, f"/m/{store.model}/1/2.json?side=in").json()
    assert older["data"]["run"] == store.run_a  # run B has no `in` neurons
    page = get(client, f"/m/{store.model}/1/2").text
    assert f'Showing run <a href="/m/{store.model}?run={store.run_b}"><code>{store.run_b}</code>' in page
    assert f'value="http://testserver/m/{store.model}/1/2?run={store.run_b}"' in page
    pinned = get(client, f"/m/{store.model}/1/2?run={store.run_a}").text  # the permalink reproduces it
    assert f'Pinned to run <a href="/m/{store.model}?run={store.run_a}"' in pinned


def test_immutable_pages_are_cached_and_pages_that_can_change_revalidate(client, store, count_queries):
    # A neuron's z-score histogram pinned to its run: the vector never changes.
    url = f"/m/{store.model}/0/4/histogram.svg?run={store.run_a}&side=in"
    first = get(client, url)
    assert first.headers["cache-control"] == "public, max-age=31536000, immutable"
    etag = first.headers["etag"]
    count_queries.clear()
    again = get(client, url)
    assert again.content == first.content and again.headers["etag"] == etag
    assert count_queries == []  # served from the page cache: no query at all
    not_modified = client.get(url, headers={"If-None-Match": etag})
    assert not_modified.status_code == 304
    # Without the overview, a pinned neuron page lists the run's next computed neurons, which a
    # growing run changes (tests/test_coverage.py: with it, the page is immutable); unpinned
    # pages follow the newest run; a channel page's nearest channels follow the run.
    for unpinned_or_incomplete in [
        f"/m/{store.model}/0/4?side=in",
        f"/m/{store.model}/0/4?run={store.run_a}&side=in",
        f"/m/{store.model}/1/4?run={store.run_b}",
        f"/m/{store.model}/1/0/out/0?run={store.run_a}",
        f"/m/{store.model}/1/0/compare?a={store.run_a}&b={store.run_b}",
    ]:
        response = get(client, unpinned_or_incomplete)
        assert response.headers["cache-control"] == "no-cache"
        assert (
            client.get(
                unpinned_or_incomplete, headers={"If-None-Match": response.headers["etag"]}
            ).status_code
            == 304
        )


# --- search ---------------------------------------------------------------------------------------


def _variants(store):
    """A token key with several spellings in the vocabulary (leading space, case)."""
    from channelscope.web.vocabulary import normalise

    by_key: dict[str, list[str]] = {}
    for t in store.tokens:
        by_key.setdefault(normalise(t), []).append(t)
    return {k: v for k, v in by_key.items() if len(v) > 1 and k.strip()}


def test_a_release_changes_every_etag_and_cache_key_of_the_same_page(client, store, monkeypatch):
    """Markup cached as immutable before a release is never served after it: the ETag and the
    page cache key carry a hash of the templates, static files and web code, and the static
    files' URLs carry it too."""
    from channelscope.web import responses

    url = f"/m/{store.model}/1/0/histogram.json?run={store.run_a}"  # immutable
    before = get(client, url)
    assert before.headers["etag"].startswith(f'"{responses.MARKUP_VERSION}-')
    assert f"/static/channelscope.css?v={responses.MARKUP_VERSION}" in get(client, "/").text
    monkeypatch.setattr(responses, "MARKUP_VERSION", "0" * 12)
    after = get(client, url)
    assert after.headers["etag"] != before.headers["etag"] and after.headers["etag"].startswith(
        '"000000000000-'
    )
    stale = client.get(url, headers={"If-None-Match": before.headers["etag"]})
    assert stale.status_code == 200  # the old ETag no longer matches
    assert responses.markup_version() == before.headers["etag"][1:13]


def test_search_ignores_case_and_leading_spaces_unless_exact(client, store):
    variants = _variants(store)
    key, spellings = next(iter(sorted(variants.items())))
    results = []
    for text in [*spellings, key.upper(), "  " + key]:
        data = get(
            client, "/search.json?" + urlencode({"token": text, "min_kurtosis": -100, "generic": 1})
        ).json()
        assert sorted(m["token"] for m in data["matches"]) == sorted(spellings)
        results.append(
            [(h["layer"], h["side"], h["neuron"], h["channel"], h["token"]["id"]) for h in data["hits"]]
        )
    assert all(r == results[0] for r in results)
    exact = get(client, "/search.json?" + urlencode({"token": spellings[0], "exact": 1})).json()
    assert [m["token"] for m in exact["matches"]] == [spellings[0]]


def _all_hits(client, query: dict) -> list[dict]:
    return get(client, "/search.json?" + urlencode({**query, "limit": 200})).json()["hits"]


def _popular_token(client, store):
    """The token in the most channels' top lists (over both runs' newest = run B and all)."""
    with db.session(db.make_engine(store.url)) as session:
        token_id = session.execute(
            select(T.ChannelToken.token_id)
            .group_by(T.ChannelToken.token_id)
            .order_by(func.count().desc())
            .limit(1)
        ).scalar_one()
    return store.tokens[token_id]


def test_search_ranks_by_faithfulness_percentile_then_z_and_sort_z(client, store):
    token = _popular_token(client, store)
    query = {"token": token, "exact": 1, "min_kurtosis": -100, "generic": 1, "run": store.run_a}
    hits = _all_hits(client, query)
    assert len(hits) >= 2
    keys = [
        (h["faithfulness_percentile"], h["token"]["z"] * (1 if h["token"]["z"] >= 0 else 1)) for h in hits
    ]
    assert [k[0] for k in keys] == sorted((k[0] for k in keys), reverse=True)
    by_z = _all_hits(client, {**query, "sort": "z"})
    oriented = [abs(h["token"]["z"]) for h in by_z]
    assert oriented == sorted(oriented, reverse=True)
    assert {h["url"] for h in by_z} == {h["url"] for h in hits}


def test_search_lists_each_channel_once_with_the_channel_page_s_signed_z_and_its_effect(client, store):
    """Search showed the index's oriented z (+16.85 where the channel page showed -16.85), and a
    channel once per matching spelling."""
    seen_negative = False
    for text in ("the", "a", "e", "s", "t", "in"):
        hits = _all_hits(client, {"token": text, "min_kurtosis": -100, "generic": 1})
        keys = [(h["run"], h["layer"], h["side"], h["neuron"], h["channel"]) for h in hits]
        assert len(keys) == len(set(keys)), text
        for h in hits[:6]:
            channel = get(client, h["url"].replace("?", ".json?")).json()
            z_on_page = {t["id"]: t["z"] for t in channel["tokens"]}
            for t in [h["token"], *h["also"]]:
                assert t["z"] * h["tail"] > 0
                if t["id"] in z_on_page:
                    assert abs(z_on_page[t["id"]] - t["z"]) < 0.05, (h, z_on_page[t["id"]])
            assert h["tail"] == channel["channel"]["tail"] and h["effect"] == channel["channel"]["effect"]
            assert h["effect"] in (
                ("promotes", "suppresses") if h["side"] == "out" else ("fires on", "is inhibited by")
            )
            seen_negative |= h["tail"] < 0
    assert seen_negative  # the tiny model's channels lie on both tails


def test_the_sign_convention_reads_the_same_on_neuron_channel_and_ablation_pages(client, store):
    for side in ("out", "in"):
        base = f"/m/{store.model}/0/2"
        neuron = get(client, f"{base}.json?side={side}&run={store.run_a}").json()
        ablation = get(client, f"{base}/ablate.json?run={store.run_a}&side={side}&channels=0").json()
        words = ("promotes", "suppresses") if side == "out" else ("fires on", "is inhibited by")
        for ch, toggle in zip(neuron["data"]["channels"], ablation["controls"]["channels"], strict=True):
            assert ch["effect"] == words[0 if ch["tail"] > 0 else 1] == toggle["effect"]
            channel = get(client, f"{base}/{side}/{ch['index']}.json?run={store.run_a}").json()["channel"]
            assert channel["effect"] == ch["effect"]
        assert ablation["preview"]["effect"] == neuron["data"]["channels"][0]["effect"]
        page = get(client, f"{base}/ablate?run={store.run_a}&side={side}&channels=0").text
        assert f"{'▲' if ablation['preview']['tail'] > 0 else '▼'} {ablation['preview']['effect']}" in page


def test_search_filters_generic_channels_kurtosis_layers_and_side(client, store):
    token = _popular_token(client, store)
    base = {"token": token, "exact": 1, "run": store.run_a}
    everything = _all_hits(client, {**base, "min_kurtosis": -100, "generic": 1})
    default = _all_hits(client, base)
    assert all(not h["generic"] and h["kurtosis"] >= 5 for h in default)
    assert len(default) == sum(1 for h in everything if not h["generic"] and h["kurtosis"] >= 5)
    only = _all_hits(
        client, {**base, "min_kurtosis": -100, "generic": 1, "side": "in", "layer_min": 1, "layer_max": 1}
    )
    assert only == [h for h in everything if h["side"] == "in" and h["layer"] == 1]
    page = get(client, "/search?" + urlencode(base)).text
    assert "Left out: generic channels and channels with kurtosis below 5" in page or "No channel has" in page


def test_search_keyset_pagination_is_stable(client, store):
    token = _popular_token(client, store)
    for sort in ("percentile", "z"):
        query = {"token": token, "min_kurtosis": -100, "generic": 1, "sort": sort}
        everything = _all_hits(client, query)
        walked, url = [], "/search.json?" + urlencode({**query, "limit": 2})
        while url:
            data = get(client, url).json()
            walked += data["hits"]
            assert len(data["hits"]) <= 2
            url = data["next_url"] and json_twin(data["next_url"])
        assert walked == everything


def test_search_for_a_token_not_in_the_vocabulary_suggests_close_tokens(client, store):
    known = next(t for t in store.tokens if len(t.strip()) >= 4 and t.strip().isalpha())
    typo = known.strip() + "qx"
    data = get(client, "/search.json?" + urlencode({"token": typo})).json()
    assert data["hits"] == [] and data["matches"] == []
    assert "is not a token of" in data["message"]
    assert data["close"], "close tokens suggested"
    page = get(client, "/search?" + urlencode({"token": typo})).text
    assert "Close tokens" in page


def test_sql_metacharacters_in_search_are_plain_text(client, store):
    with db.session(db.make_engine(store.url)) as session:
        before = session.scalar(select(func.count()).select_from(T.Channel))
    for text in [
        "'; DROP TABLE channels; --",
        "%",
        "_",
        "\\",
        "' OR '1'='1",
        '"',
        "%%'--",
        "a' UNION SELECT 1--",
    ]:
        for url in ["/search?", "/search.json?", "/search/suggest?"]:
            response = client.get(url + urlencode({"token": text, "model": store.model}))
            assert response.status_code == 200, (text, response.text[:300])
    with db.session(db.make_engine(store.url)) as session:
        assert session.scalar(select(func.count()).select_from(T.Channel)) == before


def test_autocomplete_suggests_tokens_by_prefix(client, store):
    data = get(client, "/search/suggest.json?token=th").json()
    assert data["suggestions"]
    assert all(s["token"].lstrip(" ").casefold().startswith("th") for s in data["suggestions"])
    fragment = get(client, "/search/suggest?token=th").text
    assert fragment.lstrip().startswith("<ul") and "<html" not in fragment
    assert 'hx-get="/search/suggest"' in get(client, "/search").text


# --- the layer table ------------------------------------------------------------------------------


@pytest.mark.parametrize("sort", ["percentile", "kurtosis", "best_kurtosis", "channels", "reconstruction"])
def test_layer_table_keyset_pagination_walks_every_neuron_in_order(client, store, sort):
    field = {
        "percentile": "best_percentile",
        "kurtosis": "kurtosis",
        "best_kurtosis": "best_kurtosis",
        "channels": "channel_count",
        "reconstruction": "reconstruction",
    }[sort]
    for order in ("desc", "asc"):
        url = f"/m/{store.model}/0.json?side=gate&run={store.run_a}&sort={sort}&order={order}&limit=2"
        rows = []
        while url:
            data = get(client, url).json()
            rows += data["rows"]
            url = data["next_url"] and json_twin(data["next_url"])
        assert sorted(r["neuron"] for r in rows) == [0, 1, 2, 3, 4]
        keys = [(r[field], r["neuron"]) for r in rows]
        expected = sorted(keys, key=lambda k: (-k[0] if order == "desc" else k[0], k[1]))
        assert [k[1] for k in keys] == [k[1] for k in expected]


def test_jump_to_neuron_and_random_neuron_redirect(client, store):
    jump = get(client, f"/m/{store.model}/1?neuron=3&side=in", 303)
    assert jump.headers["location"] == f"/m/{store.model}/1/3?side=in"
    twin = get(client, f"/m/{store.model}/1.json?neuron=3&side=in", 303)
    assert twin.headers["location"] == f"/m/{store.model}/1/3.json?side=in"  # JSON stays JSON
    for _ in range(5):
        target = get(client, f"/m/{store.model}/random?run={store.run_a}", 303).headers["location"]
        assert get(client, target).status_code == 200
        assert parse_qs(urlsplit(target).query)["run"] == [store.run_a]


def test_random_neuron_is_uniform_over_the_run_s_neurons_and_has_a_json_twin(client, store):
    # Run A computed neurons 0-4 of 128 per layer side: "the next computed neuron after a random
    # id" landed on neuron 0 in ~123 of 128 draws.
    seen = set()
    for _ in range(60):
        target = get(client, f"/m/{store.model}/random?run={store.run_a}", 303).headers["location"]
        seen.add(urlsplit(target).path.rsplit("/", 1)[1])
    assert len(seen) >= 4, seen
    twin = get(client, f"/m/{store.model}/random.json?run={store.run_a}", 303).headers["location"]
    assert urlsplit(twin).path.endswith(".json")
    body = get(client, twin).json()
    assert body["neuron"] in range(5) and body["run"]["hash"] == store.run_a
    unpinned = get(client, f"/m/{store.model}/random.json", 303).headers["location"]
    assert urlsplit(unpinned).path.endswith(".json")
    missing = client.get("/m/no-such-model/random.json")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("application/")


def test_a_model_s_short_name_redirects_to_its_full_name(client, store):
    short = store.model.split("-")[0]  # as `smollm2` is for smollm2-135m-instruct
    moved = get(client, f"/m/{short}/1/0?run={store.run_a}", 308).headers["location"]
    assert moved == f"/m/{store.model}/1/0?run={store.run_a}"
    assert get(client, f"/m/{short}.json", 308).headers["location"] == f"/m/{store.model}.json"
    assert client.get("/m/tin/1/0").status_code == 404  # not a whole dash-separated part


def test_layer_links_lead_only_to_layers_with_something_to_show(client, store):
    # Run B computed layer 1 `out` only: pinned to it, "layer 0" would be a 404.
    pinned = get(client, f"/m/{store.model}/1.json?run={store.run_b}").json()
    assert list(pinned["layer_urls"]) == ["1"]
    assert "layer 0" not in get(client, f"/m/{store.model}/1?run={store.run_b}").text.split("<table")[0]
    for url in (
        f"/m/{store.model}/1",
        f"/m/{store.model}/0?side=gate",
        f"/m/{store.model}/1?run={store.run_b}",
    ):
        for link in get(client, json_twin(url)).json()["layer_urls"].values():
            assert get(client, link).status_code == 200


def test_compare_runs_is_offered_only_where_another_run_has_the_neuron(client, store):
    # Run B computed layer 1 `out` only: there, two runs to compare; elsewhere only run A.
    assert get(client, f"/m/{store.model}/1/0.json").json()["compare_url"]
    assert get(client, f"/m/{store.model}/0/0.json").json()["compare_url"] is None
    assert "compare runs" not in get(client, f"/m/{store.model}/0/0").text
    assert get(client, f"/m/{store.model}/0/0.json?run={store.run_a}").json()[
        "compare_url"
    ]  # cached for good


def test_og_url_names_the_run_the_page_shows(client, store):
    for url in (f"/m/{store.model}/1/0", f"/m/{store.model}/1", f"/m/{store.model}/1/0/out/0"):
        page = get(client, url).text
        og = re.search(r'property="og:url" content="([^"]*)"', page).group(1)
        assert "run=" in html.unescape(og), (url, og)


def test_a_glossary_defines_the_numbers_and_their_labels_link_to_it(client, store):
    terms = {t["id"]: t for t in get(client, "/glossary.json").json()["terms"]}
    wanted = {"channel", "kurtosis", "faithfulness", "percentile", "generic", "alpha", "selectivity", "sign"}
    assert wanted <= set(terms)
    assert "excess" in terms["kurtosis"]["term"] and "promotes" in terms["sign"]["definition"]
    glossary = get(client, "/glossary").text
    for term in terms:
        assert f'id="{term}"' in glossary
    linked = {
        f"/m/{store.model}/1/0?run={store.run_a}": {
            "kurtosis",
            "percentile",
            "faithfulness",
            "sign",
            "channel",
        },
        f"/m/{store.model}/1/0/out/0?run={store.run_a}": {"percentile", "faithfulness", "kurtosis", "alpha"},
        f"/m/{store.model}/1": {"percentile", "kurtosis", "generic", "reconstruction"},
        "/search?token=the&min_kurtosis=-100&generic=1": {"percentile", "kurtosis", "sign", "z"},
        f"/m/{store.model}/1/0/ablate?run={store.run_a}&side=out&channels=0": {"selectivity", "alpha"},
    }
    for url, ids in linked.items():
        page = get(client, url).text
        assert {i for i in ids if f'href="/glossary#{i}"' not in page} == set(), url


# --- bad input ------------------------------------------------------------------------------------


def not_found_cases(store):
    m = store.model
    return [
        "/m/no-such-model",
        "/m/no-such-model/1/2",
        f"/m/{m}/2",  # layer out of range (2 layers)
        f"/m/{m}/1/128",  # neuron out of range (128 per layer)
        f"/m/{m}/1/100",  # in range but not computed
        f"/m/{m}/1/0/sideways/0",  # unknown side
        f"/m/{m}/1/0/out/3",  # channels are 0-2
        f"/m/{m}/1/0?run=0123456789ab",  # unknown run
        f"/m/{m}/1/0?run=not-a-hash",
        f"/m/{m}/0/0?run={store.run_b}",  # run B has no layer 0
        f"/m/{m}/1/0/compare?a=ffffffffffff",
        "/search?token=the&model=nope",
        "/nowhere",
    ]


def test_unknown_things_are_404_pages_and_404_json(client, store):
    for url in not_found_cases(store):
        page = client.get(url)
        assert page.status_code == 404, (url, page.status_code, page.text[:300])
        assert page.headers["content-type"].startswith("text/html") and "404" in page.text
        if url != "/nowhere":
            twin = client.get(json_twin(url))
            assert twin.status_code == 404, url
            assert twin.json()["status"] == 404 and twin.json()["detail"]


def test_malformed_query_values_are_422_with_a_message(client, store):
    m = store.model
    for url in [
        f"/m/{m}/one",
        f"/m/{m}/-1",
        f"/m/{m}/1/x",
        f"/m/{m}/1/0?side=sideways",
        f"/m/{m}/1/0?min_kurtosis=nan",
        f"/m/{m}/1/0?min_kurtosis=inf",
        f"/m/{m}/1/0?min_kurtosis=abc",
        f"/m/{m}/1?sort=name",
        f"/m/{m}/1?after=garbage",
        f"/m/{m}/1?limit=0",
        f"/m/{m}/1?limit=100000",
        "/search?token=" + "a" * 101,
        "/search?token=a&after=1~2",
        "/search?token=a&layer_min=-3",
        "/search?token=a&side=up",
    ]:
        response = client.get(url)
        assert response.status_code == 422, (url, response.status_code)
        assert "Malformed" in response.text and "Traceback" not in response.text
        twin = client.get(json_twin(url))
        assert twin.status_code == 422 and twin.json()["detail"], url


HOSTILE_PATHS = [
    "/m/..%2f..%2fetc%2fpasswd",
    "/m/%2e%2e/%2e%2e/etc/passwd",
    "/m/%00",
    "/m/x%00y/1/2",
    "/m/%E2%80%AE/1",
    "/m/<script>alert(1)</script>",
    "/m/{model}/99999999999999999999999999",
    "/m/{model}/1/99999999999999999999999999",
    "/m/{model}/1/-99999999999999999999",
    "/m/{model}/1/0/out/99999999999999999999",
    "/m/{model}/1/0/%00/0",
    "/m/{model}/1/0?run=%00",
    "/m/{model}/1/0?run=" + "f" * 64,
    "/m/{model}/1/0?side=%00",
    "/m/{model}/1/0?min_kurtosis=1e999",
    "/m/{model}/1?after=1e999~3",
    "/m/{model}/1?after=nan~3",
    "/m/{model}/1?after=1~99999999999999999999",
    "/m/{model}/1?neuron=99999999999999999",
    "/search?token=%00",
    "/search?token=%ED%A0%80",
    "/search?token=%FF%FE",
    "/search?token=a&after=1e999~1~1~1",
    "/search?token=a&after=1~1~99999999999999999999~1",
    "/search?token=a&layer_min=99999",
    "/search?token=a&model=%00",
    "/search?token=a&run=%00",
    "/search?" + "token=a&" * 200,
    "/m/{model}/1/0/histogram.svg?run=%00",
    "/m/{model}/1/0/histogram.svg",
    "/static/../app/main.py",
    "/static/%2e%2e/app/main.py",
    "/" + "a/" * 500,
]


def test_hostile_paths_and_values_are_never_a_500(client, store):
    for path in HOSTILE_PATHS:
        url = path.replace("{model}", store.model)
        for variant in (url, json_twin(url) if "?" in url or url.count("/") > 1 else url):
            response = client.get(variant)
            assert response.status_code in (200, 404, 422), (
                variant,
                response.status_code,
                response.text[:300],
            )
            assert "Traceback" not in response.text and "sqlalchemy" not in response.text.lower()
            assert "import " not in response.text  # no source file served


def test_hostile_tokens_are_escaped_and_shown_visibly(client, store):
    url = f"/m/{store.model}/1/0?run={store.run_a}"
    page = get(client, url).text
    assert "<script>alert(1)</script>" not in page
    assert "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "onerror=alert(1)&gt;" in page and "&#34;&gt;&lt;img·src=x·onerror" in page
    assert "\u202e" not in page and "\\u202e" in page
    assert "\x00" not in page and "\\x00" in page
    templates = Path(__file__).parent.parent / "templates"
    uncommented = {
        p.name: re.sub(r"\{#.*?#\}", "", p.read_text(), flags=re.S) for p in templates.glob("*.html")
    }
    assert not [name for name, text in uncommented.items() if "|safe" in text.replace(" ", "")]
    data = get(client, json_twin(url)).json()  # JSON keeps the exact strings
    assert [t["token"] for t in data["data"]["channels"][0]["top_tokens"][:4]] == [
        store.tokens[i] for i in store.hostile_ids
    ]
    search = get(
        client, "/search?" + urlencode({"token": "<script>alert(1)</script>", "min_kurtosis": -100})
    ).text
    assert "<script>alert(1)</script>" not in search and "&lt;script&gt;" in search
    not_found = client.get("/m/<script>alert(1)</script>").text
    assert "<script>alert(1)</script>" not in not_found
    assert "default-src 'self'" in client.get(url).headers["content-security-policy"]


# --- a constant number of queries -----------------------------------------------------------------


def test_each_page_makes_a_constant_number_of_queries(client, store, count_queries):
    m, a = store.model, store.run_a
    token = _popular_token(client, store)
    families = {
        "neuron": [
            f"/m/{m}/{layer}/{n}?side={s}" for layer, n, s in [(0, 0, "gate"), (1, 4, "out"), (1, 3, "in")]
        ],
        "channel": [f"/m/{m}/0/{n}/in/{c}" for n, c in [(0, 0), (4, 2)]],
        "layer": [f"/m/{m}/0?limit=1", f"/m/{m}/0?limit=500", f"/m/{m}/1?side=in&sort=reconstruction"],
        "search": [
            "/search?" + urlencode({"token": t, "min_kurtosis": -100, "generic": 1, "limit": k})
            for t, k in [(token, 1), (token, 200), ("the", 50)]
        ],
        "model": [f"/m/{m}", f"/m/{m}?run={a}"],
        "home": ["/"],
        "compare": [f"/m/{m}/1/0/compare", f"/m/{m}/1/3/compare?side=out"],
    }
    # The pages opened most have their own, tighter budgets (bench/web.py times them): a
    # neuron side, its channels and their tokens; the models with their newest runs, then hits.
    # search: the hits, the raw projections, and the spellings each listed channel matched
    most = {family: 8 for family in families} | {"neuron": 3, "search": 3}
    for family, urls in families.items():
        counts = []
        for url in urls:
            get(client, url)  # warm the per-process vocabulary and projection caches
            count_queries.clear()
            get(
                client,
                url.replace("?", ".json?") if "?" in url else url + ".json" if url != "/" else "/.json",
            )
            counts.append(len(count_queries))
        assert len(set(counts)) == 1, (family, counts)
        assert counts[0] <= most[family], (family, counts)


# --- health and outages ---------------------------------------------------------------------------


def test_healthz_reports_a_reachable_current_database(client):
    data = get(client, "/healthz").json()
    assert data["status"] == "ok" and data["revision"] == data["head"]
    assert get(client, "/ping").text == "ok"


def test_docs_describe_the_api_from_its_openapi_schema(client):
    page = get(client, "/docs").text
    assert "/m/{model}/{layer}/{neuron}.json" in page and "min_kurtosis" in page
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', page)  # nothing from another site (no CDN)
    schema = get(client, "/openapi.json").json()
    assert "/search.json" in schema["paths"]


def test_serve_command_prints_its_url_and_serves(store):
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DATABASE_URL": store.url}
    command = [sys.executable, "-m", "channelscope.cli", "serve", "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.strip() == f"Channelscope is serving at http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/m/{store.model}/1/0.json") as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(10)


def test_side_tabs_lead_only_to_sides_that_have_a_page(client, store):
    """Without the overview a side no run has computed is a 404: its tab is not shown."""
    m = store.model
    pinned_b = get(client, f"/m/{m}/1/0.json?run={store.run_b}").json()
    assert list(pinned_b["side_urls"]) == ["out"]  # run B computed layer 1 `out` only
    for url in get(client, f"/m/{m}/1/0.json").json()["side_urls"].values():
        assert get(client, url).status_code == 200
    assert set(get(client, f"/m/{m}/1/0.json?run={store.run_a}").json()["side_urls"]) == {"gate", "in", "out"}
