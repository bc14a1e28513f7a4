"""Automatic labels from the index and the user's label store."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from types import SimpleNamespace
from collections import Counter

import duckdb
import pytest

from core.index import IndexConfig, build_index
from core.feature_index import FeatureIndex
from core.labels import (
    MAX_EXPLANATION_CHARS,
    LabelsBusy,
    LabelStore,
    auto_labels,
    best_explanations,
    clean_text,
    search_labels,
    visible,
)
from core.saes import SaeSpec, load_sae
from tests.conftest import CORPUS

TEXTS = [CORPUS[i:] + " " + CORPUS[:i] for i in range(0, 320, 11)]


def test_auto_labels_are_the_most_frequent_top_tokens(gpt2, tiny_dir, tmp_path):
    sae = load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), gpt2)
    path = tmp_path / "index.duckdb"
    build_index(gpt2, {"s": sae}, TEXTS, path, IndexConfig(context_size=16, max_tokens=600,
                                                            top_k=6, n_sample=16))
    index = FeatureIndex(path)
    labels = auto_labels(index, "s", gpt2.tokenizer)
    assert set(labels) == set(index.alive_latents("s"))
    latent = index.alive_latents("s")[0]
    data = index.latent("s", latent)
    counts = Counter(visible(gpt2.tokenizer.decode([ex.token_ids[ex.pos]])) for ex in data.top)
    top = max(counts.values())
    assert labels[latent].split(" · ")[0] in {w for w, c in counts.items() if c == top}


def test_label_store_round_trip_and_search(tmp_path):
    store = LabelStore(tmp_path / "labels.duckdb")
    scope = LabelStore.scope("m", "sae")
    store.set(scope, 3, "  Python   keywords ")
    store.set(scope, 4, "French cities")
    store.set(LabelStore.scope("m", "other"), 3, "elsewhere")
    assert store.all(scope)[3] == "Python keywords"
    assert search_labels(store.all(scope), "python") == [3]
    store.set(scope, 3, "")
    assert store.all(scope) == {4: "French cities"}
    again = LabelStore(tmp_path / "labels.duckdb")  # persisted
    assert again.all(scope) == {4: "French cities"}
    with pytest.raises(ValueError, match="characters"):
        store.set(scope, 1, "x" * 500)
    (tmp_path / "bad.duckdb").write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="not a label database.*rename it to keep it"):
        LabelStore(tmp_path / "bad.duckdb")
    assert (tmp_path / "bad.duckdb").read_bytes() == b"not a database at all" * 100


HOLD = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
con.execute("SELECT count(*) FROM explanations").fetchall()
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_labels_kept_when_another_process_holds_the_file(tmp_path):
    path = tmp_path / "labels.duckdb"
    store = LabelStore(path, wait_s=0.3)
    scope = LabelStore.scope("m", "sae")
    store.set(scope, 1, "kept")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path), "3"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(LabelsBusy, match="another process.*try again") as err:
            store.set(scope, 2, "new")
        assert "afresh" not in str(err.value) and "move it away" not in str(err.value)
        with pytest.raises(LabelsBusy):
            LabelStore(path, wait_s=0.3)  # a second server starting meanwhile
    finally:
        holder.wait(30)
    assert store.all(scope) == {1: "kept"}
    store.set(scope, 2, "new")  # the other process let go: the same store works again
    assert store.all(scope) == {1: "kept", 2: "new"}


def test_set_is_one_transaction(tmp_path, monkeypatch):
    import core.labels

    store = LabelStore(tmp_path / "labels.duckdb")
    scope = LabelStore.scope("m", "sae")
    store.set(scope, 1, "old")
    # the INSERT fails after the DELETE ran: the old label must survive
    monkeypatch.setattr(core.labels, "time", SimpleNamespace(
        time=lambda: "not a time", monotonic=time.monotonic, sleep=time.sleep))
    with pytest.raises(duckdb.Error):
        store.set(scope, 1, "new")
    assert store.all(scope) == {1: "old"}


def test_local_saes_keyed_by_full_path(tmp_path):
    a, b = tmp_path / "a" / "layer6", tmp_path / "b" / "layer6"
    scope_a = LabelStore.scope("m", SaeSpec("local", str(a)))
    scope_b = LabelStore.scope("m", SaeSpec("local", str(b)))
    assert scope_a != scope_b
    assert scope_a == LabelStore.scope("m", SaeSpec("local", str(tmp_path / "a/../a/layer6")))
    assert LabelStore.scope("m", SaeSpec("embedded", "w512")) == LabelStore.scope("m", "w512")
    store = LabelStore(tmp_path / "labels.duckdb")
    store.set(scope_a, 3, "only in a")
    assert store.all(scope_b) == {}


# --- explanations of every source -------------------------------------------------------------


def test_every_source_round_trips_with_score_params_and_date(tmp_path):
    from core.labels import Explanation, explanation_table

    store = LabelStore(tmp_path / "labels.duckdb")
    scope = LabelStore.scope("m", "sae")
    now = time.time()
    items = [
        Explanation(1, "user", "my label", created_at=now),
        Explanation(1, "autointerp", "the word fox", 0.75, {"explainer": "a", "seed": 0}, now),
        Explanation(1, "autointerp", "animals", 0.5, {"explainer": "b", "seed": 0}, now),
        Explanation(1, "neuronpedia", "foxes and dogs", None, {"explainer": "gpt-4o-mini"}, now),
        Explanation(1, "patchscope", "a small animal", None, {"norm": 20.0}, now),
        Explanation(1, "patchscope", "a fox", None, {"norm": 60.0}, now),
        Explanation(2, "patchscope", "x" * 1000 + "\nline two", None, {"norm": 20.0}, now),
    ]
    store.put(scope, items)
    again = LabelStore(tmp_path / "labels.duckdb").explanations(scope)
    got = {(e.latent, e.source, e.text[:20], e.score, json.dumps(e.params, sort_keys=True))
           for e in again}
    assert got == {(e.latent, e.source, clean_text(e.text)[:20], e.score,
                    json.dumps(e.params, sort_keys=True)) for e in items}
    assert all(abs(e.created_at - now) < 1e-3 for e in again)
    long = next(e for e in again if e.latent == 2)
    assert len(long.text) == MAX_EXPLANATION_CHARS and "\n" not in long.text
    assert store.all(scope) == {1: "my label"}
    # same source and parameters: replaced, not added
    store.put(scope, [Explanation(1, "patchscope", "a red fox", None, {"norm": 60.0})])
    patch = {e.text for e in store.explanations(scope, [1], ("patchscope",))}
    assert patch == {"a small animal", "a red fox"}
    assert store.explained(scope, "autointerp", {"explainer": "a", "seed": 0}) == {1}
    # the best: your label, else the best-scored autointerp, else Neuronpedia, else patch
    # scoping, else the tokens it fires on
    best = best_explanations(store.explanations(scope), {1: "fox", 3: "dog"})
    assert best[1].source == "user" and best[3].source == "tokens" and best[3].text == "dog"
    best = best_explanations(store.explanations(scope), {1: "fox"}, skip_user=True)
    assert (best[1].source, best[1].score) == ("autointerp", 0.75)
    assert best[1].said == "autointerp 0.75: the word fox"
    assert best_explanations(store.explanations(scope, sources=("patchscope",)))[2].source == \
        "patchscope"
    table = explanation_table(store.explanations(scope), {1: "fox"})
    assert list(table.columns) == ["latent", "source", "text", "score", "params", "created_at"]
    assert table["source"].tolist()[:6] == ["user", "autointerp", "autointerp", "neuronpedia",
                                            "patchscope", "patchscope"]
    assert "tokens" in set(table["source"]) and table["created_at"].iloc[0].endswith("+00:00")
    store.delete(scope, 1, "patchscope")
    assert not store.explanations(scope, [1], ("patchscope",))
    with pytest.raises(ValueError, match="come from the index"):
        store.put(scope, [Explanation(1, "tokens", "fox")])
    with pytest.raises(ValueError, match="is empty"):
        store.put(scope, [Explanation(1, "patchscope", "   ", None, {"norm": 1})])
    with pytest.raises(ValueError, match="Unknown explanation source"):
        Explanation(1, "guess", "x")
    with pytest.raises(ValueError, match="finite number"):
        Explanation(1, "autointerp", "x", float("nan"))
    assert len(store.explanations(scope)) == 5  # the refused ones changed nothing


def test_old_label_files_keep_their_labels(tmp_path):
    path = tmp_path / "labels.duckdb"
    con = duckdb.connect(str(path))
    con.execute("""CREATE TABLE labels (scope VARCHAR, latent INTEGER, label VARCHAR,
                   updated DOUBLE, PRIMARY KEY (scope, latent))""")
    con.execute("INSERT INTO labels VALUES ('m|a', 3, 'Python keywords', 1.5), "
                "('m|a', 4, 'French cities', 2.5), ('m|b', 3, 'elsewhere', 3.5)")
    con.close()
    store = LabelStore(path)
    assert store.all("m|a") == {3: "Python keywords", 4: "French cities"}
    assert store.all("m|b") == {3: "elsewhere"}
    assert [e.created_at for e in store.explanations("m|a")] == [1.5, 2.5]
    store.set("m|a", 3, "Python keywords and builtins")
    store.set("m|a", 4, "")
    # copied once: opening again does not bring the old values back
    assert LabelStore(path).all("m|a") == {3: "Python keywords and builtins"}
    con = duckdb.connect(str(path))  # the old table is left for older versions of the app
    assert con.execute("SELECT count(*) FROM labels").fetchone()[0] == 3
    con.close()


def test_search_matches_stored_explanations(gpt2, tiny_dir, tmp_path):
    from core.labels import Explanation, search_latents

    sae = load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), gpt2)
    path = tmp_path / "index.duckdb"
    build_index(gpt2, {"s": sae}, TEXTS, path, IndexConfig(context_size=16, max_tokens=600,
                                                            top_k=6, n_sample=16))
    index = FeatureIndex(path)
    found = search_latents(index, "s", "zebra crossings", gpt2.tokenizer, {}, {},
                           explanations=[Explanation(7, "autointerp", "Zebra crossings", 0.9),
                                         Explanation(9, "user", "zebra crossings")])
    assert found["latent"].tolist() == [7]
    assert found["match"].tolist() == ["autointerp label"]
    # the automatic summary of a latent's top tokens is named as the table's column names it
    found = search_latents(index, "s", "zebra", gpt2.tokenizer, {3: "my zebra"},
                           {5: "zebra · the · of"})
    first = dict(zip(found["latent"].tolist()[:2], found["match"].tolist()[:2]))
    assert first == {3: "your label", 5: "fires on"}
