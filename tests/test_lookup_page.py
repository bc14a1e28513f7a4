"""AppTest of the Lookup page on a tiny index (and without one)."""

from __future__ import annotations

import math
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
    (table,) = [d for d in at.dataframe if "your label" in d.value.columns]
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
    shown = [m.value for m in at.markdown if "your label" in m.value]
    assert len(shown) == 2  # the names line and the best explanation
    for text in shown:
        rendered = MarkdownIt("commonmark").render(text)
        assert "<img" not in rendered and "<a " not in rendered and "<strong>bold" not in rendered
        assert evil in plain(text)  # the text itself is all there


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


def test_histogram_plots_only_non_zero_activations():
    """An index whose firing sample held zeros (w1024 #71 fired 14 times, 242 zeros sampled):
    the figure plots the 14 non-zero values and says so."""
    from core.feature_index import LatentData
    from ui.lookup_view import activation_histogram

    data = LatentData("w1024", 71, 1024, 14 / 149_897, 14, 806.8, 700.0, 0.9,
                      [242] + [0] * 21 + [12, 2], 806.8, 256, [], [], [], [], [])
    fig = activation_histogram(data)
    assert sum(fig.data[0].y) == 14 and fig.data[0].y[0] == 0
    assert "14 values" in fig.layout.title.text


def test_density_figure_says_its_tokens_and_labels_dead_clear_of_its_bar():
    from ui.lookup_view import density_figure

    fig = density_figure([-10.0] * 5 + [-2.0, -3.0, -0.5], 149_897, title="Firing rates")
    assert "149,897 tokens" in fig.layout.title.text
    bar = next(t for t in fig.data if t.name == "dead")
    (label,) = [a for a in fig.layout.annotations if "dead" in a.text]
    assert label.text == "dead: 5"
    # above the bar's top (log axis), inside the y range, starting at the bar's band
    assert label.yanchor == "bottom" and label.y == pytest.approx(math.log10(bar.y[0]))
    assert label.y < fig.layout.yaxis.range[1] and label.xanchor == "left"


def test_latent_names_intervals_and_bad_latent_link(tiny_dir, cache):
    make_index(tiny_dir)
    at = lookup(tiny_dir, latent="abc")
    assert not at.exception
    assert any("latent must be a whole number" in w.value for w in at.warning)
    assert at.query_params["latent"] == str(at.number_input(key="lookup_latent").value)

    at = lookup(tiny_dir, latent="5")
    (names,) = [m.value for m in at.markdown if "Fires on:" in m.value]
    assert "Logit lens:" in names  # both names, each as what it is
    labels = [e.label for e in at.expander if e.label.startswith("Interval")]
    assert labels and all(" of 8: activation " in lab for lab in labels), labels
    numbers = [int(lab.split()[1]) for lab in labels]
    empty = sorted(set(range(1, 9)) - set(numbers))
    captions = " ".join(c.value for c in at.caption)
    assert "cut into 8 equal intervals" in captions
    if empty:
        assert "held no sampled activation" in captions


def test_empty_search_shows_no_table(tiny_dir, cache):
    make_index(tiny_dir)
    at = lookup(tiny_dir)
    at.text_input(key="lookup_query").set_value("zqxj").run()
    assert not at.exception
    assert not [d for d in at.dataframe if "match" in d.value.columns]
    assert not [b for b in at.get("download_button") if b.proto.id.endswith("lookup_csv")]
    assert any("No latent" in i.value for i in at.info)
    at.text_input(key="lookup_query").set_value("fox").run()  # the same checks can fail
    assert [d for d in at.dataframe if "match" in d.value.columns]
    assert [b for b in at.get("download_button") if b.proto.id.endswith("lookup_csv")]


@pytest.fixture()
def mixed_sae(tiny_dir, cache):
    """A 64-latent SAE on the tiny GPT-2 where latents 32..63 fire on about 1 token in 20 (the
    others on about half of them: dense), indexed where the app looks for it."""
    import torch

    from core.feature_index import index_location
    from core.hooks import run_to_hooks
    from core.index import IndexConfig, build_index
    from core.models import ModelSpec, load_model
    from core.saes import SaeSpec, load_sae, sae_input
    from core.text import token_ids
    from tests.conftest import INDEX_TEXTS, build_sae

    torch.manual_seed(2)
    hook = "blocks.1.hook_resid_post"
    sae = build_sae(32, 64, hook, "tiny-gpt2")
    path = cache / "sae-mixed"
    sae.save_model(path)
    lm = load_model(ModelSpec("local", str(tiny_dir / "tiny-gpt2"), device="cpu"))
    loaded = load_sae(SaeSpec("local", str(path)), lm)
    ids = torch.tensor([token_ids(lm, t)[:48] for t in INDEX_TEXTS if len(token_ids(lm, t)) >= 48])
    x = sae_input(loaded, run_to_hooks(lm, [hook], ids)[hook]).reshape(-1, 32)
    pre = x @ sae.W_enc.detach()
    with torch.no_grad():
        sae.b_enc[32:] = -pre[:, 32:].quantile(0.95, dim=0)
    sae.save_model(path)
    loaded = load_sae(SaeSpec("local", str(path)), lm)
    where, name = index_location(lm, loaded)
    build_index(lm, {name: loaded}, INDEX_TEXTS, where,
                IndexConfig(context_size=16, max_tokens=600, top_k=5, n_sample=16))
    return path, where, name


def test_dense_latents_do_not_drown_what_fires(tiny_dir, mixed_sae):
    from core.density import is_dense
    from core.feature_index import FeatureIndex

    sae_dir, path, name = mixed_sae
    index = FeatureIndex(path)
    table = index.summary(name)
    dense = set(table["latent"][is_dense(table["firing_count"].to_numpy(),
                                         int(index.sae_stats(name)["density_tokens"]))])
    assert 0 < len(dense) < 64
    at = tiny_page(tiny_dir, "lookup", sae=f"local:{sae_dir}")
    at.text_area(key="lookup_text").set_value("The quick brown fox jumps over the lazy dog.")
    at.button(key="lookup_analyse").click().run()
    assert not at.exception, at.exception
    raw = [lat for lat, _, _ in at.session_state["lookup_fired"].overall[:20]]
    assert dense & set(raw), "the strongest by raw activation include dense latents"

    def listed() -> list[int]:
        return [int(el.proto.label.split()[0][1:]) for el in at.get("page_link")
                if el.proto.label.startswith("#") and " · cos " not in el.proto.label]

    shown = listed()
    assert shown and not dense & set(shown)  # hidden by default, ranked by relative activation
    at.checkbox(key="lookup_hide_dense").uncheck().run()
    at.radio(key="lookup_rank").set_value("activation").run()
    assert sorted(listed()) == sorted(raw)  # (drawn in five columns)
    # one latent on the text: every token coloured by it
    at.number_input(key="lookup_show").set_value(raw[0]).run()
    assert not at.exception, at.exception
    assert any(c.value.startswith(f"#{raw[0]} (") for c in at.caption)
    fired = at.session_state["lookup_fired"]
    html = [m.value for m in at.markdown if m.value.startswith('<div class="tokens">')]
    assert len(html) == 2 and html[1].count('<span class="') == len(fired.tokens)
    assert html[1] != html[0]  # coloured by that latent, not by the strongest at each token
    # the per-token table follows the same choices: dense latents back, raw activation
    def per_token_table():
        return next(d.value for d in at.dataframe if d.value.columns[0] == "position")

    assert per_token_table().columns[2] == "top latents (activation)"
    at.checkbox(key="lookup_hide_dense").check().run()
    table = per_token_table()
    column = table.columns[2]
    assert column == "top latents (activation, dense hidden)"
    listed_per_token = {int(part.split()[0][1:]) for cell in table[column] if cell
                        for part in cell.split(", #")
                        for part in [part if part.startswith("#") else "#" + part]}
    assert listed_per_token and not dense & listed_per_token


def test_sae_health_shows_the_family_card_beside_the_index(tiny_dir, cache):
    """A local SAE whose family directory holds a card (metrics.json): SAE health shows the
    card's held-out figures, cross-entropy included, as well as the index's."""
    import json
    import shutil

    from core.feature_index import index_location

    family = cache / "family"
    shutil.copytree(tiny_dir / "sae-gpt2-l1", family / "w64")
    (family / "metrics.json").write_text(json.dumps({"results": [
        {"name": "w64", "tokens": 123_456, "fve": 0.812, "l0": 7.25, "dead_fraction": 0.0625,
         "ce_tokens": 4_096, "ce_clean": 3.5, "ce_spliced": 3.75, "ce_recovered": 0.975}]}))
    lm = load_model(ModelSpec("local", str(tiny_dir / "tiny-gpt2"), device="cpu"))
    sae = load_sae(SaeSpec("local", str(family / "w64")), lm)
    where, name = index_location(lm, sae)
    build_index(lm, {name: sae}, INDEX_TEXTS, where,
                IndexConfig(context_size=16, max_tokens=400, top_k=5, n_sample=16))
    at = tiny_page(tiny_dir, "lookup", sae=f"local:{family / 'w64'}")
    assert not at.exception, at.exception
    shown = {m.label: m.value for m in at.metric}
    assert shown["CE increase"] == "+0.250 nats" and shown["CE recovered"] == "97.5%"
    assert any("held-out text: 123,456 tokens" in m.value for m in at.markdown)
    assert [m.label for m in at.metric].count("FVE") == 2  # the index's and the card's
    home = tiny_page(tiny_dir, "home", sae=f"local:{family / 'w64'}")
    said = ("From the family's card, on 123,456 held-out tokens: FVE 0.812 · L0 7.2 · dead 6.2% · "
            "CE +0.250 nats")
    assert any(c.value.startswith(said) for c in home.caption), [c.value for c in home.caption]

    make_index(tiny_dir)
    at = lookup(tiny_dir)  # the tiny SAE on its own: no card, no card figures
    assert not at.exception, at.exception
    assert "FVE" in [m.label for m in at.metric]
    assert not any(m.label == "CE increase" for m in at.metric)
