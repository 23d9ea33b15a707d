"""Replica cold start for the tiny model: first ever (model generated into an empty cache) and warm cache.

    python -m benchmarks.cold_start

For each case: seconds from submitting the config to the replica answering, and the part spent in
the replica's constructor (model load, + warm-up if configured), as the replica reports it.
"""

from __future__ import annotations

import os
import tempfile
import time

import ray

from tests.integration.harness import ServeHarness, free_port, sdxl_stats


def main() -> None:
    os.environ["SDXL_SERVE_CACHE"] = tempfile.mkdtemp(prefix="cold-start-")  # empty: the first start generates
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    harness = ServeHarness(free_port())
    rows = []
    for case, args in [
        ("empty cache (generates the tiny model)", {}),
        ("warm cache", {"requests": {"final_jpeg_quality": 94}}),  # a changed arg forces a new replica
        ("warm cache + warm-up at 512", {"requests": {"final_jpeg_quality": 93}, "model": {"warmup_size": 512}}),
    ]:
        started = time.monotonic()
        harness.deploy("sdxl", "/", args=args)
        running = time.monotonic() - started
        rows.append((case, running, sdxl_stats("sdxl")["startup_seconds"]))
    print("| case | deploy to running, s | in the replica's constructor, s |")
    print("|---|---|---|")
    for case, running, constructor in rows:
        print(f"| {case} | {running:.1f} | {constructor:.1f} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
