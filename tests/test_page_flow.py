"""Moving between pages keeps each page's choices (and the URL shows them); every in-app link to
a latent carries its SAE; pages open on latents that fire. AppTest on the tiny GPT-2."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from core.feature_index import FeatureIndex, index_location
from core.index import IndexConfig, build_index
from core.models import ModelSpec, load_model
from core.saes import SaeSpec, load_sae
from tests.conftest import INDEX_TEXTS, ROOT, build_sae, make_index, tiny_page

os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".pytest_cache" / "numba"))


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def go(at: AppTest, page: str) -> AppTest:
    """Follow the sidebar's link to ``page``: like a browser, the URL starts afresh there."""
    at.query_params.clear()
    return at.switch_page(f"views/{page}.py").run()


def test_each_page_keeps_its_choices_across_pages_and_in_the_url(tiny_dir, cache):
    make_index(tiny_dir)
    at = tiny_page(tiny_dir, "lookup", latent="3")
    at.button(key="lookup_next").click().run()
    assert at.number_input(key="lookup_latent").value == 4

    go(at, "steering")
    at.text_area(key="steer_prompt").set_value("Paris is the capital").run()
    at.slider(key="steer_max_new").set_value(12).run()
    assert at.query_params["prompt"] == "Paris is the capital"

    go(at, "dreaming")
    at.number_input(key="dream_latent").set_value(9).run()
    at.number_input(key="dream_iters").set_value(7).run()
    assert json.loads(at.query_params["dream"])["iters"] == 7

    go(at, "maps")  # a page that draws none of those widgets
    assert not at.exception, at.exception
    assert "latent" not in at.query_params and "prompt" not in at.query_params

    go(at, "lookup")
    assert not at.exception, at.exception
    assert at.number_input(key="lookup_latent").value == 4
    assert at.query_params["latent"] == "4"  # Back and shared links land on it too

    go(at, "steering")
    assert at.text_area(key="steer_prompt").value == "Paris is the capital"
    assert at.slider(key="steer_max_new").value == 12
    assert at.query_params["prompt"] == "Paris is the capital"
    assert "recipe" in at.query_params

    go(at, "dreaming")
    assert at.number_input(key="dream_latent").value == 9
    assert at.number_input(key="dream_iters").value == 7
    assert at.query_params["latent"] == "9"
    assert json.loads(at.query_params["dream"]) == {"iters": 7}


def test_dreaming_settings_from_the_link(tiny_dir, cache):
    at = tiny_page(tiny_dir, "dreaming", dream=json.dumps({"iters": 11, "seed": 3}))
    assert not at.exception, at.exception
    assert at.number_input(key="dream_iters").value == 11
    assert at.number_input(key="dream_seed").value == 3
    bad = tiny_page(tiny_dir, "dreaming", dream='{"iters": "many"}')
    assert not bad.exception
    assert any("Ignored the dreaming settings in the link" in w.value for w in bad.warning)
    assert "dream" not in bad.query_params  # defaults again: nothing to say in the URL


def test_lookup_tab_survives_other_pages(tiny_dir, cache):
    make_index(tiny_dir)
    at = tiny_page(tiny_dir, "lookup", lookup_tab="SAE health")
    assert not at.exception, at.exception
    go(at, "steering")
    go(at, "lookup")
    assert at.query_params["lookup_tab"] == "SAE health"
    assert at.session_state["lookup_tab"] == "SAE health"


def test_every_link_to_a_latent_carries_its_sae(tiny_dir, cache, monkeypatch):
    """Lookup (search results, 'open latent', what fires, neighbours), Steering (the card and
    'what else moved'), Dreaming (best text → Lookup) and Maps (open in Lookup): in a session
    on a model that is not the default, every link names the model and the SAE."""
    make_index(tiny_dir)
    model = f"local:{tiny_dir / 'tiny-gpt2'}"
    sae = f"local:{tiny_dir / 'sae-gpt2-l1'}"
    links: list[tuple[str, dict]] = []

    def page_links(at: AppTest, where: str) -> None:
        for el in at.get("page_link"):
            if "latent" in parse_qs(el.proto.query_string):
                links.append((where, {k: v[0] for k, v in
                                      parse_qs(el.proto.query_string).items()}))

    def column_links(at: AppTest, where: str, column: str) -> None:
        frames = [d.value for d in at.dataframe if column in d.value.columns]
        assert frames, f"no {column!r} column on {where}"
        for url in frames[0][column]:
            assert urlparse(url).path == "lookup", url
            links.append((where, {k: v[0] for k, v in parse_qs(urlparse(url).query).items()}))

    at = tiny_page(tiny_dir, "lookup", latent="5")
    monkeypatch.setenv("SAE_WORKBENCH_MODEL", "embedded")  # this session's model is not the default
    at.run()
    page_links(at, "lookup: neighbours")
    at.text_input(key="lookup_query").set_value("fox").run()
    column_links(at, "lookup: search results", "link")
    at.text_input(key="lookup_query").set_value("7").run()
    page_links(at, "lookup: open latent")
    at.text_area(key="lookup_text").set_value("The quick brown fox")
    at.button(key="lookup_analyse").click().run()
    page_links(at, "lookup: what fires")

    at.switch_page("views/steering.py").run()
    at.number_input(key="steer_new_latent").set_value(5)
    at.button(key="steer_add_latent").click().run()
    at.slider(key="steer_max_new").set_value(4)
    at.button(key="steer_generate").click().run()
    assert not at.exception, at.exception
    page_links(at, "steering: card")
    column_links(at, "steering: what else moved", "open")

    at.switch_page("views/dreaming.py").run()
    at.number_input(key="dream_iters").set_value(1)
    at.number_input(key="dream_explore").set_value(4)
    at.button(key="dream_start").click().run()
    assert not at.exception, at.exception
    page_links(at, "dreaming: best text")

    asked: list[dict] = []
    switch = st.switch_page
    monkeypatch.setattr(st, "switch_page", lambda page, query_params=None: (
        asked.append(dict(query_params)), switch(page, query_params=query_params))[-1])
    at.switch_page("views/maps.py").run()
    at.number_input(key="map_epochs").set_value(50).run()
    at.button(key="map_compute").click().run()
    at.button(key="map_open").click().run()
    assert not at.exception, at.exception
    links += [("maps: open in Lookup", q) for q in asked]

    wheres = {w.split(":")[0] for w, _ in links}
    assert wheres == {"lookup", "steering", "dreaming", "maps"}, wheres
    assert len({w for w, _ in links}) == 8
    for where, query in links:
        assert query.get("sae") == sae, (where, query)
        assert query.get("model") == model, (where, query)


# --- dead latents ------------------------------------------------------------------------------

DEAD = 16


@pytest.fixture()
def dead_sae(tiny_dir, cache, tmp_path) -> Path:
    """A 64-latent SAE whose first 16 latents never fire, with its feature index."""
    torch.manual_seed(1)
    sae = build_sae(32, 64, "blocks.1.hook_resid_post", "tiny-gpt2")
    with torch.no_grad():
        sae.b_enc[:DEAD] = -1e4
    path = tmp_path / "sae-dead"
    sae.save_model(path)
    lm = load_model(ModelSpec("local", str(tiny_dir / "tiny-gpt2"), device="cpu"))
    loaded = load_sae(SaeSpec("local", str(path)), lm)
    where, name = index_location(lm, loaded)
    build_index(lm, {name: loaded}, INDEX_TEXTS, where,
                IndexConfig(context_size=16, max_tokens=600, top_k=5, n_sample=16))
    return path


def counted(tiny_dir, sae_dir: Path) -> int:
    lm = load_model(ModelSpec("local", str(tiny_dir / "tiny-gpt2"), device="cpu"))
    where, name = index_location(lm, load_sae(SaeSpec("local", str(sae_dir)), lm))
    return int(FeatureIndex(where).sae_stats(name)["density_tokens"])


def app_on(tiny_dir, sae_dir: Path, page: str, **query) -> AppTest:
    return tiny_page(tiny_dir, page, timeout=180, sae=f"local:{sae_dir}", **query)


def test_lookup_opens_on_the_first_alive_latent(tiny_dir, dead_sae):
    at = app_on(tiny_dir, dead_sae, "lookup")
    assert not at.exception, at.exception
    assert at.number_input(key="lookup_latent").value == DEAD
    assert at.query_params["latent"] == str(DEAD)
    assert not [w for w in at.warning if "never fired" in w.value]


def values(data) -> list:
    """A plotly JSON array (a list, or a typed array {"dtype", "bdata"})."""
    if isinstance(data, dict):
        return np.frombuffer(base64.b64decode(data["bdata"]), dtype=data["dtype"]).tolist()
    return list(data)


def test_map_hides_dead_latents_and_its_summary_follows(tiny_dir, dead_sae):
    at = app_on(tiny_dir, dead_sae, "maps")
    at.number_input(key="map_epochs").set_value(50).run()
    at.button(key="map_compute").click().run()
    assert not at.exception, at.exception
    assert at.checkbox(key="map_hide_dead").value is True
    assert at.checkbox(key="map_hide_dead").label == f"Hide the {DEAD} dead latents"
    summary = next(c.value for c in at.caption if "computed in" in c.value)
    assert summary.startswith(f"{64 - DEAD} of 64 latents (the {DEAD} dead ones hidden: never "
                              f"fired in {counted(tiny_dir, dead_sae):,} tokens)"), summary
    assert "loaded from the cache (computed in " in summary, summary  # stored, then read back
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    drawn = [int(i) for t in spec["data"] if t.get("name") != f"sae-dead #{DEAD}"
             for i in values(t["customdata"])]
    assert len(drawn) == 64 - DEAD
    assert at.number_input(key="map_lin_latent").value == DEAD  # lineage starts on a live one
    at.checkbox(key="map_hide_dead").uncheck().run()
    summary = next(c.value for c in at.caption if "computed in" in c.value)
    assert summary.startswith("64 latents from"), summary
    go(at, "lookup")
    go(at, "maps")
    assert at.checkbox(key="map_hide_dead").value is False
    assert at.query_params["map_hide_dead"] == "false"  # the URL says so


def test_link_notices_appear_once(tiny_dir, cache):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params.update(model=f"local:{tiny_dir / 'tiny-gpt2'}", sae="bogus:thing",
                           device="tpu")
    at.run()
    assert not at.exception
    notices = [w.value for w in at.warning if w.value.startswith("Ignored")]
    assert len(notices) == 2 and len(set(notices)) == 2, notices
