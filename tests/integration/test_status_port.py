"""The ingress replicas' status port (`status_port`): health and status polls without Serve's proxy,
behind the same keys; nothing else; and a replica that takes the port over when its holder dies."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.integration.conftest import TEST_API_KEY, TEST_API_KEYS_ENV
from tests.integration.harness import ServeHarness, free_port

SMALL = {"prompt": "a red fox", "width": 128, "height": 128, "num_inference_steps": 4, "seed": 3}
KEY = {"authorization": f"Key {TEST_API_KEY}"}
APP = "status"
POLLS_PER_S = 40


@pytest.fixture(scope="module")
def service(serve_harness: ServeHarness) -> Iterator[tuple[str, str]]:
    """(Serve's URL, the status port's URL) of an app with API keys and two ingress replicas."""
    port = free_port()
    url = serve_harness.deploy(
        APP,
        f"/{APP}",
        args={
            "http": {"api_keys_env": TEST_API_KEYS_ENV, "max_polls_per_client_per_s": POLLS_PER_S},
            "status_server": {"port": port},
        },
        deployments={"SDXLIngress": {"num_replicas": 2}},
    )
    yield url, f"http://127.0.0.1:{port}"
    serve_harness.remove(APP)


def wait_until_answering(url: str, timeout_s: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(f"{url}/health", timeout=5)
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"nothing answers on {url}"
            time.sleep(0.5)


def test_health_and_status_polls_answer_as_through_serve(service: tuple[str, str]) -> None:
    serve_url, status_url = service
    health = wait_until_answering(status_url)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert health.headers["x-request-id"] == health.headers["x-fal-request-id"] != ""
    with httpx.Client(headers=KEY, timeout=60) as client:
        job = client.post(f"{serve_url}/queue/local/sdxl", json=SMALL).json()
        path = f"/queue/local/sdxl/requests/{job['request_id']}/status"
        seen = set()
        deadline = time.monotonic() + 60
        while "COMPLETED" not in seen and time.monotonic() < deadline:
            polled = client.get(f"{status_url}{path}", params={"logs": 1})
            assert polled.status_code == 200, polled.text
            seen.add(polled.json()["status"])
            time.sleep(1 / POLLS_PER_S)
            time.sleep(0.05)
        assert seen <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"} and "COMPLETED" in seen
        final = polled.json()
        assert final["status_url"] == f"{status_url}{path}"  # the host the client used
        assert "inference_time" in final["metrics"] and any("Completed" in log["message"] for log in final["logs"])
        through_serve = client.get(f"{serve_url}{path}", params={"logs": 1}).json()
        assert {k: v for k, v in through_serve.items() if not k.endswith("_url")} == {
            k: v for k, v in final.items() if not k.endswith("_url")
        }
        unknown = client.get(f"{status_url}/queue/local/sdxl/requests/0b9f3c1e-0000-4000-8000-000000000000/status")
        assert unknown.status_code == 404 and unknown.json()["error_type"] == "not_found"


def test_polls_need_the_key_and_nothing_else_is_served(service: tuple[str, str]) -> None:
    serve_url, status_url = service
    wait_until_answering(status_url)
    path = "/queue/local/sdxl/requests/0b9f3c1e-0000-4000-8000-000000000000"
    unauthorized = httpx.get(f"{status_url}{path}/status")
    assert unauthorized.status_code == 401 and unauthorized.json()["error_type"] == "unauthorized"
    for method, route in [("POST", "/stream"), ("POST", "/"), ("POST", "/queue/local/sdxl"), ("GET", path),
                          ("PUT", f"{path}/cancel"), ("GET", "/docs"), ("POST", "/health")]:  # fmt: skip
        refused = httpx.request(method, f"{status_url}{route}", headers=KEY, json=SMALL)
        assert refused.status_code == 404, (method, route, refused.text)
        assert refused.json()["error_type"] == "not_found"


def test_another_replica_takes_the_port_over_when_its_holder_dies(service: tuple[str, str]) -> None:
    _, status_url = service
    wait_until_answering(status_url)
    port = int(status_url.rsplit(":", 1)[1])
    (holder,) = {c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"}
    os.kill(holder, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        listening = {c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"}
        if listening - {holder}:
            break
        assert time.monotonic() < deadline, "no replica took the status port over"
        time.sleep(0.5)
    assert wait_until_answering(status_url).status_code == 200


def test_the_status_port_applies_the_per_client_poll_limit(service: tuple[str, str]) -> None:
    """A client polling faster than `max_polls_per_client_per_s` gets 429 + Retry-After on the status port
    as through Serve's; another client, and health checks, are not held up by it."""
    serve_url, status_url = service
    wait_until_answering(status_url)
    with httpx.Client(headers=KEY, timeout=60) as client:
        job = client.post(f"{serve_url}/queue/local/sdxl", json=SMALL).json()
        path = f"{status_url}/queue/local/sdxl/requests/{job['request_id']}/status"
        answers = [client.get(path) for _ in range(4 * POLLS_PER_S)]
        refused = [answer for answer in answers if answer.status_code == 429]
        assert refused and refused[0].json()["error_type"] == "too_many_requests"
        assert int(refused[0].headers["retry-after"]) >= 1
        assert httpx.get(f"{status_url}/health").status_code == 200
        time.sleep(1.0)
        assert client.get(path).status_code == 200  # the bucket refills
