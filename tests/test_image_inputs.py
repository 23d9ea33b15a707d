"""Images in (fast-sdxl's image-to-image and inpainting): every way fal's clients send a file, checked at
the HTTP side before anything reaches a GPU, over the app as the ingress builds it (a stand-in relay
records what would have been run; no Serve here). Bad images are 422s naming the field and fal's type."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.responses import JSONResponse

from serve_app.config import AppConfig
from serve_app.contract.requests import ResolvedRequest
from serve_app.http.app import build_http_app
from serve_app.http.queue_api import QueueApi
from serve_app.http.routes import route_table
from serve_app.queue.outputs import OutputStore

APP_ID = "local/sdxl"


class RecordingRelay:
    """Answers as `POST /` would, with what the engine would have been given."""

    def __init__(self) -> None:
        self.requests: list[ResolvedRequest] = []

    async def run(self, request: ResolvedRequest, start_timeout_s: float | None = None) -> JSONResponse:
        self.requests.append(request)
        return JSONResponse({"task": request.task, "width": request.width, "height": request.height})

    stream = run


async def healthy() -> JSONResponse:
    return JSONResponse({"status": "ok"})


def encoded(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def data_uri(data: bytes, content_type: str = "image/png") -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


PHOTO = encoded(Image.new("RGB", (640, 480), (200, 40, 40)))


@pytest.fixture()
def service() -> tuple[TestClient, RecordingRelay, OutputStore]:
    config = AppConfig(inputs={"max_image_pixels": 3000 * 3000})
    relay, outputs = RecordingRelay(), OutputStore.in_memory()
    app = build_http_app(config, route_table(APP_ID), relay, QueueApi(None, config), healthy, outputs)
    with TestClient(app) as client:
        yield client, relay, outputs


def field_error(response) -> tuple[int, str, list]:
    body = response.json()
    (entry,) = body["detail"]
    return response.status_code, entry["type"], entry["loc"]


def test_a_data_uri_image_runs_at_its_own_size(service) -> None:
    client, relay, _ = service
    response = client.post(f"/{APP_ID}/image-to-image", json={"prompt": "a fox", "image_url": data_uri(PHOTO)})
    assert response.json() == {"task": "image-to-image", "width": 640, "height": 480}
    (request,) = relay.requests
    assert request.image == PHOTO and request.strength == 0.95  # fal's default strength
    assert request.denoising_steps == 19  # 0.95 x 20: the steps really run


def test_a_size_in_the_request_wins_and_large_inputs_are_scaled_to_fit(service) -> None:
    client, relay, _ = service
    sized = {"prompt": "a fox", "image_url": data_uri(PHOTO), "image_size": "square"}
    assert client.post("/image-to-image", json=sized).json()["width"] == 512
    large = encoded(Image.new("RGB", (3000, 1000)))
    answer = client.post("/image-to-image", json={"prompt": "a fox", "image_url": data_uri(large)}).json()
    assert (answer["width"], answer["height"]) == (2048, 680)  # 2048 px at most a side, multiples of 8


def test_one_side_sent_keeps_the_inputs_aspect_and_a_sent_size_needs_no_large_input(service) -> None:
    client, relay, _ = service
    one_side = client.post("/image-to-image", json={"prompt": "a fox", "image_url": data_uri(PHOTO), "width": 1024})
    assert (one_side.json()["width"], one_side.json()["height"]) == (1024, 768)  # 640x480's aspect
    tiny = data_uri(encoded(Image.new("RGB", (64, 64))))
    sized = {"prompt": "a fox", "image_url": tiny, "image_size": "square"}
    assert client.post("/image-to-image", json=sized).json()["width"] == 512  # upscaled to what was asked


def test_a_phone_jpeg_an_unreadable_exif_and_a_huge_data_uri_header(service) -> None:
    """A multi-picture JPEG (what phones write: Pillow calls it MPO) is a JPEG; an unreadable EXIF block is
    no orientation, not a 500; a data URI's header is looked for only in its first characters."""
    client, relay, _ = service
    frames = [Image.new("RGB", (300, 200), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    phone = client.post(
        "/image-to-image", json={"prompt": "a fox", "image_url": data_uri(buffer.getvalue(), "image/jpeg")}
    )
    assert phone.status_code == 200, phone.text
    bad_exif_chunk = struct.pack(">I", 8) + b"eXIf" + b"garbage!" + struct.pack(">I", zlib.crc32(b"eXIfgarbage!"))
    bad_exif = PHOTO[:-12] + bad_exif_chunk + PHOTO[-12:]
    assert client.post("/image-to-image", json={"prompt": "a fox", "image_url": data_uri(bad_exif)}).status_code == 200
    endless_header = "data:image/png" + ";a" * 200_000 + ";base64,AAAA"
    refused = client.post("/image-to-image", json={"prompt": "a fox", "image_url": endless_header})
    assert field_error(refused)[:2] == (422, "image_load_error")


def test_inpainting_takes_an_image_and_a_mask_of_another_size(service) -> None:
    client, relay, _ = service
    mask = encoded(Image.new("L", (64, 48), 255))
    body = {"prompt": "a fox", "image_url": data_uri(PHOTO), "mask_url": data_uri(mask)}
    assert client.post(f"/{APP_ID}/inpainting/stream", json=body).json()["task"] == "inpainting"
    assert relay.requests[0].mask == mask  # the engine resizes it to the image's size
    missing_mask = client.post(f"/{APP_ID}/inpainting", json={"prompt": "a fox", "image_url": data_uri(PHOTO)})
    assert missing_mask.status_code == 422


@pytest.mark.parametrize(
    ("image_url", "kind"),
    [
        (data_uri(b"this is not an image"), "image_load_error"),
        (data_uri(PHOTO[: len(PHOTO) // 2]), "image_load_error"),  # truncated
        (data_uri(encoded(Image.new("RGB", (200, 200)), "GIF"), "image/gif"), "unsupported_image_format"),
        (data_uri(encoded(Image.new("1", (4000, 4000)))), "image_too_large"),  # a bomb: 16 M pixels, a few KiB
        (data_uri(encoded(Image.new("RGB", (300, 100)))), "image_too_small"),
        ("data:image/png;base64,%%%not-base64", "image_load_error"),
        ("data:image/png,rawbytes", "image_load_error"),
        ("file:///etc/passwd", "file_download_error"),
        ("https://images.example.com/fox.png", "file_download_error"),  # URL inputs are off by default
    ],
)
def test_a_bad_image_is_a_422_naming_the_field_and_the_kind(service, image_url: str, kind: str) -> None:
    client, relay, _ = service
    response = client.post("/image-to-image", json={"prompt": "a fox", "image_url": image_url})
    assert field_error(response) == (422, kind, ["body", "image_url"])
    assert response.json()["error_type"] == "validation_error" and relay.requests == []


def test_a_bad_mask_names_the_mask(service) -> None:
    client, _, _ = service
    body = {"prompt": "a fox", "image_url": data_uri(PHOTO), "mask_url": data_uri(b"GIF89a nope")}
    assert field_error(client.post("/inpainting", json=body)) == (422, "image_load_error", ["body", "mask_url"])


def test_url_inputs_are_off_until_hosts_are_allowed(service) -> None:
    client, _, _ = service
    response = client.post("/image-to-image", json={"prompt": "a fox", "image_url": "https://example.com/a.png"})
    assert "inputs.url_allowed_hosts" in response.json()["detail"][0]["msg"]


def test_strength_too_small_for_one_step_is_a_422(service) -> None:
    client, _, _ = service
    body = {"prompt": "a fox", "image_url": data_uri(PHOTO), "strength": 0.04, "num_inference_steps": 20}
    assert field_error(client.post("/image-to-image", json=body))[:2] == (422, "greater_than_equal")


def test_a_result_url_of_this_service_is_read_from_the_store_not_fetched(service) -> None:
    """A result's `/files/...` URL, relative or on the host the client called: no network round trip
    (URL inputs are off here, so a fetch would have been refused)."""
    client, relay, outputs = service
    (url,) = asyncio.run(outputs.put(3600, [(PHOTO, "image/png")], presign=False))
    for image_url in (url, f"http://testserver{url}"):
        response = client.post("/image-to-image", json={"prompt": "a fox", "image_url": image_url})
        assert response.json()["task"] == "image-to-image"
    assert [request.image for request in relay.requests] == [PHOTO, PHOTO]
    gone = client.post("/image-to-image", json={"prompt": "a fox", "image_url": url.replace("/0.", "/1.")})
    assert field_error(gone)[:2] == (422, "file_download_error")


def test_fal_upload_protocol_then_the_file_as_input_by_its_owner_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fal.storage.upload`: initiate (with the key), PUT to the absolute URL it returns (no key: the URL's
    token is the permission), then `file_url` as an input. Another key cannot use it; a second PUT to the
    same URL is refused; only images are taken."""
    monkeypatch.setenv("SDXL_SERVE_API_KEYS", "key-a,key-b")
    config = AppConfig()
    relay, outputs = RecordingRelay(), OutputStore.in_memory()
    app = build_http_app(config, route_table(APP_ID), relay, QueueApi(None, config), healthy, outputs)
    key_a, key_b = {"authorization": "Key key-a"}, {"authorization": "Key key-b"}
    with TestClient(app) as client:
        target = client.post(
            "/storage/upload/initiate", json={"content_type": "image/png", "file_name": "fox.png"}, headers=key_a
        ).json()
        assert target["upload_url"].startswith("http://testserver/storage/upload/")
        assert client.put(target["upload_url"], content=PHOTO, headers={"content-type": "image/png"}).status_code == 200
        assert client.put(target["upload_url"], content=PHOTO).status_code == 404  # once only
        # A URL nobody was given (here: one that would never expire) stores nothing.
        expires_at = target["upload_url"].split("/storage/upload/")[1].split(".")[0]
        forged = target["upload_url"].replace(f"/{expires_at}.", "/never.")
        assert client.put(forged, content=PHOTO).status_code == 404
        body = {"prompt": "a fox", "image_url": target["file_url"]}
        assert client.post(f"/{APP_ID}/image-to-image", json=body, headers=key_a).json()["width"] == 640
        assert field_error(client.post(f"/{APP_ID}/image-to-image", json=body, headers=key_b)) == (
            422,
            "file_download_error",
            ["body", "image_url"],
        )
        second = client.post(
            "/storage/upload/initiate", json={"content_type": "image/png", "file_name": "x.png"}, headers=key_a
        ).json()
        assert client.put(second["upload_url"], content=b"not an image").status_code == 422
        not_image = client.post("/storage/upload/initiate", json={"content_type": "text/html"}, headers=key_a)
        assert not_image.status_code == 422
        assert client.post("/storage/upload/initiate", json={"content_type": "image/png"}).status_code == 401


def test_image_routes_take_large_bodies_and_text_routes_keep_1_mib(service) -> None:
    client, relay, _ = service
    noise = Image.frombytes("RGB", (1200, 900), os.urandom(1200 * 900 * 3))  # incompressible: ~3 MiB as PNG
    large = data_uri(encoded(noise))
    assert len(large) > 1024 * 1024
    assert client.post("/image-to-image", json={"prompt": "a fox", "image_url": large}).status_code == 200
    too_large_for_text = client.post("/", json={"prompt": "x" * 10, "negative_prompt": "y" * (1024 * 1024)})
    assert too_large_for_text.status_code == 413
