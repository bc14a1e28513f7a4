"""AppTest of the shell: the router, the sidebar picker, the home page and query parameters."""

from __future__ import annotations


import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT, build_sae, plain, serve


def app(**query) -> AppTest:
    """The app opened by a link with ``query``; the link's model and SAE are the defaults."""
    if "model" in query:
        serve(query["model"], query.get("sae"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    for key, value in query.items():
        at.query_params[key] = value
    return at.run()


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [str(m.value) for m in at.metric]
    parts += [m.label for m in at.metric] + [s.value for s in at.subheader]
    parts += [c.value for c in at.caption] + [t.value for t in at.title]
    return "\n".join(parts)


def test_home_shows_loaded_model_and_sae(tiny_dir):
    at = app(model=f"local:{tiny_dir / 'tiny-gpt2'}", sae=f"local:{tiny_dir / 'sae-gpt2-l1'}",
             device="cpu")
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    shown = texts(at)
    assert "Model: tiny-gpt2" in shown
    assert "`blocks.1.hook_resid_post`" in shown and "64" in shown
    assert "memory-mapped" in " ".join(c.value for c in at.caption)  # why RSS < weights


def test_bad_query_params_are_ignored_with_a_notice(tiny_dir):
    at = app(model=f"local:{tiny_dir / 'tiny-gpt2'}", device="tpu", sae="bogus")
    assert not at.exception
    notices = " ".join(plain(w.value) for w in at.warning)
    assert "Ignored device='tpu'" in notices and "sae='bogus'" in notices
    assert "Model: tiny-gpt2" in texts(at)


def test_load_errors_are_shown_and_the_app_keeps_working(tiny_dir):
    at = app(model=f"local:{tiny_dir / 'missing'}")
    assert not at.exception
    assert any("must hold config.json" in plain(e.value) for e in at.error)
    assert any("No model is loaded" in i.value for i in at.info)


def test_sae_mismatch_is_reported(tiny_dir, tmp_path):
    build_sae(16, 8, "blocks.0.hook_resid_post", "tiny-gpt2").save_model(tmp_path / "bad")
    at = app(model=f"local:{tiny_dir / 'tiny-gpt2'}", sae=f"local:{tmp_path / 'bad'}")
    assert not at.exception
    assert any("expects d_in=16" in plain(e.value) for e in at.error)
    assert "Model: tiny-gpt2" in texts(at)


def test_sidebar_load_switches_model_and_mirrors_the_url(tiny_dir):
    at = app(model=f"local:{tiny_dir / 'tiny-gpt2'}", sae="none")
    at.sidebar.text_input(key="pick_model_name").set_value(str(tiny_dir / "tiny-gemma3"))
    at.sidebar.radio(key="pick_sae_source").set_value("local")
    at.run()
    at.sidebar.text_input(key="pick_sae_local").set_value(str(tiny_dir / "sae-gemma3-l1"))
    at.sidebar.button(key="pick_load").click().run()
    assert not at.exception
    assert "Model: tiny-gemma3" in texts(at)
    assert "SAE: sae-gemma3-l1" in texts(at)
    assert at.query_params["model"] == f"local:{tiny_dir / 'tiny-gemma3'}"
    assert at.query_params["sae"] == f"local:{tiny_dir / 'sae-gemma3-l1'}"


@pytest.mark.parametrize("page", ["steering", "dreaming", "maps"])
def test_pages_without_an_sae_keep_working(tiny_dir, page):
    at = app(model=f"local:{tiny_dir / 'tiny-gpt2'}", sae="none")
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, at.exception


def test_a_link_to_another_sae_preselects_it_and_loads_on_click(tiny_dir, tmp_path):
    build_sae(32, 16, "blocks.0.hook_resid_post", "tiny-gpt2").save_model(tmp_path / "narrow")
    at = app(model=f"local:{tiny_dir / 'tiny-gpt2'}", sae=f"local:{tiny_dir / 'sae-gpt2-l1'}")
    assert "SAE: sae-gpt2-l1" in texts(at)
    at.query_params["sae"] = f"local:{tmp_path / 'narrow'}"  # what st.page_link(sae=...) does
    at.run()
    assert not at.exception
    assert "SAE: none" in texts(at)  # not loaded by the link ...
    assert any("asks for SAE narrow" in plain(i.value) and "Press Load" in plain(i.value)
               for i in at.info)
    assert at.sidebar.text_input(key="pick_sae_local").value == str(tmp_path / "narrow")
    assert at.query_params["model"] == f"local:{tiny_dir / 'tiny-gpt2'}"  # model kept
    at.sidebar.button(key="pick_load").click().run()  # ... but by the click
    assert not at.exception
    assert "SAE: narrow" in texts(at)
    at.run()  # and it stays
    assert "SAE: narrow" in texts(at)
    # a link back to an SAE the server holds switches without a click
    at.query_params["sae"] = f"local:{tiny_dir / 'sae-gpt2-l1'}"
    at.run()
    assert "SAE: sae-gpt2-l1" in texts(at) and not at.info


def test_a_link_naming_another_model_does_not_load_it(tiny_dir):
    from ui.state import model_pool

    model_pool().clear()
    at = app(model=f"local:{tiny_dir / 'tiny-gpt2'}", sae="none")
    assert "Model: tiny-gpt2" in texts(at)
    assert "Models held: 1 of 2" in texts(at)
    other = f"local:{tiny_dir / 'tiny-gemma3'}"
    at.query_params["model"] = other
    at.run()
    assert not at.exception
    assert any("asks for model" in plain(i.value) and "tiny-gemma3" in plain(i.value)
               for i in at.info)
    assert [m.spec.name for m in model_pool().held()] == [str(tiny_dir / "tiny-gpt2")]
    assert at.sidebar.text_input(key="pick_model_name").value == str(tiny_dir / "tiny-gemma3")
    # a link that differs only in dtype names the model already held: no second copy
    fresh = app(model=f"local:{tiny_dir / 'tiny-gpt2'}", sae="none")
    fresh.query_params["dtype"] = "float32"
    fresh.run()
    assert "Model: tiny-gpt2" in texts(fresh) and len(model_pool().held()) == 1
    at.sidebar.button(key="pick_load").click().run()
    assert "Model: tiny-gemma3" in texts(at)
    assert "Models held: 2 of 2" in texts(at)


def test_models_held_are_bounded(tiny_dir, monkeypatch):
    from ui.state import model_pool

    model_pool().clear()
    monkeypatch.setenv("SAE_WORKBENCH_MAX_MODELS", "1")
    first = app(model=f"local:{tiny_dir / 'tiny-gpt2'}", sae="none")
    second = app(model=f"local:{tiny_dir / 'tiny-gemma3'}", sae="none")
    assert "Model: tiny-gemma3" in texts(second) and "Models held: 1 of 1" in texts(second)
    assert len(model_pool().held()) == 1
    first.run()  # the first session's model was dropped: it says so instead of holding a copy
    assert not first.exception
    assert any("was unloaded to make room" in plain(e.value) for e in first.error)
    assert len(model_pool().held()) == 1


def test_local_paths_in_links_are_refused_outside_allowed_dirs(tiny_dir, tmp_path, monkeypatch):
    at = app(model=f"local:{tiny_dir / 'tiny-gpt2'}", sae="none")
    monkeypatch.setenv("SAE_WORKBENCH_ALLOWED_DIRS", str(tmp_path / "models"))
    notices = []
    for path in ("/etc", "/no/such/dir", str(tiny_dir / "tiny-gemma3")):
        link = app(model=f"local:{tiny_dir / 'tiny-gpt2'}", sae="none")
        link.query_params["model"] = f"local:{path}"
        link.query_params["sae"] = f"local:{path}"
        link.run()
        assert not link.exception
        shown = " ".join(plain(w.value) for w in link.warning)
        assert f"model=local:{path} is refused" in shown and f"sae=local:{path} is refused" in shown
        assert "SAE_WORKBENCH_ALLOWED_DIRS" in shown or str(tmp_path / "models") in shown
        assert "Model: tiny-gpt2" in texts(link)  # the app keeps working on what it had
        notices.append(shown.replace(path, "<path>"))
    assert len(set(notices)) == 1  # nothing reveals whether a path exists
    assert not at.exception


def test_lookup_without_sae_asks_for_one(tiny_dir):
    at = app(model=f"local:{tiny_dir / 'tiny-gpt2'}", sae="none")
    at.switch_page("views/lookup.py").run()
    assert not at.exception
    assert any("Load a model and an SAE" in i.value for i in at.info)


def test_password_gate(tiny_dir, monkeypatch):
    monkeypatch.setenv("SAE_WORKBENCH_PASSWORD", "s3cret")
    at = app(model=f"local:{tiny_dir / 'tiny-gpt2'}")
    assert "Model: tiny-gpt2" not in texts(at)
    at.text_input(key="auth_password").set_value("wrong").run()
    assert any("Wrong password" in e.value for e in at.error)
    at.text_input(key="auth_password").set_value("s3cret").run()
    assert not at.exception
    assert "Model: tiny-gpt2" in texts(at)


def test_pages_hold_no_bare_strings_that_streamlit_would_print():
    """Streamlit's magic writes every bare string expression of a page onto the page; only
    docstrings (the first statement of a module, class or function) are left out."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    stray = []
    for path in [root / "app.py", *sorted((root / "views").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        docstrings = {id(body[0]) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
                      and (body := node.body)}
        stray += [f"{path.name}:{node.lineno}" for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                  and isinstance(node.value.value, str) and id(node) not in docstrings]
    assert not stray, f"bare strings Streamlit would print: {stray}"
