"""The discovery loop: debounced hints and periodic rescans feed the catalog.

It owns the debouncer and the timing of scans. Folder reads run in a worker thread (a job with a
large `node_modules` takes a while to walk; the loop keeps capturing output meanwhile); the catalog
is updated back on the loop. After each refresh the watches are re-synced, and `on_changed` (which
wakes the reconciler) is called when something changed. Keys reported as settling are touched
again, so they are looked at once their files have been quiet for the debounce period.

Hand-offs, one way: the watcher says which jobs have a file open for writing (taken before the
folder reads and again after them, so a file closed while it was being read still counts) and the
catalog never settles those. A job folder that *arrived* (renamed into place in whole) is looked
at on the next turn without a quiet period, unless something in it is open for writing (inotify
or /proc says so, or /proc cannot tell: see openwrites.py). At start no event has said anything:
/proc tells which jobs a process is still writing into (an upload under way across a restart).

Stuck scans: the pass records what it is doing (`stage`) and since when; `stuck_stage()` names
it once it has run longer than `stuck_after_s`, and readiness turns false on that. Every read is
non-blocking by design (see jobsettings.py), so this is the alarm for what design missed (a hung
network file system, say).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Collection
from pathlib import Path

import structlog

from webjobsd.discovery.catalog import Catalog, Observation, RefreshResult
from webjobsd.discovery.openwrites import files_written_under, writers_under
from webjobsd.discovery.watcher import Debouncer, Hint, JobsWatcher
from webjobsd.model import JobKey

log = structlog.get_logger("webjobsd.discovery")

# A pass over 1000 jobs reads their folders in a few seconds; one that takes a minute is stuck.
STUCK_AFTER_S = 60.0


def _under(path: str, folder: Path) -> bool:
    return path.startswith(f"{folder}{os.sep}")


class DiscoveryService:
    def __init__(
        self,
        catalog: Catalog,
        *,
        debouncer: Debouncer,
        rescan_s: float,
        on_changed: Callable[[set[JobKey]], None],
        clock: Callable[[], float] = time.monotonic,
        stuck_after_s: float = STUCK_AFTER_S,
    ) -> None:
        self.catalog = catalog
        self.debouncer = debouncer
        self.rescan_s = rescan_s
        self._on_changed = on_changed
        self._clock = clock
        self._wake = asyncio.Event()
        self._next_rescan = clock() + rescan_s
        self.watcher: JobsWatcher | None = None
        self.rescans = 0
        self.last_pass_monotonic: float | None = None
        self.stuck_after_s = stuck_after_s
        self._arrived: set[JobKey] = set()
        # Arrived job folders a process was seen writing into (see `_pass`).
        self._suspects: set[JobKey] = set()
        # What the running pass is doing, and since when (None: no pass running).
        self.stage = ""
        self._stage_since: float | None = None
        self._stuck_reported = False

    def hint(self, hint: Hint) -> None:
        """Called on the loop for every relevant file event (or by intents)."""
        self.debouncer.touch(hint, self._clock())
        self._wake.set()

    def arrived(self, key: JobKey) -> None:
        """A job folder was renamed into place in whole: complete, no quiet period needed."""
        self._arrived.add(key)
        self._wake.set()

    def _writing(self, *, written_only: bool = False) -> set[JobKey]:
        if self.watcher is None:
            return set()
        return self.watcher.open_for_write(written_only=written_only)

    def stuck_stage(self) -> str | None:
        """What a pass running longer than `stuck_after_s` is stuck on, else None."""
        since = self._stage_since
        if since is None:
            return None
        running_s = self._clock() - since
        if running_s <= self.stuck_after_s:
            return None
        stage = f"{self.stage} (for {running_s:.0f} s)"
        if not self._stuck_reported:
            self._stuck_reported = True
            log.error("discovery pass stuck", stage=self.stage, running_s=round(running_s))
        return stage

    def _set_stage(self, stage: str) -> None:
        # Called from the reading thread too: a plain attribute write, read by the loop.
        self.stage = stage

    def request_rescan(self) -> None:
        """Rescan at once, without a quiet period (SIGHUP)."""
        self._next_rescan = self._clock()
        self._wake.set()

    def initial_scan(self) -> RefreshResult:
        """The start-up scan: blocking, applied without confirmation. No event told which files
        are open for writing (an upload that was under way when the daemon stopped): /proc
        does, and those jobs are held like arrivals with a writer."""
        targets = self.catalog.targets(None)
        written = files_written_under(self.catalog.jobs_root) or set()
        self._suspects = {
            key
            for key in targets
            if any(_under(path, self.catalog.job_dir(key)) for path in written)
        }
        observations = self.catalog.observe(targets)
        return self._after(self.catalog.apply(observations, writing=self._suspects), full=True)

    async def refresh(
        self,
        keys: set[JobKey] | None,
        *,
        confirm: bool = False,
        settle: bool = True,
        arrived: bool = False,
    ) -> RefreshResult:
        """`arrived`: folders renamed in whole, with no writer /proc could see (openwrites.py)."""
        written_only = arrived
        writing_before = self._writing(written_only=written_only)
        targets = self.catalog.targets(keys)
        suspects = self._suspects & set(targets)
        observations, still_written = await asyncio.to_thread(
            self._observe, targets, suspects, settle
        )
        self._suspects -= suspects - still_written
        writing = writing_before | self._writing(written_only=written_only) | still_written
        if not settle and not arrived:
            # An intent: the daemon itself wrote the folder whole and closed every file. Marks
            # of its own writes may still be on their way from the watcher's thread (the close
            # events lag the writes); they must not hold the folder it just completed.
            writing = set()
        result = self.catalog.apply(observations, confirm=confirm, writing=writing)
        return self._after(result, full=keys is None)

    def _observe(
        self, targets: Collection[JobKey], suspects: set[JobKey], settle: bool
    ) -> tuple[list[Observation], set[JobKey]]:
        """In the reading thread: one job at a time, so a stuck read names its job. Suspects
        (folders that arrived with a writer inside) are asked about again, before the read."""
        still_written = {key for key, writer in self._writers(suspects).items() if writer}
        observations: list[Observation] = []
        for key in targets:
            self._set_stage(f"reading job folder {key}")
            observations.extend(self.catalog.observe([key], settle=settle))
        self._set_stage("applying")
        return observations, still_written

    def _writers(self, keys: set[JobKey]) -> dict[JobKey, bool | None]:
        """In the reading thread: whether a process writes into each job folder (None: /proc
        cannot tell)."""
        found: dict[JobKey, bool | None] = {}
        for key in keys:
            self._set_stage(f"looking for writers in {key}")
            found[key] = writers_under(self.catalog.job_dir(key))
        return found

    def _after(self, result: RefreshResult, *, full: bool) -> RefreshResult:
        now = self._clock()
        for key in result.settling:
            self.debouncer.touch(key, now)
        if full:
            self.rescans += 1
        if self.watcher is not None:
            self.watcher.sync()
        if result.changed:
            self._on_changed(result.changed)
        self.last_pass_monotonic = now
        return result

    def _timeout(self) -> float:
        now = self._clock()
        deadline = self._next_rescan
        due = self.debouncer.next_due()
        if due is not None:
            deadline = min(deadline, due)
        return max(deadline - now, 0.0)

    async def run(self) -> None:
        while True:
            try:
                # Not wait_for: on Python 3.11 it swallows a cancellation that arrives just as
                # the event is set, and this loop would outlive the daemon's shutdown.
                async with asyncio.timeout(self._timeout()):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            self._stage_since = self._clock()
            self.stage = "starting a pass"
            try:
                await self._pass()
            except Exception:
                # A scan that trips over one odd folder must not end discovery for all jobs.
                log.exception("discovery pass failed; retrying at the next rescan")
            finally:
                self._stage_since = None
                self._stuck_reported = False

    async def _pass(self) -> None:
        now = self._clock()
        if self._arrived:
            arrived, self._arrived = self._arrived, set()
            candidates = arrived - self._writing(written_only=True)
            writers = await asyncio.to_thread(self._writers, candidates)
            complete = {key for key, writer in writers.items() if writer is False}
            # A writer /proc saw holds the job until /proc sees it no more (inotify never saw
            # that file opened); where /proc cannot tell, the usual way (quiet period) decides.
            self._suspects |= {key for key, writer in writers.items() if writer}
            for key in arrived - complete:
                self.debouncer.touch(key, now)
            if complete:
                await self.refresh(complete, settle=False, arrived=True)
        due = self.debouncer.pop_due(now)
        if None in due:
            # Events on the jobs root or a kind folder: look at everything, events announced it.
            self._next_rescan = now + self.rescan_s
            await self.refresh(None)
        elif now >= self._next_rescan:
            self._next_rescan = now + self.rescan_s
            # Nothing announced what this scan may find: confirm changes with a second look.
            await self.refresh(None, confirm=True)
            if due:
                await self.refresh({hint for hint in due if hint is not None})
        elif due:
            await self.refresh({hint for hint in due if hint is not None})
        else:
            self.last_pass_monotonic = now
