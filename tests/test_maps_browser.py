"""The Feature maps page in a real browser: compute a map of the sidebar's SAE, see it drawn,
click a point to open its Lookup page."""

from __future__ import annotations

import os
import time

import pytest
from playwright.sync_api import expect

from tests.conftest import ROOT, open_page

pytestmark = pytest.mark.browser
POINT = """([name, i]) => {
  const gd = document.querySelector('.js-plotly-plot');
  const L = gd._fullLayout, trace = gd._fullData.find(t => t.name === name);
  const box = gd.getBoundingClientRect();
  return {x: box.left + L._size.l + L.xaxis.l2p(trace.x[i]),
          y: box.top + L._size.t + L.yaxis.l2p(trace.y[i])};
}"""
# UMAP's numba code compiles once into this ignored folder, not once per temporary cache dir.
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".pytest_cache" / "numba"))


def settle(page, timeout: float = 30.0) -> None:
    """Wait until the app is idle: no script run going (Streamlit's running-man widget gone)."""
    deadline = time.monotonic() + timeout
    page.wait_for_timeout(500)
    while time.monotonic() < deadline:
        if not page.locator('[data-testid="stStatusWidget"]').is_visible():
            return
        page.wait_for_timeout(250)


def click_point(page, name: str, i: int) -> None:
    """Click point ``i`` of trace ``name`` once the app is idle (a rerun that is still drawing
    can remount the chart under the mouse)."""
    settle(page)
    page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
    where = page.evaluate(POINT, [name, i])
    page.mouse.move(where["x"], where["y"])
    page.mouse.click(where["x"], where["y"])


def test_map_is_computed_and_drawn(server, browser):
    page = open_page(browser, f"{server}/maps")
    page.get_by_role("heading", name="Feature maps").wait_for(timeout=60_000)
    family = page.locator('[data-testid="stTextArea"] textarea').first
    family.wait_for(timeout=30_000)
    assert "sae-gpt2-l1" in family.input_value()  # the sidebar's SAE is the default member
    page.get_by_role("button", name="Compute map").click()
    page.get_by_text("64 latents from sae-gpt2-l1").wait_for(timeout=120_000)
    plot = page.locator(".js-plotly-plot").first
    plot.wait_for(timeout=30_000)
    points = plot.locator(".scatterlayer .point, canvas")
    points.first.wait_for(timeout=30_000)
    assert points.count() > 0 and plot.bounding_box()["height"] > 300
    page.get_by_text("One SAE: a map without lineage").wait_for(timeout=10_000)
    assert page.locator('[data-testid="stException"]').count() == 0
    page.screenshot(path=str(os.environ.get("SCREENSHOT_DIR", "/tmp")) + "/maps.png",
                    full_page=True)

    # in lineage mode a click picks the latent whose lineage is shown
    page.get_by_text("shows lineage").click()
    latent = page.get_by_label("Latent", exact=True)
    expect(latent).to_have_value("0", timeout=30_000)
    click_point(page, "sae-gpt2-l1", 9)
    expect(latent).to_have_value("9", timeout=30_000)
    page.get_by_text("sae-gpt2-l1 #9 · cluster").wait_for(timeout=10_000)

    # clicking latent 5 opens its Lookup page
    page.get_by_text("opens Lookup").click()
    click_point(page, "sae-gpt2-l1", 5)
    page.get_by_role("heading", name="Feature lookup").wait_for(timeout=60_000)
    assert "latent=5" in page.url
    page.get_by_text("Firing rate").first.wait_for(timeout=30_000)
    assert page.locator('[data-testid="stException"]').count() == 0
    page.close()
