"""The model passes of dreaming: scoring candidates (the objective at the last token and the
per-token cross-entropy) in bounded chunks, the next-token distribution and the GCG token
gradient of a parent prompt, and the corpus reference scored the way the index measured it.

Where the time goes on a 262k-token vocabulary: the unembedding and its log-softmax, more than the
transformer (``benchmarks/dreaming_profile.py``). So candidates keep their parent's per-token
cross-entropy for the tokens before the first one they change, the new token there costs two
logits (the parent's log-sum-exp holds), and only the positions after it go through the
unembedding, a slice of the vocabulary at a time (the log-sum-exp runs along, so the logits of
a whole row are never held and a CPU keeps each slice in cache). On a CPU the transformer, too,
runs only from each candidate's first change on: the changed tails of all candidates packed into
one sequence after the parent's cached keys and values (``PACK_TOKENS``). On a CPU with native
bfloat16 a large model scores in bfloat16, as a GPU does. Scoring runs in chunks of at most
``TOKEN_BUDGET`` tokens (packed: ``PACK_TOKENS``) and checks a stop callable between them, so
memory stays bounded and Stop takes effect within one chunk.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from core import graphs
from core.checks import set_per_device
from core.hooks import hooked, run_to_hooks
from core.models import LoadedModel
from core.objectives import Objective, objective_weights, read_objective

log = logging.getLogger(__name__)

TOKEN_BUDGET = {"cpu": 1024, "cuda": 65536}
"""Most tokens in one forward pass while scoring candidates, per device type; bigger batches are
scored in chunks, and Stop is checked between them."""
LOGIT_BUDGET = {"cpu": 2**24, "cuda": 2**28}
"""Most logits held at once while computing XE, per device type."""
VOCAB_SLICE = {"cpu": 2048, "cuda": 65536}
"""Vocabulary columns per step of XE's log-sum-exp (:func:`vocab_logsumexp`). On a CPU a
slice's logits stay in cache, where whole rows of Gemma 3's 262k logits did not."""
PACK_TOKENS = {"cpu": 1024}
"""Most candidate tokens in one packed pass, per device type (devices not listed score every
candidate whole). A packed pass sends only what each candidate changed, from its first changed
token on, as one sequence after its parent's cached keys and values, with a mask that lets
every token see its own candidate's tokens and the parent's before the change. On a CPU the
transformer's cost is per token, so this about halves it for single-token mutations."""
STATE_BYTES = 64 * 2**20
"""Most bytes of key/value cache a packed scoring batch keeps for its rows' :class:`ParentPass`
(the next buffer heads then need no parent pass); a bigger batch keeps none."""
HIDDEN_BUDGET = {"cpu": 8192, "cuda": 65536}
"""Most candidate tokens whose final hidden states one scoring pass keeps (``keep_hidden``), so
the next parent's next-token distribution needs no forward pass of its own; a bigger batch
keeps none and the parent pass runs as before."""


def set_pack_tokens(device_type: str, tokens: int) -> int | None:
    """Pack at most ``tokens`` candidate tokens per pass on ``device_type`` (0: score every
    candidate whole there); returns the setting it replaced. For measuring both ways on one
    machine: the app keeps :data:`PACK_TOKENS` as shipped."""
    return set_per_device(PACK_TOKENS, device_type, tokens, "whole passes")


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
    states: Callable[[int], ParentPass | None] | None = None
    """Packed passes with ``keep_hidden``: row -> its :class:`ParentPass` (hidden states and
    key/value cache taken from the pass that scored it), or ``None`` where it was not kept."""


class Interrupted(Exception):
    """Stop was requested between two scoring chunks."""


@dataclass
class ParentPass:
    """One prompt's final hidden states and key/value cache, from one forward pass: what a
    packed scoring pass of its candidates starts from."""

    hidden: torch.Tensor
    """``[pos, d_model]``."""
    cache: object
    """The model's cache after the pass; every packed pass works on a copy of it."""


_PACK_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cache_arg(lm: LoadedModel) -> str:
    """The name the model's forward takes its key/value cache by (newer transformers:
    ``cache``)."""
    return _cache_kwarg(type(lm.model.base_model))


@functools.cache
def _cache_kwarg(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def can_pack(lm: LoadedModel) -> bool:
    """Whether scoring may pack candidates after their parent's cache on this model and device:
    a device in ``PACK_TOKENS``, an attention that takes a custom 4D mask, and no failed
    self-check (the first packed pass on a model is compared with a whole pass)."""
    impl = getattr(lm.model.config, "_attn_implementation", None)
    return lm.device.type in PACK_TOKENS and impl in ("sdpa", "eager") \
        and _PACK_CHECKED.get(lm.model, True)


def _no_packing(lm: LoadedModel, err: Exception) -> None:
    _PACK_CHECKED[lm.model] = False
    log.warning("%s: no packed scoring (%s: %s); scoring whole from now on", lm.name,
                type(err).__name__, err)


def parent_pass(lm: LoadedModel, ids: torch.Tensor) -> ParentPass | None:
    """Final hidden states and key/value cache of one prompt (BOS first); ``None``, and no
    packing on this model from then on, where the model keeps no such cache."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=lm.model.config)
        with lm.lock, torch.no_grad(), _precision(lm, True):  # lock: no other session's hooks
            out = lm.model.base_model(input_ids=ids[None].to(lm.device), use_cache=True,
                                      **{_cache_arg(lm): cache})
    except (TypeError, ValueError, RuntimeError, AttributeError) as err:
        _no_packing(lm, err)
        return None
    return ParentPass(out.last_hidden_state[0], cache)


def _packable(lm: LoadedModel, t: int, state: ParentPass | None,
              lengths: torch.Tensor) -> bool:
    window = getattr(lm.model.config, "sliding_window", None)
    return state is not None and can_pack(lm) and bool((lengths == t).all()) \
        and (not window or t < window) and t - 1 <= PACK_TOKENS[lm.device.type]


def _packed_pass(lm: LoadedModel, rows: torch.Tensor, keep_from: torch.Tensor,
                 state: ParentPass) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Final hidden states ``[n, t, d_model]`` of candidates ``rows`` ``[n, t]`` that equal the
    parent before ``keep_from[i]``: positions from there on run as one packed sequence after
    the parent's cache (each token sees the parent's first ``keep_from[i]`` tokens and its own
    candidate's tokens up to itself, at its own position); the rest are the parent's. Also
    returns where each row's last token sits in the packed sequence, and the cache after the
    pass (the parent's tokens, then the packed ones)."""
    n, t = rows.shape
    dev = rows.device
    col = torch.arange(t, device=dev)[None]
    take = col >= keep_from[:, None]
    tokens, pos = rows[take], col.expand(n, t)[take]
    owner = torch.arange(n, device=dev)[:, None].expand(n, t)[take]
    size, past = tokens.numel(), state.hidden.shape[0]
    order = torch.arange(size, device=dev)
    see = torch.cat([torch.arange(past, device=dev)[None] < keep_from[owner][:, None],
                     (owner[:, None] == owner[None, :]) & (order[None] <= order[:, None])], 1)
    if getattr(lm.model.config, "_attn_implementation", None) == "eager":
        dtype = lm.model.dtype
        see = torch.zeros(see.shape, dtype=dtype, device=dev).masked_fill(
            ~see, torch.finfo(dtype).min)
    cache = copy.deepcopy(state.cache)
    out = lm.model.base_model(input_ids=tokens[None], position_ids=pos[None],
                              attention_mask=see[None, None], use_cache=True,
                              **{_cache_arg(lm): cache})
    hidden = state.hidden[:t].to(dev)[None].repeat(n, 1, 1)
    if hidden.shape[1] < t:  # an insert: one token longer than the parent
        hidden = torch.cat([hidden, hidden[:, -1:]], 1)
    hidden[owner, pos] = out.last_hidden_state[0].to(hidden.dtype)
    last = torch.cumsum(take.sum(1), 0) - 1
    return hidden, last, cache


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", ())
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
               if isinstance(t, torch.Tensor))


@dataclass
class _Pack:
    """What a packed pass leaves for :func:`_row_state`."""

    start: int
    """Its first row in the batch."""
    hidden: torch.Tensor
    last: torch.Tensor
    cache: object
    past: int
    keep_from: torch.Tensor


def _row_state(lm: LoadedModel, pack: _Pack, row: int) -> ParentPass | None:
    """Row ``row`` of a packed pass as a :class:`ParentPass`: the parent's keys and values
    before the row's change, then the row's own from the packed sequence. ``None`` where the
    cache's layers do not hold every token (a sliding window)."""
    from transformers import DynamicCache

    hidden, cache, past, last = pack.hidden, pack.cache, pack.past, pack.last
    kept, end = int(pack.keep_from[row]), int(last[row]) + 1
    start = end - (hidden.shape[1] - kept)
    idx = torch.cat([torch.arange(kept), past + torch.arange(start, end)]).to(hidden.device)
    out = DynamicCache(config=lm.model.config)
    for i, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.shape[-2] != past + int(last[-1]) + 1:
            return None
        out.update(keys[:, :, idx], values[:, :, idx], i)
    return ParentPass(hidden[row].clone(), out)


_BF16_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
LOW_PRECISION_MIN_PARAMS = 50_000_000
"""A CPU with native bfloat16 scores a dream's candidates in bfloat16, as a GPU does, for models
with at least this many weights (Gemma 3 270M: the transformer 2.5x, the unembedding 4x
faster); smaller models, and :func:`evaluate`, stay in float32."""


def low_precision(lm: LoadedModel) -> bool:
    """Whether dreaming scores in bfloat16 on this model (see ``LOW_PRECISION_MIN_PARAMS``)."""
    return lm.device.type == "cpu" and lm.dtype == torch.float32 \
        and torch.cpu._is_avx512_bf16_supported() \
        and lm.param_bytes >= 4 * LOW_PRECISION_MIN_PARAMS  # the sum over weights last


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
    states (0 elsewhere): only those positions go through the unembedding
    (:func:`vocab_logsumexp`).

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
    logit = (h.float() * w[target].float()).sum(-1)
    if cap:
        logit = torch.tanh(logit / cap) * cap
    out[rows, cols] = vocab_logsumexp(h, w, cap) - logit
    return out


def vocab_logsumexp(h: torch.Tensor, w: torch.Tensor, cap: float | None = None
                    ) -> torch.Tensor:
    """``logsumexp(h @ w.T, -1)`` (float32; logits soft-capped at ``cap`` when given) without
    holding the ``[rows, vocab]`` logits: ``VOCAB_SLICE`` columns at a time, each slice's
    log-sum-exp folded into a running one, and at most ``LOGIT_BUDGET`` logits at once."""
    kind = h.device.type
    width = min(w.shape[0], VOCAB_SLICE.get(kind, VOCAB_SLICE["cpu"]))
    step = max(1, LOGIT_BUDGET.get(kind, LOGIT_BUDGET["cpu"]) // width)
    parts = []
    for r in range(0, h.shape[0], step):
        rows = h[r:r + step]
        total = torch.full((rows.shape[0],), -torch.inf, device=h.device)
        for c in range(0, w.shape[0], width):
            logits = (rows @ w[c:c + width].T).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            total = torch.logaddexp(total, logits.logsumexp(-1))
        parts.append(total)
    return torch.cat(parts)


def _spans(sizes: list[int], budget: int, rows: int | None = None) -> list[tuple[int, int]]:
    """Consecutive row ranges whose ``sizes`` sum to at most ``budget``, of at most ``rows``
    rows (one row at least)."""
    spans, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (total + size > budget or (rows and i - start >= rows)):
            spans.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        spans.append((start, len(sizes)))
    return spans


def _check_packed(lm: LoadedModel, packed: tuple[torch.Tensor, torch.Tensor],
                  whole: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Record whether a model's packed pass reads as its whole pass (hidden states and the
    objective's activation within 2% of their largest magnitude); return the whole pass's."""
    ok = graphs.agree(packed, whole, 0.02)
    _PACK_CHECKED[lm.model] = ok
    if not ok:
        log.warning("%s: packed scoring differs from a whole pass; scoring whole from now on",
                    lm.name)
    return whole


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
              stop=None, fast=False, keep_hidden=False, parent=None,
              state: ParentPass | None = None) -> Evaluation:
    """As :func:`evaluate`, for candidates of one parent: rows equal to it before ``first[i]``
    take its per-token cross-entropy ``known`` there instead of recomputing it (causal
    attention: those positions read exactly as in the parent); with the ``parent``'s ids too,
    the position just before the first change costs two logits instead of the vocabulary
    (:func:`_token_nll`). ``fast`` scores in bfloat16 where :func:`low_precision` allows;
    ``keep_hidden`` returns the final hidden states too (for :func:`logp_from_hidden`). With
    the parent's :func:`parent_pass` as ``state`` (and ``first``), equal-length rows are scored
    packed after its cache where :func:`can_pack` allows: only from each row's first change on."""
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
    packs: list[_Pack] | None = []  # kept from packed passes, for the rows' ParentPass
    hiddens: list[torch.Tensor] | None = None
    if keep_hidden and n * t <= HIDDEN_BUDGET.get(lm.device.type, HIDDEN_BUDGET["cpu"]):
        hiddens = []
    packed = _packable(lm, t, state, lengths)
    if packed:  # rows keep the parent's states before their first change (and before the last)
        keep_from = first.clamp(min=0, max=min(t - 1, state.hidden.shape[0]))
        spans = _spans((t - keep_from).tolist(), PACK_TOKENS[lm.device.type],
                       _chunk_rows(lm, t))  # each chunk's hidden states as a whole pass's
    else:
        step = _chunk_rows(lm, t)
        spans = [(a, min(a + step, n)) for a in range(0, n, step)]

    def eager(rows: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with hooked(lm, {objective.hook_name: keep}):
            hidden = base(input_ids=rows, use_cache=False).last_hidden_state
        return hidden, store.pop("act")[torch.arange(rows.shape[0], device=rows.device),
                                        lens - 1]

    def whole(rows: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        graphed = graphs.scoring_pass(lm, objective.hook_name, rows, lens)
        if graphed is None:
            return eager(rows, lens)

        def padded() -> tuple[torch.Tensor, torch.Tensor]:  # the graph's shape, run eagerly
            n, t = rows.shape
            full = graphs.padded(lm, rows)
            lens_full = torch.ones(full.shape[0], dtype=lens.dtype, device=lens.device)
            lens_full[:n] = lens
            hidden, last = eager(full, lens_full)
            return hidden[:n, :t], last[:n]

        return graphs.checked(lm, "score", graphed, padded)

    with torch.no_grad(), _precision(lm, fast):
        for start, end in spans:
            if start and stop is not None and stop():
                raise Interrupted
            rows, lens = ids[start:end], lengths[start:end]
            if packed:
                try:
                    with hooked(lm, {objective.hook_name: keep}):
                        hidden, at, cache = _packed_pass(lm, rows, keep_from[start:end], state)
                except (TypeError, ValueError, RuntimeError, AttributeError) as err:
                    _no_packing(lm, err)  # a model that takes no custom mask or positions
                    packed = False
            if packed:
                last = store.pop("act")[0, at]
                if lm.model not in _PACK_CHECKED:  # once per model: same as a whole pass?
                    hidden, last = _check_packed(lm, (hidden, last), whole(rows, lens))
                elif hiddens is not None and packs is not None:
                    packs.append(_Pack(start, hidden, at, cache, state.hidden.shape[0],
                                       keep_from[start:end]))
                    if sum(_cache_bytes(p.cache) for p in packs) > STATE_BYTES:
                        packs = None  # too big to keep: the next heads get a parent pass
            else:
                hidden, last = whole(rows, lens)
            value, enc, dec = read_objective(objective, readout, last.float())
            nll = _token_nll(lm, hidden, rows, lens, first[start:end], fast,
                             None if pivot is None else tuple(x[start:end] for x in pivot))
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
    return Evaluation(value, xe, enc, dec, nll, hidden,
                      _states(lm, packs) if packs else None)


def _states(lm: LoadedModel, packs: list[_Pack]) -> Callable[[int], ParentPass | None]:
    """Row -> its :class:`ParentPass` from the packed pass that scored it (``None`` if none)."""

    def state(row: int) -> ParentPass | None:
        pack = next((p for p in packs if 0 <= row - p.start < p.hidden.shape[0]), None)
        if pack is None:
            return None
        try:
            return _row_state(lm, pack, row - pack.start)
        except (AttributeError, TypeError, ValueError, RuntimeError) as err:
            log.warning("%s: no cache kept from a packed pass (%s)", lm.name, err)
            return None

    return state


@torch.no_grad()
def token_values(lm: LoadedModel, objective: Objective, ids: list[int] | tuple[int, ...]
                 ) -> list[float]:
    """The objective at every token of one prompt (for highlighting); BOS reads 0."""
    acts = run_to_hooks(lm, [objective.hook_name], torch.tensor([list(ids)], device=lm.device))
    weights = objective_weights(lm, objective)
    values = read_objective(objective, weights, acts[objective.hook_name][0])[0]
    return [0.0] + values[1:].tolist()


GRAD_TOLERANCE = 0.05
"""How far (share of its largest magnitude) a graphed GCG gradient may read from the eager pass
of the same padded shape on its first use (the gradient only ranks tokens)."""


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
    emb = lm.model.get_input_embeddings()

    def to_layer(embeds: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The objective at position ``last`` (``[1]``) of the prompt ``embeds [1, pos, d]``."""
        store: dict[str, torch.Tensor] = {}

        def keep(act: torch.Tensor) -> None:
            store["act"] = act
            raise _Reached

        with hooked(lm, {objective.hook_name: keep}):
            try:
                lm.model(inputs_embeds=embeds, use_cache=False)
            except _Reached:
                pass
        return read_objective(objective, readout,
                              store["act"][0].index_select(0, last).float())[0][0]

    def eager(rows: torch.Tensor) -> tuple[torch.Tensor]:
        with torch.enable_grad():
            embeds = emb(rows).detach().requires_grad_(True)  # scaled inside (Gemma)
            value = to_layer(embeds, torch.tensor([ids.numel() - 1], device=ids.device))
            (g,) = torch.autograd.grad(-value, embeds)
        return (g[0, :ids.numel()],)

    with _precision(lm, True):
        g = graphs.gradient_pass(lm, objective, ids, to_layer)
        (g,) = eager(ids[None]) if g is None else graphs.checked(
            lm, "grad", (g,), lambda: eager(graphs.padded(lm, ids[None], pad_rows=False)), GRAD_TOLERANCE)
    scale = embed_scale(lm)
    g = g.to(emb.weight.dtype)
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
