"""Automatic labels from the index and the user's label store."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace
from collections import Counter

import duckdb
import pytest

from core.index import IndexConfig, build_index
from core.feature_index import FeatureIndex
from core.labels import LabelsBusy, LabelStore, auto_labels, search_labels, visible
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
