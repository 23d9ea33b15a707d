"""The generation client over an `SDXLEngine` in the caller's process: the Serve client's twin, for
tests and benchmarks that drive the relay and the job queue without Serve.

The engine's generator runs in a task of its own, as Serve runs the replica's method: `cancel()`
cancels that task, which reaches the generator as `CancelledError`, as a client's disconnect does
under Serve, and the engine stops the pipeline at its next step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from deployments.engine import SDXLEngine
from serve_app.contract.errors import Cancelled, InternalError, ServiceError
from serve_app.contract.events import ErrorEvent, RunMode, StreamEvent
from serve_app.contract.requests import ResolvedRequest
from serve_app.generation.client import GenerationCall

logger = logging.getLogger(__name__)

_END = object()


class InProcessCall(GenerationCall):
    def __init__(self, events: AsyncIterator[StreamEvent]) -> None:
        super().__init__()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._pump(events))

    async def _pump(self, events: AsyncIterator[StreamEvent]) -> None:
        try:
            async for event in events:
                self._queue.put_nowait(event)
        except asyncio.CancelledError:  # `cancel()`: a reader still waiting learns it, as over Serve
            self._queue.put_nowait(_error_event(Cancelled("the generation was cancelled")))
            raise
        except ServiceError as error:
            self._queue.put_nowait(_error_event(error))
        except Exception:  # noqa: BLE001 - a bug in the engine: the caller sees an internal error
            logger.exception("The engine failed")
            self._queue.put_nowait(_error_event(InternalError()))
        self._queue.put_nowait(_END)

    async def _receive(self) -> StreamEvent | ErrorEvent | None:
        item = await self._queue.get()
        return None if item is _END else item

    async def _after_final(self) -> None:
        """Until the engine has released its slot (the pipeline thread stopped): the next call may start."""
        await asyncio.gather(self._task, return_exceptions=True)

    def cancel(self) -> None:
        self._task.cancel()


def _error_event(error: ServiceError) -> ErrorEvent:
    return ErrorEvent.model_validate(error.body().model_dump())


class InProcessGenerationClient:
    def __init__(self, engine: SDXLEngine) -> None:
        self.engine = engine

    def events(self, request: ResolvedRequest, mode: RunMode) -> InProcessCall:
        return InProcessCall(self.engine.generate(request, mode))

    async def ready_replicas(self) -> int:
        return 1 if self.engine.usable else 0
