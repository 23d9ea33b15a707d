"""The playground page in headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from tests.integration.harness import sdxl_stats

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "out" / "screenshots"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, local_url: str) -> Page:
    page = browser.new_page(viewport={"width": 1000, "height": 720})
    page.goto(f"{local_url}/")
    yield page
    page.close()


def fill(page: Page, **fields: str) -> None:
    for field, value in fields.items():
        page.fill(f"#{field}", value)


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    return path


def test_previews_update_live_then_final_image(page: Page) -> None:
    fill(page, prompt="a red fox", num_inference_steps="30", preview_interval="3", width="512", height="512", seed="7")
    page.click("#generate")
    page.wait_for_selector("body[data-state=preview]", timeout=60_000)
    assert page.get_attribute("#image", "src").startswith("data:image/jpeg;base64,")
    assert "of 30 (preview)" in page.text_content("#status")
    assert page.is_enabled("#cancel")
    screenshot(page, "playground-preview")

    page.wait_for_selector("body[data-state=final]", timeout=60_000)
    assert "seed 7" in page.text_content("#status")
    assert page.eval_on_selector("#progress", "p => p.value === p.max")
    assert page.eval_on_selector("#image", "img => img.naturalWidth") == 512
    assert page.text_content("#error") == ""
    screenshot(page, "playground-final")


def test_a_queued_job_is_watched_with_its_previews_to_its_result(page: Page, browser, local_url: str) -> None:
    """ "Queue it" submits through fal's queue API and watches the job's status stream with previews;
    "Watch" follows any queued job by its request id, here from a second page."""
    fill(page, prompt="a red fox", num_inference_steps="30", preview_interval="3", width="512", height="512", seed="9")
    page.click("#queue")
    page.wait_for_selector("body[data-state=preview]", timeout=60_000)
    request_id = page.input_value("#watch_id")
    viewer = browser.new_page(viewport={"width": 1000, "height": 720})
    viewer.goto(f"{local_url}/")
    viewer.fill("#watch_id", request_id)
    viewer.click("#watch")
    screenshot(page, "playground-queued-preview")
    for watching in (page, viewer):
        watching.wait_for_selector("body[data-state=final]", timeout=60_000)
        assert "seed 9" in watching.text_content("#status") and watching.text_content("#error") == ""
        assert watching.get_attribute("#image", "src").startswith(f"{local_url}/files/")
        assert watching.eval_on_selector("#image", "img => img.naturalWidth") == 512
    viewer.close()


def test_cancel_stops_the_work(page: Page) -> None:
    before = sdxl_stats("sdxl")
    fill(page, num_inference_steps="50", preview_interval="1", width="512", height="512")
    page.click("#generate")
    page.wait_for_selector("body[data-state=preview]", timeout=60_000)
    page.click("#cancel")
    page.wait_for_selector("body[data-state=cancelled]", timeout=10_000)
    after = sdxl_stats("sdxl")
    assert after["outcomes"].get("cancelled", 0) - before["outcomes"].get("cancelled", 0) == 1
    assert after["steps_run"] - before["steps_run"] < 50


def test_errors_are_shown(page: Page) -> None:
    fill(page, prompt="   ")  # passes the form's `required`, fails the server's validation
    page.click("#generate")
    page.wait_for_selector("body[data-state=error]", timeout=30_000)
    error = page.text_content("#error")
    assert "422 validation_error" in error and "prompt" in error and "non-whitespace" in error
    screenshot(page, "playground-error")
