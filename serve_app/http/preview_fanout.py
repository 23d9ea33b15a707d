"""Previews of queued jobs for any number of viewers: each ingress replica follows a watched job's
previews with one long poll on the job queue, however many of its clients watch that job, and hands
every viewer what it has not seen yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from serve_app.contract.errors import ServiceError

logger = logging.getLogger("ray.serve")

LONG_POLL_S = 10.0
KEPT = 8  # as the store keeps: enough for a viewer that reconnects to catch up
Entry = tuple[str, str]  # (the store's entry id "<ms>-<seq>", the PreviewEvent's JSON)
Fetch = Callable[[str, str, float], Awaitable[list[Entry]]]  # (request id, after id, timeout) -> entries


class PreviewFanout:
    def __init__(self, fetch: Fetch) -> None:
        self._fetch = fetch
        self._watches: dict[str, JobPreviews] = {}

    @contextlib.asynccontextmanager
    async def watch(self, request_id: str) -> AsyncIterator[JobPreviews]:
        """The job's previews while the caller watches; the long poll stops with its last viewer."""
        previews = self._watches.get(request_id)
        if previews is None:
            previews = self._watches[request_id] = JobPreviews()
            previews.follower = asyncio.get_running_loop().create_task(self._follow(request_id, previews))
        previews.viewers += 1
        try:
            yield previews
        finally:
            previews.viewers -= 1
            if previews.viewers == 0:
                previews.follower.cancel()
                self._watches.pop(request_id, None)

    def watched(self) -> int:
        return len(self._watches)

    async def _follow(self, request_id: str, previews: JobPreviews) -> None:
        while True:
            try:
                entries = await self._fetch(request_id, previews.last_id, LONG_POLL_S)
            except ServiceError as error:  # the job queue away: previews pause, status goes on
                logger.debug("Previews of %s: %s", request_id, error)
                await asyncio.sleep(1.0)
                continue
            if entries:
                previews.add(entries)


class JobPreviews:
    """The latest previews of one job, as this replica has them."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.changed = asyncio.Event()  # replaced after each set: waiters hold the one that fired
        self.viewers = 0
        self.follower: asyncio.Task | None = None

    @property
    def last_id(self) -> str:
        return self.entries[-1][0] if self.entries else ""

    def add(self, entries: list[Entry]) -> None:
        self.entries = [*self.entries, *entries][-KEPT:]
        self.changed.set()
        self.changed = asyncio.Event()

    def after(self, entry_id: str) -> list[Entry]:
        """What a viewer that last saw `entry_id` has not seen; a new viewer ("") gets the latest only."""
        if not entry_id:
            return self.entries[-1:]
        seen = _order(entry_id)
        return [entry for entry in self.entries if _order(entry[0]) > seen]


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
