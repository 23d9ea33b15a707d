"""The generation client's contract, and the bookkeeping every implementation shares.

A call yields `PreviewEvent`s and `ProgressEvent`s as the caller's `RunMode` asked, then one
`FinalEvent`, then ends. A failure of any kind (the replica's error report, a dead replica, overload)
raises its catalog error instead. This module is the only place that tells event types apart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Protocol

from serve_app.contract.errors import InternalError, from_body
from serve_app.contract.events import ErrorEvent, FinalEvent, PreviewEvent, ProgressEvent, RunMode, StreamEvent
from serve_app.contract.requests import ResolvedRequest

ProgressHook = Callable[[ProgressEvent], Awaitable[None]]
PreviewHook = Callable[[PreviewEvent], Awaitable[None]]


class GenerationCall(ABC):
    """One generation in flight: an async iterator of its events; `cancel()` stops it (idempotent)."""

    def __init__(self) -> None:
        self._final_seen = False
        self._ended = False

    def __aiter__(self) -> GenerationCall:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._ended:
            raise StopAsyncIteration
        if self._final_seen:
            self._ended = True
            await self._after_final()
            raise StopAsyncIteration
        try:
            event = await self._receive()
        except BaseException:
            self._ended = True
            raise
        if event is None:
            self._ended = True
            raise InternalError("the generation ended without a result")
        if isinstance(event, ErrorEvent):
            self._ended = True
            await self._after_final()
            raise from_body(event)
        if isinstance(event, FinalEvent):
            self._final_seen = True
        return event

    async def result(
        self, on_progress: ProgressHook | None = None, on_preview: PreviewHook | None = None
    ) -> FinalEvent:
        """Read the call to its end: the final event; progress and previews go to the hooks given."""
        final: FinalEvent | None = None
        async for event in self:
            if isinstance(event, FinalEvent):
                final = event
            elif isinstance(event, ProgressEvent) and on_progress is not None:
                await on_progress(event)
            elif isinstance(event, PreviewEvent) and on_preview is not None:
                await on_preview(event)
        if final is None:  # the iterator raises rather than end without one; a guard, not a path
            raise InternalError("the generation ended without a result")
        return final

    @abstractmethod
    async def _receive(self) -> StreamEvent | ErrorEvent | None:
        """The replica's next event (None at the end); transport failures as catalog errors."""

    @abstractmethod
    async def _after_final(self) -> None:
        """After the terminal event: let the underlying call end by itself (briefly)."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop the generation if it still runs (at its next denoising step); safe to call at any time."""


class GenerationClient(Protocol):
    """What the relay and the job queue generate through."""

    def events(self, request: ResolvedRequest, mode: RunMode) -> GenerationCall:
        """Start a generation; it waits for a free replica first. Call from the event loop."""
        ...

    async def ready_replicas(self) -> int:
        """Model replicas that can take work now (each runs one generation at a time); cheap to call often."""
        ...
