"""Dreaming on tiny random models: the operations, the buffer, stop, determinism, objectives,
bad input, and the page (AppTest)."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.dreaming import (
    DreamConfig,
    Objective,
    banned_tokens,
    correlation,
    dream,
    embed_one_hot,
    evaluate,
    make_candidates,
    pareto_front,
)
from core.hooks import run_to_hooks
from core.saes import SaeSpec, load_sae, sae_input
from tests.conftest import leftover_hooks, make_index, tiny_page


@pytest.fixture(scope="module")
def gpt2_sae(tiny_dir, gpt2):
    return load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), gpt2)


@pytest.fixture(scope="module")
def gemma3_sae(tiny_dir, gemma3):
    return load_sae(SaeSpec("local", str(tiny_dir / "sae-gemma3-l1")), gemma3)


def small(**kw) -> DreamConfig:
    base = dict(iters=6, explore=8, buffer_size=4, min_tokens=2, max_tokens=6, gcg_topk=8,
                sample_k2=8, init_prompt="The quick brown fox")
    return DreamConfig(**{**base, **kw})


@pytest.mark.parametrize("name", ["gpt2", "gemma3"])
def test_inputs_embeds_path_equals_input_ids(name, request):
    lm = request.getfixturevalue(name)
    ids = torch.tensor([[1, 40, 41, 42, 43, 7]])
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        by_ids = lm.model(input_ids=ids).logits
        embeds = embed_one_hot(lm, torch.nn.functional.one_hot(ids, vocab).float())
        by_embeds = lm.model(inputs_embeds=embeds).logits
    torch.testing.assert_close(by_embeds, by_ids, rtol=1e-4, atol=1e-4)
    if name == "gemma3":  # the scale matters: without it the logits differ
        with torch.no_grad():
            raw = lm.model(inputs_embeds=lm.model.get_input_embeddings().weight[ids]).logits
        assert not torch.allclose(raw, by_ids, atol=1e-3)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_objective_values_equal_a_direct_computation(gemma3, gemma3_sae, kind):
    ids = torch.tensor([[1, 40, 41, 42, 43], [1, 50, 51, 52, 53]])
    ev = evaluate(gemma3, Objective.sae_latent(gemma3_sae, 5, kind), ids)
    acts = run_to_hooks(gemma3, [gemma3_sae.hook_name], ids)[gemma3_sae.hook_name][:, -1]
    sae = gemma3_sae.sae
    _, pre = sae.encode_with_hidden_pre(sae_input(gemma3_sae, acts)) if hasattr(
        sae, "encode_with_hidden_pre") else (None, None)
    x = sae_input(gemma3_sae, acts)
    expect_enc = (x - sae.b_dec * sae.cfg.apply_b_dec_to_input) @ sae.W_enc[:, 5] + sae.b_enc[5]
    if pre is not None:
        torch.testing.assert_close(expect_enc, pre[:, 5])
    expect_dec = x @ (sae.W_dec[5] / sae.W_dec[5].norm())
    torch.testing.assert_close(ev.encoder, expect_enc, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ev.decoder, expect_dec, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ev.activation, expect_enc if kind == "encoder" else expect_dec)
    # where the latent fires, the pre-activation is its activation
    fired = sae.encode(x)[:, 5]
    torch.testing.assert_close(fired[fired > 0], ev.encoder[fired > 0], rtol=1e-4, atol=1e-5)
    # XE: mean cross-entropy of tokens 1.. under the model
    logits = gemma3.model(input_ids=ids).logits
    xe = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:],
                                           reduction="none").mean(1)
    torch.testing.assert_close(ev.xe, xe, rtol=1e-4, atol=1e-5)


def test_concept_vector_objective_and_padded_rows(gpt2):
    v = torch.randn(gpt2.d_model)
    obj = Objective.concept("v", "blocks.1.hook_resid_post", v * 3)
    ids = torch.tensor([[1, 40, 41, 42, 43], [1, 50, 51, 0, 0]])
    ev = evaluate(gpt2, obj, ids, lengths=torch.tensor([5, 3]))
    acts = run_to_hooks(gpt2, ["blocks.1.hook_resid_post"], ids)["blocks.1.hook_resid_post"]
    unit = v / v.norm()
    torch.testing.assert_close(ev.activation, torch.stack([acts[0, 4] @ unit, acts[1, 2] @ unit]))
    short = evaluate(gpt2, obj, ids[1:, :3])
    torch.testing.assert_close(ev.activation[1:], short.activation, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ev.xe[1:], short.xe, rtol=1e-4, atol=1e-5)
    assert ev.encoder.numel() == 0 and ev.decoder.numel() == 0


@pytest.mark.parametrize("op", ["gcg", "insert", "swap", "delete"])
def test_each_operation_gives_valid_sequences(gpt2, op):
    cfg = small(explore=64)
    gen = torch.Generator().manual_seed(0)
    banned = banned_tokens(gpt2)
    parent = torch.tensor([1, 40, 41, 42, 43])
    vocab = banned.numel()
    logp = torch.log_softmax(torch.randn(5, vocab), -1)
    grad = torch.randn(5, vocab)
    cands = make_candidates(op, parent, logp, grad, banned, cfg, gen)
    expect_len = {"insert": 6, "delete": 4}.get(op, 5)
    assert cands.shape == (64, expect_len)
    assert (cands[:, 0] == 1).all()  # BOS kept
    assert not banned[cands[:, 1:]].any()  # no special tokens
    if op == "delete":  # each row is the parent without one token
        for row in cands.tolist():
            assert any(row == parent.tolist()[:i] + parent.tolist()[i + 1:] for i in range(1, 5))
    else:
        changed = (cands != parent[:5][None, :cands.shape[1]]) if op != "insert" else None
        if changed is not None:
            assert (changed.sum(1) <= 1).all()
        else:  # removing the inserted token gives back the parent
            for row in cands.tolist():
                assert any(row[:i] + row[i + 1:] == parent.tolist() for i in range(1, 6))
    if op == "gcg":  # candidates come from the top-k of -grad at their position
        top = (-grad).masked_fill(banned, -float("inf")).topk(cfg.gcg_topk, -1).indices
        for row in cands:
            diff = (row != parent).nonzero().flatten()
            for p in diff.tolist():
                assert int(row[p]) in top[p].tolist()


def test_dream_stays_within_lengths_and_never_loses_its_best(gemma3, gemma3_sae):
    cfg = small(iters=25, min_tokens=2, max_tokens=5, init_prompt="The quick fox",
                p_insert=0.3, p_delete=0.3)
    steps = list(dream(gemma3, Objective.sae_latent(gemma3_sae, 3), cfg))
    assert [s.iteration for s in steps] == list(range(26))
    assert steps[0].op == "init" and {s.op for s in steps[1:]} <= {"gcg", "insert", "swap",
                                                                     "delete"}
    assert len({s.op for s in steps[1:]}) >= 3
    scores = [s.best.score for s in steps]
    assert all(b <= a for a, b in itertools.pairwise(scores))  # best score never gets worse
    assert scores[-1] < scores[0]
    for s in steps:
        for p in s.buffer:
            assert 2 <= len(p.ids) - 1 <= 5 and p.ids[0] == gemma3.tokenizer.bos_token_id
        assert len(s.buffer) <= cfg.buffer_size
        assert [p.score for p in s.buffer] == sorted(p.score for p in s.buffer)
        assert len(s.activations) == len(s.xes) == len(s.encoder) == len(s.decoder) > 0
    # the reported best is what evaluate says about it
    best = steps[-1].best
    ev = evaluate(gemma3, Objective.sae_latent(gemma3_sae, 3), torch.tensor([best.ids]))
    assert abs(float(ev.activation[0]) - best.activation) < 1e-4
    assert leftover_hooks(gemma3.model) == []


def test_xe_max_drops_disfluent_candidates(gpt2, gpt2_sae):
    steps = list(dream(gpt2, Objective.sae_latent(gpt2_sae, 1), small(iters=8, xe_max=6.2)))
    for s in steps[1:]:
        for p in s.buffer:
            assert p.xe <= 6.2 or p.ids == steps[0].best.ids


def test_same_seed_same_history_other_seed_differs(gpt2, gpt2_sae):
    obj = Objective.sae_latent(gpt2_sae, 7)

    def run(seed, init="The quick brown fox"):
        return [(s.op, s.best.ids, round(s.best.activation, 5), tuple(s.activations))
                for s in dream(gpt2, obj, small(iters=8, seed=seed, init_prompt=init))]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(3, None) == run(3, None)  # random start too


def test_stop_event_ends_within_one_iteration_and_leaves_no_hooks(gpt2, gpt2_sae):
    stop = threading.Event()
    seen = []
    for step in dream(gpt2, Objective.sae_latent(gpt2_sae, 2), small(iters=50, stop=stop)):
        seen.append(step.iteration)
        if step.iteration == 3:
            stop.set()
    assert seen == [0, 1, 2, 3]
    assert leftover_hooks(gpt2.model) == []


def test_closing_the_generator_releases_the_model(gpt2, gpt2_sae):
    gen = dream(gpt2, Objective.sae_latent(gpt2_sae, 2), small(iters=50))
    next(gen), next(gen)
    gen.close()
    assert leftover_hooks(gpt2.model) == []
    other = threading.Thread(target=lambda: gpt2.lock.acquire() and gpt2.lock.release())
    other.start()
    other.join(5)
    assert not other.is_alive()  # the lock is free for other sessions


def test_stop_callable(gpt2, gpt2_sae):
    steps = list(dream(gpt2, Objective.sae_latent(gpt2_sae, 2),
                       small(iters=50, stop=lambda: True)))
    assert [s.iteration for s in steps] == [0]


@pytest.mark.parametrize("kw, message", [
    (dict(min_tokens=5, max_tokens=3), "min_tokens=5 is above max_tokens=3"),
    (dict(xe_regularization=float("nan")), "xe_regularization=nan is invalid"),
    (dict(xe_regularization=-1.0), "use a number >= 0"),
    (dict(xe_max=-2.0), "xe_max=-2.0 is invalid"),
    (dict(explore=0), "explore=0 is invalid"),
    (dict(iters=2.5), "iters=2.5 is invalid"),
    (dict(p_gcg=0, p_insert=0, p_swap=0, p_delete=0), "give at least one a positive"),
    (dict(p_swap=-0.5), "must be numbers >= 0"),
    (dict(init_prompt="   "), "initial prompt (leave it unset for random tokens) is empty"),
])
def test_bad_config_is_refused_with_the_fix(kw, message):
    with pytest.raises(ValueError) as err:
        small(**kw)
    assert message in str(err.value)


def test_bad_objectives_are_refused(gpt2, gpt2_sae):
    with pytest.raises(ValueError, match="Latent 64 is out of range.*0 to 63"):
        Objective.sae_latent(gpt2_sae, 64)
    with pytest.raises(ValueError, match="out of range"):
        Objective.sae_latent(gpt2_sae, -1)
    with pytest.raises(ValueError, match="NaN"):
        Objective.concept("x", "blocks.1.hook_resid_post", torch.full((32,), float("nan")))
    with pytest.raises(ValueError, match="all zeros"):
        Objective.concept("x", "blocks.1.hook_resid_post", torch.zeros(32))
    wrong = Objective.concept("x", "blocks.1.hook_resid_post", torch.ones(16))
    with pytest.raises(ValueError, match="d_model 32"):
        next(dream(gpt2, wrong, small()))
    with pytest.raises(ValueError, match="has 4 tokens; it must have between 5 and 6"):
        next(dream(gpt2, Objective.sae_latent(gpt2_sae, 1), small(min_tokens=5)))


def test_pareto_front_and_correlation():
    acts = [1.0, 3.0, 2.0, 0.5, 3.0]
    xes = [1.0, 2.0, 1.5, 0.2, 4.0]
    assert pareto_front(acts, xes) == [3, 0, 2, 1]
    for i in range(len(acts)):  # nothing off the front beats a point on it on both counts
        if i not in pareto_front(acts, xes):
            assert any(acts[j] >= acts[i] and xes[j] <= xes[i] for j in pareto_front(acts, xes))
    assert correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert correlation([1, 2], [1, 2]) is None and correlation([1, 1, 1], [1, 2, 3]) is None


# --- the page ---------------------------------------------------------------------------------


def page(tiny_dir, **query) -> AppTest:
    return tiny_page(tiny_dir, "dreaming", timeout=180, **query)


def test_page_runs_a_few_iterations(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    at = page(tiny_dir, latent="5")
    assert not at.exception, at.exception
    assert at.number_input(key="dream_latent").value == 5
    at.number_input(key="dream_iters").set_value(4)
    at.number_input(key="dream_explore").set_value(8)
    at.text_input(key="dream_init").set_value("The quick brown fox")
    at.button(key="dream_start").click().run()
    assert not at.exception, at.exception
    history = at.session_state["dream_history"]
    assert [s.iteration for s in history] == [0, 1, 2, 3, 4]
    labels = [m.label for m in at.metric]
    assert "Iteration" in labels and "Best activation" in labels
    assert any(m.value == "4" for m in at.metric if m.label == "Iteration")
    assert len(at.get("plotly_chart")) >= 3
    assert at.dataframe, "the best-sequences table is shown"
    html = " ".join(m.value for m in at.markdown)
    assert 'class="tokens"' in html  # best sequence with token highlighting
    # the progress line is drawn with the metrics, from the same iteration
    assert any(c.value.startswith("Finished: iteration 4 of 4") for c in at.caption)
    # results survive a rerun
    at.run()
    assert len(at.session_state["dream_history"]) == 5 and not at.exception
    assert any(c.value.startswith("Last run: iteration 4 of 4") for c in at.caption)


def test_page_bad_input_shows_an_error(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    at = page(tiny_dir, latent="999")
    assert not at.exception
    assert any("Ignored latent='999'" in w.value and "0 to 63" in w.value for w in at.warning)
    at.number_input(key="dream_min_tokens").set_value(10)
    at.number_input(key="dream_max_tokens").set_value(4)
    at.button(key="dream_start").click().run()
    assert not at.exception
    assert any("min_tokens=10 is above max_tokens=4" in e.value for e in at.error)


@pytest.mark.parametrize("name", ["gpt2", "gemma3"])
def test_token_gradient_equals_autograd_through_the_one_hot(name, request, gpt2_sae):
    from core.dreaming import _parent_pass
    from core.objectives import objective_weights

    lm = request.getfixturevalue(name)
    obj = Objective.concept("v", "blocks.1.hook_resid_post", torch.randn(lm.d_model))
    ids = torch.tensor([1, 40, 41, 42, 43, 7])
    logp, grad = _parent_pass(lm, obj, objective_weights(lm, obj), ids, 0.7, True)
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    one_hot = torch.nn.functional.one_hot(ids, vocab).float()[None].requires_grad_(True)
    store = {}
    from core.hooks import hooked

    with hooked(lm, {"blocks.1.hook_resid_post": lambda a: store.__setitem__("a", a)}):
        logits = lm.model(inputs_embeds=embed_one_hot(lm, one_hot)).logits
    lp = torch.log_softmax(logits[0], -1)
    xe = -(one_hot[0, 1:] * lp[:-1]).sum(-1).mean()
    loss = -(store["a"][0, -1] @ obj.vector) + 0.7 * xe
    loss.backward()
    torch.testing.assert_close(grad, one_hot.grad[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logp, lp.detach(), rtol=1e-4, atol=1e-5)


def _figures(at) -> list[dict]:
    import json

    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def test_page_draws_corpus_reference_points(tiny_dir, tmp_path, monkeypatch):

    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    make_index(tiny_dir)
    at = page(tiny_dir, latent="3")
    at.number_input(key="dream_iters").set_value(3)
    at.number_input(key="dream_explore").set_value(6)
    at.button(key="dream_start").click().run()
    assert not at.exception, at.exception
    figs = _figures(at)
    names = [t.get("name") for f in figs for t in f["data"]]
    assert "Pareto frontier" in names
    corpus = next(t for f in figs for t in f["data"]
                  if (t.get("name") or "").startswith("top corpus examples"))
    assert len(corpus["y"]) > 0 and all(x > 0 for x in corpus["x"])  # XE of each example
    shapes = [s for f in figs for s in f["layout"].get("shapes", [])]
    assert shapes, "the corpus max is drawn as a reference line"


def test_page_dreams_about_a_concept_vector(tiny_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    at = page(tiny_dir)
    vec = SimpleNamespace(name="fox", hook_name="blocks.1.hook_resid_post",
                          vector=torch.randn(32))
    at.session_state["steer_vectors"] = {"fox": vec}
    at.run()
    at.radio(key="dream_objective").set_value("vector").run()
    at.number_input(key="dream_iters").set_value(2)
    at.button(key="dream_start").click().run()
    assert not at.exception, at.exception
    assert len(at.session_state["dream_history"]) == 3
    assert "concept 'fox'" in " ".join(c.value for c in at.caption)


@pytest.mark.slow
def test_embedded_default_dreams_and_its_embed_scale_is_applied():
    """The real Gemma 3 270M scales its embeddings by sqrt(640) inside embed_tokens."""
    from core.dreaming import embed_scale
    from core.models import ModelSpec, load_model

    lm = load_model(ModelSpec("embedded", device="cpu"))
    assert float(embed_scale(lm)) == pytest.approx(640**0.5, rel=1e-3)
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563]])
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        by_ids = lm.model(input_ids=ids).logits
        by_embeds = lm.model(inputs_embeds=embed_one_hot(
            lm, torch.nn.functional.one_hot(ids, vocab).float())).logits
    torch.testing.assert_close(by_embeds, by_ids, rtol=1e-3, atol=1e-3)
    sae = load_sae(SaeSpec("embedded", "w512"), lm)
    steps = list(dream(lm, Objective.sae_latent(sae, 28),
                       DreamConfig(iters=3, explore=6, max_tokens=8,
                                   init_prompt="The weather today is")))
    assert steps[-1].best.activation >= steps[0].best.activation
    assert not any(tok in steps[-1].best.text for tok in ("<start_of_image>", "<unused"))
    assert leftover_hooks(lm.model) == []
