"""Tokenization: exactly one BOS when asked, padding on the requested side, bad text refused."""

import pytest

from core.text import MAX_PROMPT_CHARS, generate_text, token_ids, tokenize
from tests.conftest import device_waits


def test_exactly_one_bos(gpt2):
    bos = gpt2.tokenizer.bos_token_id
    ids = token_ids(gpt2, "hello world")
    assert ids[0] == bos and bos not in ids[1:]
    assert token_ids(gpt2, "<bos><bos>hello world") == ids
    assert bos not in token_ids(gpt2, "<bos>hello world", prepend_bos=False)


def test_padding_sides(gpt2):
    right = tokenize(gpt2, ["a", "a longer text here"])
    left = tokenize(gpt2, ["a", "a longer text here"], padding_side="left")
    assert right.attention_mask[0, 0] == 1 and right.attention_mask[0, -1] == 0
    assert left.attention_mask[0, 0] == 0 and left.attention_mask[0, -1] == 1
    assert right.attention_mask.sum() == left.attention_mask.sum()


@pytest.mark.parametrize(("text", "message"), [("", "empty"), ("   ", "empty"),
                                               ("x" * (MAX_PROMPT_CHARS + 1), "the limit is")])
def test_bad_text(gpt2, text, message):
    with pytest.raises(ValueError, match=message):
        tokenize(gpt2, [text])


def test_batched_generation_equals_unbatched(gemma3):
    prompts = ["The quick brown fox", "def add(a, b):\n    return a + b and more text"]
    batched = generate_text(gemma3, prompts, max_new_tokens=8)
    solo = [generate_text(gemma3, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == solo
    assert all(len(t) > 0 for t in batched)


def test_tracked_windows_name_each_positions_document(gpt2):
    from core.text import token_ids, tracked_windows, windows

    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "Paris is the capital.",
             "def add(a, b):\n    return a + b\n" * 4]
    tracked = list(tracked_windows(gpt2, texts, 16))
    assert [r for r, _ in tracked] == list(windows(gpt2, iter(texts), 16))
    bos = gpt2.tokenizer.bos_token_id
    rebuilt: dict[int, list[int]] = {}
    for ids, docs in tracked:
        assert len(ids) == len(docs) == 16 and ids[0] == bos
        assert all((d == -1) == (t == bos) for t, d in zip(ids, docs))
        for t, d in zip(ids, docs):
            if d >= 0:
                rebuilt.setdefault(d, []).append(t)
    # every document's tokens come back in order (the last one cut where the windows end)
    assert sorted(rebuilt) == [0, 1, 2]
    for d, got in rebuilt.items():
        want = token_ids(gpt2, texts[d], prepend_bos=False)
        assert got == want[:len(got)] and (d == 2 or got == want)


def full_sort_nucleus(logp, top_p):
    """Top-p by sorting the whole vocabulary in float64 (descending)."""
    import torch

    lp, order = torch.log_softmax(logp.double(), dim=-1).sort(dim=-1, descending=True)
    probs = lp.exp()
    drop = (probs.cumsum(-1) - probs) >= top_p
    return torch.zeros_like(drop).scatter(-1, order, drop)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95, 0.999])
def test_nucleus_from_topk_equals_a_full_sort(top_p):
    import torch

    from core.text import outside_nucleus

    gen = torch.Generator().manual_seed(0)
    # sharp rows (nucleus of a few tokens), medium ones and nearly flat ones (nucleus past
    # every topk level, down to the full vocabulary)
    scale = torch.tensor([8.0] * 4 + [2.0] * 4 + [0.05] * 4)[:, None]
    logp = torch.randn(12, 5000, generator=gen) * scale + 3.0  # logits, shifted
    want = full_sort_nucleus(logp, top_p)
    for first in (1, 8, 64, 5000, 10_000):
        got = outside_nucleus(logp, top_p, first=first)
        assert torch.equal(got, want), first
    sizes = (~want).sum(-1)
    assert (sizes >= 1).all()
    assert not outside_nucleus(logp, 1.0).any()
    if top_p in (0.9, 0.95):  # the rows exercise the first look and the widening
        assert sizes[:4].max() < 64 and sizes[8:].min() > 512


def test_nucleus_keeps_what_transformers_warpers_keep():
    import torch
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    from core.text import NucleusSampling

    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(16, 3000, generator=gen) * torch.linspace(0.1, 6, 16)[:, None]
    for temperature, top_p, top_k in [(1.0, 0.95, 0), (0.7, 0.9, 0), (1.3, 0.5, 0),
                                      (1.0, 0.95, 50), (0.8, 0.99, 7), (1.0, 1.0, 50)]:
        ours = NucleusSampling(temperature, top_p, top_k)(None, scores)
        theirs = scores / temperature
        if top_k:
            theirs = TopKLogitsWarper(top_k)(None, theirs)
        theirs = TopPLogitsWarper(top_p)(None, theirs) if top_p < 1 else theirs
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        assert torch.equal(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])
        kept = (~torch.isinf(ours)).sum(-1)
        assert (kept >= 1).all() and (not top_k or (kept <= top_k).all())


def test_sampled_generation_is_seeded_and_nucleus_bounded(gemma3):
    import torch

    prompts = ["The quick brown fox", "def add(a, b):"]
    torch.manual_seed(5)
    one = generate_text(gemma3, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9)
    torch.manual_seed(5)
    again = generate_text(gemma3, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9)
    torch.manual_seed(6)
    other = generate_text(gemma3, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9)
    assert one == again != other
    greedy = generate_text(gemma3, prompts, max_new_tokens=8)
    torch.manual_seed(5)
    # top_p so small that only the most likely token is left: sampling is greedy
    assert generate_text(gemma3, prompts, max_new_tokens=8, temperature=1.0, top_p=1e-6) == greedy
    with pytest.raises(ValueError, match="temperature"):
        generate_text(gemma3, prompts, temperature=1.0, top_p=1.5)


def test_sampled_generation_equals_transformers_own_sampling(gemma3):
    import torch

    def ours(top_p, top_k):
        torch.manual_seed(11)
        # temperature 0.05: the tiny model's nuclei then hold 2 to 120 of its 400 tokens
        return generate_text(gemma3, prompts, max_new_tokens=10, temperature=0.05, top_p=top_p,
                             top_k=top_k)

    prompts = ["The quick brown fox", "def add(a, b):", "Once upon a time"]
    for top_k, top_p in [(20, 0.9), (0, 0.8)]:
        batch = tokenize(gemma3, prompts, padding_side="left")
        torch.manual_seed(11)
        out = gemma3.model.generate(input_ids=batch.input_ids,
                                    attention_mask=batch.attention_mask, max_new_tokens=10,
                                    do_sample=True, temperature=0.05, top_p=top_p,
                                    top_k=top_k, pad_token_id=gemma3.tokenizer.pad_token_id)
        theirs = gemma3.tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:],
                                               skip_special_tokens=True)
        assert ours(top_p, top_k) == theirs
        assert ours(top_p * 0.6, top_k) != theirs  # the nucleus decides what is sampled


def test_nucleus_waits_for_the_device_only_to_look_wider():
    """After top-k nothing reads a value off the device; without it, one check per row set
    whose nucleus may reach past the first look."""
    import torch

    from core.text import NucleusSampling, outside_nucleus

    gen = torch.Generator().manual_seed(2)
    sharp = torch.randn(4, 5000, generator=gen) * 8
    flat = torch.randn(4, 5000, generator=gen) * 0.05
    out, waits = device_waits(lambda: NucleusSampling(1.0, 0.95, 50)(None, flat))
    assert waits == 0 and (~torch.isinf(out)).sum(-1).max() <= 50
    assert device_waits(lambda: outside_nucleus(sharp, 0.95))[1] == 1
    assert device_waits(lambda: outside_nucleus(flat, 0.95, first=8))[1] > 1  # wider, twice
