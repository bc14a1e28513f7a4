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
    page.get_by_text("Best activation").first.wait_for(timeout=60_000)
    # three plots shown (a redraw may leave hidden copies in the page for a moment)
    page.locator(".js-plotly-plot >> visible=true").nth(2).wait_for(timeout=30_000)
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
    page.locator(".js-plotly-plot >> visible=true").nth(2).wait_for(timeout=30_000)
    assert page.get_by_role("button", name="History as CSV").count() == 1
    assert page.locator(".tokens span.t").count() > 0  # best prompt, highlighted
    assert page.locator('[data-testid="stException"]').count() == 0
    page.screenshot(path=str(os.environ.get("SCREENSHOT_DIR", tmp_path)) + "/dreaming.png",
                    full_page=True)
    page.close()
