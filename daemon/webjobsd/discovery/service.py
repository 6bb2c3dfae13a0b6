"""The discovery loop: debounced hints and periodic rescans feed the catalog.

It owns the debouncer and the timing of scans. Folder reads run in a worker thread (a job with a
large `node_modules` takes a while to walk; the loop keeps capturing output meanwhile); the catalog
is updated back on the loop. After each refresh the watches are re-synced, and `on_changed` (which
wakes the reconciler) is called when something changed. Keys reported as settling are touched
again, so they are looked at once their files have been quiet for the debounce period.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from webjobsd.discovery.catalog import Catalog, RefreshResult
from webjobsd.discovery.watcher import Debouncer, Hint, JobsWatcher
from webjobsd.model import JobKey

log = structlog.get_logger("webjobsd.discovery")


class DiscoveryService:
    def __init__(
        self,
        catalog: Catalog,
        *,
        debouncer: Debouncer,
        rescan_s: float,
        on_changed: Callable[[set[JobKey]], None],
        clock: Callable[[], float] = time.monotonic,
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

    def hint(self, hint: Hint) -> None:
        """Called on the loop for every relevant file event (or by intents)."""
        self.debouncer.touch(hint, self._clock())
        self._wake.set()

    def request_rescan(self) -> None:
        """Rescan at once, without a quiet period (SIGHUP)."""
        self._next_rescan = self._clock()
        self._wake.set()

    def initial_scan(self) -> RefreshResult:
        """The start-up scan: blocking, applied without confirmation."""
        return self._after(self.catalog.refresh(None), full=True)

    async def refresh(
        self, keys: set[JobKey] | None, *, confirm: bool = False, settle: bool = True
    ) -> RefreshResult:
        targets = self.catalog.targets(keys)
        observations = await asyncio.to_thread(self.catalog.observe, targets, settle=settle)
        return self._after(self.catalog.apply(observations, confirm=confirm), full=keys is None)

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
                await asyncio.wait_for(self._wake.wait(), timeout=self._timeout())
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._pass()
            except Exception:
                # A scan that trips over one odd folder must not end discovery for all jobs.
                log.exception("discovery pass failed; retrying at the next rescan")

    async def _pass(self) -> None:
        now = self._clock()
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
