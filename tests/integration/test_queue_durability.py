"""Durable jobs on Redis: a killed job-queue replica and a redeploy lose no accepted job, and none
completes twice."""

from __future__ import annotations

import time

import httpx
import ray

from tests.integration.conftest import TEST_REDIS_URL_ENV
from tests.integration.harness import ServeHarness

APP = "durable"
SMALL = {"prompt": "a red fox", "width": 256, "height": 256, "num_inference_steps": 6}
FIRST = {**SMALL, "num_inference_steps": 50, "width": 384, "height": 384, "seed": 100}  # running at the kill


def kill_job_queue_replica() -> None:
    """As a crash would: Serve notices the dead replica and starts another."""
    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)]
    (name,) = [name for name in names if f"{APP}#JobQueue#" in name]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def poll(client: httpx.Client, url: str) -> dict | None:
    """The status, or None while the service is between replicas (a redeploy, a restart)."""
    try:
        response = client.get(url, params={"logs": 1})
    except httpx.TransportError:
        return None
    if response.status_code in (502, 503, 504):
        return None
    assert response.status_code == 200, response.text  # never 404: an accepted job is never forgotten
    return response.json()


def test_jobs_survive_a_killed_job_queue_and_a_redeploy(serve_harness: ServeHarness) -> None:
    queue = {"store": "redis", "redis_url_env": TEST_REDIS_URL_ENV, "lease_s": 3, "max_attempts": 3}
    args = {"queue": queue}
    url = serve_harness.deploy(APP, f"/{APP}", args=args)
    try:
        with httpx.Client(timeout=60) as client:
            jobs = [client.post(f"{url}/queue/local/sdxl", json=FIRST).json()]
            jobs += [client.post(f"{url}/queue/local/sdxl", json={**SMALL, "seed": seed}).json() for seed in range(4)]
            deadline = time.monotonic() + 120
            while (poll(client, jobs[0]["status_url"]) or {}).get("status") != "IN_PROGRESS":
                assert time.monotonic() < deadline
                time.sleep(0.1)

            kill_job_queue_replica()  # the first job is running, the rest are queued
            serve_harness.deploy(APP, f"/{APP}", args={**args, "requests": {"final_jpeg_quality": 90}})  # a new version

            final: dict[str, dict] = {}
            deadline = time.monotonic() + 300
            while len(final) < len(jobs):
                assert time.monotonic() < deadline, final
                for job in jobs:
                    body = poll(client, job["status_url"])
                    if body and body["status"] == "COMPLETED":
                        final[job["request_id"]] = body
                time.sleep(0.2)

            for job, seed in zip(jobs, [100, 0, 1, 2, 3], strict=True):
                body = final[job["request_id"]]
                assert "error" not in body, body
                messages = [log["message"] for log in body["logs"]]
                assert messages.count("Completed") == 1  # completed once
                result = client.get(job["response_url"])
                assert result.status_code == 200 and result.json()["seed"] == seed
            # The job that was running when its dispatcher died ran again from the start (once more for the
            # kill, and once more again if the redeploy replaced the restarted replica mid-run too).
            starts = [log["message"] for log in final[jobs[0]["request_id"]]["logs"]].count("Started")
            assert 2 <= starts <= queue["max_attempts"]
    finally:
        serve_harness.remove(APP)
