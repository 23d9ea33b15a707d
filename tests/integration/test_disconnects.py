"""A client that leaves stops the work, and the replica moves on to whoever waits."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.integration.harness import sdxl_stats, stream_events

APP = "sdxl"  # the local default app (tests/integration/conftest.py)
SMALL = {"prompt": "a red fox", "width": 256, "height": 256}
LONG = {"prompt": "a slow fox", "width": 512, "height": 512, "num_inference_steps": 50, "preview_interval": 1}


def delta(after: dict, before: dict, outcome: str) -> int:
    return after["outcomes"].get(outcome, 0) - before["outcomes"].get(outcome, 0)


def read_events_then_leave(client: httpx.Client, url: str, body: dict, events_to_read: int) -> list[dict]:
    """Open a stream, read a few events, then close the connection mid-stream."""
    seen = []
    for event in stream_events(client, url, body):
        seen.append(event.data)
        if len(seen) == events_to_read:
            break  # leaving the `with` closes the connection
    return seen


def post_in_background(url: str, body: dict) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def post() -> None:
        with httpx.Client(timeout=120) as client:
            response = client.post(url, json=body)
            result["status"], result["body"] = response.status_code, response.json()

    thread = threading.Thread(target=post)
    thread.start()
    return thread, result


def test_disconnect_between_events_stops_denoising_and_starts_the_waiting_request(
    local_url: str, client: httpx.Client
) -> None:
    before = sdxl_stats(APP)
    started = threading.Event()
    waiting, result = None, None

    for index, event in enumerate(stream_events(client, f"{local_url}/stream", LONG)):
        assert event.data["type"] == "preview"
        if index == 0:
            # Someone else now waits for the only replica (max_ongoing_requests: 1).
            waiting, result = post_in_background(f"{local_url}/", {**SMALL, "num_inference_steps": 2})
            started.set()
        if index == 2:
            break
    waiting.join(timeout=120)

    after = sdxl_stats(APP)
    assert result["status"] == 200 and result["body"]["images"]
    assert delta(after, before, "cancelled") == 1
    assert delta(after, before, "completed") == 1
    # The abandoned 50-step run stopped a step or so after the client left (it had sent 3 previews,
    # one per step), so the waiting request ran in its place rather than after it.
    abandoned_steps = after["steps_run"] - before["steps_run"] - 2
    assert 3 <= abandoned_steps <= LONG["num_inference_steps"] // 2  # a slow machine relays the cancel late
    assert not after["busy"]


def test_disconnect_before_the_first_event_never_runs_the_request(local_url: str) -> None:
    before = sdxl_stats(APP)
    with httpx.Client(timeout=120) as busy_client:
        blocker = stream_events(busy_client, f"{local_url}/stream", LONG)
        next(blocker)  # the replica is now busy with a long run
        with httpx.Client(timeout=0.5) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post(f"{local_url}/stream", json={**SMALL, "num_inference_steps": 2})  # queued, then gone
        blocker.close()
    after = sdxl_stats(APP)
    assert delta(after, before, "cancelled") == 1  # the blocker
    assert sum(after["outcomes"].values()) - sum(before["outcomes"].values()) == 1  # the impatient one never ran


def test_disconnect_during_final_decode_leaves_replica_healthy(local_url: str, client: httpx.Client) -> None:
    before = sdxl_stats(APP)
    # 6 steps, previews at 0 and 5: the preview of the last step arrives as the final decode starts.
    body = {**SMALL, "width": 1024, "height": 1024, "num_inference_steps": 6, "preview_interval": 5}
    seen = read_events_then_leave(client, f"{local_url}/stream", body, events_to_read=2)
    assert [event["step"] for event in seen] == [0, 5]
    follow_up = client.post(f"{local_url}/", json={**SMALL, "num_inference_steps": 2})
    assert follow_up.status_code == 200
    after = sdxl_stats(APP)
    assert delta(after, before, "failed") == 0
    assert delta(after, before, "cancelled") + delta(after, before, "completed") == 2


def test_many_disconnects_leak_nothing(local_url: str, client: httpx.Client) -> None:
    client.post(f"{local_url}/", json={**SMALL, "num_inference_steps": 2})  # warm, so the baseline is steady
    before = sdxl_stats(APP)
    for round_ in range(20):
        # 40 steps: the client leaves by step 8, so the cancel has many steps to land in on a slow machine.
        body = {**SMALL, "num_inference_steps": 40, "preview_interval": 2, "seed": round_}
        read_events_then_leave(client, f"{local_url}/stream", body, events_to_read=1 + round_ % 5)
    assert client.post(f"{local_url}/", json={**SMALL, "num_inference_steps": 2}).status_code == 200
    after = sdxl_stats(APP)
    assert delta(after, before, "failed") == 0
    assert delta(after, before, "cancelled") + delta(after, before, "completed") == 21
    assert delta(after, before, "cancelled") >= 15
    assert after["threads"] == before["threads"]
    assert not after["busy"]
    assert after["rss_bytes"] - before["rss_bytes"] < 200 * 1024 * 1024
