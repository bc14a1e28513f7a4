"""Dreaming on tiny random models: the operations, the buffer, stop, determinism, objectives,
bad input, and the page (AppTest)."""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import replace

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.dream_passes import embed_one_hot, evaluate
from core.dreaming import (
    DreamConfig,
    Objective,
    banned_tokens,
    best_fluent,
    correlation,
    dream,
    make_candidates,
    pareto_front,
)
from core.hooks import run_to_hooks
from core.saes import SaeSpec, load_sae, sae_input
from tests.conftest import leftover_hooks, make_index, plain, tiny_page


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
    (dict(xe_regularization=-1.0), "use a number from 0 to"),
    (dict(xe_max=-2.0), "xe_max=-2.0 is invalid"),
    (dict(explore=0), "explore=0 is invalid"),
    (dict(iters=2.5), "iters=2.5 is invalid"),
    (dict(p_gcg=0, p_insert=0, p_swap=0, p_delete=0), "give at least one a positive"),
    (dict(p_swap=-0.5), "must be numbers >= 0"),
    (dict(init_prompt="   "), "initial prompt (leave it unset to let the model write one) is "
                              "empty"),
    # upper bounds: a link or a widget can ask for anything
    (dict(max_tokens=20000), "max_tokens=20000 is invalid; use a whole number from 1 to 256"),
    (dict(explore=10**6), "explore=1000000 is invalid; use a whole number from 1 to 4,096"),
    (dict(iters=10**9), "iters=1000000000 is invalid"),
    (dict(buffer_size=10**5), "buffer_size=100000 is invalid"),
    (dict(gcg_topk=10**7), "gcg_topk=10000000 is invalid"),
    (dict(sample_k2=10**7), "sample_k2=10000000 is invalid"),
    (dict(xe_regularization=1e300), "use a number from 0 to 1e+06"),
    (dict(xe_weights=(0.1,) * 8), "9 XE weights is too many"),
    (dict(xe_weights=[0.1]), "use a tuple of numbers"),
    (dict(xe_weights=(-1.0,)), "xe_weights=-1.0 is invalid"),
    (dict(act_scale=0.0), "act_scale=0.0 is invalid"),
    (dict(xe_free=-1.0), "xe_free=-1.0 is invalid"),
    (dict(fluent_cap=math.nan), "0: no fluent-cap member"),
    (dict(p_gcg=float("inf")), "must be numbers >= 0"),
    (dict(seeds=[(40, 41, 42)]), "seeds must be a tuple of at most 32"),
    (dict(seeds=((40, 41),) * 33), "seeds must be a tuple of at most 32"),
    (dict(seeds=((40, -1, 42),)), "use a tuple of token ids >= 0"),
    (dict(seeds=((40,),)), "A seed prompt has 1 tokens; it must have between 2 and 6"),
])
def test_bad_config_is_refused_with_the_fix(kw, message):
    with pytest.raises(ValueError) as err:
        small(**kw)
    assert message in str(err.value)


def test_cpu_bounds_are_tighter_and_checked_before_any_work(gpt2, gpt2_sae):
    from core.dreaming import LIMITS, limits

    assert limits("cpu")["max_tokens"] < limits("cuda")["max_tokens"]
    cfg = small(explore=LIMITS["cpu"]["explore"] + 1)  # fine for a GPU
    cfg.check_device("cuda")
    with pytest.raises(ValueError, match=r"explore=513 is above the limit of 512 on the CPU"):
        next(dream(gpt2, Objective.sae_latent(gpt2_sae, 1), cfg))
    assert leftover_hooks(gpt2.model) == []


def _count_forwards(lm):
    seen = []
    handle = lm.model.base_model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(tuple((kw.get("input_ids") if "input_ids" in kw
                                                 else args[0]).shape)), with_kwargs=True)
    return seen, handle


def test_scoring_runs_in_bounded_chunks_with_the_same_result(gpt2, gpt2_sae, monkeypatch):
    import core.dream_passes as dreaming

    obj = Objective.sae_latent(gpt2_sae, 4)
    ids = torch.randint(50, 200, (11, 6))
    ids[:, 0] = 1
    whole = evaluate(gpt2, obj, ids)
    monkeypatch.setitem(dreaming.TOKEN_BUDGET, "cpu", 12)  # two rows of 6 tokens per pass
    monkeypatch.setitem(dreaming.LOGIT_BUDGET, "cpu", 3 * gpt2.model.config.vocab_size)
    seen, handle = _count_forwards(gpt2)
    try:
        parts = evaluate(gpt2, obj, ids)
    finally:
        handle.remove()
    assert [s[0] for s in seen] == [2, 2, 2, 2, 2, 1] and all(a * b <= 12 for a, b in seen)
    for name in ("activation", "xe", "encoder", "decoder", "nll"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name))


def test_stop_takes_effect_between_scoring_chunks(gpt2, gpt2_sae, monkeypatch):
    import core.dream_passes as dreaming

    monkeypatch.setitem(dreaming.TOKEN_BUDGET, "cpu", 6)  # one candidate per forward pass
    monkeypatch.setitem(dreaming.PACK_TOKENS, "cpu", 5)  # packed too: one candidate's change
    monkeypatch.setitem(dreaming._PACK_CHECKED, gpt2.model, True)
    calls = []
    stop_after = {"n": None}

    def stop():  # becomes true once the first chunk of iteration 1 has been scored
        calls.append(1)
        return stop_after["n"] is not None and len(seen) > stop_after["n"]

    seen, handle = _count_forwards(gpt2)
    steps = []
    try:
        for step in dream(gpt2, Objective.sae_latent(gpt2_sae, 2),
                          small(iters=5, explore=32, stop=stop, p_gcg=0, p_insert=0,
                                p_delete=0)):
            steps.append(step)
            stop_after["n"] = len(seen)
    finally:
        handle.remove()
    assert [s.iteration for s in steps] == [0]  # iteration 1 never finished
    scored = [s for s in seen[stop_after["n"]:] if s[0] == 1]
    assert 1 <= len(scored) <= 2, seen  # (a parent pass, then) one chunk of 32, not all of them
    assert leftover_hooks(gpt2.model) == []


def test_candidates_reuse_the_parents_cross_entropy_exactly(gemma3, gemma3_sae):
    from core.dream_passes import first_change, score_candidates
    from core.objectives import objective_weights

    obj = Objective.sae_latent(gemma3_sae, 3)
    parent = torch.tensor([1, 40, 41, 42, 43, 44, 45])
    cfg = small(explore=24)
    gen = torch.Generator().manual_seed(1)
    banned = banned_tokens(gemma3)
    logp = torch.log_softmax(torch.randn(7, banned.numel()), -1)
    known = evaluate(gemma3, obj, parent[None]).nll[0]
    for op in ("swap", "insert", "delete"):
        cands = torch.unique(make_candidates(op, parent, logp, None, banned, cfg, gen), dim=0)
        first = first_change(cands, parent)
        assert ((first >= 1) & (first <= min(cands.shape[1], 7))).all()
        full = evaluate(gemma3, obj, cands)
        for kw in ({}, {"parent": parent}):  # the parent's ids: two logits before the change
            fast = score_candidates(gemma3, obj, objective_weights(gemma3, obj), cands,
                                    first=first, known=known, **kw)
            for name in ("xe", "activation", "encoder", "decoder"):
                torch.testing.assert_close(getattr(fast, name), getattr(full, name), rtol=1e-4,
                                           atol=1e-4)
            torch.testing.assert_close(fast.nll, full.nll, rtol=1e-4, atol=1e-4)


def test_population_of_xe_weights_shares_candidates_and_keeps_a_pareto_front(gpt2, gpt2_sae):
    cfg = small(iters=9, xe_regularization=0.5, xe_weights=(0.0, 2.0), act_scale=3.0,
                xe_free=4.0)
    steps = list(dream(gpt2, Objective.sae_latent(gpt2_sae, 6), cfg))
    assert [s.weight for s in steps[1:4]] == [0.5, 0.0, 2.0]  # the weights take turns
    for s in steps:
        front = s.front
        assert front and [p.xe for p in front] == sorted(p.xe for p in front)
        assert all(a.activation < b.activation for a, b in itertools.pairwise(front))
        for p in s.buffer:  # nothing kept beats the front on both counts
            assert any(f.activation >= p.activation and f.xe <= p.xe for f in front)
        assert s.best.score == pytest.approx(-s.best.activation / 3.0
                                             + 0.5 * max(0.0, s.best.xe - 4.0))
    every = [(a, x) for s in steps for a, x in zip(s.activations, s.xes)]
    top = max(a for a, _ in every)
    assert steps[-1].front[-1].activation == pytest.approx(top)
    fluent = min(x for _, x in every)
    assert steps[-1].front[0].xe == pytest.approx(fluent)


def test_fluent_cap_member_keeps_the_strongest_prompt_under_its_cap(gpt2, gpt2_sae):
    from core.dreaming import CAP_WEIGHT, _score

    obj = Objective.sae_latent(gpt2_sae, 6)
    plain = small(iters=8, xe_regularization=0.0, act_scale=2.0)
    xes = sorted(x for s in dream(gpt2, obj, plain) for x in s.xes)
    cap = xes[len(xes) // 2]  # half of what such a run scores is over the cap
    cfg = replace(plain, fluent_cap=cap)
    assert cfg.members == ((0.0, 0.0), (CAP_WEIGHT, cap))
    steps = list(dream(gpt2, obj, cfg))
    assert [s.member for s in steps[1:5]] == ["XE weight 0", f"fluent cap {cap:g}"] * 2
    assert [s.weight for s in steps[1:3]] == [0.0, CAP_WEIGHT]
    under = [(a, x) for s in steps for a, x in zip(s.activations, s.xes) if x <= cap]
    over = [(a, x) for s in steps for a, x in zip(s.activations, s.xes) if x > cap]
    assert under and over
    # under the cap the member ranks by activation alone; over it, each nat costs CAP_WEIGHT
    a = torch.tensor([a for a, _ in under + over])
    x = torch.tensor([x for _, x in under + over])
    score = _score(a, x, cfg.members[1], cfg)
    torch.testing.assert_close(score, -a / 2.0 + CAP_WEIGHT * (x - cap).clamp(min=0))
    assert (score[len(under):] > -a[len(under):] / 2.0).all()
    # whatever the members find, the front keeps the strongest prompt under the cap
    best_under = max(a for a, _ in under)
    assert best_fluent(steps[-1].front, cap).activation == pytest.approx(best_under)
    assert steps[2].row()["member"] == f"fluent cap {cap:g}"


def test_parents_next_token_distribution_comes_from_the_pass_that_scored_them(
        gpt2, gpt2_sae, monkeypatch):
    import core.dream_passes as passes
    import core.dreaming as dreaming
    from core.objectives import objective_weights

    obj = Objective.sae_latent(gpt2_sae, 6)
    rows = torch.tensor([[1, 40, 41, 42, 43], [1, 50, 51, 52, 53]])
    ev = passes.score_candidates(gpt2, obj, objective_weights(gpt2, obj), rows,
                                 keep_hidden=True)
    for j in range(2):
        torch.testing.assert_close(passes.logp_from_hidden(gpt2, ev.hidden[j]),
                                   passes.next_token_logp(gpt2, rows[j]), rtol=1e-4, atol=1e-4)
    monkeypatch.setitem(passes.HIDDEN_BUDGET, "cpu", 9)  # 2 x 5 tokens: over it, none kept
    assert passes.score_candidates(gpt2, obj, objective_weights(gpt2, obj), rows,
                                   keep_hidden=True).hidden is None
    monkeypatch.undo()

    monkeypatch.delitem(passes.PACK_TOKENS, "cpu")  # scored whole, as on a GPU
    calls = []
    real = dreaming.next_token_logp
    monkeypatch.setattr(dreaming, "next_token_logp", lambda lm, ids: calls.append(1) or
                        real(lm, ids))
    cfg = small(iters=30, p_gcg=0.0, p_delete=0.0, xe_weights=(0.0, 1.0), seed=3)
    steps = list(dream(gpt2, obj, cfg))
    assert len(steps) == 31 and calls == []  # every head was scored by a pass that kept it
    monkeypatch.setitem(passes.HIDDEN_BUDGET, "cpu", 0)  # none kept: a parent pass per head
    again = list(dream(gpt2, obj, cfg))
    assert calls and [s.best.ids for s in again] == [s.best.ids for s in steps]

    monkeypatch.undo()  # packed (a CPU): a parent pass per head, its candidates after its cache
    monkeypatch.setitem(passes._PACK_CHECKED, gpt2.model, True)  # no checking pass
    packs = []
    real_pass = dreaming.parent_pass
    monkeypatch.setattr(dreaming, "parent_pass", lambda lm, ids: packs.append(1) or
                        real_pass(lm, ids))
    packed = list(dream(gpt2, obj, cfg))
    assert len(packs) == 1  # the start's; every later head came with its cache
    assert [s.best.ids for s in packed] == [s.best.ids for s in steps]
    torch.testing.assert_close(torch.tensor([a for s in packed for a in s.activations]),
                               torch.tensor([a for s in steps for a in s.activations]),
                               rtol=1e-4, atol=1e-4)


def test_default_start_is_text_the_model_writes(gpt2, gpt2_sae):
    cfg = small(iters=1, init_prompt=None, min_tokens=3, max_tokens=8)
    first = next(dream(gpt2, Objective.sae_latent(gpt2_sae, 1), cfg)).best
    assert len(first.ids) - 1 == 4 and first.ids[0] == 1
    assert not banned_tokens(gpt2)[list(first.ids[1:])].any()


def test_seeds_start_every_buffer_and_count_in_the_front(gpt2, gpt2_sae):
    """Seeds are scored with the start; each member's buffer begins with the best of them all,
    and a strong seed is the run's best from iteration 0 on."""
    obj = Objective.sae_latent(gpt2_sae, 1)
    rows = torch.randint(3, 200, (24, 5), generator=torch.Generator().manual_seed(0))
    ev = evaluate(gpt2, obj, torch.cat([torch.ones(24, 1, dtype=torch.long), rows], 1))
    strong = tuple(rows[int(ev.activation.argmax())].tolist())
    start = next(dream(gpt2, obj, small(iters=1))).best
    assert ev.activation.max() > start.activation  # the seed beats the start
    seeds = (strong, tuple(rows[0].tolist()), strong)
    steps = list(dream(gpt2, obj, small(iters=3, seeds=seeds, xe_regularization=0.0,
                                        xe_weights=(1.0,))))
    first = steps[0]
    assert first.best.ids == (1, *strong)
    assert first.best.activation == pytest.approx(float(ev.activation.max()), rel=1e-4)
    assert len(first.activations) == 3  # the start and the two different seeds
    assert {(1, *strong), (1, *rows[0].tolist())} <= {p.ids for p in first.buffer}
    assert all(s.best.activation >= first.best.activation for s in steps)
    assert any(p.ids == (1, *strong) for p in first.front) or \
        first.front[-1].activation >= first.best.activation
    again = list(dream(gpt2, obj, small(iters=3, seeds=seeds, xe_regularization=0.0,
                                        xe_weights=(1.0,))))
    assert [s.best.ids for s in again] == [s.best.ids for s in steps]
    with pytest.raises(ValueError, match="token id 0, which is special"):
        next(dream(gpt2, obj, small(seeds=((40, 0, 41),))))


def test_corpus_seeds_cut_the_top_examples_at_the_activating_token(gpt2):
    from core.dreaming import corpus_seeds

    cfg = small(min_tokens=3, max_tokens=6)
    window = [1, *range(40, 60)]
    seeds = corpus_seeds(gpt2, [(window, 10), (window, 10), ([1, 40, 41, 42, 0, 43, 44, 45], 7),
                                ([1, 50, 51], 2)], cfg)
    # the last 6 and last 3 tokens up to the activating one; a repeated example adds nothing;
    # a special token (0) ends a cut; too short a cut is left out
    assert seeds == ((44, 45, 46, 47, 48, 49), (47, 48, 49), (43, 44, 45))
    assert corpus_seeds(gpt2, [(window, 10)] * 2 + [(window, 12)] * 3, cfg, count=2) == \
        ((44, 45, 46, 47, 48, 49), (47, 48, 49))
    assert small(min_tokens=3, max_tokens=6, seeds=seeds).seeds == seeds  # valid as given


def test_corpus_reference_reproduces_the_index_activations(gpt2, gpt2_sae, tmp_path):
    """The page's corpus points are scored as the index measured them (the whole window up to
    the token), so the top example sits on the corpus-max line, also deep in a long window."""
    from core.dream_passes import corpus_reference
    from core.feature_index import FeatureIndex
    from core.index import IndexConfig, build_index
    from tests.conftest import INDEX_TEXTS

    path = tmp_path / "long.duckdb"
    build_index(gpt2, {"l1": gpt2_sae}, INDEX_TEXTS, path,
                IndexConfig(context_size=100, max_tokens=1200, top_k=4, n_sample=8))
    index = FeatureIndex(path)
    deep = 0
    for latent in index.alive_latents("l1")[:6]:
        data = index.latent("l1", latent)
        ref = corpus_reference(gpt2, Objective.sae_latent(gpt2_sae, latent), data.max_act,
                               [(ex.token_ids, ex.pos) for ex in data.top])
        torch.testing.assert_close(torch.tensor(ref.activations),
                                   torch.tensor([ex.value for ex in data.top]),
                                   rtol=1e-4, atol=1e-4)
        assert max(ref.activations) == pytest.approx(data.max_act, rel=1e-4, abs=1e-4)
        assert all(x > 0 for x in ref.xes) and len(ref.texts) == len(data.top)
        deep += sum(ex.pos >= 64 for ex in data.top)
    index.close()
    assert deep, "some top examples sit past a 64-token cut"


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
    assert "Iteration" in labels and "Strongest activation" in labels
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


def test_page_inputs_are_bounded_and_bad_weights_named(tiny_dir, tmp_path, monkeypatch):
    from core.dreaming import limits

    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    at = page(tiny_dir, latent="5")
    bounds = limits("cpu")
    for name in ("iters", "explore", "buffer_size", "max_tokens", "gcg_topk", "sample_k2"):
        assert at.number_input(key=f"dream_{name}").max == bounds[name], name
    at.text_input(key="dream_xe_weights").set_value("0.1, lots")
    at.button(key="dream_start").click().run()
    assert not at.exception
    assert any("Other XE weights '0.1, lots'" in e.value for e in at.error)
    at.text_input(key="dream_xe_weights").set_value("0, 0.5")
    at.number_input(key="dream_iters").set_value(2)
    at.number_input(key="dream_explore").set_value(4)
    at.button(key="dream_start").click().run()
    assert not at.exception and not at.error
    history = at.session_state["dream_history"]
    assert [s.weight for s in history[1:]] == [history[0].weight, 0.0]
    assert any(m.label.startswith("Best fluent") for m in at.metric)


def test_page_bad_input_shows_an_error(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    at = page(tiny_dir, latent="999")
    assert not at.exception
    assert any("Ignored latent='999'" in plain(w.value) and "0 to 63" in plain(w.value)
               for w in at.warning)
    at.number_input(key="dream_min_tokens").set_value(10)
    at.number_input(key="dream_max_tokens").set_value(4)
    at.button(key="dream_start").click().run()
    assert not at.exception
    assert any("min_tokens=10 is above max_tokens=4" in e.value for e in at.error)


@pytest.mark.parametrize("name", ["gpt2", "gemma3"])
def test_token_gradient_equals_autograd_through_the_one_hot(name, request, gpt2_sae):
    from core.dream_passes import next_token_logp, objective_gradient, token_gradient
    from core.hooks import hooked
    from core.objectives import objective_weights

    lm = request.getfixturevalue(name)
    obj = Objective.concept("v", "blocks.1.hook_resid_post", torch.randn(lm.d_model))
    ids = torch.tensor([1, 40, 41, 42, 43, 7])
    logp = next_token_logp(lm, ids)
    grad_obj = objective_gradient(lm, obj, objective_weights(lm, obj), ids)
    grad = token_gradient(grad_obj, logp, 0.7, act_scale=2.0)
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    one_hot = torch.nn.functional.one_hot(ids, vocab).float()[None].requires_grad_(True)
    store = {}
    with hooked(lm, {"blocks.1.hook_resid_post": lambda a: store.__setitem__("a", a)}):
        logits = lm.model(inputs_embeds=embed_one_hot(lm, one_hot)).logits
    lp = torch.log_softmax(logits[0], -1)
    torch.testing.assert_close(logp, lp.detach(), rtol=1e-4, atol=1e-5)
    act = store["a"][0, -1] @ obj.vector
    (g_act,) = torch.autograd.grad(-act, one_hot, retain_graph=True)
    torch.testing.assert_close(grad_obj, g_act[0], rtol=1e-4, atol=1e-5)
    # XE's dependence on the tokens it scores, the distributions held fixed
    xe = -(one_hot[0, 1:] * lp.detach()[:-1]).sum(-1).mean()
    (g,) = torch.autograd.grad(-act / 2.0 + 0.7 * xe, one_hot)
    torch.testing.assert_close(grad, g[0], rtol=1e-4, atol=1e-5)
    assert leftover_hooks(lm.model) == []


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
    assert "Pareto front" in names
    corpus = next(t for f in figs for t in f["data"]
                  if (t.get("name") or "").startswith("top corpus examples"))
    assert len(corpus["y"]) > 0 and all(x > 0 for x in corpus["x"])  # XE of each example
    shapes = [s for f in figs for s in f["layout"].get("shapes", [])]
    assert shapes, "the corpus max is drawn as a reference line"
    best = next(m for m in at.metric if m.label == "Strongest activation")
    top1 = at.session_state["dream_job"][1].act_scale  # the corpus top-1 scales the score
    last = at.session_state["dream_history"][-1]
    strongest = max(last.front, key=lambda p: p.activation)  # as the progress plot draws it
    assert strongest.activation >= last.best.activation
    assert best.value == f"{strongest.activation:.2f}"
    assert best.proto.delta == f"{strongest.activation - top1:+.2f} vs top-1"
    assert best.help.endswith(f"The delta is against the latent's corpus top-1, {top1:,.2f}.")
    assert repr(strongest.text) in best.help
    buffer = next(m for m in at.metric if m.label == "Buffer's best")
    assert buffer.value == f"{last.best.activation:.2f}" and "XE weight" in buffer.help
    # the latent is named both ways, each as what it is
    (names,) = [plain(c.value) for c in at.caption if plain(c.value).startswith("Latent 3:")]
    assert "fires on:" in names and "logit lens:" in names
    # the run also started from cuts of the latent's top corpus examples, said and marked
    cfg = at.session_state["dream_job"][1]
    assert cfg.seeds and len(at.session_state["dream_history"][0].activations) > 1
    assert any(f"{len(cfg.seeds)} cuts of the top corpus examples" in c.value for c in at.caption)
    assert "from" in at.dataframe[0].value.columns
    at.checkbox(key="dream_corpus").uncheck().run()
    at.button(key="dream_start").click().run()
    assert not at.exception and at.session_state["dream_job"][1].seeds == ()
    assert '"corpus":false' in at.query_params["dream"]


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
    from core.dream_passes import embed_scale
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


@pytest.mark.parametrize("name", ["gpt2", "gemma3"])
def test_packed_scoring_reads_as_whole_passes(name, request, monkeypatch):
    import core.dream_passes as passes
    from core.objectives import objective_weights

    lm = request.getfixturevalue(name)
    obj = Objective.sae_latent(request.getfixturevalue(f"{name}_sae"), 3)
    readout = objective_weights(lm, obj)
    parent = torch.tensor([1, 40, 41, 42, 43, 44])
    state = passes.parent_pass(lm, parent)
    known = passes.score_candidates(lm, obj, readout, parent[None]).nll[0]
    swaps = parent.repeat(5, 1)
    swaps[torch.arange(5), torch.arange(1, 6)] = 60  # a change at every position
    inserts = torch.stack([torch.cat([parent[:p], torch.tensor([61]), parent[p:]])
                           for p in range(1, 7)])  # the last appends
    deletes = torch.stack([torch.cat([parent[:p], parent[p + 1:]]) for p in range(1, 6)])
    monkeypatch.setitem(passes._PACK_CHECKED, lm.model, True)
    monkeypatch.setitem(passes.PACK_TOKENS, "cpu", 7)  # several packed passes per batch
    for rows in (swaps, inserts, deletes):
        first = passes.first_change(rows, parent)
        args = dict(first=first, known=known, parent=parent)
        whole = passes.score_candidates(lm, obj, readout, rows, **args)
        seen, handle = _count_forwards(lm)
        try:
            packed = passes.score_candidates(lm, obj, readout, rows, state=state, **args)
        finally:
            handle.remove()
        assert all(b == 1 for b, _ in seen) and 1 < len(seen) < len(rows)  # packed, chunked
        assert sum(t for _, t in seen) < rows.numel()  # fewer tokens than the whole rows
        for key in ("activation", "xe", "nll"):
            torch.testing.assert_close(getattr(packed, key), getattr(whole, key),
                                       rtol=1e-4, atol=1e-4)
    # a scored row's own state, taken from the packed pass, serves its candidates in turn
    ev = passes.score_candidates(lm, obj, readout, swaps, first=passes.first_change(
        swaps, parent), known=known, parent=parent, state=state, keep_hidden=True)
    taken = ev.states(3)
    if name == "gemma3":  # 6 + 7 packed tokens overflow its sliding window of 8: not kept
        assert taken is None
    else:
        own = passes.parent_pass(lm, swaps[3])
        torch.testing.assert_close(taken.hidden, own.hidden, rtol=1e-4, atol=1e-4)
        children = swaps[3].repeat(2, 1)
        children[:, 2] = torch.tensor([70, 71])
        args = dict(first=passes.first_change(children, swaps[3]), parent=swaps[3],
                    known=ev.nll[3])
        a = passes.score_candidates(lm, obj, readout, children, state=taken, **args)
        b = passes.score_candidates(lm, obj, readout, children, state=own, **args)
        c = passes.score_candidates(lm, obj, readout, children, **args)
        torch.testing.assert_close(a.activation, b.activation, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.xe, c.xe, rtol=1e-4, atol=1e-4)
        monkeypatch.setattr(passes, "STATE_BYTES", 1000)  # over the budget: none kept
        assert passes.score_candidates(lm, obj, readout, children, state=taken, keep_hidden=True,
                                       **args).states is None
    assert leftover_hooks(lm.model) == []


def test_packing_can_be_set_per_device_type(gpt2, monkeypatch):
    """What the benchmarks' --pack sets: packing on a device type, or whole passes there."""
    import core.dream_passes as passes

    monkeypatch.setattr(passes, "PACK_TOKENS", {"cpu": 1024})
    assert passes.can_pack(gpt2)
    assert passes.set_pack_tokens("cpu", 0) == 1024 and not passes.can_pack(gpt2)
    assert passes.set_pack_tokens("cuda", 512) is None and passes.PACK_TOKENS == {"cuda": 512}
    assert passes.set_pack_tokens("cpu", 7) is None and passes.can_pack(gpt2)
    with pytest.raises(ValueError, match="0 \\(whole passes\\)"):
        passes.set_pack_tokens("cpu", -1)


def test_spans_fill_a_token_budget():
    from core.dream_passes import _spans

    assert _spans([3, 3, 3, 5, 9, 1], 6) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    assert _spans([2, 2, 2], 100) == [(0, 3)] and _spans([], 4) == []
    assert _spans([1] * 5, 100, rows=2) == [(0, 2), (2, 4), (4, 5)]


@pytest.mark.parametrize("fault", ["reads differently", "refuses"])
def test_a_model_that_cannot_pack_is_scored_whole(fault, gpt2, gpt2_sae, monkeypatch):
    import core.dream_passes as passes
    from core.objectives import objective_weights

    obj = Objective.sae_latent(gpt2_sae, 3)
    readout = objective_weights(gpt2, obj)
    parent = torch.tensor([1, 40, 41, 42, 43])
    rows = parent.repeat(3, 1)
    rows[:, 2] = torch.tensor([50, 51, 52])
    first = passes.first_change(rows, parent)
    whole = passes.score_candidates(gpt2, obj, readout, rows, first=first)
    state = passes.parent_pass(gpt2, parent)
    real = passes._packed_pass

    def packed(*args):
        if fault == "refuses":
            raise TypeError("forward() got an unexpected keyword argument 'position_ids'")
        hidden, at, cache = real(*args)
        return hidden + 1.0, at, cache  # as a model that ignored the custom mask would read

    monkeypatch.setattr(passes, "_packed_pass", packed)
    if fault == "refuses":
        monkeypatch.setitem(passes._PACK_CHECKED, gpt2.model, True)
    else:  # not checked yet: the first packed pass is compared with a whole pass
        monkeypatch.delitem(passes._PACK_CHECKED, gpt2.model, raising=False)
    assert passes.can_pack(gpt2)
    ev = passes.score_candidates(gpt2, obj, readout, rows, first=first, state=state)
    torch.testing.assert_close(ev.activation, whole.activation)
    assert not passes.can_pack(gpt2) and leftover_hooks(gpt2.model) == []  # whole from now on


def test_a_model_that_keeps_no_cache_dreams_unpacked(gpt2, gpt2_sae, monkeypatch):
    import transformers

    import core.dream_passes as passes
    import core.dreaming as dreaming

    def refuse(*args, **kwargs):
        raise TypeError("this model keeps no DynamicCache")

    monkeypatch.setitem(passes._PACK_CHECKED, gpt2.model, True)
    monkeypatch.setattr(transformers, "DynamicCache", refuse)
    assert passes.parent_pass(gpt2, torch.tensor([1, 40, 41])) is None
    assert not passes.can_pack(gpt2)
    monkeypatch.setitem(passes._PACK_CHECKED, gpt2.model, True)
    monkeypatch.setattr(dreaming, "parent_pass", lambda lm, ids: None)
    steps = list(dream(gpt2, Objective.sae_latent(gpt2_sae, 3), small(iters=3)))
    assert len(steps) == 4 and leftover_hooks(gpt2.model) == []  # no cache: scored whole


def test_vocab_logsumexp_runs_over_slices_and_row_chunks(monkeypatch):
    import core.dream_passes as passes

    h, w = torch.randn(9, 16) * 3, torch.randn(50, 16)
    monkeypatch.setitem(passes.VOCAB_SLICE, "cpu", 7)  # 8 slices, the last one short
    monkeypatch.setitem(passes.LOGIT_BUDGET, "cpu", 28)  # 4 rows at a time
    torch.testing.assert_close(passes.vocab_logsumexp(h, w), (h @ w.T).logsumexp(-1))
    capped = torch.tanh((h @ w.T) / 5.0) * 5.0
    torch.testing.assert_close(passes.vocab_logsumexp(h, w, cap=5.0), capped.logsumexp(-1))
