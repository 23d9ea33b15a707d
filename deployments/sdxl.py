"""The SDXL deployment: the engine plus what Serve needs (health, stats, metrics).

Events cross to the ingress as plain dicts (`model_dump()` of the engine's event models).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator

import psutil
import ray
from ray import serve

from deployments.engine import SDXLEngine
from deployments.generation import RunOutcome
from deployments.metrics import SDXLMetrics
from serve_app.config import AppConfig
from serve_app.schemas import GenerationRequest


@serve.deployment
class SDXLDeployment:
    def __init__(self, config: AppConfig) -> None:
        started = time.perf_counter()
        self._metrics = SDXLMetrics()
        self._outcomes: Counter[str] = Counter()
        self._steps_run = 0
        self._engine = SDXLEngine(
            config, on_preview_rendered=self._metrics.preview_encode.observe, on_run_finished=self._record
        )
        self._startup_seconds = time.perf_counter() - started  # model load (+ warm-up)

    async def generate(self, request: dict, previews: bool = True, progress: bool = False) -> AsyncIterator[dict]:
        """The engine's events as dicts. `request` is a `GenerationRequest` dict."""
        arrived = time.perf_counter()
        first_preview = True
        parsed = GenerationRequest.model_validate(request)
        async for event in self._engine.generate(parsed, previews=previews, progress=progress):
            if event.type == "preview" and first_preview:
                first_preview = False
                self._metrics.time_to_first_preview.observe(time.perf_counter() - arrived)
            yield event.model_dump()

    def _record(self, outcome: RunOutcome) -> None:
        error_type = outcome.error.error_type if outcome.error else ""
        self._outcomes[outcome.status] += 1
        self._steps_run += outcome.steps_completed
        self._metrics.requests.inc(tags={"outcome": outcome.status, "error_type": error_type})
        if outcome.status == "completed" and outcome.denoise_seconds > 0:
            self._metrics.steps_per_second.observe(outcome.steps_completed / outcome.denoise_seconds)

    def stats(self) -> dict:
        """Counters for operators and tests: outcomes, steps run, and what could leak (threads, memory)."""
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": str(self._engine.models.device),
            "startup_seconds": self._startup_seconds,
            "outcomes": dict(self._outcomes),
            "steps_run": self._steps_run,
            "busy": self._engine.busy,
            "previews_dropped": self._engine.previews.dropped,
            "threads": threading.active_count(),
            "rss_bytes": psutil.Process().memory_info().rss,
        }

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica. Off the event loop,
        which relays the running generation's events."""
        await asyncio.to_thread(self._engine.check_device)
