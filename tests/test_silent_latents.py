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
