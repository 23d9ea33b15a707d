"""The SDXL deployment: the engine plus what Serve needs (health, stats, metrics).

Its callers reach it only through `serve_app.generation.serve.ServeGenerationClient`. Events cross
to them as the engine's event models; a failed run ends with an `ErrorEvent` (the client raises it
as its catalog error) rather than an exception, which Serve would log as a crash of the request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator

import psutil
import ray
from ray import serve

from deployments.engine import EngineConfig, SDXLEngine
from deployments.metrics import SDXLMetrics
from deployments.pipeline_run import RunOutcome
from serve_app.contract.errors import ServiceError
from serve_app.contract.events import ErrorEvent, RunMode, StreamEvent
from serve_app.contract.requests import ResolvedRequest

logger = logging.getLogger("ray.serve")

EXIT_AFTER_FATAL_S = 1.0  # time for the failed run's error event to reach its caller
# Adapter sets (multiplexed model ids) each replica advertises to Serve's router, most recent first. Routing
# only: the LoRAs themselves are bounded by `adapters.cache_max_count` and `cache_max_bytes` (the engine's).
ROUTED_ADAPTER_SETS = 16
EXIT_CODE_DEVICE_LOST = 70


@serve.deployment
class SDXLDeployment:
    def __init__(self, config: EngineConfig) -> None:
        started = time.perf_counter()
        self._metrics = SDXLMetrics()
        self._outcomes: Counter[str] = Counter()
        self._steps_run = 0
        self._engine = SDXLEngine(
            config,
            on_preview_rendered=self._metrics.preview_encode.observe,
            on_run_finished=self._record,
            on_first_preview=self._metrics.time_to_first_preview.observe,
            on_unusable=self._leave_service,
        )
        self._startup_seconds = time.perf_counter() - started  # model load (+ warm-up)

    async def generate(self, request: ResolvedRequest, mode: RunMode) -> AsyncIterator[StreamEvent | ErrorEvent]:
        """The engine's events; a failure as a last `ErrorEvent`."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self._serves_adapter_set(model_id)
        try:
            async for event in self._engine.generate(request, mode):
                yield event
        except ServiceError as error:
            yield ErrorEvent.model_validate(error.body().model_dump())

    @serve.multiplexed(max_num_models_per_replica=ROUTED_ADAPTER_SETS)
    async def _serves_adapter_set(self, model_id: str) -> str:
        """Registers the request's adapter set (`ResolvedRequest.adapter_set_id`) with Serve's router, which
        then sends its next requests here. The adapters are loaded by the engine, within the run."""
        return model_id

    def _leave_service(self) -> None:
        """A fatal device error: the engine refuses new work from now on (callers retry elsewhere), and
        the process exits once the failed run's error event is on its way, so that Serve replaces the
        replica now, not after `health_check_period_s` x 3 of a replica that looks idle."""
        logger.error("The device failed for good; this replica leaves service in %.0f s", EXIT_AFTER_FATAL_S)
        # A timer thread: called from the event loop (a failed run) or the health check's thread (the watchdog).
        exit_later = threading.Timer(EXIT_AFTER_FATAL_S, os._exit, args=(EXIT_CODE_DEVICE_LOST,))
        exit_later.daemon = True
        exit_later.start()

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
            "adapters": self._engine.adapters.stats(),
            "threads": threading.active_count(),
            "rss_bytes": psutil.Process().memory_info().rss,
        }

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica. Off the event loop,
        which relays the running generation's events."""
        await asyncio.to_thread(self._engine.check_device)
