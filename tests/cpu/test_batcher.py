"""The router's batcher: windows, size limits, queue limit, and callers who give up."""

import asyncio

import pytest

from services.router.batcher import Batcher
from services.runtime.errors import QueueFullError


def _batcher(calls, window_s=0.05, max_images=4, max_queue=8, delay_s=0.0):
    async def run_batch(items):
        calls.append(list(items))
        await asyncio.sleep(delay_s)
        return [f"done {i}" for i in items]

    return Batcher(run_batch, window_s=window_s, max_batch_images=max_images, max_queue=max_queue)


def test_same_key_within_window_shares_a_batch_other_keys_do_not():
    async def main():
        calls = []
        b = _batcher(calls)
        out = await asyncio.gather(b.submit("k", "a", 1), b.submit("k", "b", 1), b.submit("other", "c", 1))
        return calls, out

    calls, out = asyncio.run(main())
    assert out == ["done a", "done b", "done c"]
    assert sorted(map(sorted, calls)) == [["a", "b"], ["c"]]


def test_batch_closes_at_max_images_and_oversized_requests_run_alone():
    async def main():
        calls = []
        b = _batcher(calls, window_s=10, max_images=4)
        # 3 + 1 images fill a batch at once (no 10 s wait); 6 images exceed the limit alone.
        out = await asyncio.wait_for(asyncio.gather(b.submit("k", "a", 3), b.submit("k", "b", 1)), 2)
        big = await asyncio.wait_for(b.submit("j", "big", 6), 11)
        return calls, out, big

    calls, out, big = asyncio.run(main())
    assert calls[0] == ["a", "b"] and out == ["done a", "done b"] and big == "done big"


def test_queue_full_is_rejected():
    async def main():
        b = _batcher([], window_s=1.0, max_queue=2)
        waiting = [asyncio.ensure_future(b.submit("k", i, 1)) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await b.submit("k", "x", 1)
        for w in waiting:
            w.cancel()

    asyncio.run(main())


def test_caller_who_gives_up_leaves_the_queue_and_cancels_an_orphan_batch():
    async def main():
        calls = []
        b = _batcher(calls, window_s=0.05, delay_s=5.0)
        queued = asyncio.ensure_future(b.submit("k", "gone", 1))
        await asyncio.sleep(0)
        queued.cancel()
        await asyncio.sleep(0.1)
        assert b.queued == 0 and calls == []  # left before its batch formed: never ran

        running = asyncio.ensure_future(b.submit("k", "slow", 1))
        await asyncio.sleep(0.1)  # batch started, run_batch sleeping
        assert b.in_flight == 1
        running.cancel()
        await asyncio.sleep(0.05)
        return b.in_flight

    assert asyncio.run(main()) == 0
