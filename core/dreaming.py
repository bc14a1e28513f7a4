"""Dreaming: search for fluent text that drives a latent (or any direction) as high as it goes.

The loop follows the published dreaming recipe (Thompson et al., "Fluent dreaming for language
models"; the SAE dreaming notebook): a buffer keeps the best prompts; every iteration mutates the
best one with one of four operations chosen at random,

* ``gcg``: swap one token for one of the ``gcg_topk`` tokens with the most negative gradient of
  the score with respect to a one-hot encoding of the prompt (the objective's gradient from a
  forward pass that stops at its layer, plus XE's dependence on the tokens it scores);
* ``insert``: insert a token sampled from the model's next-token distribution (its top
  ``sample_k2`` tokens) at a random place;
* ``swap``: replace a token by one sampled the same way;
* ``delete``: drop a random token;

evaluates ``explore`` candidates in batched forward passes, scores each as
``-activation / act_scale + w * max(0, XE - xe_free)`` (XE: the mean cross-entropy of the
prompt's tokens under the model, its fluency), drops candidates whose XE exceeds ``xe_max``
and keeps the best ``buffer_size``. The activation is read at the last position.

Fluent by default, the way EPO does it: with ``act_scale`` set to the latent's corpus top-1 the
score no longer depends on how large a latent's activations run, and several XE weights
(``xe_regularization`` plus ``xe_weights``) each keep their own buffer, take turns being mutated
and share every scored candidate; ``fluent_cap`` adds a member that keeps the strongest prompts
under an XE cap. Every step carries the activation-vs-XE Pareto front of all prompts scored so
far, so one run gives the whole trade-off. ``seeds`` (e.g. :func:`corpus_seeds`, cuts of the
latent's top corpus examples) start the search from fluent text that already drives the latent.

The model passes (scoring in bounded chunks that Stop can interrupt, the parent's next-token
distribution and GCG gradient, the corpus reference) live in :mod:`core.dream_passes`. A buffer
head keeps the final hidden states of the pass that scored it, so its next-token distribution
costs the unembedding only, not another forward pass.
Candidates are built with tensor ops, never decoded and re-encoded. Hooks only live for one
forward pass (``core.hooks.hooked``); nothing is held across a ``yield``, so closing the
generator ends the run cleanly.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from core.checks import is_finite_number
from core.dream_passes import (
    Evaluation,
    Interrupted,
    can_pack,
    first_change,
    logp_from_hidden,
    next_token_logp,
    objective_gradient,
    parent_pass,
    score_candidates,
    token_gradient,
)
from core.hooks import forward
from core.models import LoadedModel
from core.objectives import Objective, objective_weights
from core.text import check_text, token_ids

log = logging.getLogger(__name__)

OPS = ("gcg", "insert", "swap", "delete")
LIMITS = {
    "cpu": dict(iters=5000, explore=512, buffer_size=64, max_tokens=64, gcg_topk=4096,
                sample_k2=4096),
    "cuda": dict(iters=50000, explore=4096, buffer_size=256, max_tokens=256, gcg_topk=16384,
                 sample_k2=16384),
}
"""Upper bounds of the settings per device type (a link or a widget can ask for anything)."""
MAX_WEIGHTS = 8
"""Most XE weights explored at once (``xe_regularization`` plus ``xe_weights``)."""
MAX_SEEDS = 32
"""Most extra starting prompts (``seeds``)."""
SEED_EXAMPLES = 4
"""How many of a latent's top corpus examples :func:`corpus_seeds` cuts into starting prompts."""
CAP_WEIGHT = 100.0
"""XE weight of the fluent-cap member, per nat above ``fluent_cap`` (in units of the scaled
activation: with the corpus top-1 as scale, 0.1 nat over the cap costs 10 times the top-1)."""
MAX_WEIGHT = 1e6
"""Largest XE weight, activation scale or XE cap accepted."""
FLUENT_XE = 6.0
"""Mean cross-entropy (nats per token) at or below which a prompt counts as fluent."""


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DreamConfig:
    """Every parameter of the reference loop, plus the fluency population."""

    iters: int = 200
    """Iterations (each: one mutation operation, one batch of candidates)."""
    seed: int = 0
    """Same seed, same model and device: same history."""
    xe_regularization: float = 0.3
    """Weight of the cross-entropy (fluency) term in the score ``-act / act_scale + w * XE``; the
    run's ``best`` and ``buffer`` are those of this weight."""
    xe_weights: tuple[float, ...] = ()
    """Further XE weights explored at once (EPO-style population): each keeps its own buffer,
    they take turns being mutated and all share every scored candidate."""
    xe_free: float = 0.0
    """XE up to this many nats costs nothing: the weights apply to ``max(0, XE - xe_free)``, so
    the search spends no effort on fluency below it (the app: 5, under the fluent line of 6)."""
    fluent_cap: float = 0.0
    """Above 0, one more member of the population keeps the strongest prompts whose XE is at
    most this (a steep penalty of ``CAP_WEIGHT`` per nat above it): the search for text that is
    fluent *and* strong, which a fixed XE weight only reaches by luck of scale."""
    act_scale: float | None = None
    """The activation is divided by this in the score; the latent's corpus top-1 makes the XE
    weight mean "share of the corpus maximum one nat of XE is worth" for any latent. ``None``
    scores the raw activation (as the reference does)."""
    xe_max: float | None = None
    """Candidates whose XE is above this are dropped; ``None`` for no cap."""
    buffer_size: int = 8
    """How many of the best prompts are kept."""
    min_tokens: int = 1
    """Fewest prompt tokens (BOS not counted)."""
    max_tokens: int = 16
    """Most prompt tokens (BOS not counted)."""
    p_gcg: float = 0.4
    """Probability of a GCG swap."""
    p_insert: float = 0.2
    """Probability of a sampled insert."""
    p_swap: float = 0.2
    """Probability of a sampled swap."""
    p_delete: float = 0.2
    """Probability of a delete."""
    sample_k2: int = 32
    """Sampled insert/swap draw from the model's top ``sample_k2`` next tokens."""
    gcg_topk: int = 64
    """GCG draws from the ``gcg_topk`` tokens with the most negative gradient at a position."""
    explore: int = 128
    """Candidates evaluated per iteration."""
    init_prompt: str | None = None
    """Where to start; ``None`` starts from text the model samples after BOS (seeded)."""
    seeds: tuple[tuple[int, ...], ...] = ()
    """More starting prompts, as token ids without BOS (e.g. :func:`corpus_seeds`: cuts of the
    latent's top corpus examples that end on the activating token). They are scored with the
    start and every member's buffer begins with the best of them all."""
    stop: threading.Event | Callable[[], bool] | None = field(default=None, compare=False)
    """Checked before every iteration and between scoring chunks: a set event (or ``True``)
    ends the run."""

    def __post_init__(self) -> None:
        most = LIMITS["cuda"]

        def whole(name: str, low: int = 1, high: int | None = None) -> None:
            value = getattr(self, name)
            high = most.get(name) if high is None else high
            if isinstance(value, bool) or not isinstance(value, int) or value < low \
                    or (high is not None and value > high):
                bound = f">= {low}" if high is None else f"from {low} to {high:,}"
                raise ValueError(f"{name}={value!r} is invalid; use a whole number {bound}.")

        for name in ("iters", "buffer_size", "min_tokens", "max_tokens", "sample_k2",
                     "gcg_topk", "explore"):
            whole(name, high=most["max_tokens"] if name == "min_tokens" else None)
        whole("seed", 0, 2**63 - 1)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} is above max_tokens="
                             f"{self.max_tokens}; raise max_tokens or lower min_tokens.")
        if not isinstance(self.xe_weights, tuple):
            raise ValueError(f"xe_weights={self.xe_weights!r} is invalid; use a tuple of "
                             "numbers >= 0.")
        if len(self.weights) > MAX_WEIGHTS:
            raise ValueError(f"{len(self.weights)} XE weights is too many; explore at most "
                             f"{MAX_WEIGHTS} at once.")
        named = [("xe_regularization", self.xe_regularization)]
        named += [("xe_weights", w) for w in self.xe_weights]
        for name, w in named:
            if not is_finite_number(w) or not 0 <= w <= MAX_WEIGHT:
                raise ValueError(f"{name}={w!r} is invalid; use a number from 0 to "
                                 f"{MAX_WEIGHT:g} (0 ignores fluency).")
        for name in ("xe_free", "fluent_cap"):
            value = getattr(self, name)
            if not is_finite_number(value) or not 0 <= value <= MAX_WEIGHT:
                raise ValueError(f"{name}={value!r} is invalid; use a number from 0 to "
                                 f"{MAX_WEIGHT:g}" + (" (0: no fluent-cap member)." if
                                                      name == "fluent_cap" else "."))
        for name in ("act_scale", "xe_max"):
            value = getattr(self, name)
            if value is not None and (not is_finite_number(value) or not 0 < value <= MAX_WEIGHT):
                raise ValueError(f"{name}={value!r} is invalid; use a number above 0 and up "
                                 f"to {MAX_WEIGHT:g}, or None.")
        probs = self.probabilities
        if not all(is_finite_number(p) and 0 <= p <= MAX_WEIGHT for p in probs):
            raise ValueError(f"Operation probabilities {probs} must be numbers >= 0.")
        if sum(probs) <= 0:
            raise ValueError("All four operation probabilities are 0; give at least one a "
                             "positive probability.")
        if not isinstance(self.seeds, tuple) or len(self.seeds) > MAX_SEEDS:
            raise ValueError(f"seeds must be a tuple of at most {MAX_SEEDS} prompts (tuples of "
                             "token ids); pass fewer.")
        for seed in self.seeds:
            if not isinstance(seed, tuple) or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in seed):
                raise ValueError(f"Seed {seed!r} is invalid; use a tuple of token ids >= 0.")
            if not self.min_tokens <= len(seed) <= self.max_tokens:
                raise ValueError(f"A seed prompt has {len(seed)} tokens; it must have between "
                                 f"{self.min_tokens} and {self.max_tokens} (min/max tokens). "
                                 "Cut it or change the limits.")
        if self.init_prompt is not None:
            check_text(self.init_prompt, "initial prompt (leave it unset to let the model "
                                         "write one)")

    @property
    def probabilities(self) -> tuple[float, float, float, float]:
        return (self.p_gcg, self.p_insert, self.p_swap, self.p_delete)

    @property
    def weights(self) -> tuple[float, ...]:
        """Every XE weight explored, ``xe_regularization`` first."""
        return (self.xe_regularization, *self.xe_weights)

    @property
    def members(self) -> tuple[tuple[float, float], ...]:
        """The population, as (XE weight, free XE) per buffer: every XE weight on the XE above
        ``xe_free``, then the fluent-cap member if there is one."""
        out = tuple((w, self.xe_free) for w in self.weights)
        return out + (((CAP_WEIGHT, self.fluent_cap),) if self.fluent_cap > 0 else ())

    def member_name(self, k: int) -> str:
        """Member ``k`` of :attr:`members` in words."""
        if k == len(self.weights):
            return f"fluent cap {self.fluent_cap:g}"
        return f"XE weight {self.weights[k]:g}"

    def check_device(self, device: torch.device | str) -> None:
        """Refuse settings above the bounds for this device type (CPUs get tighter ones)."""
        kind = torch.device(device).type
        for name, high in LIMITS.get(kind, LIMITS["cpu"]).items():
            value = getattr(self, name)
            if value > high:
                raise ValueError(f"{name}={value:,} is above the limit of {high:,} on the "
                                 f"{kind.upper()}; lower it.")


def limits(device: torch.device | str) -> dict[str, int]:
    """Upper bounds of the whole-number settings on this device type (for number inputs)."""
    return dict(LIMITS.get(torch.device(device).type, LIMITS["cpu"]))


def default_config(device: torch.device | str, **overrides) -> DreamConfig:
    """The app's defaults: three XE weights at once on the XE above 5 nats (0: activation alone,
    as the reference's default; 0.1; 0.5: fluent), meant with ``act_scale`` set to the latent's
    corpus top-1 (one nat of XE above 5 then costs 10% or 50% of it); smaller batches and
    prompts on a CPU."""
    # Gemma 3 270M, 200 iterations on a 2-core CPU: 0.4-9 minutes with native bfloat16
    # (benchmarks/dreaming_quality.py), 3-32 minutes without (dreaming_quality, dreaming_reuse)
    if torch.device(device).type == "cpu":
        base = dict(explore=12, max_tokens=12, gcg_topk=64, sample_k2=32, iters=200)
    else:
        base = dict(explore=128, max_tokens=16, gcg_topk=128, sample_k2=64, iters=300)
    base.update(xe_regularization=0.1, xe_weights=(0.0, 0.5), xe_free=5.0, min_tokens=4)
    return DreamConfig(**{**base, **overrides})


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One scored prompt."""

    ids: tuple[int, ...]
    """Token ids, BOS first."""
    text: str
    activation: float
    xe: float
    score: float
    """Under ``xe_regularization`` (lower is better)."""

    @property
    def fluent(self) -> bool:
        return self.xe <= FLUENT_XE


@dataclass(frozen=True)
class DreamStep:
    """What one iteration did (iteration 0 is the evaluation of the starting prompt)."""

    iteration: int
    op: str
    """``init`` or one of ``gcg``, ``insert``, ``swap``, ``delete``."""
    best: Prompt
    buffer: tuple[Prompt, ...]
    """The buffer of ``xe_regularization`` after this iteration, best first."""
    activations: list[float]
    """The objective for every candidate evaluated this iteration."""
    xes: list[float]
    """Their XE (same order)."""
    encoder: list[float]
    """SAE encoder pre-activation per candidate; empty unless the objective is an SAE latent."""
    decoder: list[float]
    """Projection on the unit decoder direction per candidate; empty likewise."""
    seconds: float
    """Time this iteration took."""
    elapsed: float
    """Time since the run started."""
    weight: float = 0.0
    """The XE weight whose best prompt was mutated this iteration."""
    member: str = ""
    """That member of the population in words (``XE weight 0.1`` or ``fluent cap 5.75``)."""
    front: tuple[Prompt, ...] = ()
    """Every prompt scored so far that no other beats on both activation and XE, by XE."""

    def row(self) -> dict:
        """One flat record for CSV export."""
        fluent = [p for p in self.front if p.fluent]
        top = max(fluent, key=lambda p: p.activation) if fluent else None
        return {"iteration": self.iteration, "op": self.op, "xe_weight": self.weight,
                "member": self.member,
                "best_activation": self.best.activation, "best_xe": self.best.xe,
                "best_score": self.best.score, "best_text": self.best.text,
                "best_fluent_activation": top.activation if top else None,
                "best_fluent_xe": top.xe if top else None,
                "best_fluent_text": top.text if top else None,
                "front_size": len(self.front),
                "candidates": len(self.activations), "seconds": self.seconds,
                "elapsed": self.elapsed}


# --- the loop ---------------------------------------------------------------------------------


def banned_tokens(lm: LoadedModel) -> torch.Tensor:
    """Bool mask over the model's vocabulary of ids a dream may not use: special and added
    special tokens and added markup tokens (BOS, EOS, padding, Gemma's unused and image slots)
    and ids beyond the tokenizer; added whitespace tokens stay allowed."""
    tok = lm.tokenizer
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[min(len(tok), vocab):] = True
    special = set(tok.all_special_ids)
    for i, t in getattr(tok, "added_tokens_decoder", {}).items():
        markup = t.content.strip()[:1] in ("<", "[")  # <start_of_image>, [multimodal]
        if t.special or markup:
            special.add(i)
    ids = [i for i in special if 0 <= i < vocab]
    if ids:
        mask[ids] = True
    return mask


def _bos(lm: LoadedModel) -> int:
    tok = lm.tokenizer
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def _start_ids(lm: LoadedModel, cfg: DreamConfig, banned: torch.Tensor,
               gen: torch.Generator) -> torch.Tensor:
    if cfg.init_prompt is None:  # fluent from the start: the model writes it (seeded)
        n = min(max(cfg.min_tokens, cfg.max_tokens // 2), cfg.max_tokens)
        ids = torch.tensor([_bos(lm)])
        for _ in range(n):
            logits = forward(lm, ids[None].to(lm.device), use_cache=False).logits[0, -1:]
            nxt = _sample_next(torch.log_softmax(logits.float(), -1), banned,
                               torch.tensor([0]), cfg.sample_k2, gen)
            ids = torch.cat([ids, nxt])
        return ids
    ids = token_ids(lm, cfg.init_prompt, prepend_bos=True)
    n = len(ids) - 1
    if not cfg.min_tokens <= n <= cfg.max_tokens:
        raise ValueError(f"The initial prompt has {n} tokens; it must have between "
                         f"{cfg.min_tokens} and {cfg.max_tokens} (min/max tokens). Shorten it "
                         "or change the limits.")
    return torch.tensor(ids)


def seed_prompts(lm: LoadedModel, cfg: DreamConfig) -> list[tuple[int, ...]]:
    """The seeds as the run holds them (BOS first): how fronts and buffers name them."""
    return [(_bos(lm), *seed) for seed in cfg.seeds]


def _starts(lm: LoadedModel, cfg: DreamConfig, banned: torch.Tensor,
            gen: torch.Generator) -> list[torch.Tensor]:
    """The starting prompt and the seeds (each BOS first), no prompt twice."""
    for seed in cfg.seeds:
        bad = [t for t in seed if t >= banned.numel() or banned[t]]
        if bad:
            raise ValueError(f"A seed prompt holds token id {bad[0]}, which is special or "
                             f"outside the vocabulary of {lm.name}; drop it from the seeds.")
    out, seen = [], set()
    for ids in [_start_ids(lm, cfg, banned, gen)] + [torch.tensor(s)
                                                      for s in seed_prompts(lm, cfg)]:
        key = tuple(ids.tolist())
        if key not in seen:
            seen.add(key)
            out.append(ids)
    return out


def _pad(rows: list[torch.Tensor], lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[n, longest]`` ids and the lengths (padding is never read: causal)."""
    lengths = torch.tensor([r.numel() for r in rows])
    pad = lm.tokenizer.pad_token_id or 0
    ids = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :r.numel()] = r
    return ids, lengths


def corpus_seeds(lm: LoadedModel, examples: list[tuple[list[int], int]], cfg: DreamConfig,
                 count: int = SEED_EXAMPLES) -> tuple[tuple[int, ...], ...]:
    """Starting prompts cut from a latent's top corpus examples ``(window ids, activating
    position)``: per example, its last ``max_tokens`` and last ``max_tokens // 2`` tokens up to
    and including the activating one (fluent text that already drives the latent, so the
    search starts near the corpus instead of from scratch). Special tokens end a cut; cuts
    shorter than ``min_tokens`` are left out."""
    banned = banned_tokens(lm)
    out: list[tuple[int, ...]] = []
    for window, pos in examples[:count]:
        tokens = [int(t) for t in window[:pos + 1]]
        cut = next((i + 1 for i in range(len(tokens) - 1, -1, -1)
                    if tokens[i] >= banned.numel() or banned[tokens[i]]), 0)
        tokens = tokens[cut:]
        for n in (cfg.max_tokens, cfg.max_tokens // 2):
            seed = tuple(tokens[-n:]) if n else ()
            if cfg.min_tokens <= len(seed) <= cfg.max_tokens and seed not in out:
                out.append(seed)
    return tuple(out[:MAX_SEEDS])


def choose_op(n_tokens: int, cfg: DreamConfig, gen: torch.Generator) -> str:
    """One operation, drawn with the configured probabilities among those that keep the prompt
    within min/max tokens (insert needs room, delete needs spare tokens)."""
    probs = torch.tensor(cfg.probabilities, dtype=torch.float64)
    if n_tokens >= cfg.max_tokens:
        probs[1] = 0
    if n_tokens <= cfg.min_tokens:
        probs[3] = 0
    if probs.sum() <= 0:  # only insert/delete were allowed and neither fits: swap instead
        probs = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    return OPS[int(torch.multinomial(probs, 1, generator=gen))]


def _sample_next(logp: torch.Tensor, banned: torch.Tensor, at: torch.Tensor, k: int,
                 gen: torch.Generator) -> torch.Tensor:
    """One token per entry of ``at``: drawn from the model's next-token distribution after
    position ``at`` (log-probs ``[pos, vocab]``), restricted to its top ``k`` allowed tokens."""
    masked = logp.masked_fill(banned.to(logp.device), -math.inf)
    top, idx = masked.topk(min(k, int((~banned).sum())), dim=-1)  # [pos, k]
    probs = torch.softmax(top.float(), dim=-1).cpu()[at]
    pick = torch.multinomial(probs, 1, generator=gen).flatten()
    return idx.cpu()[at, pick]


def make_candidates(op: str, parent: torch.Tensor, logp: torch.Tensor | None,
                    grad: torch.Tensor | None, banned: torch.Tensor, cfg: DreamConfig,
                    gen: torch.Generator) -> torch.Tensor:
    """``[explore, len]`` mutations of ``parent`` (BOS first, kept) built with tensor ops."""
    n, t = cfg.explore, parent.numel()
    rows = parent.cpu()[None].repeat(n, 1)
    if op == "delete":
        pos = torch.randint(1, t, (n,), generator=gen)
        keep = torch.ones(n, t, dtype=torch.bool)
        keep[torch.arange(n), pos] = False
        return rows[keep].view(n, t - 1)
    if op == "insert":
        pos = torch.randint(1, t + 1, (n,), generator=gen)
        new = _sample_next(logp, banned, pos - 1, cfg.sample_k2, gen)
        out = torch.empty(n, t + 1, dtype=parent.dtype)
        col = torch.arange(t + 1)[None]
        src = col - (col > pos[:, None]).long()
        out[:] = rows.gather(1, src.clamp(max=t - 1))
        out[torch.arange(n), pos] = new
        return out
    pos = torch.randint(1, t, (n,), generator=gen)
    if op == "swap":
        new = _sample_next(logp, banned, pos - 1, cfg.sample_k2, gen)
    elif op == "gcg":
        scores = (-grad).masked_fill(banned.to(grad.device), -math.inf)
        top = scores.topk(min(cfg.gcg_topk, scores.shape[-1]), dim=-1).indices.cpu()  # [t, k]
        pick = torch.randint(top.shape[1], (n,), generator=gen)
        new = top[pos, pick]
    else:
        raise ValueError(f"Unknown operation {op!r}; use one of {', '.join(OPS)}.")
    rows[torch.arange(n), pos] = new
    return rows


def _score(act: torch.Tensor, xe: torch.Tensor, member: tuple[float, float], cfg: DreamConfig
           ) -> torch.Tensor:
    weight, free = member
    score = -act / (cfg.act_scale or 1.0) + weight * (xe - free).clamp(min=0)
    if cfg.xe_max is not None:
        score = score.masked_fill(xe > cfg.xe_max, math.inf)
    return score.masked_fill(~torch.isfinite(act) | ~torch.isfinite(xe), math.inf)


def _stopped(stop) -> bool:
    if stop is None:
        return False
    return stop.is_set() if isinstance(stop, threading.Event) else bool(stop())


def dream(lm: LoadedModel, objective: Objective, cfg: DreamConfig) -> Iterator[DreamStep]:
    """Yield one :class:`DreamStep` per iteration (iteration 0: the starting prompt)."""
    if objective.sae is not None and objective.sae.d_in != lm.d_model:
        raise ValueError(f"SAE expects d_in={objective.sae.d_in} but {lm.name} has hidden size "
                         f"{lm.d_model}; pick an SAE trained on this model.")
    cfg.check_device(lm.device)
    readout = objective_weights(lm, objective)
    gen = torch.Generator().manual_seed(cfg.seed)
    banned = banned_tokens(lm)
    decode = lm.tokenizer.decode
    members = cfg.members
    scale = cfg.act_scale or 1.0
    start = time.perf_counter()
    starts = _starts(lm, cfg, banned, gen)
    ids, lengths = _pad(starts, lm)
    ev = score_candidates(lm, objective, readout, ids, lengths=lengths, fast=True,
                          keep_hidden=True)
    keys = [tuple(row.tolist()) for row in starts]
    buffers = [_merge([], keys, ev, _score(ev.activation, ev.xe, member, cfg), cfg.buffer_size,
                      decode, keep_one=True) for member in members]  # one per member
    first = buffers[0][0]
    rows = {key: j for j, key in enumerate(keys)}
    kept = {p.ids for b in buffers for p in b}
    nlls = {key: ev.nll[rows[key]] for key in kept}  # per-token XE of every buffered prompt
    front = _front([], keys, ev, _score(ev.activation, ev.xe, members[0], cfg), cfg, decode)
    now = time.perf_counter()
    yield DreamStep(0, "init", first, tuple(buffers[0]), ev.activation.tolist(), ev.xe.tolist(),
                    ev.encoder.tolist(), ev.decoder.tolist(), now - start, now - start,
                    members[0][0], cfg.member_name(0), tuple(front))
    # per buffer head: its final hidden states (from the pass that scored it), next-token
    # log-probs and the objective's gradient, each filled when first needed
    cache: dict = {}
    _remember(cache, [b[0].ids for b in buffers], rows, ev)
    for it in range(1, cfg.iters + 1):
        if _stopped(cfg.stop):
            log.info("dreaming stopped at iteration %d", it)
            return
        t0 = time.perf_counter()
        m = (it - 1) % len(members)  # the members take turns
        head = buffers[m][0]
        parent = torch.tensor(head.ids)
        op = choose_op(parent.numel() - 1, cfg, gen)
        logp = grad = state = None
        hit = cache.setdefault(head.ids, {})
        if can_pack(lm):  # the head's cache: its candidates are scored from their changes on
            if "state" not in hit:
                hit["state"] = parent_pass(lm, parent)
                if hit["state"] is not None:
                    hit.setdefault("hidden", hit["state"].hidden)
            state = hit["state"]
        if op != "delete":
            if "logp" not in hit:
                hidden = hit.pop("hidden", None)
                hit["logp"] = next_token_logp(lm, parent) if hidden is None \
                    else logp_from_hidden(lm, hidden)
            logp = hit["logp"]
            if op == "gcg":
                if "grad" not in hit:
                    hit["grad"] = objective_gradient(lm, objective, readout, parent)
                w, free = members[m]
                w = w if head.xe > free else 0.0  # the hinge's slope
                grad = token_gradient(hit["grad"], logp, w, scale)
        cands = make_candidates(op, parent, logp, grad, banned, cfg, gen)
        uniq = torch.unique(cands, dim=0)  # duplicates would score the same: evaluate once
        try:
            ev = score_candidates(lm, objective, readout, uniq,
                                  first=first_change(uniq, parent), known=nlls[head.ids],
                                  parent=parent, state=state,
                                  stop=lambda: _stopped(cfg.stop), fast=True,
                                  keep_hidden=True)
        except Interrupted:
            log.info("dreaming stopped during iteration %d", it)
            return
        keys = [tuple(row.tolist()) for row in uniq]
        for k, member in enumerate(members):
            score = _score(ev.activation, ev.xe, member, cfg)
            buffers[k] = _merge(buffers[k], keys, ev, score, cfg.buffer_size, decode)
        kept = {p.ids for b in buffers for p in b}
        new = {key: j for j, key in enumerate(keys)}
        nlls = {key: nlls[key] if key in nlls else ev.nll[new[key]] for key in kept}
        _remember(cache, [b[0].ids for b in buffers], new, ev)
        main = _score(ev.activation, ev.xe, members[0], cfg)
        front = _front(front, keys, ev, main, cfg, decode)
        now = time.perf_counter()
        yield DreamStep(it, op, buffers[0][0], tuple(buffers[0]), ev.activation.tolist(),
                        ev.xe.tolist(), ev.encoder.tolist(), ev.decoder.tolist(), now - t0,
                        now - start, members[m][0], cfg.member_name(m), tuple(front))


def _remember(cache: dict, heads: list[tuple[int, ...]], rows: dict[tuple[int, ...], int],
              ev: Evaluation) -> None:
    """Keep only the current buffer heads in ``cache``; a head that was just scored (``rows``:
    prompt -> its row in ``ev``) keeps its final hidden states from that pass, so its
    next-token distribution needs no forward pass of its own, and from a packed pass its
    key/value cache too, so neither do its candidates' packed passes (when the pass kept
    them)."""
    for key in set(cache) - set(heads):
        del cache[key]
    if ev.hidden is None:
        return
    for key in heads:
        if key not in cache and key in rows:
            state = ev.states(rows[key]) if ev.states is not None else None
            if state is not None:  # its hidden states are the row's, already copied
                cache[key] = {"hidden": state.hidden, "state": state}
            else:
                cache[key] = {"hidden": ev.hidden[rows[key], :len(key)].clone()}


def _merge(buffer: list[Prompt], keys: list[tuple[int, ...]], ev: Evaluation,
           score: torch.Tensor, size: int, decode, keep_one: bool = False) -> list[Prompt]:
    """The best ``size`` of the buffer and the new candidates (``keys``: their token ids), no
    prompt twice. Ties keep the older prompt, so the best never gets worse. ``keep_one``: an
    empty buffer keeps the best candidate even when every score is infinite (the start)."""
    seen = {p.ids for p in buffer}
    order = torch.argsort(score, stable=True)[:size]
    scores, acts, xes = score.tolist(), ev.activation.tolist(), ev.xe.tolist()  # no per-item reads
    new = []
    for j in order.tolist():
        if not math.isfinite(scores[j]) and not (keep_one and not buffer and not new):
            break
        key = keys[j]
        if key in seen:
            continue
        seen.add(key)
        new.append(Prompt(key, decode(key[1:]), acts[j], xes[j], scores[j]))
    merged = sorted(buffer + new, key=lambda p: p.score)  # stable: old entries win ties
    return merged[:size]


def _front(front: list[Prompt], keys: list[tuple[int, ...]], ev: Evaluation, score,
           cfg: DreamConfig, decode) -> list[Prompt]:
    """The Pareto front of ``front`` and the new candidates (those the XE cap lets through)."""
    scores = torch.as_tensor(score).flatten().tolist()
    new_acts, new_xes = ev.activation.tolist(), ev.xe.tolist()
    ok = [j for j in range(len(keys)) if math.isfinite(scores[j])]
    acts = [p.activation for p in front] + [new_acts[j] for j in ok]
    xes = [p.xe for p in front] + [new_xes[j] for j in ok]
    out, seen = [], set()
    for i in pareto_front(acts, xes):
        if i < len(front):
            p = front[i]
        else:
            j = ok[i - len(front)]
            p = Prompt(keys[j], decode(keys[j][1:]), new_acts[j], new_xes[j], scores[j])
        if p.ids not in seen:
            seen.add(p.ids)
            out.append(p)
    return out


def pareto_front(activations: list[float], xes: list[float]) -> list[int]:
    """Indices of the points no other point beats on both counts (higher activation and lower
    XE), ordered by XE."""
    order = sorted(range(len(xes)), key=lambda i: (xes[i], -activations[i]))
    front, best = [], -math.inf
    for i in order:
        if activations[i] > best:
            front.append(i)
            best = activations[i]
    return front


def best_fluent(front: tuple[Prompt, ...] | list[Prompt], max_xe: float = FLUENT_XE
                ) -> Prompt | None:
    """The front's highest-activation prompt with XE at most ``max_xe``, or ``None``."""
    ok = [p for p in front if p.xe <= max_xe]
    return max(ok, key=lambda p: p.activation) if ok else None


def correlation(a: list[float], b: list[float]) -> float | None:
    """Pearson correlation, or ``None`` with fewer than 3 points or no spread."""
    if len(a) < 3:
        return None
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = x.norm() * y.norm()
    return None if den == 0 else float((x @ y) / den)
