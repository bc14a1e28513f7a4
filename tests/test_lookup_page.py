"""AppTest of the Lookup page on a tiny index (and without one)."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import make_index, tiny_page


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    return tmp_path


def lookup(tiny_dir, **query) -> AppTest:
    return tiny_page(tiny_dir, "lookup", **query)


def test_without_index_offers_to_build(tiny_dir, cache):
    at = lookup(tiny_dir)
    assert not at.exception
    assert any("no feature index yet" in i.value for i in at.info)
    assert at.button(key="FormSubmitter:lookup_build-Build index") is not None


def test_latent_dashboard(tiny_dir, cache):
    make_index(tiny_dir)
    at = lookup(tiny_dir, latent="3")
    assert not at.exception, at.exception
    assert at.number_input(key="lookup_latent").value == 3
    labels = [m.label for m in at.metric]
    assert "Firing rate" in labels and "Max activation" in labels
    html = " ".join(m.value for m in at.markdown)
    assert 'class="tokens"' in html and "activation" in html  # highlighted contexts
    at.button(key="lookup_next").click().run()
    assert at.number_input(key="lookup_latent").value == 4
    assert at.query_params["latent"] == "4"
    assert not at.exception


def test_bad_latent_param_is_ignored_with_notice(tiny_dir, cache):
    make_index(tiny_dir)
    at = lookup(tiny_dir, latent="999")
    assert not at.exception
    assert any("Ignored latent='999'" in w.value and "0 to 63" in w.value for w in at.warning)


def test_what_fires_and_search(tiny_dir, cache):
    make_index(tiny_dir)
    at = lookup(tiny_dir)
    at.text_area(key="lookup_text").set_value("The quick brown fox").run()
    at.button(key="lookup_analyse").click().run()
    assert not at.exception
    assert any("Strongest latents" in m.value for m in at.markdown)
    at.text_area(key="lookup_text").set_value("").run()
    at.button(key="lookup_analyse").click().run()
    assert any("empty" in e.value for e in at.error)
    at.text_input(key="lookup_query").set_value("fox").run()
    assert not at.exception


def test_text_sent_by_link_opens_what_fires(tiny_dir, cache):
    make_index(tiny_dir)
    at = lookup(tiny_dir, latent="2", text="The quick brown fox")
    assert not at.exception, at.exception
    assert at.text_area(key="lookup_text").value == "The quick brown fox"
    assert at.session_state.lookup_fired is not None
    assert any("Strongest latents" in m.value for m in at.markdown)
    at = lookup(tiny_dir, text="  ")
    assert not at.exception
    assert any("Ignored text in the link" in w.value for w in at.warning)


def test_labels_are_shown_saved_and_searched(tiny_dir, cache):
    make_index(tiny_dir)
    at = lookup(tiny_dir, latent="5")
    assert any("Fires on:" in m.value for m in at.markdown)
    at.text_input(key="lookup_label_5").set_value("my fox detector")
    at.button(key="lookup_label_save").click().run()
    assert not at.exception, at.exception
    assert any("your label:** my fox detector" in m.value for m in at.markdown)
    at.text_input(key="lookup_query").set_value("detector").run()
    assert not at.exception
    (table,) = [d for d in at.dataframe if "label" in d.value.columns]
    assert table.value["latent"].tolist()[0] == 5
    assert table.value["match"].tolist()[0].startswith("your label")
