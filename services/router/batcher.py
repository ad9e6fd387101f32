"""Groups compatible requests into one stage batch within a short window (CPU bookkeeping).

A request waits at most `window_s` for companions with the same batch key; a batch closes early
once it holds `max_batch_images` images. A caller that gives up (deadline, disconnect) leaves
the queue at once; a batch whose every caller gave up is cancelled, which frees the stage."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Hashable

from services.runtime import metrics
from services.runtime.errors import QueueFullError, RequestCancelledError


@dataclass(eq=False)
class Pending:
    item: Any
    images: int
    future: asyncio.Future
    abandoned: bool = False
    batch: list["Pending"] = field(default_factory=list)
    task: asyncio.Task | None = None


RunBatch = Callable[[list[Any]], Awaitable[list[Any]]]


class Batcher:
    def __init__(self, run_batch: RunBatch, *, window_s: float, max_batch_images: int, max_queue: int):
        self.run_batch = run_batch
        self.window_s = window_s
        self.max_batch_images = max_batch_images
        self.max_queue = max_queue
        self._queues: dict[Hashable, list[Pending]] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self.in_flight = 0  # batches running now

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def submit(self, key: Hashable, item: Any, images: int) -> Any:
        if self.queued >= self.max_queue:
            raise QueueFullError(f"queue full ({self.max_queue} requests waiting); retry later")
        loop = asyncio.get_running_loop()
        pending = Pending(item=item, images=images, future=loop.create_future())
        queue = self._queues.setdefault(key, [])
        queue.append(pending)
        metrics.QUEUE_DEPTH.inc()
        if sum(p.images for p in queue) >= self.max_batch_images:
            self._flush(key)
        elif key not in self._timers:
            self._timers[key] = loop.call_later(self.window_s, self._flush, key)
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._abandon(key, pending)
            raise

    def _abandon(self, key: Hashable, pending: Pending) -> None:
        pending.abandoned = True
        queue = self._queues.get(key, [])
        if pending in queue:
            queue.remove(pending)
            metrics.QUEUE_DEPTH.dec()
        elif pending.task is not None and all(p.abandoned for p in pending.batch):
            pending.task.cancel()

    def _flush(self, key: Hashable) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        queue = self._queues.get(key, [])
        batch, images = [], 0
        while queue and (not batch or images + queue[0].images <= self.max_batch_images):
            p = queue.pop(0)
            metrics.QUEUE_DEPTH.dec()
            batch.append(p)
            images += p.images
        if not queue:
            self._queues.pop(key, None)
        else:  # the rest start their own window now
            self._timers[key] = asyncio.get_running_loop().call_later(self.window_s, self._flush, key)
        if not batch:
            return
        task = asyncio.ensure_future(self._run(batch))
        for p in batch:
            p.batch, p.task = batch, task

    async def _run(self, batch: list[Pending]) -> None:
        self.in_flight += 1
        try:
            results = await self.run_batch([p.item for p in batch])
        except asyncio.CancelledError:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(RequestCancelledError("batch cancelled"))
            raise
        except Exception as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        else:
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)
        finally:
            self.in_flight -= 1
