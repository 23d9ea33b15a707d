"""Failures reach the client as errors, never as hangs or silent success, and are survived."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors.torch import load_file, save_file

from deployments.tiny import ensure_tiny_model
from tests.integration.conftest import TEST_API_KEY as KEY
from tests.integration.conftest import TEST_API_KEYS_ENV
from tests.integration.harness import ServeHarness, read_stream_body, sdxl_stats, stream_events

SMALL = {"prompt": "a red fox", "width": 256, "height": 256, "num_inference_steps": 4}
LONG = {"prompt": "a slow fox", "width": 512, "height": 512, "num_inference_steps": 50}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault-models")


@pytest.fixture(scope="module")
def broken_previews_url(serve_harness: ServeHarness, models_dir: Path):
    """A preview decoder whose latent channels do not match SDXL's: every TAESD decode raises."""
    torch.manual_seed(0)
    AutoencoderTiny(
        latent_channels=3,
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).save_pretrained(models_dir / "mismatched-decoder")
    yield serve_harness.deploy(
        "broken-previews", "/broken-previews", args={"previews": {"decoder": str(models_dir / "mismatched-decoder")}}
    )
    serve_harness.remove("broken-previews")


@pytest.fixture(scope="module")
def nan_model_url(serve_harness: ServeHarness, models_dir: Path):
    """The tiny model with NaN in the UNet's output bias: the pipeline produces NaN latents."""
    poisoned = models_dir / "nan-model"
    shutil.copytree(ensure_tiny_model(models_dir / "tiny"), poisoned)
    weights_file = poisoned / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    weights["conv_out.bias"] = torch.full_like(weights["conv_out.bias"], float("nan"))
    save_file(weights, weights_file, metadata={"format": "pt"})
    args = {"model": {"source": str(poisoned)}, "previews": {"decoder": "tiny"}}
    yield serve_harness.deploy("nan-model", "/nan-model", args=args)
    serve_harness.remove("nan-model")


@pytest.fixture(scope="module")
def strict_url(serve_harness: ServeHarness):
    """Short queue, short keepalive and a short first-event wait: overload and idle gaps show quickly."""
    yield serve_harness.deploy(
        "strict",
        "/strict",
        args={"http": {"keepalive_s": 0.5, "first_event_wait_s": 0.3}},
        deployments={"SDXLDeployment": {"max_queued_requests": 2}},
    )
    serve_harness.remove("strict")


@pytest.fixture(scope="module")
def deadline_url(serve_harness: ServeHarness):
    yield serve_harness.deploy("deadline", "/deadline", args={"requests": {"timeout_s": 3.0}})
    serve_harness.remove("deadline")


def test_preview_decoder_failure_is_an_error_event_and_replica_stays_usable(
    broken_previews_url: str, client: httpx.Client
) -> None:
    events = list(stream_events(client, f"{broken_previews_url}/stream", SMALL))
    assert [event.event for event in events] == ["error"]
    assert events[0].data["error_type"] == "generation_failed"
    assert "preview decoding failed" in events[0].data["detail"]
    # Without previews the same replica still generates.
    response = client.post(f"{broken_previews_url}/", json=SMALL)
    assert response.status_code == 200 and response.json()["images"]


def test_nan_output_is_an_error_not_a_black_image(nan_model_url: str, client: httpx.Client) -> None:
    events = list(stream_events(client, f"{nan_model_url}/stream", SMALL))
    assert all(event.event == "message" and event.data["type"] == "preview" for event in events[:-1])
    assert events[-1].event == "error"
    assert "NaN" in events[-1].data["detail"]
    response = client.post(f"{nan_model_url}/", json=SMALL)
    assert response.status_code == 500
    assert response.json()["error_type"] == "generation_failed"


def test_deadline_ends_a_runaway_request(deadline_url: str, client: httpx.Client) -> None:
    runaway = {**LONG, "width": 768, "height": 768}  # well past 3 s even on a fast machine; SMALL well within
    events = list(stream_events(client, f"{deadline_url}/stream", runaway))
    assert events[-1].event == "error"
    assert events[-1].data["error_type"] == "deadline_exceeded"
    assert all(event.data.get("type") == "preview" for event in events[:-1])
    response = client.post(f"{deadline_url}/", json=runaway)
    assert response.status_code == 504
    assert response.json()["error_type"] == "deadline_exceeded"
    assert client.post(f"{deadline_url}/", json=SMALL).status_code == 200  # short requests still fit


@pytest.mark.parametrize("path", ["/stream", "/"])
def test_overload_gets_503_with_retry_after_and_accepted_requests_complete(strict_url: str, path: str) -> None:
    body = {**SMALL, "num_inference_steps": 25, "width": 384, "height": 384}

    def call(index: int) -> dict:
        started = time.monotonic()
        with httpx.Client(timeout=120) as client, client.stream("POST", f"{strict_url}{path}", json=body) as response:
            raw = response.read().decode()
            return {
                "status": response.status_code,
                "headers": response.headers,
                "raw": raw,
                "seconds": time.monotonic() - started,
            }

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))

    rejected = [result for result in results if result["status"] == 503]
    accepted = [result for result in results if result["status"] == 200]
    assert len(rejected) + len(accepted) == 8
    # Capacity is 1 running + 2 queued. Serve may reject a little more than that when requests
    # arrive together (its router counts them queued until assigned), never admit more.
    assert 3 <= len(rejected) <= 7 and len(accepted) >= 1
    for result in rejected:
        assert result["headers"]["content-type"] == "application/json"
        assert int(result["headers"]["retry-after"]) >= 1
        assert json.loads(result["raw"])["error_type"] == "overloaded"
        assert result["seconds"] < 5  # rejected up front, not after waiting in line
    for result in accepted:
        if path == "/":
            assert json.loads(result["raw"])["images"]
            continue
        data_events = [chunk for chunk in result["raw"].split("\n\n") if chunk.startswith("data: ")]
        assert '"type":"final"' in data_events[-1]
        assert "event: error" not in result["raw"]


def test_waiting_stream_gets_keepalives_before_its_first_event(strict_url: str) -> None:
    long = {**SMALL, "num_inference_steps": 40, "width": 512, "height": 512}
    with httpx.Client(timeout=120) as busy, httpx.Client(timeout=120) as waiting:
        running = stream_events(busy, f"{strict_url}/stream", long)
        next(running)  # the only replica is now busy for a few seconds
        with waiting.stream("POST", f"{strict_url}/stream", json=SMALL) as response:
            assert response.status_code == 200  # committed after first_event_wait_s (0.3 s)
            raw = response.read().decode()
        running.close()
    assert raw.startswith(": keepalive")  # sent every keepalive_s (0.5 s) while it waited
    data_events = [chunk for chunk in raw.split("\n\n") if chunk.startswith("data: ")]
    assert '"type":"final"' in data_events[-1]


def test_replica_crash_mid_stream_is_an_error_event_and_service_recovers(
    serve_harness: ServeHarness, client: httpx.Client
) -> None:
    url = serve_harness.deploy("crashy", "/crashy")
    try:
        pid = sdxl_stats("crashy")["pid"]
        started = time.monotonic()
        events = []
        for event in stream_events(client, f"{url}/stream", LONG):
            events.append(event)
            if len(events) == 1:
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
        assert events[-1].event == "error"
        assert events[-1].data["error_type"] == "replica_failed"
        assert time.monotonic() - killed_at < 10
        assert time.monotonic() - started < 60

        # Serve replaces the replica; later requests succeed on the new one.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            response = client.post(f"{url}/", json=SMALL)
            if response.status_code == 200:
                break
            time.sleep(1)
        assert response.status_code == 200
        assert sdxl_stats("crashy")["pid"] != pid
    finally:
        serve_harness.remove("crashy")


def test_redeploy_lets_in_flight_streams_finish(serve_harness: ServeHarness, client: httpx.Client) -> None:
    url = serve_harness.deploy("rolling", "/rolling")
    try:
        old_pid = sdxl_stats("rolling")["pid"]
        changed = {"args": {"requests": {"final_jpeg_quality": 90}}}
        redeploy = threading.Thread(target=serve_harness.deploy, args=("rolling", "/rolling"), kwargs=changed)
        events = []
        body = {**LONG, "num_inference_steps": 30}
        for event in stream_events(client, f"{url}/stream", body):
            events.append(event)
            if len(events) == 1:
                redeploy.start()  # a new version replaces the replica while this stream runs
        redeploy.join(timeout=120)
        assert [event.event for event in events] == ["message"] * len(events)
        assert events[-1].data["type"] == "final"
        assert [event.data["step"] for event in events[:-1]] == [0, 5, 10, 15, 20, 25]
        assert client.post(f"{url}/", json=SMALL).status_code == 200
        assert sdxl_stats("rolling")["pid"] != old_pid  # new requests go to the new replica
    finally:
        serve_harness.remove("rolling")


@pytest.fixture(scope="module")
def secured_url(serve_harness: ServeHarness):
    # The session's workers have TEST_API_KEYS_ENV set (conftest.py); only this app reads it.
    yield serve_harness.deploy("secured", "/secured", args={"http": {"api_keys_env": TEST_API_KEYS_ENV}})
    serve_harness.remove("secured")


@pytest.mark.parametrize(
    ("headers", "raw"),
    [
        ({}, b'{"prompt": "a fox"}'),
        ({"authorization": "Key wrong-key"}, b'{"prompt": "a fox"}'),
        ({"authorization": KEY}, b'{"prompt": "a fox"}'),  # no scheme
        ({}, b"not json"),  # unauthenticated callers learn nothing about validation
    ],
)
@pytest.mark.parametrize("path", ["/stream", "/"])
def test_api_keys_reject_missing_or_wrong_keys(secured_url: str, client: httpx.Client, path, headers, raw) -> None:
    response = client.post(f"{secured_url}{path}", content=raw, headers={"content-type": "application/json", **headers})
    assert response.status_code == 401
    assert response.json()["error_type"] == "unauthorized"
    assert KEY not in response.text


def test_api_keys_accept_fal_style_key_and_stay_out_of_logs(secured_url: str, client: httpx.Client) -> None:
    headers = {"authorization": f"Key {KEY}"}
    assert client.post(f"{secured_url}/", json=SMALL, headers=headers).status_code == 200
    events = list(stream_events(client, f"{secured_url}/stream", SMALL, headers=headers))
    assert events[-1].data["type"] == "final"
    assert client.get(f"{secured_url}/health").status_code == 200  # health stays open for load balancers
    # Every Ray session's logs: `session_latest` is whichever instance started last, maybe not this one.
    logs = [path for path in Path("/tmp/ray").glob("session_2*/logs/**/*") if path.is_file()]
    assert logs
    leaked = [path for path in logs if KEY.encode() in path.read_bytes()]
    assert leaked == []


def test_other_apps_need_no_key(local_url: str, client: httpx.Client) -> None:
    assert client.post(f"{local_url}/", json=SMALL).status_code == 200  # keys are off by default


def test_without_a_model_replica_health_is_503_and_requests_end_not_hang(
    serve_harness: ServeHarness, client: httpx.Client
) -> None:
    """The SDXL replica asks for a GPU this cluster lacks, so it never starts; the ingress does."""
    url = serve_harness.deploy(
        "no-gpu",
        "/no-gpu",
        args={
            "requests": {"queue_timeout_s": 2, "timeout_s": 1},
            "http": {"first_event_wait_s": 0.3, "keepalive_s": 0.5},
        },
        deployments={"SDXLDeployment": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}},
        wait=False,
    )
    try:
        deadline = time.monotonic() + 60
        while (health := client.get(f"{url}/health")).status_code == 404 and time.monotonic() < deadline:
            time.sleep(0.5)  # the route appears once the ingress replica is up
        assert health.status_code == 503
        assert health.json()["error_type"] == "not_ready"

        with client.stream("POST", f"{url}/stream", json=SMALL) as response:
            assert response.status_code == 200
            raw, cut_off = read_stream_body(response)
        assert raw.startswith(": keepalive")
        assert "event: error" in raw and '"error_type":"queue_timeout"' in raw
        assert cut_off  # after the error event: so that fal clients raise
        assert 'data: {"type"' not in raw

        response = client.post(f"{url}/", json=SMALL)
        assert response.status_code == 503
        assert response.json()["error_type"] == "queue_timeout"
    finally:
        serve_harness.remove("no-gpu")
