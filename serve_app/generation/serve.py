"""The generation client over the SDXL deployment's handle: the only code that calls that handle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from serve_app.contract.events import ErrorEvent, RunMode, StreamEvent
from serve_app.contract.requests import ResolvedRequest
from serve_app.generation.client import GenerationCall
from serve_app.generation.ray_errors import from_ray

logger = logging.getLogger("ray.serve")

FINISH_WAIT_S = 2.0  # from a call's terminal event to its end: the replica's cleanup, milliseconds
READINESS_MAX_AGE_S = 2.0  # asking the controller costs ~30 ms of CPU: polls must not pay it each time


class ServeGenerationCall(GenerationCall):
    def __init__(self, response: DeploymentResponseGenerator) -> None:
        super().__init__()
        self._response = response

    async def _receive(self) -> StreamEvent | ErrorEvent | None:
        try:
            return await self._response.__anext__()
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise from_ray(error) from error

    async def _after_final(self) -> None:
        """Let the call end by itself (briefly), so that the replica logs and counts it as finished rather
        than cancelled; then make sure it has stopped."""
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._response.__anext__(), FINISH_WAIT_S)
        finally:
            self.cancel()

    def cancel(self) -> None:
        """`cancel()` re-raises the call's own failure (e.g. `BackPressureError`) when it already failed;
        that outcome was handled where it was read."""
        with contextlib.suppress(Exception):
            self._response.cancel()


class ServeGenerationClient:
    """`SDXLDeployment.generate` over its handle; readiness from Serve's status, cached."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle
        self._generate = handle.options(stream=True).generate
        self._ready: tuple[float, int] = (0.0, 0)  # (checked at, running replicas)
        self._refresh: asyncio.Task | None = None

    def events(self, request: ResolvedRequest, mode: RunMode) -> GenerationCall:
        """Requests naming adapters (or a runner hint) go by Serve's model multiplexing, preferring the replicas
        that served the same adapter set last."""
        model_id = request.adapter_set_id
        if not model_id:
            return ServeGenerationCall(self._generate.remote(request, mode))
        generate = self._handle.options(stream=True, multiplexed_model_id=model_id).generate
        return ServeGenerationCall(generate.remote(request, mode))

    async def ready_replicas(self) -> int:
        """From a cached answer refreshed in the background (the first call waits for one)."""
        checked_at, ready = self._ready
        if checked_at == 0.0:
            await self._refresh_readiness()
        elif time.monotonic() - checked_at > READINESS_MAX_AGE_S and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.get_running_loop().create_task(self._refresh_readiness())
        return self._ready[1]

    async def _refresh_readiness(self) -> None:
        try:
            running = await asyncio.to_thread(self._running_replicas)
        except Exception:  # noqa: BLE001 - the controller is briefly away: keep the last answer
            logger.warning("Asking Serve for the model replicas' status failed", exc_info=True)
            running = self._ready[1]
        self._ready = (time.monotonic(), running)

    def _running_replicas(self) -> int:
        deployment = self._handle.deployment_id
        application = serve.status().applications.get(deployment.app_name)
        status = application.deployments.get(deployment.name) if application else None
        return status.replica_states.get("RUNNING", 0) if status else 0
