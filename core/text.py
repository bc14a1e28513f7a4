"""Tokenization with explicit BOS handling and batched generation on the shared model."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from core.models import LoadedModel

MAX_PROMPT_CHARS = 20_000
"""Longer texts are refused: the pages are for reading activations, not for whole books."""


@dataclass(frozen=True)
class Batch:
    """Token ids ready for the model."""

    input_ids: torch.Tensor
    """``[batch, pos]``; padded on the side the caller asked for."""
    attention_mask: torch.Tensor
    """1 for real tokens, 0 for padding."""


def check_text(text: str, what: str = "prompt") -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"The {what} is empty; type some text.")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"The {what} has {len(text):,} characters; the limit is {MAX_PROMPT_CHARS:,}. "
            "Shorten it or split it into several texts."
        )
    return text


def token_ids(lm: LoadedModel, text: str, prepend_bos: bool = True) -> list[int]:
    """Ids of ``text`` starting with exactly one BOS when ``prepend_bos`` (none otherwise).

    Tokenizers disagree: Gemma's adds BOS, GPT-2's does not, and a text that itself starts
    with the BOS string would give two. Duplicated BOS tokens give wrong activations.
    """
    tok = lm.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    while ids and ids[0] == bos:
        ids = ids[1:]
    return ([bos] if prepend_bos and bos is not None else []) + list(ids)


def windows(lm: LoadedModel, texts: Iterator[str], context_size: int) -> Iterator[list[int]]:
    """Documents joined by BOS and cut into windows of ``context_size`` that each start with BOS."""
    for window, _ in tracked_windows(lm, texts, context_size):
        yield window


def tracked_windows(lm: LoadedModel, texts: Iterable[str], context_size: int
                    ) -> Iterator[tuple[list[int], list[int]]]:
    """:func:`windows`, each with the document every position comes from (its index among
    ``texts``; -1 at BOS)."""
    bos = lm.tokenizer.bos_token_id
    buffer: list[int] = []
    source: list[int] = []
    for doc, text in enumerate(texts):
        if buffer:
            buffer.append(bos)  # document separator
            source.append(-1)
        ids = token_ids(lm, text, prepend_bos=False)
        buffer += ids
        source += [doc] * len(ids)
        while len(buffer) >= context_size:
            if buffer[0] == bos:  # never two BOS in a row at a window start
                buffer, source = buffer[1:], source[1:]
            yield [bos] + buffer[: context_size - 1], [-1] + source[: context_size - 1]
            buffer, source = buffer[context_size - 1:], source[context_size - 1:]


def tokenize(
    lm: LoadedModel,
    texts: list[str],
    prepend_bos: bool = True,
    max_length: int | None = None,
    padding_side: str = "right",
) -> Batch:
    """Tokenize and pad a batch; ``max_length`` truncates each text after its BOS."""
    rows = [token_ids(lm, check_text(t), prepend_bos) for t in texts]
    if max_length is not None:
        rows = [r[:max_length] for r in rows]
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return Batch(ids.to(lm.device), mask.to(lm.device))


def generate_text(
    lm: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = 32,
    prepend_bos: bool = True,
    **sampling,
) -> list[str]:
    """Continuations of ``prompts`` as one left-padded batch (greedy unless ``do_sample=True``)."""
    batch = tokenize(lm, prompts, prepend_bos=prepend_bos, padding_side="left")
    sampling.setdefault("do_sample", False)
    with lm.lock, torch.no_grad():
        out = lm.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=lm.tokenizer.pad_token_id,
            **sampling,
        )
    new = out[:, batch.input_ids.shape[1]:]
    return lm.tokenizer.batch_decode(new, skip_special_tokens=True)
