"""Tokenization: exactly one BOS when asked, padding on the requested side, bad text refused."""

import pytest

from core.text import MAX_PROMPT_CHARS, generate_text, token_ids, tokenize


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
