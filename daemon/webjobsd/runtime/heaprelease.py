"""Give the heap's free memory back once job starts have been quiet for a while.

Starting a job allocates and frees a good deal (its environment, paths, encoded arguments, the
transient objects of its status and log writes). With the allocator tuned for the log capture
(`webjobsd.malloc`), what a wave of starts leaves free stays resident: about 3 MB after 1000
jobs started (daemon RSS 82.8-83.9 MB without a release, 79.8-80.5 MB with one, tmpfs, two runs
each), nothing measurable at 100.

Decisions:
* After starts, not on a timer: the daemon's idle CPU stays nil, and a job that floods its
  output keeps the buffers the capture reuses. `poke` after every spawn; the release runs once
  no start has happened for `QUIET_S`. Half a second is a hundred times the gap between two
  spawns of a wave, so a wave is released once, at its end; a job restarting more slowly than
  that costs a release (milliseconds, in a thread) per restart, which is little next to the
  restart itself.
* In a thread: `malloc_trim` walks the whole heap, a few milliseconds at 1000 jobs, and holds
  the allocator's locks meanwhile; the loop keeps serving. The daemon gives it the records
  thread (`runtime.writes`), behind the status and start-history writes the wave queued
  there: released before them, what they free would stay.
* Poking costs a float store: the timer re-arms itself at its due time instead of being
  cancelled and made again at each of a thousand spawns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Final

import structlog

log = structlog.get_logger("webjobsd.heap")

QUIET_S: Final = 0.5


class QuietRelease:
    """Runs `release` off the loop once `poke` has not been called for `quiet_s` (loop only).

    `run_in`: how to run it (the supervisor's records thread, so that it comes after the writes
    the starts queued there, whose objects are freed by then); the loop's executor otherwise.
    """

    def __init__(
        self,
        release: Callable[[], bool],
        quiet_s: float = QUIET_S,
        run_in: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self._release = release
        self._quiet_s = quiet_s
        self._run_in = run_in
        self._due: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight = False
        self.releases = 0  # releases run so far

    def poke(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + self._quiet_s
        if self._timer is None:
            self._timer = loop.call_at(self._due, self._fire)

    def _fire(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = None
        due = self._due
        if due is None:
            return
        if loop.time() < due:  # poked since this timer was set
            self._timer = loop.call_at(due, self._fire)
            return
        if self._in_flight:  # the last release is still queued or running: look again later
            self._timer = loop.call_at(loop.time() + self._quiet_s, self._fire)
            return
        self._due = None
        self._in_flight = True
        job = functools.partial(self._run_release, loop)
        if self._run_in is None:
            loop.run_in_executor(None, job)
        else:
            self._run_in(job)

    def _run_release(self, loop: asyncio.AbstractEventLoop) -> None:
        """Off the loop."""
        error: Exception | None = None
        returned = False
        try:
            returned = self._release()
        except Exception as raised:
            error = raised
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            loop.call_soon_threadsafe(self._released, returned, error)

    def _released(self, returned: bool, error: Exception | None) -> None:
        self._in_flight = False
        self.releases += 1
        if error is not None:
            log.warning("heap release failed", error=repr(error))
        else:
            log.debug("heap released", returned=returned)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due = None
