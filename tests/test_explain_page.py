"""AppTest of the Lookup page's explanation panel: patch scoping on the tiny model, autointerp
against the loopback server, and what it says with no endpoint."""

from __future__ import annotations

import pytest
from markdown_it import MarkdownIt

from core.labels import LabelStore
from core.saes import SaeSpec
from tests.conftest import make_index, plain, tiny_page
from tests.test_autointerp import KEY, FakeLLM

ENDPOINT_VARS = ("SAE_WORKBENCH_LLM_BASE_URL", "OPENAI_BASE_URL", "SAE_WORKBENCH_LLM_API_KEY",
                 "OPENAI_API_KEY", "SAE_WORKBENCH_LLM_MODEL")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    for name in ENDPOINT_VARS:
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def scope(tiny_dir) -> str:
    return LabelStore.scope("tiny-gpt2", SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")))


def test_without_an_endpoint_autointerp_says_so_and_patch_scoping_works(tiny_dir, cache):
    from ui.resources import label_store

    make_index(tiny_dir)
    at = tiny_page(tiny_dir, "lookup", latent="5")
    assert not at.exception, at.exception
    assert any("No autointerp endpoint is configured" in plain(i.value) for i in at.info)
    at.text_area(key="lookup_ps_prompt").set_value('The word "<unk>" means').run()
    assert any("Typical activation norm at blocks.1.hook_resid_post" in c.value
               for c in at.caption)
    at.button(key="lookup_ps_suggest").click().run()
    assert len(at.text_input(key="lookup_ps_norms").value.split(",")) == 4
    at.slider(key="lookup_ps_tokens").set_value(4).run()
    at.button(key="lookup_ps_run").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert sum(m.value.startswith("**norm ") for m in at.markdown) == 4  # side by side
    stored = label_store().explanations(scope(tiny_dir), [5], ("patchscope",))
    assert {e.params["prompt"] for e in stored} == {'The word "<unk>" means'}
    at.run()
    table = next(d.value for d in at.dataframe if "detection score" in d.value.columns)
    assert "patch scoping" in set(table["source"]) and "fires on" in set(table["source"])
    # a bad norm is refused with the fix
    at.text_input(key="lookup_ps_norms").set_value("10, lots").run()
    assert any("give numbers separated by commas" in plain(e.value) for e in at.error)


def test_autointerp_from_the_page_against_the_loopback_server(tiny_dir, cache, monkeypatch):
    make_index(tiny_dir)
    llm = FakeLLM()
    llm.explanation = "This neuron fires on ![x](http://127.0.0.1:9/p.png) **fox**"
    try:
        monkeypatch.setenv("SAE_WORKBENCH_LLM_BASE_URL", llm.url)
        monkeypatch.setenv("SAE_WORKBENCH_LLM_MODEL", "explainer-1")
        monkeypatch.setenv("SAE_WORKBENCH_LLM_API_KEY", KEY)
        at = tiny_page(tiny_dir, "lookup", latent="5")
        assert not at.exception, at.exception
        assert any("…cdef" in c.value for c in at.caption)
        at.button(key="lookup_ai_one").click().run()
        assert not at.exception, at.exception
        assert len(llm.requests) == 2
        (done,) = [s.value for s in at.success]
        rendered = MarkdownIt("commonmark").render(done)
        assert "<img" not in rendered and "<strong>" not in rendered
        assert "detection score" in done
        at.run()
        table = next(d.value for d in at.dataframe if "detection score" in d.value.columns)
        row = table[table["source"] == "autointerp"].iloc[0]
        assert row["explanation"] == "![x](http://127.0.0.1:9/p.png) **fox**"
        assert 0 <= row["detection score"] <= 1 and row["made with"] == "explainer-1"
        best = [m.value for m in at.markdown if m.value.startswith("**Best:**")]
        assert best and "<img" not in MarkdownIt("commonmark").render(best[0])
        # asking again: cached, no new request
        at.button(key="lookup_ai_one").click().run()
        assert len(llm.requests) == 2
        assert any("already had an explanation" in i.value for i in at.info)
        # the batch shows its estimate before it runs
        at.radio(key="lookup_ai_how").set_value("listed").run()
        at.text_input(key="lookup_ai_list").set_value("5, 7, 9").run()
        assert any("1 of 3 already explained" in c.value and "4 requests" in c.value
                   for c in at.caption)
        every = " ".join(str(e.value) for e in at.main if hasattr(e, "value"))
        assert KEY not in every  # the key is never shown back
        llm.mode = "401"
        at.button(key="lookup_ai_many").click().run()
        assert not at.exception
        assert any("refused the key" in plain(e.value) for e in at.error)
        at.run()
        table = next(d.value for d in at.dataframe if "detection score" in d.value.columns)
        assert "autointerp" in set(table["source"])  # nothing lost
    finally:
        llm.close()


def test_the_servers_key_never_goes_to_a_url_typed_in_the_sidebar(monkeypatch):
    from streamlit.testing.v1 import AppTest

    def app():
        import streamlit as st

        from ui.explain_view import current_endpoint

        ep, problem = current_endpoint()
        st.write(f"{ep.where}|{ep.api_key}" if ep else problem)

    for name in ENDPOINT_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SAE_WORKBENCH_LLM_BASE_URL", "http://127.0.0.1:8080/v1")
    monkeypatch.setenv("SAE_WORKBENCH_LLM_API_KEY", KEY)
    at = AppTest.from_function(app, default_timeout=120).run()
    assert at.markdown[0].value == f"http://127.0.0.1:8080/v1|{KEY}"
    at.session_state["llm_base_url"] = "http://attacker.example/v1"
    at.run()
    assert at.markdown[0].value == "http://attacker.example/v1|"
    at.session_state["llm_key"] = "sk-mine"
    at.run()
    assert at.markdown[0].value == "http://attacker.example/v1|sk-mine"
