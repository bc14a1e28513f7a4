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
    page.get_by_text("This page is not built yet").wait_for(timeout=10_000)
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
    page.get_by_role("link", name="Feature maps").first.click()
    page.get_by_role("heading", name="Feature maps").wait_for(timeout=30_000)
    page.get_by_text("This page is not built yet").wait_for(timeout=10_000)
    assert "model=local" in page.url
    page.get_by_role("button", name="Load").wait_for(timeout=10_000)
    assert page.locator('[data-testid="stException"]').count() == 0
    page.close()
