"""The counting helpers of benchmarks/silent_latents.py."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import silent_latents as sl  # noqa: E402


def test_card_sets_split_silent_and_rare():
    fires = torch.tensor([0, 1, 5, 6, 0, 3, 100])
    sets = sl.card_sets(fires)
    assert sets["silent"].tolist() == [0, 4]
    assert sets["rare"].tolist() == [1, 2, 5]


def test_fired_among_counts_only_the_given_latents():
    counts = torch.tensor([0, 2, 0, 7])
    assert sl.fired_among(counts, torch.tensor([0, 1, 2])) == 1
    assert sl.fired_among(counts, torch.tensor([1, 3])) == 2


def test_batch_topk_takes_k_per_token_over_the_whole_batch():
    pre = torch.tensor([[5.0, 4.0, -1.0],
                        [0.5, 3.0, 2.0]])
    # k = 1: the two largest of the whole batch, wherever they sit (both in row 0 here)
    assert sl.batch_topk_counts(pre, 1).tolist() == [1, 1, 0]
    assert sl.batch_topk_counts(pre, 2).tolist() == [1, 2, 1]
    # negative pre-activations are never selected, even when k asks for more
    assert sl.batch_topk_counts(pre, 3).tolist() == [2, 2, 1]


def test_opening_of_prefers_the_longest_opening():
    assert sl.opening_of("The history of Rome") == "The history of"
    assert sl.opening_of("Q: Why is the sky blue?\nA: Rayleigh") == "Q: Why is the sky blue?\nA:"
    assert sl.opening_of("nothing known") == ""


def test_massive_tokens_are_outliers_of_the_batch_and_never_bos():
    x = torch.ones(1, 6, 4)
    x[0, 2] *= 10  # an outlier
    x[0, 0] *= 50  # BOS, left out
    body = torch.tensor([[False, True, True, True, True, True]])
    assert sl.massive_tokens(x, body).tolist() == [[False, False, True, False, False, False]]


def test_good_toulmin_alternates_over_the_rare_counts():
    fires = torch.tensor([0, 0, 1, 1, 1, 2, 3, 50])
    # n1 = 3, n2 = 1, n3 = 1: 3 - 1 + 1
    assert sl.good_toulmin(fires) == 3.0
    assert sl.good_toulmin(fires, t=0.5) == 3 * 0.5 - 0.25 + 0.125


def test_trained_rows_are_windows_the_training_stream_took(tmp_path, monkeypatch):
    """The train windows the benchmark runs are ones ``activation_batches`` harvested, from the
    main corpus only, past the first harvests; a corpus that is not the shipped one is refused."""
    import hashlib
    import json
    from types import SimpleNamespace

    import numpy as np
    import pytest

    import core.pipeline.training as training
    from core.pipeline.corpus import TOKENS_SUFFIX

    body, seed = 7, 3
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    ids = np.arange(10, 10 + 2_000, dtype="<u4")
    ids.tofile(corpus / f"train{TOKENS_SUFFIX}")
    (corpus / "train.jsonl").write_text('{"text": "x"}\n')
    samples = np.arange(5_000, 5_300, dtype="<u4")  # 300 tokens in 3 documents
    root = tmp_path / "saes"
    (root / "w4096").mkdir(parents=True)
    cfg = {"context_size": body + 1, "seed": seed, "training_tokens": 1_500, "norm_batches": 1,
           "batch_tokens": 14, "shuffle_tokens": 28, "windows_per_forward": 4}
    (root / "w4096" / "cfg.json").write_text(json.dumps({"metadata": {"training_config": cfg}}))
    sha = hashlib.sha256((corpus / "train.jsonl").read_bytes()).hexdigest()
    (root / "corpus-manifest.json").write_text(json.dumps({"sha256": {"train": sha}}))
    (root / "samples-manifest.json").write_text(json.dumps(
        {"splits": {"train": {"samples": {"documents": 3, "tokens": 300}}}}))

    rows, taken, meta = sl.trained_rows(corpus, 40, bos=2, root=root)
    assert rows.shape == (40, body + 1) and (rows[:, 0] == 2).all()
    starts = ((rows[:, 1] - 10) // body).tolist()
    assert all(torch.equal(r[1:], torch.arange(10 + w * body, 10 + (w + 1) * body))
               for r, w in zip(rows, starts))  # whole windows of the main corpus, in place
    assert meta["windows_taken"] == 40 and max(starts) < len(ids) // body
    assert taken.tolist() == starts

    # the stream of the main corpus + BOS + samples, as training joins them
    joint = np.concatenate([ids, [2], samples[:100], [2], samples[100:200], [2], samples[200:]])
    taken = []
    real = training.stream_windows

    def spy(stream, bos, context_size, which=None, **kw):
        taken.extend(int(w) for w in which)
        return real(stream, bos, context_size, which=which, **kw)

    monkeypatch.setattr(training, "stream_windows", spy)
    monkeypatch.setattr(training, "run_to_hooks", lambda lm, hooks, batch: {
        hooks[0]: torch.zeros(*batch.shape, 4)})
    lm = SimpleNamespace(device=torch.device("cpu"), d_model=4,
                         tokenizer=SimpleNamespace(bos_token_id=2))
    batches = training.activation_batches(lm, joint, "h", body + 1, cfg["batch_tokens"],
                                          cfg["windows_per_forward"], cfg["shuffle_tokens"], seed)
    for _ in range(cfg["training_tokens"] // cfg["batch_tokens"]):
        next(batches)
    skip = meta["first_stream_windows_skipped"]
    assert set(starts) <= set(taken[skip:]), "windows the stream never harvested"

    (corpus / "train.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(ValueError, match="not the shipped corpus"):
        sl.trained_rows(corpus, 40, bos=2, root=root)


def test_fired_curve_counts_latents_fired_so_far(monkeypatch):
    monkeypatch.setattr(sl, "pre_acts", lambda s, x: x)  # the inputs are the pre-activations
    x = torch.zeros(8, 4)
    x[1, 0] = x[2, 0] = 5.0  # latent 0 early, twice
    x[6, 3] = 5.0  # latent 3 late
    x[3, 2] = 5.0  # latent 2 is not among the counted
    curve = sl.fired_curve(None, x, torch.tensor([0, 1, 3]), torch.full((4,), 1.0), points=4)
    assert curve == [[2, 1], [4, 1], [6, 1], [8, 2]]


def test_source_lookup_names_each_tokens_document_source(tmp_path):
    import json

    import numpy as np

    from core.pipeline.corpus import TOKENS_SUFFIX

    docs = [("a", 10), ("b", 3), ("c", 12)]  # source, tokens; joined by BOS (2)
    parts = []
    for i, (_, n) in enumerate(docs):
        parts += ([2] if i else []) + list(range(100 + 20 * i, 100 + 20 * i + n))
    np.array(parts, dtype="<u4").tofile(tmp_path / f"train{TOKENS_SUFFIX}")
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"text": "x", "source": src}) + "\n" for src, _ in docs))
    lookup = sl.source_lookup(tmp_path, "train", np.array([0, 2]), context=6, bos=2)
    # window 0 holds stream tokens 0-4 (a), window 2 tokens 10-14: BOS, b, b, b, BOS
    where = torch.tensor([[0, 1], [0, 5], [1, 2], [1, 4], [1, 5]])
    assert lookup(where) == ["a", "a", "b", "b", "b"]  # a separator counts with the one before
