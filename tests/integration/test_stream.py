"""The streaming contract users see (previews, then the final image), over real HTTP against the
local config on the tiny model."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.harness import decode_image, stream_events

SMALL = {"prompt": "a red fox", "width": 256, "height": 256}


@pytest.mark.parametrize(
    ("steps", "interval", "size", "preview_steps"),
    [
        (20, None, (512, 512), [0, 5, 10, 15]),  # the README's example: the default interval of 5
        (1, None, (256, 256), [0]),
        (7, 3, (256, 256), [0, 3, 6]),
        (6, 1, (256, 256), [0, 1, 2, 3, 4, 5]),
        (4, 10, (640, 384), [0]),
    ],
)
def test_stream_sends_previews_on_schedule_then_final(
    local_url: str, client: httpx.Client, steps: int, interval: int | None, size: tuple, preview_steps: list
) -> None:
    width, height = size
    body = {**SMALL, "num_inference_steps": steps, "width": width, "height": height, "seed": 1}
    if interval is not None:
        body["preview_interval"] = interval
    events = list(stream_events(client, f"{local_url}/stream", body))

    assert all(event.event == "message" for event in events)
    *previews, final = [event.data for event in events]
    assert [preview["type"] for preview in previews] == ["preview"] * len(preview_steps)
    assert [preview["step"] for preview in previews] == preview_steps
    assert all(preview["num_inference_steps"] == steps for preview in previews)
    for preview in previews:
        image = decode_image(preview["image"])
        assert image.size == (preview["image"]["width"], preview["image"]["height"])
        assert max(image.size) == min(512, max(width, height))  # configs/local.yaml: preview_max_size 512
        assert image.format == "JPEG"

    assert final["type"] == "final"
    assert decode_image(final["image"]).size == (width, height)
    assert (final["image"]["width"], final["image"]["height"]) == (width, height)
    assert final["images"] == [final["image"]]
    assert final["seed"] == 1
    assert final["prompt"] == "a red fox"
    assert 0 < final["timings"]["inference"] <= final["timings"]["total"]


def test_stream_response_is_event_stream(local_url: str, client: httpx.Client) -> None:
    body = {**SMALL, "num_inference_steps": 2}
    with client.stream("POST", f"{local_url}/stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    # fal's framing: `data: <json>` lines, each event closed by a blank line.
    chunks = [chunk for chunk in raw.split("\n\n") if chunk.strip()]
    assert all(chunk.startswith("data: {") for chunk in chunks)
    assert raw.endswith("\n\n")


def test_png_final_on_request(local_url: str, client: httpx.Client) -> None:
    body = {**SMALL, "num_inference_steps": 2, "output_format": "png"}
    final = list(stream_events(client, f"{local_url}/stream", body))[-1].data
    assert final["image"]["content_type"] == "image/png"
    assert decode_image(final["image"]).format == "PNG"


def test_post_root_returns_fast_sdxl_result(local_url: str, client: httpx.Client) -> None:
    body = {**SMALL, "num_inference_steps": 3, "width": 320, "seed": 7}
    response = client.post(f"{local_url}/", json=body)
    assert response.status_code == 200
    result = response.json()
    assert set(result) == {"images", "seed", "timings", "prompt", "has_nsfw_concepts"}
    assert result["has_nsfw_concepts"] == [None]  # configs/local.yaml runs no safety checker: nothing is claimed
    assert result["seed"] == 7 and result["prompt"] == "a red fox"
    assert len(result["images"]) == 1
    assert decode_image(result["images"][0]).size == (320, 256)


def test_same_seed_same_image_different_seed_different_image(local_url: str, client: httpx.Client) -> None:
    def final_image(seed: int, path: str) -> str:
        body = {**SMALL, "num_inference_steps": 3, "seed": seed, "output_format": "png"}
        if path == "/stream":
            return list(stream_events(client, f"{local_url}/stream", body))[-1].data["image"]["url"]
        return client.post(f"{local_url}/", json=body).json()["images"][0]["url"]

    first = final_image(123, "/stream")
    assert final_image(123, "/stream") == first
    assert final_image(123, "/") == first  # previews or not, the same image
    assert final_image(124, "/stream") != first


def test_seed_is_chosen_and_returned_when_omitted(local_url: str, client: httpx.Client) -> None:
    body = {**SMALL, "num_inference_steps": 2, "output_format": "png"}
    result = client.post(f"{local_url}/", json=body).json()
    assert isinstance(result["seed"], int)
    replay = client.post(f"{local_url}/", json={**body, "seed": result["seed"]}).json()
    assert replay["images"][0]["url"] == result["images"][0]["url"]


def test_health_is_ok_once_loaded(local_url: str, client: httpx.Client) -> None:
    response = client.get(f"{local_url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.fixture(scope="module")
def turbo_url(serve_harness):
    """configs/sdxl-turbo.yaml with the tiny model on the CPU: the few-step configuration path."""
    yield serve_harness.deploy(
        "turbo",
        "/turbo",
        config_file="configs/sdxl-turbo.yaml",
        args={
            # the config's fp16-fix VAE is a hub download
            "model": {"source": "tiny", "vae": None, "device": "cpu", "dtype": "auto", "warmup_sizes": ["128x128"]},
            "previews": {"decoder": "tiny"},
        },
        deployments={
            "SDXLIngress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
            "SDXLDeployment": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 0}},
        },
    )
    serve_harness.remove("turbo")


def test_few_step_config_applies_its_request_defaults(turbo_url: str, client: httpx.Client) -> None:
    events = [event.data for event in stream_events(client, f"{turbo_url}/stream", {"prompt": "a fox"})]
    assert [event.get("step") for event in events] == [0, 1, 2, 3, None]  # 4 steps, a preview each
    assert decode_image(events[-1]["image"]).size == (512, 512)
    sent = list(stream_events(client, f"{turbo_url}/stream", {"prompt": "a fox", "num_inference_steps": 2}))
    assert len(sent) == 3  # what the client sends wins
