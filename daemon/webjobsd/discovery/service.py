"""The discovery loop: debounced hints and periodic rescans feed the catalog.

It owns the debouncer and the timing of scans. After each refresh that changed something it re-syncs
the watches and calls `on_changed` (which wakes the reconciler). Keys reported as settling are
touched again, so they are looked at once their files have been quiet for the debounce period.
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
        """Rescan at once, without a quiet period (SIGHUP, start-up)."""
        self._next_rescan = self._clock()
        self._wake.set()

    def refresh_now(self, keys: set[JobKey] | None = None) -> RefreshResult:
        result = self.catalog.refresh(keys)
        now = self._clock()
        for key in result.settling:
            self.debouncer.touch(key, now)
        if keys is None:
            self.rescans += 1
        if result.changed:
            if self.watcher is not None:
                self.watcher.sync(self.catalog.job_dirs())
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
                self._pass()
            except Exception:
                # A scan that trips over one odd folder must not end discovery for all jobs.
                log.exception("discovery pass failed; retrying at the next rescan")

    def _pass(self) -> None:
        now = self._clock()
        due = self.debouncer.pop_due(now)
        if None in due or now >= self._next_rescan:
            self._next_rescan = now + self.rescan_s
            self.refresh_now(None)
        elif due:
            self.refresh_now({hint for hint in due if hint is not None})
        else:
            self.last_pass_monotonic = now
