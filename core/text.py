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


NUCLEUS_FIRST = 1024
"""Tokens :func:`outside_nucleus` ranks first: a 0.95 nucleus of the embedded model at
temperature 1 mostly holds tens to hundreds of tokens."""


def outside_nucleus(scores: torch.Tensor, top_p: float, first: int = NUCLEUS_FIRST) -> torch.Tensor:
    """Which tokens top-p (nucleus) sampling leaves out: ``[rows, vocab]`` booleans.

    ``scores`` are logits (any shift). A token stays when the probability of the tokens ranked
    above it is below ``top_p``, so the one that crosses ``top_p`` stays (the rule of
    transformers' ``TopPLogitsWarper``). That warper sorts the whole 262k-token vocabulary of
    every row, a large part of a sampling step; this ranks the top ``first`` with ``topk``, and
    only the rows whose nucleus reaches past them again with eight times as many, up to the
    whole vocabulary.

    Probabilities are normalized by a plain sum of the exponentials (relative error about 3e-7
    over 262k tokens): the probabilities of a float32 ``log_softmax`` add up to 1 only within
    about 5e-5 there, enough to move the nucleus's edge by a token now and then."""
    vocab = scores.shape[-1]
    if top_p >= 1:
        return torch.zeros_like(scores, dtype=torch.bool)
    k = min(first, vocab)
    top, order = scores.topk(k, dim=-1)
    top_score = top[:, :1]
    total = torch.exp(scores - top_score).sum(-1, keepdim=True).double()
    probs = torch.exp((top - top_score).double()) / total
    cum = probs.cumsum(-1)
    drop = torch.ones_like(scores, dtype=torch.bool).scatter(-1, order, (cum - probs) >= top_p)
    if k == vocab:
        return drop
    wider = (cum[:, -1] < top_p).nonzero().squeeze(-1)  # their nucleus reaches past the top k
    if wider.numel():
        drop[wider] = outside_nucleus(scores[wider], top_p, first=k * 8)
    return drop


class NucleusSampling:
    """A ``generate`` logits processor: temperature, then top-k (``top_k`` > 0), then top-p
    with :func:`outside_nucleus`, in transformers' order.

    transformers' own ``TopPLogitsWarper`` sorts the whole vocabulary of every row at every
    step, even after top-k has left 50 tokens; this keeps the same tokens and leaves the same
    probabilities to sample from."""

    def __init__(self, temperature: float, top_p: float, top_k: int = 0) -> None:
        if not temperature > 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"temperature={temperature}, top_p={top_p}, top_k={top_k}: use a "
                             "temperature above 0, top_p in (0, 1] and top_k of 0 (off) or more.")
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if not self.top_k or self.top_k >= scores.shape[-1]:
            if self.top_p >= 1:
                return scores
            return scores.masked_fill(outside_nucleus(scores.float(), self.top_p), -torch.inf)
        top, order = scores.topk(self.top_k, dim=-1)
        top = top.masked_fill(outside_nucleus(top.float(), self.top_p, first=self.top_k),
                              -torch.inf)
        return torch.full_like(scores, -torch.inf).scatter(-1, order, top)


def generate_text(
    lm: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = 32,
    prepend_bos: bool = True,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> list[str]:
    """Continuations of ``prompts`` as one left-padded batch: greedy at ``temperature`` 0, else
    sampled (:class:`NucleusSampling`; ``top_k`` 0 is off, not transformers' default of 50)."""
    batch = tokenize(lm, prompts, prepend_bos=prepend_bos, padding_side="left")
    sampling: dict = {"do_sample": False}
    if temperature > 0:
        from transformers import LogitsProcessorList

        nucleus = NucleusSampling(temperature, top_p, top_k)
        sampling = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                    "logits_processor": LogitsProcessorList([nucleus])}
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
