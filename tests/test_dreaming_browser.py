"""The Dreaming page in a real browser: Start, watch the plots update, Stop (tiny GPT-2)."""

from __future__ import annotations

import os
import re
import time

import pytest

from tests.conftest import open_page

pytestmark = pytest.mark.browser


def metric(page, label: str) -> str:
    box = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    return box.locator('[data-testid="stMetricValue"]').inner_text()


def wait_plots(page, n: int, timeout: float) -> None:
    """Wait until ``n`` plots show at once; on a timeout, say what the page held instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.locator(".js-plotly-plot >> visible=true").count() >= n:
            return
        time.sleep(0.25)
    plots = page.locator(".js-plotly-plot")
    errors = page.locator('[data-testid="stException"], [data-testid="stAlert"]').all_inner_texts()
    raise AssertionError(
        f"{n} plots never showed at once in {timeout:.0f} s: {plots.count()} in the page, "
        f"{page.locator('.js-plotly-plot >> visible=true').count()} visible; "
        f"captions {page.locator('[data-testid=stCaptionContainer]').all_inner_texts()[:4]}; "
        f"alerts {errors[:3]}")


def test_dreaming_updates_live_and_stops(server, browser, tmp_path):
    page = open_page(browser, f"{server}/dreaming?latent=5")
    page.get_by_role("heading", name="Dreaming").wait_for(timeout=60_000)
    page.get_by_text("Parameters").click()
    iters = page.get_by_label("Iterations")
    iters.fill("3000")
    iters.press("Enter")
    page.get_by_label("Initial prompt (empty: the model writes one)").fill("The quick brown fox")
    page.get_by_label("Initial prompt (empty: the model writes one)").press("Enter")
    time.sleep(1)
    page.get_by_role("button", name="Start", exact=True).click()
    page.get_by_text("Strongest activation").first.wait_for(timeout=60_000)
    # three plots shown while it runs (they redraw every few seconds, each time mounted afresh)
    wait_plots(page, 3, 60)
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(set(seen)) < 3:
        seen.append(int(metric(page, "Iteration")))
        time.sleep(0.7)
    assert len(set(seen)) >= 3 and seen == sorted(seen), seen  # the count rises, live
    page.get_by_role("button", name="Stop").click()
    page.get_by_text(re.compile(r"Stopped after \d+ of 3000 iterations")).wait_for(timeout=30_000)
    stopped = int(metric(page, "Iteration"))
    time.sleep(1.5)
    assert int(metric(page, "Iteration")) == stopped < 3000  # it really stopped
    wait_plots(page, 3, 60)
    assert page.get_by_role("button", name="History as CSV").count() == 1
    assert page.locator(".tokens span.t").count() > 0  # best prompt, highlighted
    assert page.locator('[data-testid="stException"]').count() == 0
    page.screenshot(path=str(os.environ.get("SCREENSHOT_DIR", tmp_path)) + "/dreaming.png",
                    full_page=True)
    page.close()
