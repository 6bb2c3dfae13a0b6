"""Small record files (status, process records) written by one background thread, in order.

A thousand jobs starting write a few thousand small files (each: open the folder, create a temp
file, write, rename): on the event loop that is loop time the spawns and the API wait for, and
on a busy disk each one takes milliseconds. The writes go to one thread instead.

Decisions:
* One thread, not the default executor: writes of one file must land in the order they were
  asked for (Starting before Running; a process record saved before it is removed), and a
  single worker takes its queue in order. The writes are tiny; one thread keeps up.
* `drained()` waits for everything asked before it: the supervisor's shutdown awaits it, so a
  stopped daemon has written its last statuses. The executor's thread is joined at interpreter
  exit too, so a queued write is never dropped.
* A write asked after `close()` runs inline, on the caller's thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

log = structlog.get_logger("webjobsd.writes")


class OrderedWrites:
    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    def submit(self, write: Callable[..., Any], *args: Any) -> None:
        """Run `write(*args)` after every write asked before; errors are the write's to log
        (anything it raises is logged here)."""
        if self._closed:
            _run(write, args)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="records")
        self._executor.submit(_run, write, args)

    async def drained(self) -> None:
        """Once every write asked so far is done."""
        if self._executor is not None and not self._closed:
            await asyncio.wrap_future(self._executor.submit(lambda: None))

    async def close(self) -> None:
        await self.drained()
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)


def _run(write: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        write(*args)
    except Exception:
        log.exception("record write failed", write=getattr(write, "__qualname__", repr(write)))
