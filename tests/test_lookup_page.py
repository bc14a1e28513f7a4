"""AppTest of the Lookup page on a tiny index (and without one)."""

from __future__ import annotations

import subprocess
import sys

import duckdb
import pytest
from streamlit.testing.v1 import AppTest

from core.feature_index import built_index_location
from core.index import IndexConfig, build_index
from core.labels import LabelStore
from core.models import ModelSpec, load_model
from core.saes import SaeSpec, load_sae
from tests.conftest import INDEX_TEXTS, make_index, plain, tiny_page
from tests.test_labels import HOLD


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
    assert any("Ignored latent='999'" in plain(w.value) and "0 to 63" in plain(w.value)
               for w in at.warning)


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
    assert any("Ignored text in the link" in plain(w.value) for w in at.warning)


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


def test_markdown_in_a_label_is_shown_as_text(tiny_dir, cache):
    from markdown_it import MarkdownIt

    make_index(tiny_dir)
    at = lookup(tiny_dir, latent="5")
    evil = "![](http://127.0.0.1:9/pixel.png) **bold** <img src=x> [a](javascript:x)"
    at.text_input(key="lookup_label_5").set_value(evil)
    at.button(key="lookup_label_save").click().run()
    assert not at.exception, at.exception
    (shown,) = [m.value for m in at.markdown if "your label" in m.value]
    rendered = MarkdownIt("commonmark").render(shown)
    assert "<img" not in rendered and "<a " not in rendered and "<strong>bold" not in rendered
    assert evil in plain(shown)  # the text itself is all there


def test_contexts_come_from_the_index_without_a_forward_pass(tiny_dir, cache, monkeypatch):
    import core.feature_index
    import ui.lookup_view

    def no_forward(*args, **kwargs):
        raise AssertionError("the page ran the model to colour the contexts")

    monkeypatch.setattr(core.feature_index, "window_activations", no_forward)
    monkeypatch.setattr(ui.lookup_view, "window_activations", no_forward)
    make_index(tiny_dir)
    at = lookup(tiny_dir, latent="3")
    assert not at.exception, at.exception
    html = " ".join(m.value for m in at.markdown)
    assert html.count('class="example"') >= 3 and "rgba(234, 88, 12" in html


def test_a_running_build_is_shown_instead_of_a_second_one(tiny_dir, cache):
    from core.index import build_lock

    lm = load_model(ModelSpec("local", str(tiny_dir / "tiny-gpt2"), device="cpu"))
    sae = load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), lm)
    path, _ = built_index_location(lm, sae)
    with build_lock(path):
        at = lookup(tiny_dir)
        assert not at.exception
        assert any("build of this index is running" in plain(i.value) for i in at.info)
        assert not [b for b in at.button if "Build index" in b.key]
    at.button(key="lookup_build_check").click().run()
    assert at.button(key="FormSubmitter:lookup_build-Build index") is not None


def test_an_upload_with_a_bad_line_is_reported(tiny_dir, cache):
    at = lookup(tiny_dir)
    at.radio(key="lookup_build_source").set_value("Upload .txt / .jsonl")
    at.file_uploader(key="lookup_build_upload").set_value(
        ("corpus.jsonl", b'{"text": "The quick brown fox"}\n{"body": "no text"}\n',
         "application/octet-stream"))
    at.button(key="FormSubmitter:lookup_build-Build index").click().run()
    assert not at.exception, at.exception
    assert any('corpus.jsonl line 2 has no "text" field' in plain(e.value) for e in at.error)


def test_the_shipped_index_is_never_written(tiny_dir, cache, tmp_path, monkeypatch):
    """The embedded family's shipped index lacks this SAE, or is old: Lookup builds into the
    cache directory and the shipped file stays as it was."""
    import core.feature_index
    import core.saes

    shipped = tmp_path / "shipped" / "embedded.duckdb"
    shipped.parent.mkdir()
    lm = load_model(ModelSpec("local", str(tiny_dir / "tiny-gpt2"), device="cpu"))
    sae = load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), lm)
    build_index(lm, {"another": sae}, INDEX_TEXTS, shipped,
                IndexConfig(context_size=16, max_tokens=300, top_k=3, n_sample=8))
    before = shipped.read_bytes()
    monkeypatch.setattr(core.feature_index, "EMBEDDED_INDEX", shipped)
    monkeypatch.setattr(core.feature_index, "EMBEDDED_MODEL_NAME", "tiny-gpt2")
    monkeypatch.setattr(core.saes, "EMBEDDED_SAE_DIR", tiny_dir)
    at = lookup(tiny_dir, sae="embedded:sae-gpt2-l1")
    assert not at.exception, at.exception
    assert any("no feature index yet" in i.value for i in at.info)
    at.number_input(key="lookup_build_tokens").set_value(2_000)
    at.button(key="FormSubmitter:lookup_build-Build index").click().run()
    assert not at.exception, at.exception
    assert shipped.read_bytes() == before
    assert list((cache / "index").glob("*.duckdb"))
    assert "Firing rate" in [m.label for m in at.metric]
    # an old shipped file: the problem is named, a build is offered, the file is kept
    old = tmp_path / "old.duckdb"  # replaced as a file, the way a deployment swaps it
    old.write_bytes(shipped.read_bytes())
    con = duckdb.connect(str(old))
    con.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    con.close()
    old.replace(shipped)
    before = shipped.read_bytes()
    for path in (cache / "index").glob("*"):
        path.unlink()
    at = lookup(tiny_dir, sae="embedded:sae-gpt2-l1")
    assert not at.exception, at.exception
    assert any("schema version 0" in plain(e.value) for e in at.error)
    assert shipped.read_bytes() == before


def test_labels_kept_while_another_process_holds_them(tiny_dir, cache):
    make_index(tiny_dir)
    at = lookup(tiny_dir, latent="5")
    at.text_input(key="lookup_label_5").set_value("kept label")
    at.button(key="lookup_label_save").click().run()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(cache / "labels.duckdb"), "20"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        at.text_input(key="lookup_label_5").set_value("new label")
        at.button(key="lookup_label_save").click().run()
        assert not at.exception, at.exception
        messages = [plain(e.value) for e in at.error] + [plain(w.value) for w in at.warning]
        assert any("another process" in m and "try again" in m for m in messages), messages
        assert not any("afresh" in m or "move it away" in m for m in messages)
    finally:
        holder.kill()
        holder.wait(30)
    assert LabelStore(cache / "labels.duckdb").all(
        LabelStore.scope("tiny-gpt2", SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")))) == {
        5: "kept label"}
