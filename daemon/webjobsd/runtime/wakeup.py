"""A unit's "something changed" flag, awaited by the unit's own task alone.

Every running continuous job waits, for as long as it runs, for "its target changed, or its
process exited". With an `asyncio.Event` and `asyncio.wait` that wait held, per job: the event's
deque of waiters, a task for the event's wait, a task for the process's exit, the shield over
the exit and `asyncio.wait`'s own future and callbacks, about 3.5 kB (tracemalloc, 300 jobs
against 100). A daemon of 1000 jobs kept 3.5 MB in them.

Decisions:
* One waiter at a time: the flag is the unit's, and only the unit's task waits on it. A second
  concurrent `wait` is a bug in the caller and raises, rather than leaving the first waiter
  asleep for good.
* `wait(also=future)` returns when the flag is set or `future` completes, without a task: the
  future gets a done callback for the length of the wait, removed after. The future is never
  cancelled or awaited, so a process's exit future can be passed as it is.
* `wait(timeout=...)` uses a timer handle, not `asyncio.wait_for` (which wraps the wait in a
  task of its own).
* The callback and the timer name the wait's own future, not "the current waiter": a future
  completing in the turn that set the flag has its callback queued already, which removing it
  cannot take back, and it must not end the next wait the same task starts.
* Like `asyncio.Event`, `wait` does not clear the flag: the caller decides when it has seen it.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any


class Wakeup:
    """A set/clear flag with at most one waiter (loop only)."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        self._wake()

    def clear(self) -> None:
        self._set = False

    async def wait(
        self, *, also: asyncio.Future[Any] | None = None, timeout: float | None = None
    ) -> bool:
        """Until the flag is set (True), `also` completes or `timeout` seconds pass (False)."""
        if self._set:
            return True
        if also is not None and also.done():
            return False
        if self._waiter is not None:
            raise RuntimeError("Wakeup has a waiter already")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(timeout, _end, waiter) if timeout is not None else None
        also_done = functools.partial(_end_when_done, waiter)
        if also is not None:
            also.add_done_callback(also_done)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
            if also is not None:
                also.remove_done_callback(also_done)
        return self._set

    def _wake(self) -> None:
        if self._waiter is not None:
            _end(self._waiter)


def _end(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _end_when_done(waiter: asyncio.Future[None], _future: asyncio.Future[Any]) -> None:
    _end(waiter)
