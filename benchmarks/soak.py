"""Soak: a few hundred mixed requests against a real Serve app, then check nothing was lost or leaked.

    python -m benchmarks.soak --requests 300 --concurrency 6

Mix: streams read to the end, `POST /` calls, clients that leave mid-stream, malformed requests,
and more concurrent clients than the replica plus its queue admit (so some get 503). Afterwards:
every request the replica took either completed or was cancelled (none failed), the replica is the
same process, not busy, with the same thread count and bounded memory growth.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ray
from ray import serve

from tests.integration.harness import ServeHarness, free_port, sdxl_stats, stream_events

APP = "soak"
BAD_BODIES = [
    b"",
    b"{",
    b'{"prompt": ""}',
    b'{"prompt": "x", "width": 500}',
    b'{"prompt": "x", "num_inference_steps": 0}',
    b'{"prompt": "x", "seed": -1}',
    b'{"prompt": 5}',
    b'{"prompt": "x", "guidance_scale": NaN}',
]


MAX_ATTEMPTS = 30


def one_request(url: str, index: int, seed: int) -> tuple[str, int]:
    """One randomly chosen kind of request, retried after each 503 as `Retry-After` says.

    Returns how it ended, as the client saw it, and how many 503s it met on the way.
    """
    rejections = 0
    for _ in range(MAX_ATTEMPTS):
        ending, retry_after = attempt(url, index, seed)
        if ending != "rejected_503":
            return ending, rejections
        rejections += 1
        time.sleep(retry_after)
    return "gave_up_after_503s", rejections


def attempt(url: str, index: int, seed: int) -> tuple[str, float]:
    rng = random.Random(seed * 100_003 + index)
    kind = rng.choices(["stream", "post", "leave", "bad"], weights=[40, 15, 30, 15])[0]
    body = {
        "prompt": f"soak {index}",
        "width": 256,
        "height": 256,
        "num_inference_steps": rng.randint(6, 14),
        "preview_interval": 2,
        "seed": index,
    }
    with httpx.Client(timeout=120) as client:
        if kind == "bad":
            response = client.post(
                f"{url}/stream", content=rng.choice(BAD_BODIES), headers={"content-type": "application/json"}
            )
            return ("invalid_4xx" if 400 <= response.status_code < 500 else f"unexpected_{response.status_code}"), 0
        if kind == "post":
            response = client.post(f"{url}/", json=body)
            if response.status_code == 503:
                return "rejected_503", float(response.headers["retry-after"])
            return ("completed" if response.status_code == 200 else f"unexpected_{response.status_code}"), 0
        try:
            events = []
            for event in stream_events(client, f"{url}/stream", body):
                events.append(event)
                if kind == "leave" and len(events) == rng.randint(1, 3):
                    return "left_mid_stream", 0
        except httpx.HTTPStatusError as error:
            if error.response.status_code == 503:
                return "rejected_503", float(error.response.headers["retry-after"])
            return f"unexpected_{error.response.status_code}", 0
        if events and events[-1].event == "message" and events[-1].data["type"] == "final":
            return "completed", 0
        return ("error_event" if events and events[-1].event == "error" else "truncated"), 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    options = parser.parse_args()

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    harness = ServeHarness(free_port())
    url = harness.deploy(APP, "/", deployments={"SDXLDeployment": {"max_queued_requests": 2}})
    with httpx.Client(timeout=120) as client:  # warm up, so the baseline is the steady state
        client.post(f"{url}/", json={"prompt": "warm", "width": 256, "height": 256, "num_inference_steps": 2})
    before = sdxl_stats(APP)

    started = time.monotonic()
    with ThreadPoolExecutor(options.concurrency) as pool:
        results = list(pool.map(lambda i: one_request(url, i, options.seed), range(options.requests)))
    endings = Counter(ending for ending, _ in results)
    rejections = sum(count for _, count in results)
    elapsed = time.monotonic() - started

    after = sdxl_stats(APP)
    replica = {key: after["outcomes"].get(key, 0) - before["outcomes"].get(key, 0) for key in after["outcomes"]}
    deployment = serve.status().applications[APP].deployments["SDXLDeployment"]
    checks = {
        "every_request_ended_as_expected": set(endings) <= {"completed", "left_mid_stream", "invalid_4xx"},
        "no_failed_runs": replica.get("failed", 0) == 0,
        "every_accepted_request_completed_or_cancelled": (
            replica.get("completed", 0) + replica.get("cancelled", 0)
            == endings["completed"] + endings["left_mid_stream"]
        ),
        "overload_was_exercised": rejections > 0,
        "same_replica_process": after["pid"] == before["pid"],
        "replica_count_stable": deployment.replica_states.get("RUNNING", 0) == 1,
        "nothing_left_running": not after["busy"],
        "threads_stable": after["threads"] == before["threads"],
        "memory_growth_under_200_mib": after["rss_bytes"] - before["rss_bytes"] < 200 * 1024**2,
    }
    report = {
        "requests": options.requests,
        "concurrency": options.concurrency,
        "seconds": round(elapsed, 1),
        "client_endings": dict(endings),
        "503s_met_and_retried": rejections,
        "replica_outcomes": replica,
        "replica_steps_run": after["steps_run"] - before["steps_run"],
        "previews_dropped": after["previews_dropped"] - before["previews_dropped"],
        "rss_growth_mib": round((after["rss_bytes"] - before["rss_bytes"]) / 1024**2, 1),
        "threads": [before["threads"], after["threads"]],
        "checks": checks,
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    serve.shutdown()
    ray.shutdown()
    raise SystemExit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
