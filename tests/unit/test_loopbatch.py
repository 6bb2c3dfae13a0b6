"""`LoopBatch`: the requests of a loop turn share one call; those made while it runs get the next
(a call that began after they asked); an item's exception is its caller's alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from webjobsd.runtime.loopbatch import LoopBatch, Outcome


class Recorder:
    """A batch function that records its batches; the first call waits until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.first_running = threading.Event()
        self.release_first = threading.Event()

    def __call__(self, items: Sequence[int]) -> list[Outcome[int]]:
        if not self.batches:
            self.first_running.set()
            assert self.release_first.wait(10)
        self.batches.append(list(items))
        return [ValueError(item) if item < 0 else item * 10 for item in items]


async def test_a_turn_shares_a_call_and_requests_during_it_get_the_next() -> None:
    work = Recorder()
    batch: LoopBatch[int, int] = LoopBatch(work, "test")
    first = [asyncio.ensure_future(batch.submit(item)) for item in (1, 2, 3)]
    assert await asyncio.to_thread(work.first_running.wait, 10)
    # Asked while the first call runs: served by a second call, whatever its timing.
    second = [asyncio.ensure_future(batch.submit(item)) for item in (4, -5, 6)]
    await asyncio.sleep(0)
    work.release_first.set()

    assert await asyncio.gather(*first) == [10, 20, 30]
    assert await second[0] == 40
    with pytest.raises(ValueError):
        await second[1]
    assert await second[2] == 60
    assert work.batches == [[1, 2, 3], [4, -5, 6]]


async def test_a_failing_call_fails_its_batch_and_the_next_batch_runs() -> None:
    calls = 0

    def work(items: Sequence[int]) -> list[Outcome[int]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("no more file descriptors")
        return list(items)

    batch: LoopBatch[int, int] = LoopBatch(work, "test")
    with pytest.raises(OSError):
        await batch.submit(1)
    assert await batch.submit(2) == 2
