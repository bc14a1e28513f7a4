"""AppTest of the Steering page on the tiny GPT-2 and its SAE."""

from __future__ import annotations

import base64
import json
import zlib

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.saes import SaeSpec
from core.steering import Intervention, Recipe
from core.vectors import ConceptVector
from tests.conftest import make_index, plain, tiny_page


def steering(tiny_dir, **query) -> AppTest:
    return tiny_page(tiny_dir, "steering", **query)


@pytest.mark.parametrize("with_index", [False, True])
def test_add_a_clamp_and_generate(tiny_dir, tmp_path, monkeypatch, with_index):
    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    if with_index:
        make_index(tiny_dir)
    at = steering(tiny_dir)
    assert not at.exception
    assert "None yet" in "\n".join(c.value for c in at.caption)
    at.number_input(key="steer_new_latent").set_value(5)
    at.button(key="steer_add_latent").click().run()
    assert not at.exception
    (slider,) = [s for s in at.slider if s.key.startswith("steer_val_")]
    slider.set_value(6.0).run()
    at.slider(key="steer_max_new").set_value(8)
    at.button(key="steer_generate").click().run()
    assert not at.exception, at.exception
    prompt, recipe, res, scored = at.session_state.steer_out
    top = recipe.interventions[0].max_act if with_index else 6.0  # the index bounds the slider
    assert recipe.interventions[0].latent == 5 and recipe.interventions[0].value == top
    assert len(res.texts) == 2 and all(0 < len(r) <= 8 for r in res.rows)
    assert any("tokens/s" in c.value for c in at.caption)
    assert "What else moved" in "\n".join(m.value for m in at.markdown)
    latents = at.dataframe[-1].value
    assert 5 not in set(latents["latent"])  # the clamped latent is left out
    if with_index:  # ranked in units of each latent's typical activation
        assert list(latents.columns[:4]) == ["latent", "baseline", "steered", "change"]
        assert (latents["change"].abs().diff().dropna() <= 1e-9).all()
        assert any("typical activation (its mean" in c.value for c in at.caption)
    else:  # no index, no typical activation: by raw change
        assert list(latents.columns[:3]) == ["latent", "baseline", "steered"]
        assert "change" not in latents.columns
        change = (latents["steered"] - latents["baseline"]).abs()
        assert (change.diff().dropna() <= 1e-6).all()
        assert any("ranked by the change in activation" in c.value for c in at.caption)
    # the recipe is in the URL
    back = Recipe.from_param(at.query_params["recipe"])
    assert back.interventions[0].latent == 5


def test_recipe_and_prompt_from_the_link(tiny_dir):
    recipe = Recipe((Intervention("add", 2.5, latent=7),), "generated")
    at = steering(tiny_dir, recipe=recipe.to_param(), prompt="Paris is")
    assert not at.exception
    assert at.text_area(key="steer_prompt").value == "Paris is"
    assert at.radio(key="steer_positions").value == "generated"
    assert [iv.latent for _, iv in at.session_state.steer_items] == [7]


def test_bad_link_and_out_of_range_latent(tiny_dir):
    at = steering(tiny_dir, recipe="garbage")
    assert not at.exception
    assert any("Ignored recipe in the link" in plain(w.value) for w in at.warning)
    wide = Recipe((Intervention("clamp", 1.0, latent=500),))
    at = steering(tiny_dir, recipe=wide.to_param())
    assert not at.exception
    assert any("out of range" in plain(e.value) for e in at.error)
    at.button(key="steer_generate").click().run()
    assert not at.exception
    assert "steer_out" not in at.session_state


def test_sweep_and_concept_vector(tiny_dir):
    at = steering(tiny_dir)
    at.number_input(key="steer_new_latent").set_value(3)
    at.radio(key="steer_new_kind").set_value("add").run()
    at.button(key="steer_add_latent").click().run()
    assert not at.exception
    at.slider(key="steer_max_new").set_value(6)
    at.number_input(key="steer_sweep_n").set_value(3)
    at.button(key="steer_sweep_run").click().run()
    assert not at.exception, at.exception
    label, sw = at.session_state.steer_sweep
    assert len(sw.kl) == 3

    at.button(key="steer_cav_train").click().run()  # the shipped sentiment set
    assert not at.exception
    assert any("cross-validated accuracy" in plain(s.value) for s in at.success)
    at.text_area(key="steer_caa_pairs").set_value("no separator here")
    at.button(key="steer_caa_make").click().run()
    assert any("positive text | negative text" in plain(e.value) for e in at.error)


def test_pick_a_latent_by_label(tiny_dir, tmp_path, monkeypatch):
    from core.labels import LabelStore

    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    make_index(tiny_dir)
    scope = LabelStore.scope("tiny-gpt2", SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")))
    LabelStore().set(scope, 17, "fox detector")
    at = steering(tiny_dir)
    at.text_input(key="steer_search").set_value("detector").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="steer_pick").value == 17
    assert at.number_input(key="steer_new_latent").value == 17
    at.button(key="steer_add_latent").click().run()
    assert [iv.latent for _, iv in at.session_state.steer_items] == [17]
    assert at.session_state.steer_items[0][1].max_act is not None  # from the index


def test_bad_fields_in_a_link_are_one_clear_message(tiny_dir):
    bad_max = base64.urlsafe_b64encode(zlib.compress(json.dumps({"interventions": [
        {"kind": "clamp", "latent": 3, "value": 1.0, "max_act": "abc"}]}).encode())).decode()
    at = steering(tiny_dir, recipe=bad_max)
    assert not at.exception, at.exception
    assert any("'max_act' must be a number" in plain(w.value) for w in at.warning)
    at.run()  # and the session keeps working on the next rerun
    assert not at.exception
    bomb = base64.urlsafe_b64encode(zlib.compress(b"[" + b" " * (20 << 20) + b"]", 9)).decode()
    at = steering(tiny_dir, recipe=bomb)
    assert not at.exception
    assert any("expands beyond" in plain(w.value) for w in at.warning)


def test_a_vector_of_the_wrong_length_is_refused_with_the_fix(tiny_dir):
    short = Recipe((Intervention("vector", 1.0, vector=ConceptVector(
        "![](http://127.0.0.1:9/x.png)", "blocks.1.hook_resid_post", torch.ones(1))),))
    at = steering(tiny_dir, recipe=short.to_param())
    assert not at.exception, at.exception
    assert any("has 1 values but blocks.1.hook_resid_post" in plain(e.value) for e in at.error)
    shown = " ".join(m.value for m in at.markdown)
    assert "![](http" not in shown  # the vector's name is text, not an image
    at.button(key="steer_generate").click().run()
    assert not at.exception
    assert "steer_out" not in at.session_state


def test_sweep_range_follows_its_intervention(tiny_dir, monkeypatch):
    """Replace the clamp on one latent by a clamp on another: "To" follows (3× the new max)."""
    import ui.steering_view as view

    tops = {2: 3884.3, 9: 120.0}  # max activations as an index of a real SAE has them
    monkeypatch.setattr(view, "max_act", lambda index, name, latent: tops[latent])
    at = steering(tiny_dir)
    for latent in (2, 9):
        if at.session_state.steer_items:  # replace the intervention by another latent
            at.button(key=f"steer_rm_{at.session_state.steer_items[0][0]}").click().run()
        at.number_input(key="steer_new_latent").set_value(latent)
        at.button(key="steer_add_latent").click().run()
        assert not at.exception, at.exception
        (_, iv), = at.session_state.steer_items
        assert iv.latent == latent and iv.max_act == tops[latent]
        assert at.number_input(key="steer_sweep_lo").value == 0.0
        assert at.number_input(key="steer_sweep_hi").value == pytest.approx(3 * tops[latent])
        assert any("0× to 3× its max activation" in c.value for c in at.caption)


def test_sweep_plot_says_what_after_means_and_tables_round():
    from core.steering import Sweep
    from ui.steering_view import sweep_figure, sweep_table

    sw = Sweep([0.0, 3884.3333333, 7768.6666667], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0],
               [0.0, 0.0516, 0.1032], ["a", "b", "c"], "base")
    fig = sweep_figure(sw, Intervention("clamp", 100.0, latent=3))
    names = [t.name for t in fig.data]
    assert any("after the intervention" in n and "later layers" in n for n in names)
    assert "the clamp value written" in names
    assert fig.layout.yaxis2.overlaying is None  # KL on a panel of its own, not a second axis
    assert fig.layout.yaxis.rangemode == "tozero" and fig.layout.yaxis2.tickformat
    assert sweep_table(sw)["strength"].tolist() == [0.0, 3884.0, 7769.0]


def test_max_new_tokens_is_bounded_and_says_its_limit(tiny_dir):
    from core.steering import MAX_NEW_TOKENS

    at = steering(tiny_dir)
    widget = at.slider(key="steer_max_new")
    assert (widget.min, widget.max) == (1, MAX_NEW_TOKENS)
    assert f"1 to {MAX_NEW_TOKENS}" in widget.label


def test_the_card_names_a_latent_both_ways(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    make_index(tiny_dir)
    at = steering(tiny_dir, recipe=Recipe((Intervention("clamp", 2.0, latent=5),)).to_param())
    assert not at.exception, at.exception
    (card,) = [plain(c.value) for c in at.caption if "logit lens:" in plain(c.value)]
    assert "fires on:" in card


def test_stop_keeps_the_text_so_far_and_leaves_no_hooks(tiny_dir, monkeypatch):
    from streamlit.runtime.scriptrunner_utils.exceptions import StopException

    import ui.steering_view as view
    from tests.conftest import leftover_hooks

    drawn = []
    box = view.text_box

    def interrupted(text, prompt):  # Stop's click lands while a token is drawn
        drawn.append(text)
        if len(drawn) == 6:
            raise StopException()
        return box(text, prompt)

    monkeypatch.setattr(view, "text_box", interrupted)
    at = steering(tiny_dir, recipe=Recipe((Intervention("clamp", 2.0, latent=5),)).to_param())
    at.slider(key="steer_max_new").set_value(30)
    at.button(key="steer_generate").click().run()
    prompt, _, texts = at.session_state.steer_stopped
    assert "steer_out" not in at.session_state
    assert all(texts) and leftover_hooks(at.session_state.model.model) == []
    monkeypatch.setattr(view, "text_box", box)
    at.run()
    assert not at.exception, at.exception
    assert any(c.value.startswith("Stopped") for c in at.caption)
    assert at.button(key="steer_stop") is not None
