"""The feature index: exact top-k, atomic builds, readable errors, searches, what fires."""

from __future__ import annotations

import duckdb
import pytest
import torch

from core.hooks import run_to_hooks
from core.feature_index import FeatureIndex, open_index, what_fires, window_activations
from core.index import (
    BuildRunning,
    IndexConfig,
    build_index,
    build_running,
    corpus_texts,
    index_texts,
)
from core.saes import SaeSpec, load_sae, sae_input
from core.text import windows
from tests.conftest import CORPUS

TEXTS = [CORPUS[i:] + " " + CORPUS[:i] for i in range(0, 320, 11)]
CFG = IndexConfig(context_size=16, max_tokens=600, top_k=5, n_sample=16, n_intervals=3,
                  per_interval=2, batch_windows=4, n_logits=4, n_neighbours=3)


@pytest.fixture(scope="module")
def sae(gpt2, tiny_dir):
    return load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), gpt2)


@pytest.fixture(scope="module")
def index_path(gpt2, sae, tmp_path_factory):
    path = tmp_path_factory.mktemp("index") / "tiny.duckdb"
    return build_index(gpt2, {"s": sae}, TEXTS, path, CFG, corpus_name="tiny")


def brute_force(gpt2, sae):
    """Every (global token, activation) of the same windows, computed in one go."""
    rows = list(windows(gpt2, iter(TEXTS), CFG.context_size))[: CFG.max_tokens // 15]
    ids = torch.tensor(rows)
    acts = run_to_hooks(gpt2, [sae.hook_name], ids)[sae.hook_name]
    feats = sae.sae.encode(sae_input(sae, acts)).reshape(-1, sae.d_sae)
    feats[(ids == gpt2.tokenizer.bos_token_id).reshape(-1)] = 0
    return feats


def test_top_k_equals_brute_force(gpt2, sae, index_path):
    feats = brute_force(gpt2, sae)
    index = FeatureIndex(index_path)
    checked = 0
    for latent in index.alive_latents("s")[:20]:
        data = index.latent("s", latent)
        expected = feats[:, latent].topk(CFG.top_k)
        got = [ex.value for ex in data.top]
        want = [v for v in expected.values.tolist() if v > 0]
        assert got == pytest.approx(want, rel=1e-5)
        assert data.firing_count == int((feats[:, latent] > 0).sum())
        assert data.max_act == pytest.approx(float(feats[:, latent].max()), rel=1e-5)
        checked += 1
    assert checked >= 5


def test_window_activations_reproduce_stored_values(gpt2, sae, index_path):
    index = FeatureIndex(index_path)
    latent = index.alive_latents("s")[0]
    data = index.latent("s", latent)
    acts = window_activations(gpt2, sae, [ex.token_ids for ex in data.top], latent)
    for ex, row in zip(data.top, acts):
        assert row[ex.pos] == pytest.approx(ex.value, rel=1e-4)
        assert row[0] == 0  # BOS


def test_interval_samples_fall_in_their_intervals(index_path):
    index = FeatureIndex(index_path)
    for latent in index.alive_latents("s")[:10]:
        for _, lo, hi, ex in index.latent("s", latent).intervals:
            assert lo < ex.value <= hi + 1e-6


def test_sae_stats_and_weights(index_path, sae):
    index = FeatureIndex(index_path)
    stats = index.sae_stats("s")
    assert stats["d_sae"] == 64 and stats["tokens"] > 500 and 0 < stats["l0"] < 64
    assert stats["dead"] + len(index.alive_latents("s")) == 64
    data = index.latent("s", 0)
    assert len(data.logit_pos) == 4 and len(data.neighbours) == 3
    assert all(n != 0 for n, _ in data.neighbours)
    w = torch.nn.functional.normalize(sae.sae.W_dec, dim=1)
    best = (w[1:] @ w[0]).argmax().item() + 1
    assert data.neighbours[0][0] == best


def test_interrupted_build_leaves_old_index(gpt2, sae, index_path, tmp_path):
    target = tmp_path / "copy.duckdb"
    target.write_bytes(index_path.read_bytes())
    before = target.read_bytes()

    def crash(fraction, message):
        if fraction > 0.3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(gpt2, {"s": sae}, TEXTS, target, CFG, progress=crash)
    assert target.read_bytes() == before
    assert FeatureIndex(target).saes == ["s"]


def test_old_schema_and_corrupt_files_are_clear(index_path, tmp_path):
    old = tmp_path / "old.duckdb"
    old.write_bytes(index_path.read_bytes())
    con = duckdb.connect(str(old))
    con.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(ValueError, match="schema version 0.*Rebuild"):
        FeatureIndex(old)
    bad = tmp_path / "bad.duckdb"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="unreadable.*Rebuild"):
        FeatureIndex(bad)
    with pytest.raises(FileNotFoundError, match="No feature index"):
        FeatureIndex(tmp_path / "missing.duckdb")


def test_latent_out_of_range(index_path):
    index = FeatureIndex(index_path)
    for bad in (-1, 64, 10**9):
        with pytest.raises(ValueError, match="latents 0 to 63"):
            index.latent("s", bad)
    with pytest.raises(ValueError, match="has no SAE 'x'"):
        index.latent("x", 0)


def test_search_by_token(gpt2, index_path):
    index = FeatureIndex(index_path)
    data = index.latent("s", index.alive_latents("s")[0])
    word = gpt2.tokenizer.convert_ids_to_tokens(int(data.logit_pos[0][0])).replace("Ġ", "")
    found = index.search_tokens("s", word, gpt2.tokenizer)
    assert data.latent in found["latent"].tolist()
    with pytest.raises(ValueError, match="Type a token"):
        index.search_tokens("s", "  ", gpt2.tokenizer)


def test_what_fires(gpt2, sae):
    fired = what_fires(gpt2, sae, "The quick brown fox")
    assert len(fired.tokens) == len(fired.active)
    assert fired.active[0] == []  # BOS
    assert sum(len(row) for row in fired.active) == fired.counts.sum()  # every firing, once
    assert all([v for _, v in row] == sorted((v for _, v in row), reverse=True)
               for row in fired.active)
    assert max(v for row in fired.active for _, v in row) == pytest.approx(fired.overall[0][1])
    assert fired.overall and all(v > 0 for _, v, _ in fired.overall)
    with pytest.raises(ValueError, match="empty"):
        what_fires(gpt2, sae, "")
    with pytest.raises(ValueError, match="the limit is 20,000"):
        what_fires(gpt2, sae, "x" * 100_000)


def test_summary_rows_match_the_dashboards(index_path):
    index = FeatureIndex(index_path)
    name = index.saes[0]
    whole = index.summary(name)
    assert whole["latent"].tolist() == list(range(index.d_sae(name)))
    some = index.summary(name, [7, 3])
    assert some["latent"].tolist() == [3, 7]
    for latent, max_act, ids in zip(some["latent"], some["max_act"], some["logit_pos_ids"]):
        data = index.latent(name, int(latent))
        assert max_act == data.max_act
        assert list(ids) == [t for t, _ in data.logit_pos]
    assert index.summary(name, []).empty


def test_stored_spans_equal_recomputed_activations(gpt2, sae, index_path):
    index = FeatureIndex(index_path)
    checked = 0
    for latent in index.alive_latents("s")[:8]:
        data = index.latent("s", latent)
        examples = data.top + [ex for *_, ex in data.intervals]
        fresh = window_activations(gpt2, sae, [ex.token_ids for ex in examples], latent)
        for ex, row in zip(examples, fresh):
            assert ex.acts_start == max(ex.pos - CFG.show_left, 0)
            want = row[ex.acts_start:ex.pos + CFG.show_right + 1]
            assert len(ex.acts) == len(want)
            assert ex.acts == pytest.approx(want, abs=data.max_act / 500)
            checked += 1
    assert checked >= 20


def test_version_1_index_is_still_read(index_path, tmp_path):
    old = tmp_path / "v1.duckdb"
    old.write_bytes(index_path.read_bytes())
    con = duckdb.connect(str(old))
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.execute("DROP TABLE shown_spans")
    con.close()
    index = FeatureIndex(old)
    data = index.latent("s", index.alive_latents("s")[0])
    assert data.top and all(ex.acts is None for ex in data.top)


def test_concurrent_builds_one_waits_and_the_index_is_intact(gpt2, sae, tmp_path):
    import threading

    target = tmp_path / "busy.duckdb"
    inside, release, errors = threading.Event(), threading.Event(), []

    def slow(fraction, message):
        inside.set()
        release.wait(30)

    def first():
        try:
            build_index(gpt2, {"s": sae}, TEXTS, target, CFG, progress=slow)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=first)
    worker.start()
    assert inside.wait(30)
    assert build_running(target)
    with pytest.raises(BuildRunning, match="is running; wait for it"):
        build_index(gpt2, {"t": sae}, TEXTS, target, CFG)
    release.set()
    worker.join(60)
    assert not errors
    assert not build_running(target)
    assert FeatureIndex(target).saes == ["s"]
    assert not list(tmp_path.glob("*.partial*"))


def test_reopened_after_a_rebuild(gpt2, sae, tmp_path):
    target = tmp_path / "again.duckdb"
    build_index(gpt2, {"s": sae}, TEXTS, target, CFG)
    assert open_index(target).saes == ["s"]
    build_index(gpt2, {"t": sae}, TEXTS, target, CFG)
    assert open_index(target).saes == ["t"]


@pytest.mark.parametrize("body, message", [
    ('{"text": "fine"}\n{"txt": "typo"}\n', 'line 2 has no "text" field'),
    ('{"text": "fine"}\n\n{"text": 3}\n', 'line 3 has no string "text"'),
    ('{"text": "fine"}\nnot json\n', "line 2 is not JSON"),
    ('["text"]\n', 'line 1 has no string "text"'),
    ('\n\n', "holds no text"),
])
def test_bad_jsonl_lines_are_reported(body, message, tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        index_texts(path)
    with pytest.raises(ValueError, match=message):
        corpus_texts(body.encode(), "jsonl", "upload.jsonl")
    with pytest.raises(ValueError, match="line 2 is not UTF-8"):
        corpus_texts(b'{"text": "a"}\n{"text": "\xff"}\n', "jsonl")


def test_app_builds_never_target_shipped_files(gpt2, tiny_dir, index_path, tmp_path,
                                               monkeypatch):
    """An embedded SAE whose shipped index is old or lacks it: reads fall back to the cache
    file, and that is where a build goes; the shipped file is never a build target."""
    import core.feature_index
    import core.saes
    from core.feature_index import built_index_location, index_candidates, index_location

    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path / "cache"))
    shipped = tmp_path / "data" / "embedded.duckdb"
    shipped.parent.mkdir()
    shipped.write_bytes(index_path.read_bytes())
    con = duckdb.connect(str(shipped))
    con.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    con.close()
    before = shipped.read_bytes()
    monkeypatch.setattr(core.feature_index, "EMBEDDED_INDEX", shipped)
    monkeypatch.setattr(core.feature_index, "EMBEDDED_MODEL_NAME", gpt2.name)
    monkeypatch.setattr(core.saes, "EMBEDDED_SAE_DIR", tiny_dir)
    emb = load_sae(SaeSpec("embedded", "sae-gpt2-l1"), gpt2)
    assert index_candidates(gpt2, emb)[0] == (shipped, "sae-gpt2-l1")
    target, name = built_index_location(gpt2, emb)
    assert target.is_relative_to(tmp_path / "cache") and name == "sae-gpt2-l1"
    assert index_location(gpt2, emb) == (target, name)  # the old shipped file is skipped
    build_index(gpt2, {name: emb}, TEXTS, target, CFG)
    assert index_location(gpt2, emb) == (target, name)
    assert shipped.read_bytes() == before


def test_density_counts_from_a_larger_sample_set_rates_dead_and_dense(gpt2, sae, tmp_path):
    from core.index import apply_density

    d = sae.d_sae
    counts = torch.zeros(d, dtype=torch.int64)
    counts[0], counts[1], counts[2] = 5, 2_000, 1  # rare, dense, once in 10k
    path = build_index(gpt2, {"s": sae}, TEXTS, tmp_path / "d.duckdb", CFG, corpus_name="tiny")
    index = FeatureIndex(path)
    own = index.sae_stats("s")
    assert own["density_tokens"] == own["tokens"]
    top_before = index.latent("s", index.alive_latents("s")[0]).top
    index.close()
    apply_density(path, {"s": (counts, 10_000)})
    index = FeatureIndex(path)
    stats = index.sae_stats("s")
    assert stats["density_tokens"] == 10_000 and stats["tokens"] == own["tokens"] < 10_000
    assert stats["dead"] == d - 3 and stats["dense"] == 1
    assert index.alive_latents("s") == [0, 1, 2]
    assert index.latent("s", 2).firing_rate == pytest.approx(1e-4)
    assert index.latent("s", 1).firing_count == 2_000
    assert sum(v > -10 for v in stats["log10_density"]) == 3
    assert top_before  # examples stay what the indexed tokens showed
    index.close()
    with pytest.raises(ValueError, match="latents"):
        apply_density(path, {"s": (counts[:3], 10_000)})
    assert FeatureIndex(path).sae_stats("s")["density_tokens"] == 10_000  # rolled back whole
    from core.index import BuildRunning, build_lock

    with build_lock(path), pytest.raises(BuildRunning):  # never while a rebuild runs
        apply_density(path, {"s": (counts, 20_000)})


def test_random_picks_skip_alive_latents_without_examples(gpt2, sae, tmp_path):
    from core.index import apply_density
    from ui.dreaming_view import silent_note
    from ui.resources import SaeIndex

    import copy
    import dataclasses

    quiet = dataclasses.replace(sae, sae=copy.deepcopy(sae.sae))
    with torch.no_grad():
        quiet.sae.b_enc[[3, 7]] = -1e6  # these two never fire on the indexed tokens
    path = build_index(gpt2, {"s": quiet}, TEXTS, tmp_path / "e.duckdb", CFG, corpus_name="tiny")
    index = FeatureIndex(path)
    shown = [lat for lat in range(sae.d_sae) if index.latent("s", lat).max_act > 0]
    index.close()
    assert 3 not in shown and 7 not in shown and len(shown) > 10
    apply_density(path, {"s": (torch.ones(sae.d_sae, dtype=torch.int64), 10_000)})
    index = FeatureIndex(path)
    assert index.alive_latents("s") == list(range(sae.d_sae))  # each fired once in 10k tokens
    assert index.alive_latents("s", with_examples=True) == shown
    index.close()
    apply_density(path, {"s": (torch.arange(sae.d_sae, dtype=torch.int64), 10_000)})
    index = FeatureIndex(path)
    found = SaeIndex(path, "s", index)
    tokens = index.sae_stats("s")["tokens"]
    assert silent_note(found, 0).startswith("Latent 0 never fired in the 10,000 tokens counted (dead)")
    assert silent_note(found, 7).startswith(  # the Dreaming page says why there is no reference
        f"Latent 7 fired 7 times in the 10,000 tokens counted, but never on the {tokens:,} indexed")
    index.close()


def test_strongest_ranks_by_typical_activation_and_hides_dense():
    import numpy as np

    from core.feature_index import Firing, strongest

    maxima = np.array([9.0, 4.0, 0.0, 2.0, 5.0])
    fired = Firing([1, 2, 3], [], [], maxima, np.array([3, 1, 0, 1, 2]))
    typical = np.array([8.0, 1.0, 1.0, 0.5, 0.0])  # latent 4 never fired in the index
    dense = np.array([True, False, False, False, False])
    assert [s.latent for s in strongest(fired, typical, dense, "activation", False)] == [
        0, 4, 1, 3]
    ranked = strongest(fired, typical, dense, "relative", True)
    assert [s.latent for s in ranked] == [1, 3, 4]  # 4.0×, 4.0× (less activation), unknown
    assert ranked[0].relative == 4.0 and np.isnan(ranked[2].relative)
    with pytest.raises(ValueError, match="use one of relative, activation"):
        strongest(fired, typical, dense, "loudness")


def test_token_tops_rank_each_token_as_the_text_is_ranked():
    import numpy as np

    from core.feature_index import Firing, token_tops

    active = [[], [(0, 9.0), (1, 3.0), (4, 2.0)], [(0, 6.0), (3, 1.0)]]  # BOS, then two tokens
    fired = Firing([1, 2, 3], active, [], np.zeros(5), np.zeros(5))
    typical = np.array([8.0, 1.0, 1.0, 0.5, 0.0])  # latent 4 never fired in the index
    dense = np.array([True, False, False, False, False])
    tops = token_tops(fired, typical, dense, "relative", True)
    assert [[r.latent for r in row] for row in tops] == [[], [1, 4], [3]]
    assert tops[1][0].relative == 3.0 and np.isnan(tops[1][1].relative)
    assert tops[2][0].value == 1.0 and tops[2][0].relative == 2.0
    raw = token_tops(fired, typical, dense, "activation", False, top=2)
    assert [[r.latent for r in row] for row in raw] == [[], [0, 1], [0, 3]]
    with pytest.raises(ValueError, match="use one of relative, activation"):
        token_tops(fired, typical, dense, "loudness")
