"""Issue 13: code written for fal's fast-sdxl, unchanged, over plain HTTP and the unmodified @fal-ai/client.

One app as `serve_config.yaml` sets it up (app id fal-ai/fast-sdxl, fal's request defaults) on the tiny
model, with the tiny safety checker and `max_num_images: 4`. Sizes and steps are small where the
payload allows it: the tiny model takes about a minute for fal's full 25 steps at 1024x1024 here.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.tiny import TINY_CHECKER_FLAGS
from serve_app.contract.requests import IMAGE_SIZE_PRESETS
from tests.integration.harness import REPO, ServeHarness, decode_image, stream_events

APP_ID = "fal-ai/fast-sdxl"
# fal's own example input for fal-ai/fast-sdxl, all of its fields.
FAL_EXAMPLE = {
    "prompt": "photo of a rhino dressed suit and tie sitting at a table in a bar with a bar stools, award winning "
    "photography, Elke vogelsang",
    "negative_prompt": "cartoon, illustration, animation. face. male, female",
    "image_size": "square_hd",
    "num_inference_steps": 25,
    "guidance_scale": 7.5,
    "num_images": 1,
    "loras": [],
    "embeddings": [],
    "enable_safety_checker": True,
    "safety_checker_version": "v1",
    "expand_prompt": False,
    "format": "jpeg",
    "sync_mode": False,
    "request_id": "",
}
SMALL = {**FAL_EXAMPLE, "image_size": {"width": 256, "height": 256}, "num_inference_steps": 2, "seed": 11}
# Image 2 of this batch is the one the tiny checker is built to flag (image i has seed + i).
FLAGGED_BATCH = {**TINY_CHECKER_FLAGS, "seed": TINY_CHECKER_FLAGS["seed"] - 2, "num_images": 4}
RESULT_KEYS = {"images", "seed", "timings", "prompt", "has_nsfw_concepts"}
JS_SCRIPT = REPO / "tests" / "js" / "fal_fast_sdxl.mjs"


@pytest.fixture(scope="module")
def fast_url(serve_harness: ServeHarness) -> Iterator[str]:
    url = serve_harness.deploy(
        "fast-sdxl",
        "/fast",
        args={
            "app_id": APP_ID,
            "model": {"safety_checker": "tiny"},
            "requests": {"profile": "fast-sdxl", "max_num_images": 4},
        },
    )
    yield url
    serve_harness.remove("fast-sdxl")


def submit_and_wait(client: httpx.Client, fast_url: str, body: dict, route: str = f"/queue/{APP_ID}") -> dict:
    job = client.post(f"{fast_url}{route}", json=body)
    assert job.status_code == 200, job.text
    status_url = job.json()["status_url"]
    deadline = time.monotonic() + 120
    while client.get(status_url).json()["status"] != "COMPLETED":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    response = client.get(job.json()["response_url"])
    assert response.status_code == 200, response.text
    return response.json()


def fetch(client: httpx.Client, file: dict) -> Image.Image:
    """An image of a result: inline (data URI) or at the URL the service gave."""
    if file["url"].startswith("data:"):
        return decode_image(file)
    response = client.get(file["url"])
    assert response.headers["content-type"] == file["content_type"]
    return Image.open(io.BytesIO(response.content))


def is_black(image: Image.Image) -> bool:
    return int(np.asarray(image.convert("RGB")).max()) == 0


def run_js(fast_url: str, body: dict, mode: str) -> dict:
    result = subprocess.run(
        ["node", str(JS_SCRIPT), fast_url, json.dumps(body), mode], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- Request fields ----------------------------------------------------------------------------


@pytest.mark.parametrize(("preset", "size"), list(IMAGE_SIZE_PRESETS.items()))
def test_each_image_size_preset(fast_url: str, client: httpx.Client, preset: str, size: tuple[int, int]) -> None:
    body = {**FAL_EXAMPLE, "image_size": preset, "num_inference_steps": 1, "seed": 1}
    response = client.post(f"{fast_url}/{APP_ID}", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert set(result) == RESULT_KEYS
    (image,) = result["images"]
    assert (image["width"], image["height"]) == size == decode_image(image).size
    assert image["content_type"] == "image/jpeg"
    assert result["has_nsfw_concepts"] == [False]  # checked, and passed
    assert result["seed"] == 1 and result["prompt"] == FAL_EXAMPLE["prompt"] and result["timings"]["inference"] > 0


def test_a_bare_prompt_gets_fals_defaults(fast_url: str, client: httpx.Client) -> None:
    """25 steps at square_hd (the first preview says so; 25 steps at 1024 take a minute here, so the
    client leaves after it and the run stops)."""
    events = stream_events(client, f"{fast_url}/{APP_ID}/stream", {"prompt": "a red fox"})
    first = next(events).data
    events.close()
    assert (first["type"], first["step"], first["num_inference_steps"]) == ("preview", 0, 25)
    assert (first["image"]["width"], first["image"]["height"]) == (512, 512)  # 1024x1024, previews' long side 512


def test_a_batch_of_four_png_reproduces_from_its_seed(fast_url: str, client: httpx.Client) -> None:
    body = {**SMALL, "num_images": 4, "format": "png", "seed": 42.0}  # 42.0: as Python's json.dumps sends a float
    first = client.post(f"{fast_url}/", json=body).json()
    assert first["seed"] == 42 and first["has_nsfw_concepts"] == [False] * 4
    assert [decode_image(image).format for image in first["images"]] == ["PNG"] * 4
    assert len({image["url"] for image in first["images"]}) == 4
    again = client.post(f"{fast_url}/{APP_ID}", json={**body, "seed": 42}).json()
    assert again["images"] == first["images"]


def test_the_stream_ends_with_every_image_and_image_is_the_first(fast_url: str, client: httpx.Client) -> None:
    events = [event.data for event in stream_events(client, f"{fast_url}/stream", {**SMALL, "num_images": 3})]
    *previews, final = events
    assert [preview["step"] for preview in previews] == [0]
    assert (previews[0]["image"]["width"], previews[0]["image"]["height"]) == (256, 256)  # the first image's
    assert len(final["images"]) == 3 and final["image"] == final["images"][0]
    assert final["has_nsfw_concepts"] == [False] * 3


@pytest.mark.parametrize("sync_mode", [True, False])
def test_queue_result_has_fast_sdxls_shape(fast_url: str, client: httpx.Client, sync_mode: bool) -> None:
    result = submit_and_wait(client, fast_url, {**SMALL, "num_images": 2, "format": "png", "sync_mode": sync_mode})
    assert set(result) == RESULT_KEYS and result["has_nsfw_concepts"] == [False, False]
    for image in result["images"]:
        assert image["url"].startswith("data:image/png;base64," if sync_mode else f"{fast_url}/files/")
        assert image["content_type"] == "image/png" and fetch(client, image).size == (256, 256)


# --- The safety checker ------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/", f"/{APP_ID}", f"/{APP_ID}/stream", "queue"])
def test_the_tiny_checker_flags_the_image_it_is_built_to_flag(fast_url: str, client: httpx.Client, route: str) -> None:
    if route == "queue":
        result = submit_and_wait(client, fast_url, FLAGGED_BATCH)
    elif route.endswith("/stream"):
        result = list(stream_events(client, f"{fast_url}{route}", FLAGGED_BATCH))[-1].data
    else:
        result = client.post(f"{fast_url}{route}", json=FLAGGED_BATCH).json()
    assert result["has_nsfw_concepts"] == [False, False, True, False]
    assert [is_black(fetch(client, image)) for image in result["images"]] == [False, False, True, False]


def test_a_check_turned_off_is_not_claimed(fast_url: str, client: httpx.Client) -> None:
    result = client.post(f"{fast_url}/", json={**FLAGGED_BATCH, "enable_safety_checker": False}).json()
    assert result["has_nsfw_concepts"] == [None] * 4
    assert not any(is_black(decode_image(image)) for image in result["images"])


def test_without_a_checker_nothing_is_claimed(local_url: str, client: httpx.Client) -> None:
    """configs/local.yaml has no safety checker: the request's default `enable_safety_checker: true` checks nothing."""
    result = client.post(f"{local_url}/", json={**FLAGGED_BATCH, "num_images": 2}).json()
    assert result["has_nsfw_concepts"] == [None, None]


# --- Refusals ----------------------------------------------------------------------------------

REFUSED = [
    ("over the deployment's max_num_images", {"num_images": 5}, "num_images", "max_num_images"),
    ("over fal's 8 images", {"num_images": 9}, "num_images", "less than or equal to 8"),
    ("expand_prompt true", {"expand_prompt": True}, "expand_prompt", "not supported"),
    (
        "a LoRA from a host not allowed",
        {"loras": [{"path": "https://example.com/a.safetensors"}]},
        "loras",
        "example.com",
    ),
    ("a pickled LoRA", {"loras": [{"path": "owner/repo/style.ckpt"}]}, "loras", "only safetensors"),
    ("a LoRA scale over 4", {"loras": [{"path": "a.safetensors", "scale": 5}]}, "loras", "less than or equal to 4"),
    ("four LoRAs", {"loras": [{"path": f"{n}.safetensors"} for n in range(4)]}, "loras", "at most 3"),
    ("an embedding by absolute path", {"embeddings": [{"path": "/etc/passwd"}]}, "embeddings", "a path is"),
    ("image_size and a disagreeing width", {"image_size": "square", "width": 1024}, "width", "image_size"),
    ("format and a disagreeing output_format", {"format": "png", "output_format": "jpeg"}, "output_format", ""),
    ("seed 42.5", {"seed": 42.5}, "seed", "integer"),
    ("seed true", {"seed": True}, "seed", "integer"),
    ('seed "42"', {"seed": "42"}, "seed", "integer"),
    ("an unknown field", {"num_steps": 20}, "num_steps", "Extra inputs are not permitted"),
]


@pytest.mark.parametrize("route", ["/", "/stream", f"/{APP_ID}", f"/queue/{APP_ID}"])
@pytest.mark.parametrize(("fields", "field", "message"), [case[1:] for case in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_fields_are_a_422_naming_the_field(
    fast_url: str, client: httpx.Client, route: str, fields: dict, field: str, message: str
) -> None:
    response = client.post(f"{fast_url}{route}", json={**SMALL, **fields})
    assert response.status_code == 422, response.text
    (error,) = [item for item in response.json()["detail"] if field in item["loc"]]
    assert message in error["msg"]


# --- The unmodified JS client ------------------------------------------------------------------


def test_js_client_subscribe_gets_a_batch_with_file_urls(fast_url: str, js_client_installed: None) -> None:
    out = run_js(fast_url, {**SMALL, "num_images": 2}, "subscribe")
    data = out["data"]
    assert set(data) == RESULT_KEYS and out["requestId"]
    assert data["seed"] == 11 and data["has_nsfw_concepts"] == [False, False]
    assert all(image["url"].startswith(f"{fast_url}/files/") for image in data["images"])
    assert [(image["width"], image["height"], image["content_type"]) for image in data["images"]] == [
        (256, 256, "image/jpeg")
    ] * 2


def test_js_client_subscribe_sync_mode_flags_the_built_in_image(fast_url: str, js_client_installed: None) -> None:
    data = run_js(fast_url, {**FLAGGED_BATCH, "sync_mode": True, "format": "png"}, "subscribe")["data"]
    assert data["has_nsfw_concepts"] == [False, False, True, False]
    assert [is_black(decode_image(image)) for image in data["images"]] == [False, False, True, False]


def test_js_client_run_and_stream(fast_url: str, js_client_installed: None) -> None:
    body = {**SMALL, "num_images": 2, "format": "png", "image_size": "square", "num_inference_steps": 1}
    ran = run_js(fast_url, body, "run")["data"]
    assert [decode_image(image).size for image in ran["images"]] == [(512, 512)] * 2
    streamed = run_js(fast_url, body, "stream")
    assert streamed["types"] == ["preview", "final"]
    assert streamed["data"]["images"] == ran["images"]  # same seed, same batch, streamed or not
    assert streamed["data"]["image"] == ran["images"][0] and streamed["data"]["has_nsfw_concepts"] == [False, False]


def test_cli_saves_every_image_of_a_batch(fast_url: str, tmp_path: Path) -> None:
    options = f"--url {fast_url} --steps 2 --size 256 --num-images 2 --out {tmp_path}".split()
    cli = shutil.which("sdxl-stream") or "sdxl-stream"
    result = subprocess.run([cli, "a fox", *options], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["final_0.jpg", "final_1.jpg", "preview_000.jpg"]


@pytest.fixture(scope="module")
def js_client_installed() -> None:
    """The locked @fal-ai/client, installed once (as tests/integration/test_clients.py does)."""
    if not (JS_SCRIPT.parent / "node_modules" / "@fal-ai" / "client").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_SCRIPT.parent, check=True, timeout=300)


# --- Images in: image-to-image and inpainting ---------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


INPUT_IMAGE = png_bytes(Image.radial_gradient("L").convert("RGB").resize((320, 256)))
INPUT_MASK = png_bytes(Image.new("L", (160, 128), 255))  # another size than the image: resized to it
IMAGE_BODY = {
    "prompt": "a fox",
    "num_inference_steps": 4,
    "seed": 5,
    "image_url": "data:image/png;base64," + base64.b64encode(INPUT_IMAGE).decode(),
}


def test_image_to_image_runs_streams_and_queues_at_the_inputs_size(fast_url: str, client: httpx.Client) -> None:
    ran = client.post(f"{fast_url}/{APP_ID}/image-to-image", json=IMAGE_BODY)
    assert ran.status_code == 200, ran.text
    assert [(image["width"], image["height"]) for image in ran.json()["images"]] == [(320, 256)]
    body = {**IMAGE_BODY, "strength": 0.5, "num_inference_steps": 10, "preview_interval": 1}
    events = [event.data for event in stream_events(client, f"{fast_url}/{APP_ID}/image-to-image/stream", body)]
    previews = [event["step"] for event in events if event["type"] == "preview"]
    assert events[-1]["type"] == "final" and previews and set(previews) <= set(range(5))  # 0.5 x 10 steps run
    queued = submit_and_wait(client, fast_url, {**IMAGE_BODY, "sync_mode": True}, f"/queue/{APP_ID}/image-to-image")
    assert queued["images"] == ran.json()["images"]  # same seed and input: the same image, queued or not


def test_inpainting_through_the_queue_with_a_mask_of_another_size(fast_url: str, client: httpx.Client) -> None:
    body = {**IMAGE_BODY, "mask_url": "data:image/png;base64," + base64.b64encode(INPUT_MASK).decode()}
    result = submit_and_wait(client, fast_url, body, f"/queue/{APP_ID}/inpainting")
    assert (result["images"][0]["width"], result["images"][0]["height"]) == (320, 256)
    assert fetch(client, result["images"][0]).size == (320, 256)


def test_a_result_url_feeds_the_next_request_and_bad_images_are_422s(fast_url: str, client: httpx.Client) -> None:
    first = submit_and_wait(client, fast_url, {**SMALL}, f"/queue/{APP_ID}")
    chained = client.post(
        f"{fast_url}/{APP_ID}/image-to-image", json={**IMAGE_BODY, "image_url": first["images"][0]["url"]}
    )
    assert chained.status_code == 200, chained.text
    assert (chained.json()["images"][0]["width"], chained.json()["images"][0]["height"]) == (256, 256)
    broken = client.post(
        f"{fast_url}/{APP_ID}/image-to-image", json={**IMAGE_BODY, "image_url": IMAGE_BODY["image_url"][:200]}
    )
    assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "image_load_error"


def test_image_routes_take_bodies_past_1_mib_through_servers_proxy(fast_url: str, client: httpx.Client) -> None:
    """Serve's proxy runs the edge's body guard (the harness sets its callback): image routes get the
    larger limit there too, text routes keep 1 MiB."""
    noise = Image.frombytes("RGB", (800, 640), np.random.default_rng(0).bytes(800 * 640 * 3))
    large = "data:image/png;base64," + base64.b64encode(png_bytes(noise)).decode()
    assert len(large) > 1024 * 1024
    body = {**IMAGE_BODY, "image_url": large, "image_size": {"width": 256, "height": 256}}
    assert client.post(f"{fast_url}/{APP_ID}/image-to-image", json=body).status_code == 200
    text = client.post(f"{fast_url}/{APP_ID}", json={**SMALL, "negative_prompt": "x" * (1024 * 1024)})
    assert text.status_code == 413


def test_js_client_uploads_blobs_and_subscribes_to_both_endpoints(
    fast_url: str, js_client_installed: None, tmp_path: Path
) -> None:
    """@fal-ai/client with `Blob` inputs: it uploads each through fal's storage protocol (mapped onto this
    service by the README's middleware; the PUT goes to the absolute URL the service gave, no middleware),
    then submits the file URLs."""
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    image.write_bytes(INPUT_IMAGE)
    mask.write_bytes(INPUT_MASK)
    body = {"prompt": "a fox", "num_inference_steps": 4, "seed": 5, "sync_mode": True}
    for extra in ([], [str(mask)]):
        result = subprocess.run(
            ["node", str(JS_IMAGES), fast_url, json.dumps(body), str(image), *extra],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout.strip().splitlines()[-1])
        assert out["uploadedUrl"].startswith(f"{fast_url}/files/") and out["requestId"]
        assert [decode_image(each).size for each in out["data"]["images"]] == [(320, 256)]


JS_IMAGES = REPO / "tests" / "js" / "fal_images.mjs"
