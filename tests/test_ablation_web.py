"""The ablation page (issue 6) in-process: figures, JSON twin, limits (422, 429, 504), a missing
or disallowed model file, and the model's weights left bit-identical by every request."""

import shutil

import pytest
import torch
from fastapi.testclient import TestClient

from channelscope.core import db
from tests.fixtures.ablation_store import LAYER, PROMPT, fill_store, make_app


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory, tiny_gguf):
    folder = tmp_path_factory.mktemp("ablation-store")
    url = f"sqlite:///{folder / 'store.db'}"
    db.upgrade(url)
    return url, fill_store(url, tiny_gguf, folder)


@pytest.fixture(scope="module")
def client(sqlite_store, tiny_gguf):
    url, _ = sqlite_store
    app = make_app(url, [tiny_gguf.parent])
    with TestClient(app) as c:
        c.app_state = app.state
        yield c


def ablate_url(run: str, side="out", channels="0", prompt=PROMPT, neuron=0, json=False):
    from urllib.parse import urlencode

    query = {"run": run, "side": side, "channels": channels}
    if prompt:
        query["prompt"] = prompt
    return f"/m/tiny-llama/{LAYER}/{neuron}/ablate{'.json' if json else ''}?{urlencode(query)}"


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _loaded(client):
    (lm,) = client.app_state.runtime._models.values()
    return lm


@pytest.mark.parametrize("side", ["out", "gate", "in"])
def test_the_page_and_its_json_twin_show_the_same_figures(client, sqlite_store, side):
    _, run = sqlite_store
    page = client.get(ablate_url(run, side, channels="0,1"))
    twin = client.get(ablate_url(run, side, channels="0,1", json=True))
    assert page.status_code == 200 and twin.status_code == 200, (page.text[-500:], twin.text[-500:])
    data = twin.json()
    assert [a["channel"] for a in data["applied"]] == [0, 1]
    assert data["applied"][0]["refitted"] is False and data["applied"][1]["refitted"] is True
    preview = data["preview"]["selectivity"]
    assert preview["value"] is not None and len(preview["baseline"]) == 16
    effect = data["model_effect"]
    assert effect is not None, data["model_note"]
    assert len(effect["tokens"]) > 5 and len(effect["next_before"]) == 5 and len(effect["next_after"]) == 5
    if side == "out":
        assert effect["threshold"] is not None and "90th percentile" in effect["threshold_note"]
        assert len(effect["selectivity"]["baseline"]) == 16
        assert effect["target_next"]  # the channels' own tokens at the last position
        top = {t["id"]: t["probability"] for t in effect["next_before"]}
        after = {t["id"]: t["probability"] for t in effect["next_after"]}
        for t in effect["next_before"]:  # each list shows the change: the same token, the other side
            assert t["id"] not in after or abs(after[t["id"]] - t["other"]) < 1e-4
        for t in effect["target_next"]:
            assert 0 <= t["before"] <= 1 and 0 <= t["after"] <= 1
            assert t["id"] not in top or abs(top[t["id"]] - t["before"]) < 1e-4
        low, high = effect["selectivity"]["baseline_low"], effect["selectivity"]["baseline_high"]
        assert low is None or low <= effect["selectivity"]["baseline_median"] <= high
    else:
        assert all(t["pre_before"] is not None for t in effect["tokens"])
    html = page.text
    assert "S at weight level" in html and "random-direction baseline" in html
    assert data["selectivity_definition"][:40] in html
    if preview["value"] is not None:
        assert f"{preview['value']:.2f}" in html
    # The permalink reproduces exactly the same numbers (seeded random draws).
    again = client.get(ablate_url(run, side, channels="1,0", json=True)).json()
    for key in ("applied", "pinning"):
        assert again[key] == data[key]
    assert again["preview"]["selectivity"] == data["preview"]["selectivity"]
    assert again["model_effect"]["selectivity"] == effect["selectivity"]


def test_every_request_leaves_the_weights_bit_identical_even_one_that_fails(sqlite_store, tiny_gguf):
    url, run = sqlite_store
    app = make_app(url, [tiny_gguf.parent], timeout_s=60.0)
    with TestClient(app) as c:
        assert c.get(ablate_url(run)).status_code == 200
        (lm,) = app.state.runtime._models.values()
        before = _state(lm.model)
        clean = lm.model.model(input_ids=torch.tensor([lm.encode(PROMPT)])).last_hidden_state
        assert c.get(ablate_url(run, "gate", "0,2")).status_code == 200
        app.state.runtime.timeout_s = 1e-9  # every run now stops at its first layer
        failed = c.get(ablate_url(run, "out", "0,1"))
        assert failed.status_code == 504 and "took longer" in failed.text
        failed = c.get(ablate_url(run, "in", "2"))
        assert failed.status_code == 504
        after = _state(lm.model)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.model.modules())
        again = lm.model.model(input_ids=torch.tensor([lm.encode(PROMPT)])).last_hidden_state
        assert torch.equal(clean, again)  # nothing leaked into the next use of the model


def test_a_prompt_longer_than_512_tokens_is_refused_with_422(client, sqlite_store):
    _, run = sqlite_store
    response = client.get(ablate_url(run, prompt=" ab" * 1000, json=True))
    assert response.status_code == 422
    assert "at most 512" in response.json()["detail"]
    response = client.get(ablate_url(run, prompt="x" * 5000, json=True))
    assert response.status_code == 422


@pytest.mark.parametrize("channels", ["0,x", "-1", "0;1", "99", "1,2,7"])
def test_a_bad_channel_list_is_refused_with_422(client, sqlite_store, channels):
    _, run = sqlite_store
    response = client.get(ablate_url(run, channels=channels, json=True))
    assert response.status_code == 422, response.text
    html = client.get(ablate_url(run, channels=channels))
    assert html.status_code == 422 and "channels" in html.text


def test_beyond_the_admitted_model_runs_the_answer_is_429_with_retry_after(sqlite_store, tiny_gguf):
    url, run = sqlite_store
    app = make_app(url, [tiny_gguf.parent], max_runs=1)
    with TestClient(app) as c, app.state.runtime.slot():  # another request holds the only slot
        response = c.get(ablate_url(run, json=True))
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert c.get(ablate_url(run)).status_code == 429
    with TestClient(app) as c:
        assert c.get(ablate_url(run, json=True)).status_code == 200  # the slot is free again


def test_the_weight_level_preview_takes_no_model_slot(sqlite_store, tiny_gguf):
    url, run = sqlite_store
    app = make_app(url, [tiny_gguf.parent], max_runs=2)
    slots = app.state.runtime.slot
    with TestClient(app) as c, slots(), slots():  # both slots held by model runs elsewhere
        preview = c.get(ablate_url(run, prompt="", json=True))
        assert preview.status_code == 200 and preview.json()["preview"]["top_before"]
        assert c.get(ablate_url(run, json=True)).status_code == 429  # a model run would need one
    app.state.engine.dispose()


def test_unknown_neuron_side_or_run_is_404(client, sqlite_store):
    _, run = sqlite_store
    assert client.get(ablate_url(run, neuron=9, json=True)).status_code == 404
    assert client.get(ablate_url("abc123", json=True)).status_code == 404
    assert client.get(ablate_url(run, side="up", json=True)).status_code == 422


def test_without_channels_the_page_is_the_form_with_example_prompts(client, sqlite_store):
    _, run = sqlite_store
    page = client.get(ablate_url(run, channels="", prompt=""))
    assert page.status_code == 200
    assert 'name="channels"' in page.text and "<textarea" in page.text
    data = client.get(ablate_url(run, channels="", prompt="", json=True)).json()
    assert data["preview"] is None and data["controls"]["examples"]
    for example in data["controls"]["examples"]:
        assert example["url"].startswith(f"/m/tiny-llama/{LAYER}/0/ablate?")


def test_a_model_outside_the_allowed_directories_is_refused_but_the_preview_works(sqlite_store, tiny_gguf):
    url, run = sqlite_store
    app = make_app(url, [])  # only the SmolLM2 wheel is allowed
    with TestClient(app) as c:
        data = c.get(ablate_url(run, json=True)).json()
        assert data["model_effect"] is None
        assert "CHANNELSCOPE_MODEL_DIRS" in data["model_note"]
        assert data["preview"]["selectivity"]["value"] is not None
        assert app.state.runtime._models == {}
        page = c.get(ablate_url(run))
        # The file's name, never where it is on the server.
        assert tiny_gguf.name in page.text and str(tiny_gguf.parent) not in page.text


def test_a_missing_model_file_is_said_on_the_page_and_the_preview_still_works(
    database_url, tiny_gguf, tmp_path
):
    gguf = tmp_path / "models" / "tiny-llama.gguf"
    gguf.parent.mkdir()
    shutil.copy(tiny_gguf, gguf)
    run = fill_store(database_url, gguf, tmp_path)
    gguf.unlink()
    app = make_app(database_url, [gguf.parent])
    with TestClient(app) as c:
        page = c.get(ablate_url(run, "gate", "0"))
        assert page.status_code == 200
        assert "missing on this server" in page.text
        assert gguf.name in page.text and str(gguf.parent) not in page.text
        data = c.get(ablate_url(run, "gate", "0", json=True)).json()
        assert data["model_effect"] is None and data["preview"]["top_before"]
    app.state.engine.dispose()


def test_the_trigram_lookup_finds_exactly_the_texts_a_scan_finds():
    from channelscope.worker import corpus

    texts = corpus.load().texts
    words = [" the", "ing", " Paris", "tion", "\n\n", " quantum", "zzqx", "abc", " of the"]
    words += [texts[7][40:46], texts[100][3:12]]
    for word in words:
        assert corpus.texts_containing(word) == tuple(i for i, t in enumerate(texts) if word in t), word
