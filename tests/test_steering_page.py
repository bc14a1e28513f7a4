"""AppTest of the Steering page on the tiny GPT-2 and its SAE."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from core.steering import Intervention, Recipe
from tests.conftest import make_index, tiny_page


def steering(tiny_dir, **query) -> AppTest:
    return tiny_page(tiny_dir, "steering", **query)


def test_add_a_clamp_and_generate(tiny_dir):
    at = steering(tiny_dir)
    assert not at.exception
    assert "None yet" in "\n".join(c.value for c in at.caption)
    at.number_input(key="steer_new_latent").set_value(5)
    at.button(key="steer_add_latent").click().run()
    assert not at.exception
    (slider,) = [s for s in at.slider if s.key.startswith("steer_val_")]
    slider.set_value(6.0).run()
    at.number_input(key="steer_max_new").set_value(8)
    at.button(key="steer_generate").click().run()
    assert not at.exception, at.exception
    prompt, recipe, res, scored = at.session_state.steer_out
    assert recipe.interventions[0].latent == 5 and recipe.interventions[0].value == 6.0
    assert len(res.texts) == 2 and all(0 < len(r) <= 8 for r in res.rows)
    assert any("tokens/s" in c.value for c in at.caption)
    assert "What else moved" in "\n".join(m.value for m in at.markdown)
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
    assert any("Ignored recipe in the link" in w.value for w in at.warning)
    wide = Recipe((Intervention("clamp", 1.0, latent=500),))
    at = steering(tiny_dir, recipe=wide.to_param())
    assert not at.exception
    assert any("out of range" in e.value for e in at.error)
    at.button(key="steer_generate").click().run()
    assert not at.exception
    assert "steer_out" not in at.session_state


def test_sweep_and_concept_vector(tiny_dir):
    at = steering(tiny_dir)
    at.number_input(key="steer_new_latent").set_value(3)
    at.radio(key="steer_new_kind").set_value("add").run()
    at.button(key="steer_add_latent").click().run()
    assert not at.exception
    at.number_input(key="steer_max_new").set_value(6)
    at.number_input(key="steer_sweep_n").set_value(3)
    at.button(key="steer_sweep_run").click().run()
    assert not at.exception, at.exception
    label, sw = at.session_state.steer_sweep
    assert len(sw.kl) == 3

    at.button(key="steer_cav_train").click().run()  # the shipped sentiment set
    assert not at.exception
    assert any("cross-validated accuracy" in s.value for s in at.success)
    at.text_area(key="steer_caa_pairs").set_value("no separator here")
    at.button(key="steer_caa_make").click().run()
    assert any("positive text | negative text" in e.value for e in at.error)


def test_pick_a_latent_by_label(tiny_dir, tmp_path, monkeypatch):
    from core.labels import LabelStore

    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    make_index(tiny_dir)
    LabelStore().set(LabelStore.scope("tiny-gpt2", "sae-gpt2-l1"), 17, "fox detector")
    at = steering(tiny_dir)
    at.text_input(key="steer_search").set_value("detector").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="steer_pick").value == 17
    assert at.number_input(key="steer_new_latent").value == 17
    at.button(key="steer_add_latent").click().run()
    assert [iv.latent for _, iv in at.session_state.steer_items] == [17]
    assert at.session_state.steer_items[0][1].max_act is not None  # from the index
