"""Dreaming: search for fluent text that drives a latent (or any direction) as high as it goes.

The loop follows the published dreaming recipe (Thompson et al., "Fluent dreaming for language
models"; the SAE dreaming notebook): a buffer keeps the best prompts; every iteration mutates the
best one with one of four operations chosen at random,

* ``gcg``: swap one token for one of the ``gcg_topk`` tokens with the most negative gradient of
  the loss with respect to a one-hot encoding of the prompt (one backward pass);
* ``insert``: insert a token sampled from the model's next-token distribution (its top
  ``sample_k2`` tokens) at a random place;
* ``swap``: replace a token by one sampled the same way;
* ``delete``: drop a random token;

evaluates ``explore`` candidates in one batched forward pass, scores each as
``-activation + xe_regularization * XE`` (XE: the mean cross-entropy of the prompt's tokens under
the model, its fluency), drops candidates whose XE exceeds ``xe_max`` and keeps the best
``buffer_size``. The activation is read at the last position.

Everything stays a tensor of token ids: candidates are built with tensor ops, never decoded and
re-encoded. Hooks only live for one forward pass (``core.hooks.hooked``); nothing is held across a
``yield``, so closing the generator or setting ``stop`` ends the run cleanly within one iteration.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from core.checks import is_finite_number
from core.hooks import hooked, run_to_hooks
from core.models import LoadedModel
from core.objectives import Objective, objective_weights, read_objective
from core.text import check_text, token_ids

log = logging.getLogger(__name__)

OPS = ("gcg", "insert", "swap", "delete")
LOGIT_BUDGET = {"cpu": 2**26, "cuda": 2**29}
"""Most logits held at once while computing XE, per device type; batches are cut to fit."""


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DreamConfig:
    """Every parameter of the reference loop."""

    iters: int = 200
    """Iterations (each: one mutation operation, one batch of candidates)."""
    seed: int = 0
    """Same seed, same model and device: same history."""
    xe_regularization: float = 0.3
    """Weight of the cross-entropy (fluency) term in the score ``-act + w * XE``."""
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
    """Candidates evaluated per iteration (one batch)."""
    init_prompt: str | None = None
    """Where to start; ``None`` starts from random tokens."""
    stop: threading.Event | Callable[[], bool] | None = field(default=None, compare=False)
    """Checked before every iteration: a set event (or ``True``) ends the run."""

    def __post_init__(self) -> None:
        def positive_int(name: str, low: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} is invalid; use a whole number >= {low}.")

        for name in ("iters", "buffer_size", "min_tokens", "max_tokens", "sample_k2",
                     "gcg_topk", "explore"):
            positive_int(name)
        positive_int("seed", 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} is above max_tokens="
                             f"{self.max_tokens}; raise max_tokens or lower min_tokens.")
        if not is_finite_number(self.xe_regularization) or self.xe_regularization < 0:
            raise ValueError(f"xe_regularization={self.xe_regularization!r} is invalid; use a "
                             "number >= 0 (0 ignores fluency).")
        if self.xe_max is not None and (not is_finite_number(self.xe_max) or self.xe_max <= 0):
            raise ValueError(f"xe_max={self.xe_max!r} is invalid; use a number > 0, or None "
                             "for no cap.")
        probs = self.probabilities
        if not all(is_finite_number(p) and p >= 0 for p in probs):
            raise ValueError(f"Operation probabilities {probs} must be numbers >= 0.")
        if sum(probs) <= 0:
            raise ValueError("All four operation probabilities are 0; give at least one a "
                             "positive probability.")
        if self.init_prompt is not None:
            check_text(self.init_prompt, "initial prompt (leave it unset for random tokens)")

    @property
    def probabilities(self) -> tuple[float, float, float, float]:
        return (self.p_gcg, self.p_insert, self.p_swap, self.p_delete)


def default_config(device: torch.device | str, **overrides) -> DreamConfig:
    """Defaults that keep the page responsive: small batches and prompts on a CPU."""
    if torch.device(device).type == "cpu":
        base = dict(explore=24, max_tokens=12, gcg_topk=64, sample_k2=32, iters=60)
    else:
        base = dict(explore=128, max_tokens=16, gcg_topk=128, sample_k2=64, iters=200)
    return DreamConfig(**{**base, **overrides})


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One prompt in the buffer."""

    ids: tuple[int, ...]
    """Token ids, BOS first."""
    text: str
    activation: float
    xe: float
    score: float


@dataclass(frozen=True)
class DreamStep:
    """What one iteration did (iteration 0 is the evaluation of the starting prompt)."""

    iteration: int
    op: str
    """``init`` or one of ``gcg``, ``insert``, ``swap``, ``delete``."""
    best: Prompt
    buffer: tuple[Prompt, ...]
    """The buffer after this iteration, best first."""
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

    def row(self) -> dict:
        """One flat record for CSV export."""
        return {"iteration": self.iteration, "op": self.op,
                "best_activation": self.best.activation, "best_xe": self.best.xe,
                "best_score": self.best.score, "best_text": self.best.text,
                "candidates": len(self.activations), "seconds": self.seconds,
                "elapsed": self.elapsed}


# --- model passes -----------------------------------------------------------------------------


def embed_scale(lm: LoadedModel) -> torch.Tensor | None:
    """The factor the model's input embedding multiplies its output by (Gemma: sqrt(d_model)),
    or ``None``; needed when feeding ``inputs_embeds``."""
    scale = getattr(lm.model.get_input_embeddings(), "embed_scale", None)
    if scale is None:
        return None
    return torch.as_tensor(scale)


def embed_one_hot(lm: LoadedModel, one_hot: torch.Tensor) -> torch.Tensor:
    """``inputs_embeds`` for a (differentiable) one-hot ``[batch, pos, vocab]``."""
    w_e = lm.model.get_input_embeddings().weight
    embeds = one_hot.to(w_e.dtype) @ w_e
    scale = embed_scale(lm)
    return embeds if scale is None else embeds * scale.to(device=w_e.device, dtype=w_e.dtype)


@dataclass
class Evaluation:
    """Per sequence: the objective at its last token and its mean cross-entropy."""

    activation: torch.Tensor
    xe: torch.Tensor
    encoder: torch.Tensor
    decoder: torch.Tensor


def _chunk(lm: LoadedModel, n_pos: int) -> int:
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    budget = LOGIT_BUDGET.get(lm.device.type, LOGIT_BUDGET["cpu"])
    return max(1, budget // max(1, n_pos * vocab))


@torch.no_grad()
def evaluate(lm: LoadedModel, objective: Objective, ids: torch.Tensor,
             lengths: torch.Tensor | None = None) -> Evaluation:
    """Score token ids ``[batch, pos]`` (BOS first). With ``lengths`` the rows are right-padded:
    the objective is read at each row's last real token and XE averages its real tokens
    (causal attention never looks right, so padding changes nothing before it)."""
    return _evaluate(lm, objective, objective_weights(lm, objective), ids, lengths)


def _evaluate(lm, objective, readout, ids, lengths=None) -> Evaluation:
    ids = ids.to(lm.device)
    n, t = ids.shape
    if lengths is None:
        lengths = torch.full((n,), t, dtype=torch.long)
    lengths = lengths.to(lm.device)
    outs: list[tuple[torch.Tensor, ...]] = []
    store: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor) -> None:
        store["act"] = act

    step = _chunk(lm, t)
    for start in range(0, n, step):
        rows = ids[start:start + step]
        lens = lengths[start:start + step]
        with hooked(lm, {objective.hook_name: keep}):
            logits = lm.model(input_ids=rows, use_cache=False).logits
        last = store["act"][torch.arange(rows.shape[0], device=rows.device), lens - 1]
        value, enc, dec = read_objective(objective, readout, last)
        outs.append((value, _xe(logits, rows, lens), enc, dec))
        del logits
    cat = [torch.cat([o[k] for o in outs]).float().cpu() for k in range(4)]
    return Evaluation(*cat)


@torch.no_grad()
def token_values(lm: LoadedModel, objective: Objective, ids: list[int] | tuple[int, ...]
                 ) -> list[float]:
    """The objective at every token of one prompt (for highlighting); BOS reads 0."""
    acts = run_to_hooks(lm, [objective.hook_name], torch.tensor([list(ids)], device=lm.device))
    weights = objective_weights(lm, objective)
    values = read_objective(objective, weights, acts[objective.hook_name][0])[0]
    return [0.0] + values[1:].tolist()


def _xe(logits: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of tokens 1..len-1 of each row (float32, one log-softmax)."""
    n, t = ids.shape
    if t < 2:
        return logits.new_zeros(n, dtype=torch.float32)
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(),
                          reduction="none").view(n, t - 1)
    mask = torch.arange(1, t, device=ids.device)[None] < lengths[:, None]
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


def _parent_pass(lm, objective, readout, ids: torch.Tensor, xe_reg: float, grad: bool):
    """Next-token log-probs ``[pos, vocab]`` of one prompt and, with ``grad``, the gradient of
    ``-objective + xe_reg * XE`` with respect to its one-hot tokens ``[pos, vocab]``.

    The one-hot is never built: ``embeds = one_hot @ W_E * scale``, so the gradient is the
    gradient at the embeddings times ``(W_E * scale)^T``, plus the XE term's own dependence on
    the target tokens, ``-logp / (pos - 1)`` (same numbers, one pass over ``W_E`` fewer)."""
    ids = ids.to(lm.device)
    store: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor) -> None:
        store["act"] = act

    if not grad:
        with torch.no_grad(), hooked(lm, {objective.hook_name: keep}):
            logits = lm.model(input_ids=ids[None], use_cache=False).logits
        return torch.log_softmax(logits[0].float(), dim=-1), None
    emb = lm.model.get_input_embeddings()
    with torch.enable_grad():
        embeds = emb(ids[None]).detach().requires_grad_(True)  # scaled inside (Gemma)
        with hooked(lm, {objective.hook_name: keep}):
            logits = lm.model(inputs_embeds=embeds, use_cache=False).logits
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        value = read_objective(objective, readout, store["act"][:, -1])[0][0]
        n = ids.numel() - 1
        xe = -logp[:-1].gather(1, ids[1:, None]).mean() if n else logp.new_zeros(())
        (g,) = torch.autograd.grad(-value + xe_reg * xe, embeds)
    scale = embed_scale(lm)
    g = g[0].to(emb.weight.dtype)
    if scale is not None:
        g = g * scale.to(device=g.device, dtype=g.dtype)
    grad_one_hot = (g @ emb.weight.T).float()
    if n:
        grad_one_hot[1:] -= xe_reg * logp[:-1].detach() / n
    return logp.detach(), grad_one_hot


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
    if cfg.init_prompt is None:
        n = min(max(cfg.min_tokens, cfg.max_tokens // 2), cfg.max_tokens)
        allowed = (~banned).nonzero().flatten()
        body = allowed[torch.randint(len(allowed), (n,), generator=gen)]
        return torch.cat([torch.tensor([_bos(lm)]), body])
    ids = token_ids(lm, cfg.init_prompt, prepend_bos=True)
    n = len(ids) - 1
    if not cfg.min_tokens <= n <= cfg.max_tokens:
        raise ValueError(f"The initial prompt has {n} tokens; it must have between "
                         f"{cfg.min_tokens} and {cfg.max_tokens} (min/max tokens). Shorten it "
                         "or change the limits.")
    return torch.tensor(ids)


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


def _score(act: torch.Tensor, xe: torch.Tensor, cfg: DreamConfig) -> torch.Tensor:
    score = -act + cfg.xe_regularization * xe
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
    readout = objective_weights(lm, objective)
    gen = torch.Generator().manual_seed(cfg.seed)
    banned = banned_tokens(lm)
    decode = lm.tokenizer.decode
    start = time.perf_counter()
    ids = _start_ids(lm, cfg, banned, gen)
    ev = _evaluate(lm, objective, readout, ids[None])
    score = _score(ev.activation, ev.xe, cfg)
    buffer = [Prompt(tuple(ids.tolist()), decode(ids[1:]), float(ev.activation[0]),
                     float(ev.xe[0]), float(score[0]))]
    now = time.perf_counter()
    yield DreamStep(0, "init", buffer[0], tuple(buffer), ev.activation.tolist(), ev.xe.tolist(),
                    ev.encoder.tolist(), ev.decoder.tolist(), now - start, now - start)
    cache: dict = {}  # the best prompt's log-probs/gradient while it stays the best
    for it in range(1, cfg.iters + 1):
        if _stopped(cfg.stop):
            log.info("dreaming stopped at iteration %d", it)
            return
        t0 = time.perf_counter()
        parent = torch.tensor(buffer[0].ids)
        op = choose_op(parent.numel() - 1, cfg, gen)
        logp = grad = None
        if op != "delete":
            hit = cache.get(buffer[0].ids)
            if hit is None or (op == "gcg" and hit[1] is None):
                cache.clear()
                cache[buffer[0].ids] = hit = _parent_pass(lm, objective, readout, parent,
                                                          cfg.xe_regularization, op == "gcg")
            logp, grad = hit
        cands = make_candidates(op, parent, logp, grad, banned, cfg, gen)
        uniq = torch.unique(cands, dim=0)  # duplicates would score the same: evaluate once
        ev = _evaluate(lm, objective, readout, uniq)
        score = _score(ev.activation, ev.xe, cfg)
        buffer = _merge(buffer, uniq, ev, score, cfg.buffer_size, decode)
        now = time.perf_counter()
        yield DreamStep(it, op, buffer[0], tuple(buffer), ev.activation.tolist(),
                        ev.xe.tolist(), ev.encoder.tolist(), ev.decoder.tolist(), now - t0,
                        now - start)


def _merge(buffer: list[Prompt], ids: torch.Tensor, ev: Evaluation, score: torch.Tensor,
           size: int, decode) -> list[Prompt]:
    """The best ``size`` of the buffer and the new candidates, no prompt twice. Ties keep the
    older prompt, so the best never gets worse."""
    seen = {p.ids for p in buffer}
    order = torch.argsort(score, stable=True)[:size]
    new = []
    for j in order.tolist():
        if not math.isfinite(float(score[j])):
            break
        key = tuple(ids[j].tolist())
        if key in seen:
            continue
        seen.add(key)
        new.append(Prompt(key, decode(ids[j, 1:]), float(ev.activation[j]), float(ev.xe[j]),
                          float(score[j])))
    merged = sorted(buffer + new, key=lambda p: p.score)  # stable: old entries win ties
    return merged[:size]


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


def correlation(a: list[float], b: list[float]) -> float | None:
    """Pearson correlation, or ``None`` with fewer than 3 points or no spread."""
    if len(a) < 3:
        return None
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = x.norm() * y.norm()
    return None if den == 0 else float((x @ y) / den)


# --- corpus reference -------------------------------------------------------------------------


@dataclass
class Reference:
    """A latent's top corpus examples, scored like dream candidates."""

    max_act: float | None
    """The latent's max activation on the indexed corpus."""
    activations: list[float]
    xes: list[float]
    texts: list[str]


def corpus_reference(lm: LoadedModel, objective: Objective, max_act: float | None,
                     examples: list[tuple[list[int], int]], n_tokens: int) -> Reference:
    """Score top corpus examples ``(window ids, activating position)``, each cut to BOS + the
    last ``n_tokens`` up to the activating token (dream-sized texts, so their XE compares with
    the dreams' and scoring is quick)."""
    bos = examples[0][0][0] if examples else 0
    windows = [[bos] + ids[max(1, pos + 1 - n_tokens):pos + 1] for ids, pos in examples]
    if not windows:
        return Reference(max_act, [], [], [])
    width = max(len(w) for w in windows)
    pad = lm.tokenizer.pad_token_id or 0
    ids = torch.tensor([w + [pad] * (width - len(w)) for w in windows])
    ev = evaluate(lm, objective, ids, lengths=torch.tensor([len(w) for w in windows]))
    texts = [lm.tokenizer.decode(w[1:]) for w in windows]
    return Reference(max_act, ev.activation.tolist(), ev.xe.tolist(), texts)
