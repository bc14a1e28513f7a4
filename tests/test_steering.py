"""Steering on tiny random models: interventions, generation, sweeps, recipes, concept vectors."""

from __future__ import annotations

import base64
import copy
import json
import threading
import time
import tracemalloc
import zlib

import pytest
import torch

from core.hooks import hooked
from core.saes import SaeSpec, load_sae
from core.steering import (
    GenConfig,
    Intervention,
    MAX_INTERVENTIONS,
    Recipe,
    Steerer,
    generate_steered,
    latent_shifts,
    score_on_text,
    stream,
    sweep,
)
from core.text import token_ids
from core.vectors import ConceptVector, caa_vector, mean_activations, read_labelled, train_cav
from tests.conftest import build_sae, leftover_hooks

PROMPT = "The quick brown fox jumps over"
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def sae(gpt2, tiny_dir):
    return load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), gpt2)


def logits_with(lm, sae, recipe, ids, prompt_len=None):
    steerer = Steerer(sae, [recipe], prompt_len or len(ids), keep_post=True)
    with hooked(lm, steerer.hooks() if recipe else {}), torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids])).logits[0]
    return out, steerer


def feats(lm, sae, ids):
    from core.hooks import run_to_hooks

    acts = run_to_hooks(lm, [HOOK], torch.tensor([ids]))[HOOK]
    return sae.sae.encode(acts)[0]


def test_zero_strength_and_own_value_reproduce_the_baseline(gpt2, sae):
    ids = token_ids(gpt2, PROMPT)
    base, _ = logits_with(gpt2, sae, None, ids)
    add0, _ = logits_with(gpt2, sae, Recipe((Intervention("add", 0.0, latent=5),)), ids)
    assert torch.equal(add0, base)
    quiet = copy.deepcopy(sae)
    with torch.no_grad():
        quiet.sae.b_enc[0] = -1e3  # latent 0 never fires: clamping it to 0 changes nothing
    assert feats(gpt2, quiet, ids)[:, 0].max() == 0
    clamp0, _ = logits_with(gpt2, quiet, Recipe((Intervention("clamp", 0.0, latent=0),)), ids)
    torch.testing.assert_close(clamp0, base, atol=1e-5, rtol=0)
    # One position: clamping a firing latent to its own value changes nothing.
    one = ids[:1]
    f1 = feats(gpt2, sae, one)[0]
    busy = int(f1.argmax())
    own, _ = logits_with(gpt2, sae, Recipe((Intervention("clamp", float(f1[busy]), latent=busy),)),
                         one)
    torch.testing.assert_close(own, logits_with(gpt2, sae, None, one)[0], atol=1e-5, rtol=0)
    moved, _ = logits_with(gpt2, sae, Recipe((Intervention("clamp", 8.0, latent=busy),)), ids)
    assert (moved - base).abs().max() > 1e-2
    assert leftover_hooks(gpt2.model) == []


def test_clamped_latent_reads_back_at_the_value(gpt2):
    """With an orthonormal decoder, tied encoder and a latent that always fires, the SAE reads
    the steered activation back at exactly the clamp value, at every position."""
    sae_model = build_sae(32, 16, HOOK, "tiny-gpt2")
    q, _ = torch.linalg.qr(torch.randn(32, 16))
    with torch.no_grad():
        sae_model.W_dec.copy_(q.T)
        sae_model.W_enc.copy_(q)
        sae_model.b_enc[3] = 100.0
    from core.saes import LoadedSAE, SaeProcessing

    tied = LoadedSAE(sae_model, SaeSpec("local", "tied"), HOOK, SaeProcessing(False, True), None)
    ids = token_ids(gpt2, PROMPT)
    _, steerer = logits_with(gpt2, tied, Recipe((Intervention("clamp", 7.5, latent=3),)), ids)
    torch.testing.assert_close(steerer.last_post[0, :, 3], torch.full((len(ids),), 7.5),
                               atol=1e-4, rtol=0)


def test_positions_prompt_and_generated(gpt2, sae):
    ids = token_ids(gpt2, PROMPT)
    n_prompt = 4
    base, _ = logits_with(gpt2, sae, None, ids)
    add = (Intervention("add", 6.0, latent=1),)
    gen_only, _ = logits_with(gpt2, sae, Recipe(add, "generated"), ids, n_prompt)
    prompt_only, _ = logits_with(gpt2, sae, Recipe(add, "prompt"), ids, n_prompt)
    torch.testing.assert_close(gen_only[:n_prompt], base[:n_prompt])
    assert (gen_only[n_prompt:] - base[n_prompt:]).abs().max() > 1e-3
    assert (prompt_only[:n_prompt] - base[:n_prompt]).abs().max() > 1e-3


def test_rows_share_the_sampling_noise(gpt2, sae):
    cfg = GenConfig(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=3)
    strong = Recipe((Intervention("clamp", 20.0, latent=2),))
    res = generate_steered(gpt2, sae, PROMPT, [None, Recipe(), strong], cfg)
    assert res.rows[0] == res.rows[1]  # empty recipe: same tokens under sampling
    assert res.rows[2] != res.rows[0]
    again = generate_steered(gpt2, sae, PROMPT, [None, Recipe(), strong], cfg)
    assert again.rows == res.rows  # same seed, same history
    assert leftover_hooks(gpt2.model) == []


def test_streaming_can_stop_midway_without_leaving_hooks(gpt2, sae):
    gen = stream(gpt2, sae, PROMPT, [None, Recipe((Intervention("add", 3.0, latent=1),))],
                 GenConfig(max_new_tokens=20))
    first = next(gen)
    assert len(first.tokens) == 2
    gen.close()
    assert leftover_hooks(gpt2.model) == []
    assert gpt2.lock.acquire(blocking=False)  # nobody holds the model
    gpt2.lock.release()


def test_steered_and_unsteered_at_the_same_time(gpt2, sae):
    cfg = GenConfig(max_new_tokens=16, temperature=0.0)
    solo = generate_steered(gpt2, sae, PROMPT, [None], cfg).rows[0]
    steered = Recipe((Intervention("clamp", 30.0, latent=2),))
    out: dict = {}
    start = threading.Barrier(2)

    def run(key, recipe):
        start.wait()
        for _ in range(3):
            row = generate_steered(gpt2, sae, PROMPT, [recipe], cfg).rows[0]
            out.setdefault(key, []).append(row)

    threads = [threading.Thread(target=run, args=("plain", None)),
               threading.Thread(target=run, args=("steered", steered))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out["plain"] == [solo] * 3
    assert out["steered"][0] != solo
    assert leftover_hooks(gpt2.model) == []


def test_sweep_kl_and_side_effects(gpt2, sae):
    recipe = Recipe((Intervention("add", 1.0, latent=4),))
    sw = sweep(gpt2, sae, PROMPT, recipe, 0, [0.0, 4.0, 16.0],
               GenConfig(max_new_tokens=8, temperature=0.0))
    assert len(sw.kl) == len(sw.texts) == 3
    assert sw.kl[0] == pytest.approx(0.0, abs=1e-6)
    assert sw.kl[2] > sw.kl[0]
    assert sw.texts[0] == sw.baseline
    # The target latent as the model sees it rises with the strength of its own direction.
    assert sw.target_post[2] > sw.target_post[0]

    res = generate_steered(gpt2, sae, PROMPT, [None, recipe], GenConfig(max_new_tokens=8))
    shifts = latent_shifts(res.readout, 1, exclude={4})
    assert shifts and all(lat != 4 for lat, *_ in shifts)
    assert all(c == pytest.approx(s - b) for _, b, s, c in shifts)  # no scale: raw change
    scored = score_on_text(gpt2, sae, res.prompt_ids + res.rows[0], len(res.prompt_ids),
                           [Recipe(), recipe])
    assert scored.kl[0] == pytest.approx(0.0, abs=1e-6)
    assert len(scored.logit_up[1]) == 10


def test_recipe_json_and_link_round_trip(gpt2):
    vec = ConceptVector("joy", HOOK, torch.randn(32))
    recipe = Recipe((Intervention("clamp", 12.0, latent=3),
                     Intervention("add", 0.5, latent=7, scale_by_max=True, max_act=9.0),
                     Intervention("vector", -2.0, vector=vec)), "generated")
    for back in (Recipe.from_json(recipe.to_json()), Recipe.from_param(recipe.to_param())):
        assert back.positions == "generated"
        assert [(i.kind, i.value, i.latent) for i in back.interventions] == [
            (i.kind, i.value, i.latent) for i in recipe.interventions]
        assert back.interventions[1].strength == pytest.approx(4.5)
        torch.testing.assert_close(back.interventions[2].vector.vector,
                                   vec.vector.half().float())


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"interventions": 3}', "'interventions' list"),
    ('{"interventions": [{"kind": "clamp", "value": 1}]}', "needs a latent"),
    ('{"interventions": [{"kind": "clamp", "latent": 1, "value": "NaN"}]}', "must be a number"),
    ('{"interventions": [{"kind": "clamp", "latent": 1, "value": 1e999}]}', "finite"),
    ('{"interventions": [{"kind": "warp", "latent": 1, "value": 1}]}', "'kind' is 'warp'"),
    ('{"interventions": [{"kind": "clamp", "latent": 1, "value": 1, "max_act": "abc"}]}',
     "Intervention 1 of the recipe: 'max_act' must be a number; got 'abc'"),
    ('{"interventions": [{"kind": "clamp", "latent": 1, "value": 1, "max_act": -3}]}',
     "max activation is ≥ 0"),
    ('{"interventions": [{"kind": "clamp", "latent": "1", "value": 1}]}', "whole number"),
    ('{"interventions": [{"kind": "clamp", "latent": 1.5, "value": 1}]}', "whole number"),
    ('{"interventions": [{"kind": "add", "latent": 1, "value": 1, "scale_by_max": "yes",'
     ' "max_act": 2}]}', "true or false"),
    ('{"interventions": [{"kind": "vector", "value": 1, "vector": {"name": "v", "hook": "h",'
     ' "fp16_b64": "AA=="}}]}', "1 to 65,536 float16 values"),
    ('{"interventions": [{"kind": "vector", "value": 1, "vector": {"name": 3, "hook": "h",'
     ' "fp16_b64": "AAAA"}}]}', "name' must be a string"),
    ('{"interventions": [{"kind": "vector", "value": 1, "vector": "x"}]}', "must be an object"),
    ('{"interventions": [{"kind": "add", "latent": 1, "value": 1, "colour": 2}]}',
     "unknown fields"),
    ('{"interventions": [], "positions": "middle"}', "positions="),
])
def test_malformed_recipes_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_json(text)
    with pytest.raises(ValueError, match="damaged"):
        Recipe.from_param("not-a-recipe")


def _bomb_param(raw: bytes) -> str:
    return base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode().rstrip("=")


def test_recipe_bomb_is_refused_fast_with_bounded_memory():
    bomb = _bomb_param(b'{"interventions": [' + b" " * (50 << 20) + b"]}")
    assert len(bomb) < 100_000  # a 50 MiB expansion fits in an ordinary link
    many = _bomb_param(json.dumps({"interventions": [
        {"kind": "clamp", "latent": 1, "value": 1.0}] * 1_000_000}).encode())
    for param in (bomb, many):
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(ValueError, match="expands beyond 524,288 bytes"):
            Recipe.from_param(param)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert seconds < 1.0 and peak < 8 << 20, (seconds, peak)


def test_too_many_interventions_are_refused():
    items = [{"kind": "clamp", "latent": i, "value": 1.0} for i in range(MAX_INTERVENTIONS + 1)]
    text = json.dumps({"interventions": items})
    with pytest.raises(ValueError, match=f"{MAX_INTERVENTIONS + 1} interventions; the limit is"):
        Recipe.from_json(text)
    with pytest.raises(ValueError, match="the limit is"):
        Recipe.from_param(_bomb_param(text.encode()))
    with pytest.raises(ValueError, match="the limit is"):
        Recipe(tuple(Intervention("clamp", 1.0, latent=i) for i in range(MAX_INTERVENTIONS + 1)))
    Recipe.from_json(json.dumps({"interventions": items[:MAX_INTERVENTIONS]}))


def test_vectors_of_the_wrong_length_are_refused_before_generating(gpt2, sae):
    for size in (1, 31, 33):
        recipe = Recipe((Intervention("vector", 1.0, vector=ConceptVector(
            "short", HOOK, torch.ones(size))),))
        back = Recipe.from_param(recipe.to_param())  # a link carries it intact
        with pytest.raises(ValueError, match=f"has {size} values but {HOOK} of tiny-gpt2 has 32"):
            back.check(sae, gpt2)
        with pytest.raises(ValueError, match="make the vector again"):
            generate_steered(gpt2, sae, PROMPT, [None, back], GenConfig(max_new_tokens=2))
    bad_hook = Recipe((Intervention("vector", 1.0, vector=ConceptVector(
        "v", "blocks.9.hook_resid_post", torch.ones(32))),))
    with pytest.raises(ValueError, match="asks for layer 9"):
        bad_hook.check(sae, gpt2)
    Recipe((Intervention("vector", 1.0, vector=ConceptVector("ok", HOOK, torch.ones(32))),
            )).check(sae, gpt2)


def test_bad_strengths_and_settings(gpt2, sae):
    for bad in (float("nan"), float("inf"), 1e9):
        with pytest.raises(ValueError, match="strength"):
            Intervention("clamp", bad, latent=1)
    with pytest.raises(ValueError, match="out of range"):
        Recipe((Intervention("clamp", 1.0, latent=64),)).check(sae)
    with pytest.raises(ValueError, match="needs an SAE"):
        Recipe((Intervention("clamp", 1.0, latent=1),)).check(None)
    with pytest.raises(ValueError, match="max activation"):
        Intervention("add", 1.0, latent=1, scale_by_max=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenConfig(max_new_tokens=100_000)
    with pytest.raises(ValueError, match="temperature"):
        GenConfig(temperature=float("nan"))
    with pytest.raises(ValueError, match="empty"):
        generate_steered(gpt2, sae, "   ", [None], GenConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="limit"):
        generate_steered(gpt2, sae, "x" * 30_000, [None], GenConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="chat template"):
        generate_steered(gpt2, sae, PROMPT, [None], GenConfig(max_new_tokens=2, chat=True))


def test_cav_and_caa(gpt2):
    rows = "text,label\n" + "\n".join(
        [f'"the fox jumps {i}",a' for i in range(6)]
        + [f'"def add(a, b): return {i}",b' for i in range(6)])
    texts, labels = read_labelled(rows)
    vec = train_cav(gpt2, HOOK, texts, labels, "a")
    assert vec.vector.shape == (32,) and vec.info["texts"] == 12
    assert vec.info["train_accuracy"] == 1.0  # two very different kinds of text
    x = mean_activations(gpt2, HOOK, texts)
    score = x @ vec.vector
    assert score[:6].min() > score[6:].max()  # the vector points towards label 'a'

    pairs = [("the fox jumps", "def add(a, b)"), ("lazy dog", "return a + b")]
    caa = caa_vector(gpt2, HOOK, pairs)
    pos = mean_activations(gpt2, HOOK, [p for p, _ in pairs], last_only=True)
    neg = mean_activations(gpt2, HOOK, [n for _, n in pairs], last_only=True)
    torch.testing.assert_close(caa.vector, (pos - neg).mean(0))

    with pytest.raises(ValueError, match="columns 'text' and 'label'"):
        read_labelled("words,kind\nhello,a\n")
    with pytest.raises(ValueError, match="two labels"):
        read_labelled("text,label\nhello,a\nbye,a\n")
    with pytest.raises(ValueError, match="not in the rows"):
        train_cav(gpt2, HOOK, texts, labels, "c")


def test_vector_steering_moves_the_projection(gpt2, sae):
    vec = ConceptVector("v", HOOK, torch.nn.functional.normalize(torch.randn(32), dim=0) * 5)
    recipe = Recipe((Intervention("vector", 2.0, vector=vec),))
    res = generate_steered(gpt2, None, PROMPT, [None, recipe], GenConfig(max_new_tokens=6),
                           targets=list(recipe.interventions))
    shift = (res.readout.target_post - res.readout.target_pre)[:, 0] / res.readout.count
    assert shift[0] == pytest.approx(0.0, abs=1e-5)
    assert shift[1] == pytest.approx(10.0, rel=1e-3)  # α·|v| along unit(v)


def test_latent_shifts_rank_by_change_in_each_latents_typical_activation():
    """A rare latent switching on outranks a dense one whose large activations move more in
    absolute terms; a latent with no typical activation takes the median scale."""
    from core.steering import Readout

    pre = torch.zeros(2, 5)
    pre[0] = torch.tensor([3000.0, 0.0, 10.0, 0.0, 50.0])
    pre[1] = torch.tensor([2400.0, 40.0, 10.0, 30.0, 50.0])
    readout = Readout(torch.zeros(2), torch.zeros(2), pre.clone(), torch.ones(2))
    raw = latent_shifts(readout, 1)
    assert [lat for lat, *_ in raw] == [0, 1, 3]  # by absolute change: the dense one first
    typical = [2500.0, 20.0, 10.0, float("nan"), 100.0]  # latent 3 never fired in the index
    ranked = latent_shifts(readout, 1, typical=typical)
    assert [lat for lat, *_ in ranked] == [1, 3, 0]
    assert ranked[0][3] == pytest.approx(2.0)  # 40 over a typical 20
    assert ranked[1][3] == pytest.approx(30 / 20)  # median of the known scales (10, 20, 100, 2500)
    assert ranked[2][3] == pytest.approx(-600 / 2500)
    assert latent_shifts(readout, 1, typical=typical, exclude={1})[0][0] == 3
    with pytest.raises(ValueError, match="5 latents"):
        latent_shifts(readout, 1, typical=[1.0, 2.0])
