"""CUDA graphs for dreaming's two model passes: scoring candidates whole, and the GCG gradient.

On a GPU a dreaming iteration on a small model is bound by the host, not the arithmetic: one
scoring pass of Gemma 3 270M is about 1,850 operations, each a kernel launched from Python
(``benchmarks/dreaming_ops.py``), while the GPU finishes each in microseconds. A CUDA graph records
a pass's kernels once, for one input shape, and replays them all with one launch.

A shape is captured the second time it is asked for (the first runs eagerly, as
torch.compile's CUDA graphs do), so one-off passes (a run's start, the corpus reference) cost no
capture. Shapes are bucketed so a handful of graphs serve a whole run: rows up to a power of two (at
least 8), tokens up to a multiple of ``WIDTH_STEP``. The extra rows and columns are padding,
and causal attention never lets a real token read a padded one on its right, so the real rows
read as in a pass of their own shape (up to the rounding of the kernels a shape picks). At most ``GRAPHS_KEPT`` graphs per model are kept
(least recently used first out), each of at most ``GRAPH_TOKENS`` padded tokens, so the memory
they hold is bounded.

Safety: a graph is captured and replayed under the model's lock, with only its own hook
installed (other sessions' interventions cannot run then, and a replay runs no Python hook, so
none can leak in later). Its outputs are static buffers, read or copied before the lock is
released. The first graphed pass of each kind on a model is compared with the same pass run
eagerly at the graph's shape; a difference, or any error while capturing (for example a model whose forward reads a value off
the device), turns graphs off for that model and kind, with a warning, and the pass runs
eagerly from then on.
"""

from __future__ import annotations

import collections
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from core.checks import set_per_device
from core.hooks import hooked
from core.models import LoadedModel

log = logging.getLogger(__name__)

GRAPH_TOKENS: dict[str, int] = {"cuda": 8192}
"""Most padded tokens (rows x width) in one captured scoring pass, per device type; a device
type not listed captures none, and a bigger chunk runs eagerly."""
GRAPHS_KEPT = 12
"""Most graphs kept per model, each holding its own activations' memory (Gemma 3 270M: tens of
MB for 128 candidates of 24 tokens). A GPU run of the app's defaults (up to 128 candidates of
5-18 tokens) uses about nine scoring shapes and one gradient shape per width."""
WIDTH_STEP = 8
"""Prompt widths are padded up to a multiple of this."""
WARMUP = 1
"""Eager runs on a side stream before a capture, so CUDA's libraries set up their handles and
workspaces outside it (one, as torch.compile's CUDA graphs do)."""
SEEN_KEPT = 256
"""Most shapes remembered as asked for once (they are captured when asked for again)."""


def _capture_cuda(fn: Callable[[], tuple[torch.Tensor, ...]]
                  ) -> tuple[Callable[[], None], tuple[torch.Tensor, ...]]:
    """Record ``fn``'s kernels in a CUDA graph; returns its replay and its (static) outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another session's thread using the GPU meanwhile does not break the capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph.replay, out


CAPTURE: dict[str, Callable] = {"cuda": _capture_cuda}
"""Device type -> how a pass is captured: ``fn -> (replay, outputs)``, where ``replay()`` reruns
the recorded work in place, writing the same output tensors."""


@dataclass
class _Graph:
    inputs: dict[str, torch.Tensor]
    outputs: tuple[torch.Tensor, ...]
    replay: Callable[[], None]
    owner: object = None
    """What the recorded pass reads besides the model (the objective of a gradient graph): kept
    alive so the key's ``id`` stays its own."""


@dataclass
class _ModelGraphs:
    graphs: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    checked: dict[str, bool] = field(default_factory=dict)
    """kind -> True once a graphed pass read as the eager one, False once graphs are off."""
    seen: set = field(default_factory=set)
    """Keys asked for once and not captured yet (cleared past ``SEEN_KEPT``)."""
    captures: int = 0
    replays: int = 0
    replayed_tokens: int = 0
    """Real (unpadded) tokens the replays read: what the same passes run eagerly would read."""
    capturing: bool = False
    """True while a pass runs to be captured (its warm-up runs included)."""


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state(lm: LoadedModel) -> _ModelGraphs:
    state = _STATES.get(lm.model)
    if state is None:
        state = _STATES[lm.model] = _ModelGraphs()
    return state


def set_graph_tokens(device_type: str, tokens: int) -> int | None:
    """Capture passes of at most ``tokens`` padded tokens on ``device_type`` (0: no graphs
    there); returns the setting it replaced. For measuring both ways on one machine."""
    return set_per_device(GRAPH_TOKENS, device_type, tokens, "no graphs")


def usable(lm: LoadedModel, kind: str) -> bool:
    """Whether passes of ``kind`` (``score`` or ``grad``) are graphed on this model now."""
    dev = lm.device.type
    return dev in GRAPH_TOKENS and dev in CAPTURE \
        and _state(lm).checked.get(kind, True) is not False


def bucket(n: int, t: int) -> tuple[int, int]:
    """The graph shape ``(rows, width)`` that holds ``n`` rows of ``t`` tokens."""
    rows = max(8, 1 << max(0, n - 1).bit_length())
    return rows, -(-t // WIDTH_STEP) * WIDTH_STEP


def turn_off(lm: LoadedModel, kind: str, why: str) -> None:
    state = _state(lm)
    state.checked[kind] = False
    for key in [k for k in state.graphs if k[0] == kind]:
        del state.graphs[key]
    log.warning("%s: no CUDA graphs for %s passes (%s); running them eagerly from now on",
                lm.name, kind, why)


def agree(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], tol: float) -> bool:
    """Same shapes and every pair within ``tol`` of the larger magnitude of the eager one."""
    return len(a) == len(b) and all(
        x.shape == y.shape and float((x.float() - y.float()).abs().max())
        <= tol * float(y.float().abs().max()) + 1e-4 for x, y in zip(a, b))


def checked(lm: LoadedModel, kind: str, graphed: tuple[torch.Tensor, ...],
            eager: Callable[[], tuple[torch.Tensor, ...]], tol: float = 0.02
            ) -> tuple[torch.Tensor, ...]:
    """The first graphed pass of ``kind`` on a model is compared with ``eager`` (the same pass
    run eagerly at the graph's padded shape, see :func:`padded`), whose result is returned;
    later ones are returned as they are."""
    state = _state(lm)
    if state.checked.get(kind):
        return graphed
    whole = eager()
    if agree(graphed, whole, tol):
        state.checked[kind] = True
    else:
        turn_off(lm, kind, "a graphed pass read differently from the eager one")
    return whole


def _get(lm: LoadedModel, key: tuple, make: Callable[[], _Graph]) -> _Graph | None:
    state = _state(lm)
    graph = state.graphs.get(key)
    if graph is not None:
        state.graphs.move_to_end(key)
        return graph
    if key not in state.seen:  # first time: eager; captured if it comes again
        if len(state.seen) >= SEEN_KEPT:
            state.seen.clear()
        state.seen.add(key)
        return None
    state.seen.discard(key)
    state.capturing = True
    try:
        graph = make()
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError) as err:
        turn_off(lm, key[0], f"{type(err).__name__}: {err}")
        return None
    finally:
        state.capturing = False
    state.captures += 1
    state.graphs[key] = graph
    while len(state.graphs) > GRAPHS_KEPT:
        state.graphs.popitem(last=False)
    return graph


def _pad_id(lm: LoadedModel) -> int:
    return lm.tokenizer.pad_token_id or 0


def padded(lm: LoadedModel, ids: torch.Tensor, pad_rows: bool = True) -> torch.Tensor:
    """``ids`` ``[n, t]`` padded to the shape of the graph that serves them (a gradient graph's
    single row, ``pad_rows=False``, only gets the columns): what a replay reads, and what the
    first graphed pass of a kind is compared with, run eagerly, so the comparison takes the
    same kernels."""
    n, t = ids.shape
    rows, width = bucket(n, t)
    out = torch.full((rows if pad_rows else n, width), _pad_id(lm), dtype=ids.dtype,
                     device=ids.device)
    out[:n, :t] = ids
    return out


def scoring_pass(lm: LoadedModel, hook_name: str, ids: torch.Tensor, lengths: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A whole scoring pass of ``ids`` ``[n, t]`` (right-padded, ``lengths`` real tokens) from a
    graph: the final hidden states ``[n, t, d_model]`` (a view of the graph's output, valid
    until its next replay: copy what is kept) and the activation at ``hook_name`` at each
    row's last token ``[n, d]`` (a new tensor). ``None`` where no graph serves it (the
    caller runs the pass eagerly)."""
    n, t = ids.shape
    rows, width = bucket(n, t)
    dev = lm.device
    if not usable(lm, "score") or rows * width > GRAPH_TOKENS[dev.type]:
        return None
    key = ("score", hook_name, rows, width, torch.is_autocast_enabled(dev.type))

    def make() -> _Graph:
        static = torch.full((rows, width), _pad_id(lm), dtype=torch.long, device=dev)
        store: dict[str, torch.Tensor] = {}

        def keep(act: torch.Tensor) -> None:
            store["act"] = act

        def run() -> tuple[torch.Tensor, ...]:
            with hooked(lm, {hook_name: keep}):
                hidden = lm.model.base_model(input_ids=static, use_cache=False).last_hidden_state
            return hidden, store.pop("act")

        replay, out = CAPTURE[dev.type](run)
        return _Graph({"ids": static}, out, replay)

    with lm.lock, torch.no_grad():
        graph = _get(lm, key, make)
        if graph is None:
            return None
        graph.inputs["ids"].copy_(padded(lm, ids.to(dev)))
        graph.replay()
        _count(lm, n * t)
        hidden, act = graph.outputs
        last = act[torch.arange(n, device=dev), lengths.to(dev) - 1]  # a new tensor
        return hidden[:n, :t], last


def gradient_pass(lm: LoadedModel, objective, ids: torch.Tensor,
                  run_to_layer: Callable) -> torch.Tensor | None:
    """The gradient of ``-objective`` at the input embeddings ``[t, d_model]`` of one prompt
    ``ids`` ``[t]`` from a graph (forward to the objective's layer and backward, recorded
    together); ``run_to_layer(embeds, last)`` is that pass (it returns the objective at position
    ``last``). ``None`` where no graph serves it."""
    t = ids.numel()
    dev = lm.device
    _, width = bucket(1, t)
    if not usable(lm, "grad") or width > GRAPH_TOKENS[dev.type]:
        return None
    key = ("grad", id(objective), width, torch.is_autocast_enabled(dev.type))

    def make() -> _Graph:
        static = torch.full((1, width), _pad_id(lm), dtype=torch.long, device=dev)
        last = torch.zeros(1, dtype=torch.long, device=dev)
        emb = lm.model.get_input_embeddings()

        def run() -> tuple[torch.Tensor, ...]:
            with torch.enable_grad():
                embeds = emb(static).detach().requires_grad_(True)
                value = run_to_layer(embeds, last)
                (g,) = torch.autograd.grad(-value, embeds)
            return (g[0],)

        replay, out = CAPTURE[dev.type](run)
        return _Graph({"ids": static, "last": last}, out, replay, objective)

    with lm.lock:
        graph = _get(lm, key, make)
        if graph is None:
            return None
        graph.inputs["ids"].copy_(padded(lm, ids.to(dev)[None], pad_rows=False))
        graph.inputs["last"].fill_(t - 1)
        graph.replay()
        _count(lm, t)
        return graph.outputs[0][:t].clone()


def _count(lm: LoadedModel, tokens: int) -> None:
    state = _state(lm)
    state.replays += 1
    state.replayed_tokens += tokens


def stats(lm: LoadedModel) -> dict:
    """Captures, replays and the real tokens replays read on this model so far, the kinds of
    pass turned off, and whether a
    capture is running now (benchmarks count the tokens a loop reads at the model's input,
    which a replay never reaches and a capture's warm-up runs reach with padding)."""
    state = _state(lm)
    return {"captures": state.captures, "replays": state.replays,
            "replayed_tokens": state.replayed_tokens, "capturing": state.capturing,
            "off": sorted(k for k, ok in state.checked.items() if ok is False)}
