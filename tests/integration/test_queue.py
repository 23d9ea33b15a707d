"""fal's queue API over real HTTP: positions, logs, results, cancel, errors, webhooks, CORS and keys.

The unmodified fal clients drive the same routes in test_clients.py; the queue under faults (Redis
killed, paused or flushed, replicas killed, redeploys) is in test_queue_faults.py.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from httpx_sse import connect_sse
from PIL import Image

from tests.integration.conftest import OTHER_API_KEY, TEST_API_KEY, TEST_API_KEYS_ENV
from tests.integration.harness import REPO, ServeHarness, decode_image, free_port, sdxl_stats

SMALL = {"prompt": "a red fox", "width": 256, "height": 256, "num_inference_steps": 6, "seed": 3}
LONG = {"prompt": "a slow fox", "width": 512, "height": 512, "num_inference_steps": 40, "seed": 4}
KEY = {"authorization": f"Key {TEST_API_KEY}"}
APP = "jobs"
MAX_QUEUED = 2


class WebhookReceiver(ThreadingHTTPServer):
    """A webhook destination on 127.0.0.1 that keeps what it was sent."""

    def __init__(self) -> None:
        received: list[dict] = []
        raw: list[tuple[dict, bytes]] = []  # (headers, body) as they came
        self.received = received
        self.raw = raw

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["content-length"]))
                raw.append(({name.lower(): value for name, value in self.headers.items()}, body))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)


def documented_receiver(jwks_url: str) -> dict:
    """The webhook receiver docs/queue.md shows, run as written but for its JWKS URL."""
    docs = (REPO / "docs" / "queue.md").read_text()
    code = docs.split("<!-- webhook-receiver -->\n```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(code.replace('"http://localhost:8000/.well-known/jwks.json"', repr(jwks_url)), namespace)  # noqa: S102
    return namespace


@pytest.fixture(scope="module")
def webhooks() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def jobs_url(serve_harness: ServeHarness) -> Iterator[str]:
    """An app with API keys, CORS, a small queue and webhooks allowed to this machine."""
    url = serve_harness.deploy(
        APP,
        f"/{APP}",
        args={
            "http": {"api_keys_env": TEST_API_KEYS_ENV, "cors_allow_origins": ["https://app.example"]},
            "queue": {"max_queued": MAX_QUEUED, "webhook_allowed_hosts": ["127.0.0.1"]},
        },
    )
    yield url
    serve_harness.remove(APP)


@pytest.fixture()
def api(jobs_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=jobs_url, headers=KEY, timeout=httpx.Timeout(120, connect=10)) as client:
        yield client


def submit(api: httpx.Client, body: dict, **params) -> dict:
    response = api.post("/queue/local/sdxl", json=body, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["x-fal-request-id"] == response.json()["request_id"]
    return response.json()


def status(api: httpx.Client, job: dict, logs: bool = False) -> dict:
    response = api.get(job["status_url"], params={"logs": int(logs)})
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(api: httpx.Client, job: dict, done: Callable[[dict], bool], timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while not done(current := status(api, job, logs=True)):
        assert time.monotonic() < deadline, current
        time.sleep(0.1)
    return current


def completed(body: dict) -> bool:
    return body["status"] == "COMPLETED"


def running(body: dict) -> bool:
    return body["status"] != "IN_QUEUE"


def test_submit_answers_fal_urls_and_the_result_has_image_urls(api: httpx.Client, jobs_url: str) -> None:
    job = submit(api, SMALL)
    assert job["status"] == "IN_QUEUE" and job["queue_position"] == 0
    base = f"{jobs_url}/queue/local/sdxl/requests/{job['request_id']}"
    assert (job["response_url"], job["status_url"], job["cancel_url"]) == (base, f"{base}/status", f"{base}/cancel")

    final = wait_for(api, job, completed)
    assert final["metrics"]["inference_time"] > 0 and "error" not in final
    messages = [log["message"] for log in final["logs"]]
    assert messages[:2] == ["Queued", "Started"] and messages[-1] == "Completed"
    assert [message for message in messages if message.startswith("step")] == [f"step {i}/6" for i in range(1, 7)]
    assert set(final["logs"][0]) == {"message", "level", "source", "timestamp"}

    result = api.get(job["response_url"])
    assert result.status_code == 200 and result.headers["x-fal-request-id"] == job["request_id"]
    body = result.json()
    assert body["seed"] == 3 and body["prompt"] == SMALL["prompt"]
    (image,) = body["images"]
    assert image["url"].startswith(f"{jobs_url}/files/")  # served by us while the job is kept, no key needed
    fetched = httpx.get(image["url"])
    assert fetched.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(fetched.content)).size == (256, 256)


def test_sync_mode_inlines_the_images(api: httpx.Client) -> None:
    job = submit(api, {**SMALL, "sync_mode": True})
    wait_for(api, job, completed)
    (image,) = api.get(job["response_url"]).json()["images"]
    assert decode_image(image).size == (256, 256)


def test_positions_are_true_order_and_cancel_stops_a_running_job_within_a_step(
    api: httpx.Client, jobs_url: str
) -> None:
    steps_before = sdxl_stats(APP)["steps_run"]
    long = submit(api, LONG)
    second, third = submit(api, SMALL), submit(api, {**SMALL, "seed": 5})
    wait_for(api, long, lambda body: any(log["message"].startswith("step") for log in body["logs"] or []))
    assert [status(api, job)["queue_position"] for job in (second, third)] == [0, 1]
    assert status(api, long)["logs"] is None  # without `logs` the key is there, empty

    cancelled = api.put(long["cancel_url"])
    assert (cancelled.status_code, cancelled.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    final = wait_for(api, long, completed, timeout_s=30)
    assert final["error_type"] == "cancelled"
    assert wait_for(api, second, running)  # the replica is free for the next job
    assert sdxl_stats(APP)["outcomes"].get("cancelled", 0) >= 1
    assert sdxl_stats(APP)["steps_run"] - steps_before < LONG["num_inference_steps"]

    result = api.get(long["response_url"])
    assert (result.status_code, result.json()["error_type"]) == (400, "cancelled")
    for job in (second, third):
        assert "error" not in wait_for(api, job, completed)


def test_cancel_a_queued_job_removes_it_and_the_queue_moves_up(api: httpx.Client) -> None:
    long = submit(api, LONG)
    dispatched, waiting = submit(api, SMALL), submit(api, SMALL)
    wait_for(api, long, running)
    assert api.put(waiting["cancel_url"]).status_code == 202
    assert wait_for(api, waiting, completed, timeout_s=10)["error_type"] == "cancelled"  # the mirror may lag
    last = submit(api, SMALL)
    assert last["queue_position"] == 1  # behind `dispatched` only: the cancelled job left the queue
    for job in (dispatched, long):
        assert api.put(job["cancel_url"]).status_code == 202
    assert wait_for(api, last, completed)["metrics"]["inference_time"] > 0


def test_a_full_queue_is_503_with_retry_after(api: httpx.Client) -> None:
    jobs = [submit(api, LONG)]
    wait_for(api, jobs[0], running)
    jobs += [submit(api, SMALL) for _ in range(MAX_QUEUED + 1)]  # one waits at the replica, two in the queue
    refused = api.post("/queue/local/sdxl", json=SMALL)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error_type"] == "overloaded"
    for job in jobs:
        api.put(job["cancel_url"])
    for job in jobs:
        wait_for(api, job, completed)


def test_unknown_ids_are_404_and_finished_jobs_cannot_be_cancelled(api: httpx.Client) -> None:
    unknown = "/queue/local/sdxl/requests/0b9f3c1e-0000-4000-8000-000000000000"
    for method, path in [("GET", "/status"), ("GET", "/status/stream"), ("GET", ""), ("PUT", "/cancel")]:
        response = api.request(method, unknown + path)
        assert (response.status_code, response.json()["error_type"]) == (404, "not_found"), (method, path)

    job = submit(api, LONG)
    early = api.get(job["response_url"])
    assert (early.status_code, early.json()["error_type"]) == (400, "not_completed")
    api.put(job["cancel_url"])
    wait_for(api, job, completed)
    again = api.put(job["cancel_url"])
    assert (again.status_code, again.json()["error_type"]) == (400, "already_completed")
    assert api.get(job["status_url"], params={"logs": "maybe"}).status_code == 422


def test_a_job_is_its_keys_alone_and_its_file_urls_reveal_nothing_but_the_file(
    api: httpx.Client, jobs_url: str
) -> None:
    """Key B meets key A's job exactly as it meets an unknown id, on every route; A's file URLs carry a
    token of their own, not A's request id (they are shared, and served without a key)."""
    job = submit(api, SMALL)
    unknown = job["request_id"][:-12] + "000000000000"
    routes = [("GET", "/status"), ("GET", "/status/stream"), ("GET", ""), ("PUT", "/cancel")]
    with httpx.Client(base_url=jobs_url, headers={"authorization": f"Key {OTHER_API_KEY}"}, timeout=30) as other:
        for method, path in routes:
            for request_id, state in ((job["request_id"], "queued or running"), (unknown, "unknown")):
                response = other.request(method, f"/queue/local/sdxl/requests/{request_id}{path}")
                body = response.json()
                assert (response.status_code, body["error_type"]) == (404, "not_found"), (method, path, state)
                assert body["detail"] == f"no request {request_id}"
        final = wait_for(api, job, completed)
        for method, path in routes:
            response = other.request(method, f"/queue/local/sdxl/requests/{job['request_id']}{path}")
            assert response.status_code == 404, (method, path, "completed")
    assert final["status"] == "COMPLETED"
    result = api.get(job["response_url"]).json()
    (image,) = result["images"]
    assert job["request_id"] not in image["url"]
    assert httpx.get(image["url"]).status_code == 200  # the URL alone, no key: as fal's CDN URLs


def test_status_stream_sends_each_change_and_ends_after_completed(api: httpx.Client) -> None:
    job = submit(api, SMALL)
    with connect_sse(api, "GET", job["status_url"] + "/stream", params={"logs": 1}) as source:
        events = [json.loads(sse.data) for sse in source.iter_sse()]
    assert events[-1]["status"] == "COMPLETED" and all(event["status"] != "COMPLETED" for event in events[:-1])
    logs = [log["message"] for event in events for log in event.get("logs") or []]
    assert logs[0] == "Queued" and logs[-1] == "Completed" and len(logs) == len(set(logs))  # each line once


def test_status_stream_without_the_flag_has_no_ids_and_no_previews(api: httpx.Client) -> None:
    """What fal's clients ask for (no `previews`): status objects only, as before previews existed."""
    job = submit(api, {**SMALL, "num_inference_steps": 12})
    with connect_sse(api, "GET", job["status_url"] + "/stream", params={"logs": 1}) as source:
        events = list(source.iter_sse())
    assert all(sse.id == "" for sse in events)
    assert all("status" in json.loads(sse.data) for sse in events)


def test_viewers_watch_a_queued_jobs_previews_and_resume_with_last_event_id(api: httpx.Client) -> None:
    """`?previews=1`: the running job's TAESD previews between its status events, every event with an
    id; a viewer that drops and reconnects with `Last-Event-ID` gets only what it missed (no log line
    twice, no preview twice), to COMPLETED. Two viewers at once see the same previews."""
    job = submit(api, {**LONG, "preview_interval": 4})
    url, params = job["status_url"] + "/stream", {"logs": 1, "previews": 1}
    before: list = []
    with connect_sse(api, "GET", url, params=params) as source:
        for sse in source.iter_sse():
            before.append(sse)
            if sum(json.loads(event.data).get("type") == "preview" for event in before) == 2:
                break  # the viewer drops here
    with httpx.Client(headers=KEY, timeout=120) as other, connect_sse(other, "GET", url, params=params) as second:
        with connect_sse(api, "GET", url, params=params, headers={"last-event-id": before[-1].id}) as source:
            after = list(source.iter_sse())
        watched = list(second.iter_sse())

    assert all(sse.id for sse in before + after + watched)
    previews = [json.loads(sse.data) for sse in before + after if json.loads(sse.data).get("type") == "preview"]
    steps = [preview["step"] for preview in previews]
    assert len(steps) >= 4 and steps == sorted(set(steps))  # none twice across the reconnect
    assert previews[0]["num_inference_steps"] == 40 and decode_image(previews[-1]["image"]).size[0] > 0
    statuses = [json.loads(sse.data) for sse in before + after if "status" in json.loads(sse.data)]
    logs = [log["message"] for status in statuses for log in status.get("logs") or []]
    assert logs[0] == "Queued" and logs[-1] == "Completed" and len(logs) == len(set(logs))
    assert statuses[-1]["status"] == "COMPLETED"
    assert any(json.loads(sse.data).get("type") == "preview" for sse in watched)
    malformed = api.get(url, params=params, headers={"last-event-id": "nonsense"})
    assert malformed.status_code == 422


def test_webhooks_are_called_for_allowed_hosts_and_refused_at_submit_otherwise(
    api: httpx.Client, webhooks: WebhookReceiver
) -> None:
    hook = f"http://127.0.0.1:{webhooks.server_address[1]}/hook"
    job = submit(api, SMALL, fal_webhook=hook)
    wait_for(api, job, completed)
    deadline = time.monotonic() + 30
    while not webhooks.received and time.monotonic() < deadline:
        time.sleep(0.1)
    (delivered,) = webhooks.received
    assert delivered["request_id"] == job["request_id"] and delivered["status"] == "OK"
    assert delivered["payload"]["seed"] == 3 and delivered["error"] is None
    base = str(api.base_url).rstrip("/")
    assert delivered["payload"]["images"][0]["url"].startswith(f"{base}/files/")  # absolute, as fal's

    # Verified with the receiver code docs/queue.md shows, as a receiver written for fal's webhooks does.
    receiver = documented_receiver(f"{base}/.well-known/jwks.json")
    keys = receiver["public_keys"]()
    (headers, body), *_ = webhooks.raw
    assert receiver["verify_webhook"](headers, body, keys)
    assert headers["x-fal-webhook-request-id"] == job["request_id"]
    assert not receiver["verify_webhook"](headers, body.replace(b'"OK"', b'"ERROR"'), keys)  # a changed body
    forged = {**headers, "x-fal-webhook-timestamp": str(int(headers["x-fal-webhook-timestamp"]) + 1)}
    assert not receiver["verify_webhook"](forged, body, keys)

    for refused in ("http://169.254.169.254/latest/meta-data", "file:///etc/passwd", "http://user:pw@127.0.0.1/"):
        response = api.post("/queue/local/sdxl", json=SMALL, params={"fal_webhook": refused})
        assert (response.status_code, response.json()["error_type"]) == (400, "webhook_not_allowed"), refused


def test_queue_calls_need_the_api_key_and_browsers_may_make_them(jobs_url: str) -> None:
    job_path = "/queue/local/sdxl/requests/x"
    for method, path in [("POST", "/queue/local/sdxl"), ("GET", f"{job_path}/status"), ("PUT", f"{job_path}/cancel")]:
        response = httpx.request(method, jobs_url + path, json=SMALL)
        assert (response.status_code, response.json()["error_type"]) == (401, "unauthorized"), path
    preflight = httpx.options(
        f"{jobs_url}{job_path}/cancel",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "PUT",
            "access-control-request-headers": "authorization, content-type, x-fal-queue-priority",
        },
    )
    assert preflight.status_code == 200
    assert "PUT" in preflight.headers["access-control-allow-methods"]
    assert "x-fal-queue-priority" in preflight.headers["access-control-allow-headers"].lower()


def test_run_and_stream_are_served_at_the_app_id_too(api: httpx.Client) -> None:
    result = api.post("/local/sdxl", json=SMALL)
    assert result.status_code == 200 and result.json()["seed"] == 3
    with connect_sse(api, "POST", "/local/sdxl/stream", json=SMALL) as source:
        types = [json.loads(sse.data)["type"] for sse in source.iter_sse()]
    assert types == ["preview", "preview", "final"]
