"""Patch scoping: the model the SAE was trained on explains a latent itself.

A prompt asks for the meaning of a placeholder token (``<unk>``); in the first forward pass the
activation at a chosen hook is *replaced*, at every position of the placeholder, by the latent's
decoder direction scaled to a chosen norm, and the model's continuation is the explanation
(ARENA's SAE exercises, after the Patchscopes and SelfIE papers). One norm rarely suits every
latent, so a sweep over several norms runs as one batch, one row per norm.

Generation is the steering loop (:func:`core.steering.generate_rows`): hooks are installed for
one forward pass at a time and never held across a yield. Only the first pass, the one that
reads the whole prompt, is patched; later passes read one new token each and see the patched
prompt through the KV cache, as in the reference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from core.labels import Explanation
from core.models import LoadedModel
from core.saes import LoadedSAE
from core.steering import GenConfig, generate_rows, hook_width
from core.text import check_text

PLACEHOLDER = "<unk>"
MAX_NORMS = 8
"""Norms in one sweep (one batch row each)."""
MAX_SCOPE_TOKENS = 64
MAX_NORM = 1e6
MAX_LATENTS = 256
"""Latents in one batch command or one page run."""

BASE_PROMPT = ('Each word is followed by what it means.\n'
               '"dog": a furry animal that barks and is kept as a pet.\n'
               '"Paris": the capital city of France.\n'
               '"quickly": in a fast way; with speed.\n'
               '"however": used to introduce a contrast.\n'
               '"<unk>":')
"""A few-shot prompt for base models: the continuation of the last line is the meaning."""
CHAT_PROMPT = 'What is the meaning of the word "<unk>"?'
CHAT_PREFIX = 'The meaning of the word "<unk>" is "'
"""ARENA's prompt for instruction-tuned models: the question through the chat template, then
the start of the answer."""
PROMPTS = {"base": (BASE_PROMPT, "", False), "chat": (CHAT_PROMPT, CHAT_PREFIX, True)}
"""Preset name -> (prompt, answer prefix, chat template)."""


@dataclass(frozen=True)
class ScopeConfig:
    """How to patch scope a latent."""

    prompt: str = BASE_PROMPT
    """Text holding the placeholder one or more times (the user turn when ``chat``)."""
    placeholder: str = PLACEHOLDER
    """Every token overlapping an occurrence of this text is patched."""
    chat: bool = False
    """Wrap ``prompt`` in the tokenizer's chat template (instruction-tuned models)."""
    answer_prefix: str = ""
    """Text after the chat template's generation prompt (the start of the answer); may hold the
    placeholder too."""
    hook: str | None = None
    """Where to patch (``blocks.L.hook_resid_pre`` ...); ``None``: the SAE's own hook."""
    norms: tuple[float, ...] = (20.0, 60.0, 120.0)
    """Norm of the patched vector, one batch row each (see :func:`typical_norm`)."""
    max_new_tokens: int = 24
    cut_at_newline: bool = True
    """The explanation ends at the first line break (and at a closing quote after a quoted
    answer prefix)."""

    def __post_init__(self) -> None:
        check_text(self.prompt, "patch-scoping prompt")
        if not isinstance(self.placeholder, str) or not self.placeholder:
            raise ValueError("The placeholder is empty; use a token such as <unk>.")
        if self.placeholder not in self.prompt + self.answer_prefix:
            raise ValueError(f"The prompt does not contain the placeholder "
                             f"{self.placeholder!r}; put it where the latent should be read.")
        norms = tuple(self.norms)
        if not 1 <= len(norms) <= MAX_NORMS:
            raise ValueError(f"Give 1 to {MAX_NORMS} norms; got {len(norms)}.")
        for n in norms:
            if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) \
                    or not 0 < n <= MAX_NORM:
                raise ValueError(f"Norm {n!r} is not usable; use numbers above 0 and at most "
                                 f"{MAX_NORM:g} (residual norms run from about 10 to 20,000, depending on the model and layer; see typical_norm).")
        object.__setattr__(self, "norms", tuple(float(n) for n in norms))
        if not 1 <= int(self.max_new_tokens) <= MAX_SCOPE_TOKENS:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; use 1 to "
                             f"{MAX_SCOPE_TOKENS}.")

    def params(self, lm: LoadedModel, sae: LoadedSAE, norm: float) -> dict:
        """What is stored with an explanation made at ``norm``."""
        return {"model": lm.name, "hook": self.hook or sae.hook_name, "norm": float(norm),
                "prompt": self.prompt, "placeholder": self.placeholder, "chat": self.chat,
                "answer_prefix": self.answer_prefix, "max_new_tokens": int(self.max_new_tokens)}


@dataclass
class ScopeResult:
    """The sweep's outputs for one latent."""

    latent: int
    hook: str
    norms: list[float]
    texts: list[str]
    """The explanation at each norm (cut as the config says)."""
    raw: list[str]
    """The whole continuation at each norm."""
    prompt_ids: list[int]
    positions: list[int]
    """The patched token positions."""
    seconds: float


def prompt_with_positions(lm: LoadedModel, cfg: ScopeConfig, prepend_bos: bool = True
                          ) -> tuple[list[int], list[int]]:
    """(token ids, positions of the placeholder's tokens) of the full prompt, starting with
    exactly one BOS as :func:`core.text.token_ids` does."""
    tok = lm.tokenizer
    text = cfg.prompt
    if cfg.chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"{lm.name} has no chat template (a base model?); use the base "
                             "prompt or untick 'chat template'.")
        text = tok.apply_chat_template([{"role": "user", "content": cfg.prompt}], tokenize=False,
                                       add_generation_prompt=True)
    text += cfg.answer_prefix
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    while ids and ids[0] == bos:
        ids, offsets = ids[1:], offsets[1:]
    spans, start = [], text.find(cfg.placeholder)
    while start >= 0:
        spans.append((start, start + len(cfg.placeholder)))
        start = text.find(cfg.placeholder, start + len(cfg.placeholder))
    shift = 1 if prepend_bos and bos is not None else 0
    positions = [i + shift for i, (a, b) in enumerate(offsets)
                 if any(a < hi and b > lo for lo, hi in spans)]
    if not positions:
        raise ValueError(f"The placeholder {cfg.placeholder!r} has no token of its own in the "
                         "tokenized prompt; put spaces or quotes around it.")
    ids = ([bos] if shift else []) + ids
    limit = getattr(lm.config, "max_position_embeddings", None) or getattr(
        lm.config, "n_positions", None)
    if limit and len(ids) + int(cfg.max_new_tokens) > int(limit):
        raise ValueError(f"The prompt has {len(ids)} tokens and {cfg.max_new_tokens} more are "
                         f"asked for, but {lm.name} reads at most {limit}; shorten the prompt.")
    return ids, positions


class Patch:
    """Per-pass hooks: in the first pass, replace the activation at ``positions`` of row ``r``
    with ``vectors[r]``; later passes are left alone."""

    def __init__(self, hook: str, positions: list[int], vectors: torch.Tensor):
        self.hook, self.positions, self.vectors = hook, list(positions), vectors
        self.seen = 0

    def hooks(self) -> dict:
        return {self.hook: self._fn} if self.seen == 0 else {}

    def advance(self, n: int) -> None:
        self.seen += n

    def _fn(self, x: torch.Tensor) -> torch.Tensor:
        new = x.clone()
        new[:, self.positions, :] = self.vectors.to(x.device, x.dtype)[:, None, :]
        return new


def decoder_direction(sae: LoadedSAE, latent: int) -> torch.Tensor:
    if not 0 <= int(latent) < sae.d_sae:
        raise ValueError(f"Latent {latent} is out of range: {sae.spec.label} has latents 0 to "
                         f"{sae.d_sae - 1}.")
    return torch.nn.functional.normalize(sae.sae.W_dec[int(latent)].detach().float(), dim=-1)


def cut(text: str, cfg: ScopeConfig) -> str:
    out = text
    if cfg.cut_at_newline:
        out = out.split("\n", 1)[0]
        if cfg.answer_prefix.rstrip().endswith('"'):
            out = out.split('"', 1)[0]
    return " ".join(out.split())


def patch_scope(lm: LoadedModel, sae: LoadedSAE, latent: int, cfg: ScopeConfig) -> ScopeResult:
    """The model's continuations of the prompt with the placeholder patched by the latent's
    decoder direction, one per norm (greedy, so a rerun gives the same texts)."""
    hook = cfg.hook or sae.hook_name
    width = hook_width(lm, hook)
    if width != sae.d_in:
        raise ValueError(f"{hook} has {width:,} values per token but the decoder directions of "
                         f"{sae.spec.label} have {sae.d_in:,}; patch a residual-stream hook.")
    direction = decoder_direction(sae, latent)
    ids, positions = prompt_with_positions(lm, cfg, sae.processing.prepend_bos)
    vectors = torch.stack([n * direction for n in cfg.norms])
    patch = Patch(hook, positions, vectors)
    gen = GenConfig(max_new_tokens=int(cfg.max_new_tokens), temperature=0.0)
    out: list = []
    for _ in generate_rows(lm, ids, len(cfg.norms), patch, gen, out):
        pass
    rows, seconds = out[0]
    raw = [lm.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    return ScopeResult(int(latent), hook, list(cfg.norms), [cut(t, cfg) for t in raw], raw, ids,
                       positions, seconds)


def as_explanations(result: ScopeResult, lm: LoadedModel, sae: LoadedSAE,
                    cfg: ScopeConfig) -> list[Explanation]:
    """One stored explanation per norm whose output is not empty."""
    now = time.time()
    return [Explanation(result.latent, "patchscope", text, None, cfg.params(lm, sae, norm), now)
            for norm, text in zip(result.norms, result.texts) if text]


@torch.no_grad()
def typical_norm(lm: LoadedModel, sae: LoadedSAE, cfg: ScopeConfig) -> float:
    """Median norm of the activation at the patched hook over the prompt's tokens (BOS left
    out): the scale a patched vector competes with."""
    from core.hooks import run_to_hooks

    hook = cfg.hook or sae.hook_name
    ids, _ = prompt_with_positions(lm, cfg, sae.processing.prepend_bos)
    acts = run_to_hooks(lm, [hook], torch.tensor([ids], device=lm.device))[hook][0]
    norms = acts.float().norm(dim=-1)[1:] if len(ids) > 1 else acts.float().norm(dim=-1)
    return float(norms.median())


def scope_many(lm: LoadedModel, sae: LoadedSAE, latents: list[int], cfg: ScopeConfig,
               progress: Callable[[int, int, ScopeResult], None] | None = None
               ) -> list[ScopeResult]:
    """:func:`patch_scope` for each latent (at most :data:`MAX_LATENTS`), reporting after
    each."""
    latents = [int(i) for i in latents]
    if not 1 <= len(latents) <= MAX_LATENTS:
        raise ValueError(f"Patch scope 1 to {MAX_LATENTS} latents at once; got {len(latents)}.")
    out = []
    for i, latent in enumerate(latents):
        out.append(patch_scope(lm, sae, latent, cfg))
        if progress is not None:
            progress(i + 1, len(latents), out[-1])
    return out
