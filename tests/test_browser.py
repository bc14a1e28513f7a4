"""The running app in a real browser: `streamlit run app.py` on 127.0.0.1 driven by Playwright."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.browser
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: run scripts/setup --browser (scripts/test does)")
    port = free_port()
    env = {
        **os.environ,
        "SAE_WORKBENCH_MODEL": f"local:{tiny_dir / 'tiny-gpt2'}",
        "SAE_WORKBENCH_SAE": f"local:{tiny_dir / 'sae-gpt2-l1'}",
        "HF_HUB_OFFLINE": "1",
    }
    cache = tmp_path_factory.mktemp("cache")
    env["SAE_WORKBENCH_CACHE"] = str(cache)
    _build_tiny_index(tiny_dir, cache)
    log = tmp_path_factory.mktemp("server") / "streamlit.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
             "--server.headless", "true"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"streamlit did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _build_tiny_index(tiny_dir, cache):
    from core.index import IndexConfig, build_index
    from core.feature_index import index_location
    from core.models import ModelSpec, load_model
    from core.saes import SaeSpec, load_sae
    from tests.conftest import CORPUS

    os.environ["SAE_WORKBENCH_CACHE"] = str(cache)
    try:
        lm = load_model(ModelSpec("local", str(tiny_dir / "tiny-gpt2"), device="cpu"))
        sae = load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), lm)
        path, name = index_location(lm, sae)
        texts = [CORPUS[i:] + " " + CORPUS[:i] for i in range(0, 320, 11)]
        build_index(lm, {name: sae}, texts, path, IndexConfig(context_size=16, max_tokens=600,
                                                              top_k=5, n_sample=16))
    finally:
        del os.environ["SAE_WORKBENCH_CACHE"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    return page


def test_deep_link_as_first_request_keeps_the_shell(server, browser):
    """The very first request of a fresh server opens a page by URL: sidebar and router run."""
    page = open_page(browser, f"{server}/steering")
    page.get_by_role("heading", name="Steering").wait_for(timeout=60_000)
    page.get_by_role("heading", name="Interventions").wait_for(timeout=30_000)
    page.get_by_role("button", name="Load").wait_for(timeout=10_000)
    assert page.locator('[data-testid="stException"]').count() == 0
    page.close()


def test_home_shows_the_loaded_model(server, browser, tmp_path):
    page = open_page(browser, server)
    page.get_by_text("Model: tiny-gpt2").wait_for(timeout=60_000)
    page.get_by_text("blocks.1.hook_resid_post").first.wait_for(timeout=10_000)
    assert page.locator('[data-testid="stException"]').count() == 0
    assert "model=local" in page.url and "sae=local" in page.url
    page.screenshot(path=str(os.environ.get("SCREENSHOT_DIR", tmp_path)) + "/home.png",
                    full_page=True)
    page.close()


def test_navigation_keeps_the_sidebar(server, browser):
    page = open_page(browser, server)
    page.get_by_text("Model: tiny-gpt2").wait_for(timeout=60_000)
    page.get_by_role("link", name="Steering").first.click()
    page.get_by_role("heading", name="Interventions").wait_for(timeout=30_000)
    assert "model=local" in page.url
    page.get_by_role("button", name="Load").wait_for(timeout=10_000)
    assert page.locator('[data-testid="stException"]').count() == 0
    page.close()


def test_lookup_opens_a_latent_with_highlighted_contexts(server, browser):
    page = open_page(browser, f"{server}/lookup?latent=5")
    page.get_by_role("heading", name="Top").first.wait_for(timeout=60_000)
    highlighted = page.locator(".tokens span.t[style*='rgba']")
    highlighted.first.wait_for(timeout=30_000)
    assert highlighted.count() > 0
    assert "activation" in highlighted.first.get_attribute("title")
    assert page.locator('[data-testid="stException"]').count() == 0
    page.screenshot(path=str(os.environ.get("SCREENSHOT_DIR", "/tmp")) + "/lookup.png",
                    full_page=True)
    page.close()


def test_steering_generates_baseline_and_steered(server, browser):
    from core.steering import Intervention, Recipe

    recipe = Recipe((Intervention("clamp", 20.0, latent=2),))
    page = open_page(browser, f"{server}/steering?recipe={recipe.to_param()}&prompt=The%20fox")
    page.get_by_role("link", name="Clamp latent #2").wait_for(timeout=60_000)
    page.get_by_role("button", name="Generate baseline and steered").click()
    page.get_by_text("tokens/s").wait_for(timeout=60_000)
    page.get_by_text("What else moved").wait_for(timeout=30_000)
    assert page.get_by_text("The fox").count() >= 2  # the prompt heads both outputs
    assert page.locator('[data-testid="stException"]').count() == 0
    page.screenshot(path=str(os.environ.get("SCREENSHOT_DIR", "/tmp")) + "/steering.png",
                    full_page=True)
    page.close()
