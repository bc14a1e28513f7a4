"""Dreaming's CUDA-graph passes (core.graphs), checked on the CPU with a stand-in capture that
records nothing and replays by running the pass again into the same output tensors: the padding
to bucketed shapes, the static buffers, the bounds, the first-use comparison and the fallback.
Whether a forward pass can be captured at all is checked by what it dispatches while
transformers believes a CUDA stream is capturing (the slow test on the embedded model)."""

from __future__ import annotations

import pytest
import torch

import core.dream_passes as passes
import core.graphs as graphs
from core.dreaming import DreamConfig, Objective, dream
from core.objectives import objective_weights
from core.saes import SaeSpec, load_sae
from tests.conftest import DEVICE_WAITS, leftover_hooks


def stand_in(calls: list | None = None):
    """A capture that runs ``fn`` once and whose replay runs it again, copying into the first
    run's outputs (what a CUDA graph's replay does to its static outputs)."""

    def capture(fn):
        out = fn()
        if calls is not None:
            calls.append(len(out))

        def replay():
            for static, new in zip(out, fn()):
                static.copy_(new)

        return replay, out

    return capture


@pytest.fixture
def graphed(monkeypatch):
    """Graphs on the CPU, through the stand-in capture, with a fresh per-model state."""
    calls: list = []
    monkeypatch.setitem(graphs.CAPTURE, "cpu", stand_in(calls))
    monkeypatch.setitem(graphs.GRAPH_TOKENS, "cpu", 4096)
    monkeypatch.setattr(graphs, "_STATES", __import__("weakref").WeakKeyDictionary())
    return calls


@pytest.fixture(scope="module")
def sae_of(tiny_dir, gpt2, gemma3):
    return {"gpt2": load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), gpt2),
            "gemma3": load_sae(SaeSpec("local", str(tiny_dir / "sae-gemma3-l1")), gemma3)}


def _rows(n: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 300, (n, t), generator=g)
    ids[:, 0] = 1
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    lengths[0] = t
    return ids, lengths


def test_buckets():
    assert graphs.bucket(1, 1) == (8, 8)
    assert graphs.bucket(8, 8) == (8, 8) and graphs.bucket(9, 9) == (16, 16)
    assert graphs.bucket(100, 17) == (128, 24) and graphs.bucket(128, 16) == (128, 16)


@pytest.mark.parametrize("name", ["gpt2", "gemma3"])
def test_graphed_scoring_reads_as_the_eager_pass(name, request, sae_of, graphed, monkeypatch):
    """Padded to its bucket and replayed from static buffers, a scoring pass gives the eager
    pass's activations, XE and per-token XE, for several shapes; one capture per bucket, on its
    second use."""
    lm = request.getfixturevalue(name)
    obj = Objective.sae_latent(sae_of[name], 3)
    readout = objective_weights(lm, obj)
    shapes = [(5, 7), (3, 6), (12, 9), (7, 8)]  # buckets (8, 8), (8, 8), (16, 16), (8, 8)
    for n, t in shapes:
        ids, lengths = _rows(n, t, seed=n)
        monkeypatch.setitem(graphs.GRAPH_TOKENS, "cpu", 0)
        monkeypatch.delitem(graphs.GRAPH_TOKENS, "cpu")
        eager = passes.score_candidates(lm, obj, readout, ids, lengths, keep_hidden=True)
        monkeypatch.setitem(graphs.GRAPH_TOKENS, "cpu", 4096)
        for _ in range(2):
            got = passes.score_candidates(lm, obj, readout, ids, lengths, keep_hidden=True)
        for key in ("activation", "xe", "nll", "encoder"):
            torch.testing.assert_close(getattr(got, key), getattr(eager, key),
                                       rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.hidden, eager.hidden, rtol=1e-4, atol=1e-4)
    assert graphs.stats(lm)["captures"] == 2 and graphed == [2, 2]  # (8, 8) and (16, 16)
    assert graphs._state(lm).checked == {"score": True} and graphs.stats(lm)["replays"] == 6
    passes.score_candidates(lm, obj, readout, *_rows(20, 3))  # (32, 8) once: no capture
    assert graphs.stats(lm)["captures"] == 2
    assert leftover_hooks(lm.model) == []


def test_kept_hidden_states_survive_the_next_replay(gpt2, sae_of, graphed):
    """A graph's outputs are overwritten by its next replay: the hidden states a scoring pass
    keeps for the next parent are a copy."""
    obj = Objective.sae_latent(sae_of["gpt2"], 3)
    readout = objective_weights(gpt2, obj)
    for _ in range(2):  # eager, then captured and compared: replayed from now on
        passes.score_candidates(gpt2, obj, readout, *_rows(4, 6, seed=0))
    a_ids, a_len = _rows(4, 6, seed=1)
    a = passes.score_candidates(gpt2, obj, readout, a_ids, a_len, keep_hidden=True)
    kept = a.hidden.clone()
    passes.score_candidates(gpt2, obj, readout, *_rows(4, 6, seed=2), keep_hidden=True)
    torch.testing.assert_close(a.hidden, kept)


def test_graphs_are_bounded(gpt2, sae_of, graphed, monkeypatch):
    """At most GRAPHS_KEPT graphs per model (least recently used out), none above GRAPH_TOKENS
    padded tokens (those chunks run eagerly)."""
    obj = Objective.sae_latent(sae_of["gpt2"], 3)
    readout = objective_weights(gpt2, obj)
    monkeypatch.setattr(graphs, "GRAPHS_KEPT", 2)
    for t in (4, 12, 20, 4):  # widths 8, 16, 24, 8: the first is evicted before it returns
        for _ in range(2):
            passes.score_candidates(gpt2, obj, readout, *_rows(3, t))
    state = graphs._state(gpt2)
    assert [k[3] for k in state.graphs] == [24, 8] and state.captures == 4
    monkeypatch.setitem(graphs.GRAPH_TOKENS, "cpu", 64)
    for _ in range(2):
        passes.score_candidates(gpt2, obj, readout, *_rows(9, 5))  # bucket 16 x 8 = 128 > 64
    assert state.captures == 4


@pytest.mark.parametrize("fault", ["capture fails", "reads differently"])
def test_a_model_whose_pass_cannot_be_graphed_runs_eagerly(fault, gpt2, sae_of, graphed,
                                                           monkeypatch):
    obj = Objective.sae_latent(sae_of["gpt2"], 3)
    readout = objective_weights(gpt2, obj)
    ids, lengths = _rows(5, 7)
    monkeypatch.setitem(graphs.GRAPH_TOKENS, "cpu", 0)
    monkeypatch.delitem(graphs.GRAPH_TOKENS, "cpu")
    want = passes.score_candidates(gpt2, obj, readout, ids, lengths)
    monkeypatch.setitem(graphs.GRAPH_TOKENS, "cpu", 4096)
    real = stand_in()

    def capture(fn):
        if fault == "capture fails":
            raise RuntimeError("operation not permitted when stream is capturing")
        replay, out = real(fn)

        def wrong():
            replay()
            out[1].add_(1.0)  # as a graph that read stale inputs would

        return wrong, out

    monkeypatch.setitem(graphs.CAPTURE, "cpu", capture)
    for _ in range(2):  # the second use captures
        got = passes.score_candidates(gpt2, obj, readout, ids, lengths)
        torch.testing.assert_close(got.activation, want.activation)
    assert not graphs.usable(gpt2, "score") and graphs.usable(gpt2, "grad")
    assert graphs._state(gpt2).graphs == {} and leftover_hooks(gpt2.model) == []
    again = passes.score_candidates(gpt2, obj, readout, ids, lengths)  # eager from now on
    torch.testing.assert_close(again.activation, want.activation)


@pytest.mark.parametrize("name", ["gpt2", "gemma3"])
def test_graphed_gradient_equals_the_eager_one(name, request, sae_of, graphed, monkeypatch):
    """The GCG gradient from a graph padded to its width (the objective read at the real last
    token) is the eager one, for prompts of several lengths; one capture per width."""
    lm = request.getfixturevalue(name)
    obj = Objective.sae_latent(sae_of[name], 5)
    readout = objective_weights(lm, obj)
    for t in (3, 6, 8, 11):
        ids = torch.randint(10, 300, (t,), generator=torch.Generator().manual_seed(t))
        ids[0] = 1
        monkeypatch.setitem(graphs.GRAPH_TOKENS, "cpu", 0)
        monkeypatch.delitem(graphs.GRAPH_TOKENS, "cpu")
        eager = passes.objective_gradient(lm, obj, readout, ids)
        monkeypatch.setitem(graphs.GRAPH_TOKENS, "cpu", 4096)
        for _ in range(2):
            got = passes.objective_gradient(lm, obj, readout, ids)
        assert got.shape == (t, lm.model.config.vocab_size)
        torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)
        assert got.abs().sum() > 0
    assert graphs.stats(lm)["captures"] == 2 and graphs._state(lm).checked == {"grad": True}
    other = Objective.sae_latent(sae_of[name], 6)  # another objective: its own graph
    for _ in range(2):
        passes.objective_gradient(lm, other, objective_weights(lm, other), ids)
    assert graphs.stats(lm)["captures"] == 3 and leftover_hooks(lm.model) == []


def test_dream_with_graphs_follows_the_eager_history(gemma3, sae_of, graphed, monkeypatch):
    """A whole dream on the CUDA path (whole passes) reads the same with graphs as without."""
    obj = Objective.sae_latent(sae_of["gemma3"], 3)
    monkeypatch.delitem(passes.PACK_TOKENS, "cpu")
    cfg = DreamConfig(iters=12, explore=16, buffer_size=4, min_tokens=2, max_tokens=9,
                      gcg_topk=16, sample_k2=16, init_prompt="The quick brown fox",
                      p_gcg=0.4, xe_weights=(0.0,))

    def history():
        return [(s.op, s.best.ids, round(s.best.activation, 3)) for s in dream(gemma3, obj, cfg)]

    with_graphs = history()
    assert graphs.stats(gemma3)["captures"] >= 2  # scoring and gradient graphs were used
    monkeypatch.delitem(graphs.GRAPH_TOKENS, "cpu")
    assert history() == with_graphs
    assert {op for op, *_ in with_graphs} >= {"gcg", "init"}
    assert leftover_hooks(gemma3.model) == []


def test_graph_tokens_can_be_set_per_device_type(monkeypatch):
    monkeypatch.setattr(graphs, "GRAPH_TOKENS", {"cuda": 8192})
    assert graphs.set_graph_tokens("cuda", 0) == 8192 and graphs.GRAPH_TOKENS == {}
    assert graphs.set_graph_tokens("cpu", 64) is None and graphs.GRAPH_TOKENS == {"cpu": 64}
    with pytest.raises(ValueError, match="0 \\(no graphs\\)"):
        graphs.set_graph_tokens("cpu", -1)


def strict(calls: list, capturing: bool = True):
    """The stand-in capture, with the capture run as CUDA would run it: transformers (and torch)
    told a stream is capturing, and any operation that reads a value off the device refused."""
    from torch.utils._python_dispatch import TorchDispatchMode

    inner = stand_in(calls)

    class Refuse(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._overloadpacket.__name__ in DEVICE_WAITS:
                raise RuntimeError(f"{func} reads a value off the device while capturing")
            return func(*args, **(kwargs or {}))

    def capture(fn):
        def as_captured():
            real = torch.cuda.is_current_stream_capturing
            torch.cuda.is_current_stream_capturing = lambda: capturing
            try:
                with Refuse():
                    return fn()
            finally:
                torch.cuda.is_current_stream_capturing = real

        replay, out = inner(as_captured)
        return replay, out

    return capture


def _graph_both_passes(lm, obj, monkeypatch, t: int = 9, n: int = 6):
    calls: list = []
    monkeypatch.setitem(graphs.CAPTURE, "cpu", strict(calls))
    readout = objective_weights(lm, obj)
    ids, lengths = _rows(n, t)
    monkeypatch.delitem(graphs.GRAPH_TOKENS, "cpu")
    want = passes.score_candidates(lm, obj, readout, ids, lengths)
    want_grad = passes.objective_gradient(lm, obj, readout, ids[0])
    monkeypatch.setitem(graphs.GRAPH_TOKENS, "cpu", 4096)
    for _ in range(3):  # eager, captured and compared with the eager pass, then graphed
        got = passes.score_candidates(lm, obj, readout, ids, lengths)
        got_grad = passes.objective_gradient(lm, obj, readout, ids[0])
    assert calls == [2, 1]  # each pass captured once, and neither refused
    assert graphs._state(lm).checked == {"score": True, "grad": True}
    return (got, want), (got_grad, want_grad)


@pytest.mark.parametrize("name", ["gpt2", "gemma3"])
def test_both_passes_capture_without_reading_values_off_the_device(name, request, sae_of,
                                                                  graphed, monkeypatch):
    lm = request.getfixturevalue(name)
    (got, want), (got_grad, want_grad) = _graph_both_passes(
        lm, Objective.sae_latent(sae_of[name], 3), monkeypatch)
    torch.testing.assert_close(got.activation, want.activation, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)


def test_strict_capture_refuses_a_pass_that_reads_a_value(gemma3, sae_of, graphed, monkeypatch):
    """The check above can fail: outside a capture, transformers' mask code reads a value off
    the device (whether the positions hold packed sequences); such a pass is scored eagerly."""
    calls: list = []
    monkeypatch.setitem(graphs.CAPTURE, "cpu", strict(calls, capturing=False))
    obj = Objective.sae_latent(sae_of["gemma3"], 3)
    ids, lengths = _rows(6, 9)
    for _ in range(2):
        ev = passes.score_candidates(gemma3, obj, objective_weights(gemma3, obj), ids, lengths)
    assert calls == [] and not graphs.usable(gemma3, "score")
    assert torch.isfinite(ev.activation).all() and leftover_hooks(gemma3.model) == []


@pytest.mark.slow
def test_embedded_model_passes_capture_without_reading_values_off_the_device(graphed,
                                                                            monkeypatch):
    """Gemma 3 270M and a w4096 latent of the shipped family: the scoring pass and the GCG
    gradient pass can be recorded as CUDA graphs (nothing reads a value off the device while
    transformers believes a stream is capturing) and read as the eager passes."""
    from core.models import ModelSpec, load_model

    lm = load_model(ModelSpec("embedded", device="cpu"))
    sae = load_sae(SaeSpec("embedded", "w4096"), lm)
    (got, want), (got_grad, want_grad) = _graph_both_passes(
        lm, Objective.sae_latent(sae, 273), monkeypatch, t=12, n=10)
    torch.testing.assert_close(got.activation, want.activation, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(got.xe, want.xe, rtol=1e-3, atol=1e-3)
    scale = want_grad.abs().max()
    assert (got_grad - want_grad).abs().max() <= 1e-4 * scale  # float32, other shapes
    top = [len(set(a.tolist()) & set(b.tolist())) / 64 for a, b in
           zip((-got_grad).topk(64).indices, (-want_grad).topk(64).indices)]
    assert min(top) >= 0.95  # GCG draws from the same tokens
