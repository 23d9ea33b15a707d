"""The playground page in headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import pytest
from PIL import Image
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


# --- An input image: image to image and inpainting ------------------------------------------------

INPUT_SIZE = (256, 192)  # not the text-to-image size the form holds (512 x 512): the output must take this one


def input_png(tmp_path: Path, name: str = "input.png", size: tuple[int, int] = INPUT_SIZE) -> Path:
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    path = tmp_path / name
    image.save(path)
    return path


def record_states(page: Page) -> None:
    """Every `data-state` the page goes through, in `window.states`: a few quick steps can pass the
    preview state before a selector wait would see it."""
    page.evaluate(
        """() => {
            window.states = [];
            new MutationObserver(() => window.states.push(document.body.dataset.state))
                .observe(document.body, { attributes: true, attributeFilter: ["data-state"] });
        }"""
    )


def posted(page: Page, button: str = "#generate") -> tuple[str, dict]:
    """Click `button`; the URL and the JSON body of the POST it made."""
    with page.expect_request(lambda request: request.method == "POST") as sent:
        page.click(button)
    return sent.value.url, sent.value.post_data_json


def final_image_size(page: Page) -> tuple[int, int]:
    page.wait_for_selector("body[data-state=final]", timeout=60_000)
    assert page.text_content("#error") == ""
    page.wait_for_function(
        "() => { const i = document.getElementById('image'); return i.complete && i.naturalWidth > 0; }"
    )
    return tuple(page.eval_on_selector("#image", "img => [img.naturalWidth, img.naturalHeight]"))


def paint_a_stroke(page: Page) -> None:
    box = page.locator("#mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.4)
    page.mouse.down()
    for step in range(1, 6):
        page.mouse.move(box["x"] + box["width"] * (0.3 + step * 0.08), box["y"] + box["height"] * 0.5)
    page.mouse.up()


def decode_data_uri(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_an_input_image_streams_image_to_image_with_previews_at_its_size(page: Page, tmp_path: Path) -> None:
    assert page.is_hidden("#strength") and page.get_attribute("body", "data-task") == "text-to-image"
    errors: list[str] = []  # a CSP refusal (of a data: image, say) is logged as a console error
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.set_input_files("#image_file", input_png(tmp_path))
    page.wait_for_selector("body[data-task=image-to-image]")
    assert page.is_visible("#input_image") and page.is_visible("#strength")
    assert page.input_value("#strength") == "0.95"
    assert "256 x 192" in page.text_content("#image_info")
    fill(page, prompt="a red fox", num_inference_steps="4", preview_interval="1", seed="11")
    record_states(page)
    url, body = posted(page)
    assert url.endswith("/image-to-image/stream")
    assert body["image_url"].startswith("data:image/png;base64,") and body["strength"] == 0.95
    assert decode_data_uri(body["image_url"]).size == INPUT_SIZE
    assert not {"width", "height", "image_size", "mask_url"} & body.keys()  # the output takes the input's size

    assert final_image_size(page) == INPUT_SIZE
    assert "preview" in page.evaluate("window.states")
    assert "seed 11" in page.text_content("#status")
    assert errors == []
    screenshot(page, "playground-image-to-image")


def test_a_painted_mask_inpaints_and_clearing_goes_back_to_text_to_image(page: Page, tmp_path: Path) -> None:
    page.set_input_files("#image_file", input_png(tmp_path))
    page.wait_for_selector("body[data-task=image-to-image]")
    assert page.is_disabled("#clear_mask")
    paint_a_stroke(page)
    page.wait_for_selector("body[data-task=inpainting]")
    fill(page, prompt="a red fox", num_inference_steps="4", preview_interval="1", strength="0.75")
    record_states(page)
    url, body = posted(page)
    assert url.endswith("/inpainting/stream")
    assert body["mask_url"].startswith("data:image/png;base64,") and body["strength"] == 0.75
    mask = decode_data_uri(body["mask_url"]).convert("L")
    assert mask.size == INPUT_SIZE  # the image's natural size, not the thumbnail's
    assert mask.getextrema() == (0, 255)  # black kept, white painted
    assert final_image_size(page) == INPUT_SIZE
    assert "preview" in page.evaluate("window.states")
    screenshot(page, "playground-inpainting")

    page.click("#clear_mask")
    page.wait_for_selector("body[data-task=image-to-image]")
    assert "mask_url" not in page.evaluate("request()")
    page.click("#clear_image")
    page.wait_for_selector("body[data-task=text-to-image]")
    assert page.is_hidden("#strength") and page.is_enabled("#width")
    text = page.evaluate("request()")  # as before any image was chosen
    assert text["width"] == 512 and text["height"] == 512
    assert not {"image_url", "strength", "mask_url"} & text.keys()


def test_a_dropped_image_and_a_mask_file_are_queued_as_inpainting(page: Page, tmp_path: Path) -> None:
    dropped = base64.b64encode(input_png(tmp_path).read_bytes()).decode()
    files = page.evaluate_handle(
        """(data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            return transfer;
        }""",
        dropped,
    )
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": files})
    page.wait_for_selector("body[data-task=image-to-image]")
    mask = Image.new("L", (64, 48))  # another size: stretched onto the image's
    mask.paste(255, (0, 0, 32, 48))
    mask.save(tmp_path / "mask.png")
    page.set_input_files("#mask_file", tmp_path / "mask.png")
    page.wait_for_selector("body[data-task=inpainting]")
    fill(page, prompt="a red fox", num_inference_steps="4", preview_interval="1", seed="13")
    app_id = page.get_attribute("body", "data-app-id")
    url, body = posted(page, "#queue")
    assert url.endswith(f"/queue/{app_id}/inpainting")
    sent_mask = decode_data_uri(body["mask_url"]).convert("L")
    assert sent_mask.size == INPUT_SIZE
    assert sent_mask.getpixel((10, 96)) == 255 and sent_mask.getpixel((240, 96)) == 0

    assert final_image_size(page) == INPUT_SIZE
    assert "seed 13" in page.text_content("#status") and page.input_value("#watch_id")
    assert page.get_attribute("#image", "src").startswith("http")  # a stored result's /files/ URL
