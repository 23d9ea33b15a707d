"""Waiting for an `asyncio.Event` with a time limit, without losing a cancellation.

Python 3.11's `asyncio.wait_for` can swallow a cancellation that arrives just as the awaited event is
set (python/cpython#86296, fixed in 3.12): a loop that waits that way may then ignore the cancel that
should stop it. `asyncio.wait` has no such race.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """True once `event` is set, False after `timeout_s`; a cancellation always propagates."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=max(0.0, timeout_s))
    finally:
        waiter.cancel()
    return bool(done)


async def wait_any(first: asyncio.Event, second: asyncio.Event, timeout_s: float) -> bool:
    """True once either event is set, False after `timeout_s`; a cancellation always propagates."""
    if first.is_set() or second.is_set():
        return True
    waiters = {asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())}
    try:
        done, _ = await asyncio.wait(waiters, timeout=max(0.0, timeout_s), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)
