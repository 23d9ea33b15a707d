"""Previews of a queued job for many viewers: one long poll per job per ingress replica, each viewer
handed what it has not seen (a new one the latest, a reconnecting one what it missed)."""

from __future__ import annotations

import asyncio

from serve_app.contract.errors import QueueUnavailable
from serve_app.http.preview_fanout import PreviewFanout


class JobQueue:
    """The job queue's `previews` long poll over a list the test appends to."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str]] = []
        self.calls = 0
        self.added = asyncio.Event()
        self.fail_next = False

    def add(self, ms: int) -> None:
        self.entries.append((f"{ms}-0", f'{{"step": {ms}}}'))
        self.added.set()
        self.added = asyncio.Event()

    async def previews(self, request_id: str, after: str, timeout_s: float) -> list[tuple[str, str]]:
        self.calls += 1
        if self.fail_next:
            self.fail_next = False
            raise QueueUnavailable(retry_after_s=1)
        newer = [entry for entry in self.entries if not after or int(entry[0].split("-")[0]) > int(after.split("-")[0])]
        if not newer:
            await asyncio.wait_for(self.added.wait(), timeout_s)
            return await self.previews(request_id, after, 0)
        return newer


async def next_change(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), 5)


def test_many_viewers_share_one_long_poll_and_each_sees_what_it_missed() -> None:
    async def scenario() -> None:
        queue = JobQueue()
        fanout = PreviewFanout(queue.previews)
        queue.add(1)
        queue.add(2)
        async with fanout.watch("job") as first, fanout.watch("job") as second:
            await next_change(first.changed)
            assert first is second and fanout.watched() == 1
            assert [entry[0] for entry in first.after("")] == ["2-0"]  # a new viewer: the latest only
            changed = first.changed
            queue.add(3)
            queue.add(4)
            await next_change(changed)
            while first.last_id != "4-0":
                await next_change(first.changed)
            assert [entry[0] for entry in second.after("2-0")] == ["3-0", "4-0"]  # resumes after its last
            assert queue.calls <= 4  # one follower, not one per viewer
        assert fanout.watched() == 0  # the long poll stops with the last viewer

    asyncio.run(scenario())


def test_the_job_queue_away_pauses_previews_only() -> None:
    async def scenario() -> None:
        queue = JobQueue()
        queue.fail_next = True
        fanout = PreviewFanout(queue.previews)
        async with fanout.watch("job") as previews:
            queue.add(7)
            await asyncio.wait_for(previews.changed.wait(), 5)  # retried after a second
            assert previews.after("") == [("7-0", '{"step": 7}')]

    asyncio.run(scenario())
