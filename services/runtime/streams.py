"""Turning a call that reports progress through a callback into an async stream of events."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable

from services.runtime.stage_client import StepCallback


async def with_progress(run: Callable[[StepCallback], Awaitable[Any]]) -> AsyncIterator[tuple[int, int] | Any]:
    """Yield (step, total) tuples as `run(on_step)` reports them, then its result.

    If the consumer stops early (client gone, deadline), the call is cancelled."""
    events: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(run(lambda done, total: events.put_nowait((done, total))))
    try:
        while not task.done() or not events.empty():
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
            else:
                getter.cancel()
        yield task.result()
    finally:
        if not task.done():
            task.cancel()
