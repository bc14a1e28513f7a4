"""The running app in a real browser: `streamlit run app.py` on 127.0.0.1 driven by Playwright."""

from __future__ import annotations

import os

import pytest

from tests.conftest import open_page

pytestmark = pytest.mark.browser


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


def test_pages_keep_their_place_and_links_carry_the_sae(server, browser):
    """Lookup → Steering → Lookup: the latent and the prompt survive, the URL shows them (a new
    tab on it lands on the same place), and every link to a latent names its SAE."""
    page = open_page(browser, f"{server}/lookup?latent=5")
    page.get_by_role("heading", name="Top").first.wait_for(timeout=60_000)
    from playwright.sync_api import expect

    latent_input = page.get_by_role("spinbutton", name="Latent", exact=True)
    expect(latent_input).to_have_value("5", timeout=30_000)
    links = page.locator('a[href*="latent="]')
    links.first.wait_for(timeout=30_000)
    hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
    assert hrefs and all("sae=local" in h for h in hrefs), hrefs

    page.get_by_role("link", name="Steering").first.click()
    page.get_by_role("heading", name="Interventions").wait_for(timeout=30_000)
    prompt = page.get_by_role("textbox", name="Prompt")
    prompt.fill("The fox ran")
    prompt.press("Control+Enter")
    page.wait_for_url("**prompt=The+fox+ran**", timeout=30_000)
    steering_url = page.url

    page.get_by_role("link", name="Feature lookup").first.click()
    page.get_by_role("heading", name="Top").first.wait_for(timeout=60_000)
    expect(latent_input).to_have_value("5", timeout=30_000)
    page.wait_for_url("**latent=5**", timeout=30_000)

    assert page.locator('[data-testid="stException"]').count() == 0
    page.close()

    shared = open_page(browser, steering_url)  # the URL is the place: a new tab lands on it
    shared.get_by_role("heading", name="Interventions").wait_for(timeout=60_000)
    expect(shared.get_by_role("textbox", name="Prompt")).to_have_value("The fox ran",
                                                                       timeout=30_000)
    shared.close()
