"""Every page reads a damaged or outdated feature index the same way: a message naming the fix,
and the page keeps working (AppTest)."""

from __future__ import annotations

import os

import duckdb
import pytest

from tests.conftest import ROOT, make_index, tiny_page

# UMAP's numba code compiles once into this ignored folder, not once per temporary cache dir.
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".pytest_cache" / "numba"))


@pytest.fixture(params=["damaged", "old schema"])
def bad_index(request, tiny_dir, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    path = make_index(tiny_dir)
    if request.param == "damaged":
        path.write_bytes(b"not a DuckDB file" * 100)
        return "unreadable"
    with duckdb.connect(str(path)) as con:
        con.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    return "schema version 0"


def messages(at) -> str:
    return " ".join(m.value for m in [*at.error, *at.warning])


def test_lookup_says_so_and_offers_a_rebuild(tiny_dir, bad_index):
    at = tiny_page(tiny_dir, "lookup")
    assert not at.exception, at.exception
    assert bad_index in messages(at) and "Rebuild" in messages(at)
    assert at.button(key="FormSubmitter:lookup_build-Build index") is not None


def test_steering_says_so_and_keeps_working(tiny_dir, bad_index):
    at = tiny_page(tiny_dir, "steering")
    assert not at.exception, at.exception
    assert bad_index in messages(at) and "Rebuild" in messages(at)
    assert at.text_area(key="steer_prompt").value


def test_dreaming_says_so_and_still_dreams(tiny_dir, bad_index):
    at = tiny_page(tiny_dir, "dreaming", timeout=180, latent="3")
    assert not at.exception, at.exception
    assert bad_index in messages(at) and "Rebuild" in messages(at)
    at.number_input(key="dream_iters").set_value(2)
    at.number_input(key="dream_explore").set_value(4)
    at.button(key="dream_start").click().run()
    assert not at.exception, at.exception
    assert len(at.session_state.dream_history) == 3  # the start and two iterations


def test_maps_says_so_and_draws_the_map(tiny_dir, bad_index):
    at = tiny_page(tiny_dir, "maps", timeout=180)
    at.number_input(key="map_epochs").set_value(50).run()
    at.button(key="map_compute").click().run()
    assert not at.exception, at.exception
    assert bad_index in messages(at) and "Rebuild" in messages(at)
    assert at.get("plotly_chart")
