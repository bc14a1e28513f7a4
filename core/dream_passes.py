"""The model passes of dreaming: scoring candidates (the objective at the last token and the
per-token cross-entropy) in bounded chunks, the next-token distribution and the GCG token
gradient of a parent prompt, and the corpus reference scored the way the index measured it.

Where the time goes on a 262k-token vocabulary: the unembedding and its log-softmax, more than the
transformer (``benchmarks/dreaming_profile.py``). So candidates keep their parent's per-token
cross-entropy for the tokens before the first one they change, the new token there costs two
logits (the parent's log-sum-exp holds), and only the positions after it go through the
unembedding, in chunks; and on a CPU with native bfloat16 a large model scores in
bfloat16, as a GPU does. Scoring runs in chunks of at most ``TOKEN_BUDGET`` tokens and checks a
stop callable between them, so memory stays bounded and Stop takes effect within one chunk.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch

from core.hooks import hooked, run_to_hooks
from core.models import LoadedModel
from core.objectives import Objective, objective_weights, read_objective

TOKEN_BUDGET = {"cpu": 1024, "cuda": 65536}
"""Most tokens in one forward pass while scoring candidates, per device type; bigger batches are
scored in chunks, and Stop is checked between them."""
LOGIT_BUDGET = {"cpu": 2**24, "cuda": 2**28}
"""Most logits held at once while computing XE, per device type."""
HIDDEN_BUDGET = {"cpu": 8192, "cuda": 65536}
"""Most candidate tokens whose final hidden states one scoring pass keeps (``keep_hidden``), so
the next parent's next-token distribution needs no forward pass of its own; a bigger batch
keeps none and the parent pass runs as before."""


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
    nll: torch.Tensor
    """``[batch, pos - 1]``: cross-entropy of tokens 1.. (0 past each row's length)."""
    hidden: torch.Tensor | None = None
    """``[batch, pos, d_model]`` final hidden states (on the model's device), when asked for
    with ``keep_hidden`` and within ``HIDDEN_BUDGET``; else ``None``."""


class Interrupted(Exception):
    """Stop was requested between two scoring chunks."""


_BF16_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
LOW_PRECISION_MIN_PARAMS = 50_000_000
"""A CPU with native bfloat16 scores a dream's candidates in bfloat16, as a GPU does, for models
with at least this many weights (Gemma 3 270M: the transformer 2.5x, the unembedding 4x
faster); smaller models, and :func:`evaluate`, stay in float32."""


def low_precision(lm: LoadedModel) -> bool:
    """Whether dreaming scores in bfloat16 on this model (see ``LOW_PRECISION_MIN_PARAMS``)."""
    return lm.device.type == "cpu" and lm.dtype == torch.float32 \
        and lm.param_bytes >= 4 * LOW_PRECISION_MIN_PARAMS \
        and torch.cpu._is_avx512_bf16_supported()


def _precision(lm: LoadedModel, fast: bool):
    if fast and low_precision(lm):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unembedding(lm: LoadedModel, fast: bool = True) -> torch.Tensor:
    """The unembedding ``[vocab, d_model]`` used for XE (a cached bfloat16 copy when fast)."""
    w = lm.model.get_output_embeddings().weight
    if not (fast and low_precision(lm)):
        return w
    copy = _BF16_HEADS.get(lm.model)  # keyed by the module: tensors compare elementwise
    if copy is None:
        copy = _BF16_HEADS[lm.model] = w.detach().to(torch.bfloat16)
    return copy


def _token_nll(lm: LoadedModel, hidden: torch.Tensor, ids: torch.Tensor,
               lengths: torch.Tensor, first: torch.Tensor, fast: bool = False,
               pivot: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``[n, t - 1]`` cross-entropy of tokens ``first..len-1`` of each row from the final hidden
    states (0 elsewhere): only those positions go through the unembedding, in chunks.

    ``pivot`` = (the parent's cross-entropy of its token ``first`` per row, that token; -1 where
    the parent has none): the position before a row's first change reads the same
    hidden state as in the parent, so its log-sum-exp is the parent's and the cross-entropy of
    the new token there is the parent's plus the difference of the two tokens' logits, two dot
    products instead of a pass over the vocabulary."""
    n, t, _ = hidden.shape
    out = torch.zeros(n, max(t - 1, 0), device=hidden.device)
    if t < 2:
        return out
    w = unembedding(lm, fast)
    cap = getattr(lm.config, "final_logit_softcapping", None)  # Gemma 2; None elsewhere
    pos = torch.arange(t - 1, device=hidden.device)[None]
    start = first - 1
    if pivot is not None:
        known, old = pivot
        at = (old >= 0) & (first < lengths)  # the parent scored that token; the row has one
        r = at.nonzero(as_tuple=True)[0]
        if r.numel():
            h = hidden[r, start[r]].to(w.dtype)
            logits = torch.stack([(h * w[old[r]]).sum(-1), (h * w[ids[r, first[r]]]).sum(-1)])
            logits = logits.float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            out[r, start[r]] = known[r] + logits[0] - logits[1]
        start = start + at.long()
    need = (pos >= start[:, None]) & (pos < lengths[:, None] - 1)
    rows, cols = need.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return out
    h, target = hidden[rows, cols].to(w.dtype), ids[rows, cols + 1]
    step = max(1, LOGIT_BUDGET.get(hidden.device.type, LOGIT_BUDGET["cpu"]) // w.shape[0])
    vals = []
    for s in range(0, h.shape[0], step):
        logits = (h[s:s + step] @ w.T).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        vals.append(logits.logsumexp(-1) - logits.gather(1, target[s:s + step, None])[:, 0])
    out[rows, cols] = torch.cat(vals)
    return out


def _chunk_rows(lm: LoadedModel, n_pos: int) -> int:
    return max(1, TOKEN_BUDGET.get(lm.device.type, TOKEN_BUDGET["cpu"]) // max(1, n_pos))


@torch.no_grad()
def evaluate(lm: LoadedModel, objective: Objective, ids: torch.Tensor,
             lengths: torch.Tensor | None = None) -> Evaluation:
    """Score token ids ``[batch, pos]`` (BOS first). With ``lengths`` the rows are right-padded:
    the objective is read at each row's last real token and XE averages its real tokens
    (causal attention never looks right, so padding changes nothing before it)."""
    return score_candidates(lm, objective, objective_weights(lm, objective), ids, lengths)


def score_candidates(lm, objective, readout, ids, lengths=None, first=None, known=None,
              stop=None, fast=False, keep_hidden=False, parent=None) -> Evaluation:
    """As :func:`evaluate`, for candidates of one parent: rows equal to it before ``first[i]``
    take its per-token cross-entropy ``known`` there instead of recomputing it (causal
    attention: those positions read exactly as in the parent); with the ``parent``'s ids too,
    the position just before the first change costs two logits instead of the vocabulary
    (:func:`_token_nll`). ``fast`` scores in bfloat16 where :func:`low_precision` allows;
    ``keep_hidden`` returns the final hidden states too (for :func:`logp_from_hidden`)."""
    ids = ids.to(lm.device)
    n, t = ids.shape
    lengths = torch.full((n,), t, dtype=torch.long) if lengths is None else lengths
    lengths = lengths.to(lm.device)
    first = (torch.zeros(n, dtype=torch.long) if first is None else first).to(lm.device)
    pivot = None
    if parent is not None and known is not None:
        # the parent's token at each row's first change and its cross-entropy (from known)
        parent = parent.to(lm.device)
        has = (first >= 1) & (first < parent.numel())
        at = torch.where(has, first, 1)
        pivot = (known.to(lm.device)[at - 1], torch.where(has, parent[at], -1))
    base = lm.model.base_model  # the transformer without its unembedding
    store: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor) -> None:
        store["act"] = act

    outs: list[tuple[torch.Tensor, ...]] = []
    hiddens: list[torch.Tensor] | None = None
    if keep_hidden and n * t <= HIDDEN_BUDGET.get(lm.device.type, HIDDEN_BUDGET["cpu"]):
        hiddens = []
    step = _chunk_rows(lm, t)
    with torch.no_grad(), _precision(lm, fast):
        for start in range(0, n, step):
            if start and stop is not None and stop():
                raise Interrupted
            rows, lens = ids[start:start + step], lengths[start:start + step]
            with hooked(lm, {objective.hook_name: keep}):
                hidden = base(input_ids=rows, use_cache=False).last_hidden_state
            last = store.pop("act")[torch.arange(rows.shape[0], device=rows.device), lens - 1]
            value, enc, dec = read_objective(objective, readout, last.float())
            nll = _token_nll(lm, hidden, rows, lens, first[start:start + step], fast,
                             None if pivot is None else tuple(x[start:start + step]
                                                              for x in pivot))
            outs.append((value, enc, dec, nll))
            if hiddens is not None:
                hiddens.append(hidden)
            del hidden
    value, enc, dec, nll = (torch.cat([o[k] for o in outs]).float().cpu() for k in range(4))
    first, lengths = first.cpu(), lengths.cpu()
    if known is not None and nll.shape[1]:  # first - 1 <= len(known): the parent's tokens
        reused = torch.zeros(nll.shape[1])
        k = min(known.numel(), nll.shape[1])
        reused[:k] = known[:k]
        reuse = torch.arange(nll.shape[1])[None] < first[:, None] - 1
        nll = torch.where(reuse, reused[None], nll)
    mask = torch.arange(nll.shape[1])[None] < (lengths[:, None] - 1)
    xe = (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
    hidden = torch.cat(hiddens) if hiddens else None
    return Evaluation(value, xe, enc, dec, nll, hidden)


@torch.no_grad()
def token_values(lm: LoadedModel, objective: Objective, ids: list[int] | tuple[int, ...]
                 ) -> list[float]:
    """The objective at every token of one prompt (for highlighting); BOS reads 0."""
    acts = run_to_hooks(lm, [objective.hook_name], torch.tensor([list(ids)], device=lm.device))
    weights = objective_weights(lm, objective)
    values = read_objective(objective, weights, acts[objective.hook_name][0])[0]
    return [0.0] + values[1:].tolist()


class _Reached(Exception):
    """Raised by the gradient pass's hook: nothing after the objective's layer is needed."""


def next_token_logp(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probs ``[pos, vocab]`` (float32) of one prompt (BOS first)."""
    with lm.lock, torch.no_grad(), _precision(lm, True):  # lock: no other session's hooks
        hidden = lm.model.base_model(input_ids=ids[None].to(lm.device),
                                     use_cache=False).last_hidden_state[0]
    return logp_from_hidden(lm, hidden)


def logp_from_hidden(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probs ``[pos, vocab]`` (float32) from one prompt's final hidden states
    ``[pos, d_model]`` (a scoring pass's, or :func:`next_token_logp`'s own)."""
    with torch.no_grad(), _precision(lm, True):
        w = unembedding(lm)
        logits = (hidden.to(w.dtype) @ w.T).float()
        cap = getattr(lm.config, "final_logit_softcapping", None)  # Gemma 2; None elsewhere
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, dim=-1)


def objective_gradient(lm: LoadedModel, objective: Objective, readout, ids: torch.Tensor
                       ) -> torch.Tensor:
    """Gradient of ``-objective`` with respect to the one-hot tokens ``[pos, vocab]`` of one
    prompt. The forward pass stops at the objective's layer (the reference's GCG gradient).

    The one-hot is never built: ``embeds = one_hot @ W_E * scale``, so the gradient is the
    gradient at the embeddings times ``(W_E * scale)^T``."""
    ids = ids.to(lm.device)
    store: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor) -> None:
        store["act"] = act
        raise _Reached

    emb = lm.model.get_input_embeddings()
    with torch.enable_grad(), _precision(lm, True):
        embeds = emb(ids[None]).detach().requires_grad_(True)  # scaled inside (Gemma)
        with hooked(lm, {objective.hook_name: keep}):
            try:
                lm.model(inputs_embeds=embeds, use_cache=False)
            except _Reached:
                pass
        value = read_objective(objective, readout, store["act"][:, -1].float())[0][0]
        (g,) = torch.autograd.grad(-value, embeds)
    scale = embed_scale(lm)
    g = g[0].to(emb.weight.dtype)
    if scale is not None:
        g = g * scale.to(device=g.device, dtype=g.dtype)
    return (g @ emb.weight.T).float()


def token_gradient(grad_objective: torch.Tensor, logp: torch.Tensor, weight: float,
                   act_scale: float = 1.0) -> torch.Tensor:
    """The GCG gradient of ``-objective / act_scale + weight * XE`` with respect to the one-hot
    tokens: the objective's gradient plus XE's dependence on the tokens it scores,
    ``-logp / (pos - 1)`` (the next-token distributions themselves held fixed, so no backward
    pass through the unembedding is needed)."""
    out = grad_objective / act_scale
    n = logp.shape[0] - 1
    if n and weight:
        out = out.clone()
        out[1:] -= weight * logp[:-1].to(out.device) / n
    return out


def first_change(rows: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """Per row, the first position where it differs from ``parent`` (its length if it is a
    prefix of it): everything before it reads exactly as in the parent (causal attention)."""
    m = min(rows.shape[1], parent.numel())
    diff = rows[:, :m] != parent[None, :m]
    return torch.where(diff.any(1), diff.int().argmax(1), torch.tensor(m))


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
                     examples: list[tuple[list[int], int]], text_tokens: int = 48) -> Reference:
    """Score top corpus examples ``(window ids, activating position)`` the way the index
    measured them: each with its window's whole prefix up to the activating token (the index
    reads every token with everything before it in its window; a shorter cut loses context and
    reads lower). Their XE is that prefix's; the texts keep the last ``text_tokens`` tokens."""
    windows = [list(ids[:pos + 1]) for ids, pos in examples]
    if not windows:
        return Reference(max_act, [], [], [])
    width = max(len(w) for w in windows)
    pad = lm.tokenizer.pad_token_id or 0
    ids = torch.tensor([w + [pad] * (width - len(w)) for w in windows])
    ev = evaluate(lm, objective, ids, lengths=torch.tensor([len(w) for w in windows]))
    texts = [("…" if len(w) - 1 > text_tokens else "")
             + lm.tokenizer.decode(w[max(1, len(w) - text_tokens):]) for w in windows]
    return Reference(max_act, ev.activation.tolist(), ev.xe.tolist(), texts)
