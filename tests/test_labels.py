"""Automatic labels from the index and the user's label store."""

from __future__ import annotations

from collections import Counter

import pytest

from core.index import IndexConfig, build_index
from core.labels import LabelStore, auto_labels, search_labels, visible
from core.feature_index import FeatureIndex
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
    with pytest.raises(ValueError, match="unreadable"):
        LabelStore(tmp_path / "bad.duckdb")
