"""`runtime.wakeup`: a flag awaited by one task, woken by a set, another future or a timeout."""

from __future__ import annotations

import asyncio

import pytest

from webjobsd.runtime.wakeup import Wakeup


async def test_a_set_wakes_the_waiter_and_stays_set_until_cleared() -> None:
    wakeup = Wakeup()
    waiting = asyncio.create_task(wakeup.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    wakeup.set()
    assert await asyncio.wait_for(waiting, 5) is True
    assert wakeup.is_set()
    # Still set: the next wait returns at once, until the caller clears it.
    assert await asyncio.wait_for(wakeup.wait(), 5) is True
    wakeup.clear()
    assert not wakeup.is_set()


async def test_a_set_before_the_wait_is_not_lost() -> None:
    wakeup = Wakeup()
    wakeup.set()
    assert await asyncio.wait_for(wakeup.wait(), 5) is True


async def test_another_future_ends_the_wait_unset_and_keeps_no_callback() -> None:
    loop = asyncio.get_running_loop()
    wakeup = Wakeup()
    exited: asyncio.Future[int] = loop.create_future()
    waiting = asyncio.create_task(wakeup.wait(also=exited))
    await asyncio.sleep(0)
    exited.set_result(3)
    assert await asyncio.wait_for(waiting, 5) is False
    assert exited.result() == 3
    # Done already: returns at once, unset.
    assert await asyncio.wait_for(wakeup.wait(also=exited), 5) is False


async def test_a_set_during_a_wait_on_another_future_leaves_that_future_alone() -> None:
    loop = asyncio.get_running_loop()
    wakeup = Wakeup()
    exited: asyncio.Future[int] = loop.create_future()
    waiting = asyncio.create_task(wakeup.wait(also=exited))
    await asyncio.sleep(0)
    wakeup.set()
    assert await asyncio.wait_for(waiting, 5) is True
    assert not exited.done()
    wakeup.clear()
    await _the_old_future_wakes_no_later_wait(wakeup, exited)


async def test_a_timeout_ends_the_wait_unset() -> None:
    wakeup = Wakeup()
    assert await asyncio.wait_for(wakeup.wait(timeout=0.01), 5) is False
    assert not wakeup.is_set()


async def test_a_cancelled_wait_leaves_room_for_the_next() -> None:
    loop = asyncio.get_running_loop()
    wakeup = Wakeup()
    exited: asyncio.Future[int] = loop.create_future()
    waiting = asyncio.create_task(wakeup.wait(also=exited, timeout=60))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await _the_old_future_wakes_no_later_wait(wakeup, exited)


async def test_a_future_done_in_the_turn_that_set_the_flag_wakes_no_later_wait() -> None:
    """The future's callback is already queued when the wait ends: it must not wake the wait
    the same task starts next, before that callback runs."""
    loop = asyncio.get_running_loop()
    wakeup = Wakeup()
    exited: asyncio.Future[int] = loop.create_future()

    async def unit() -> tuple[bool, bool]:
        first = await wakeup.wait(also=exited)
        wakeup.clear()
        second = await wakeup.wait(timeout=60)
        return first, second

    waiting = asyncio.create_task(unit())
    await asyncio.sleep(0)
    wakeup.set()
    exited.set_result(0)
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()
    wakeup.set()
    assert await asyncio.wait_for(waiting, 5) == (True, True)


async def _the_old_future_wakes_no_later_wait(wakeup: Wakeup, old: asyncio.Future[int]) -> None:
    """The wait on `old` is over: its completion must not end a wait that did not ask for it."""
    later = asyncio.create_task(wakeup.wait())
    await asyncio.sleep(0)
    old.set_result(0)
    for _ in range(3):
        await asyncio.sleep(0)
    assert not later.done()
    wakeup.set()
    assert await asyncio.wait_for(later, 5) is True


async def test_a_second_waiter_at_once_is_refused() -> None:
    wakeup = Wakeup()
    first = asyncio.create_task(wakeup.wait())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="waiter already"):
        await wakeup.wait()
    wakeup.set()
    assert await asyncio.wait_for(first, 5) is True
