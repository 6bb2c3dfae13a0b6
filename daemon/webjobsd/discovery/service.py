"""The discovery loop: debounced hints and periodic rescans feed the catalog.

It owns the debouncer and the timing of scans. Folder reads run in a worker thread (a job with a
large `node_modules` takes a while to walk; the loop keeps capturing output meanwhile); the catalog
is updated back on the loop. The thread is discovery's own, not the loop's default executor:
starting a hundred jobs queues a hundred working copies there, and the reads of the next folders
that arrived (and their look into /proc) waited behind them; one thread is enough, as passes run
one at a time (it ends with `run`: the daemon stops the API, which asks for refreshes too,
first). After each refresh the watches are re-synced, and `on_changed` (which wakes the
reconciler) is called when something changed. Keys reported as settling are touched again, so
they are looked at once their files have been quiet for the debounce period.

Hand-offs, one way: the watcher says which jobs have a file open for writing (taken before the
folder reads and again after them, so a file closed while it was being read still counts) and the
catalog never settles those. A job folder that *arrived* (renamed into place in whole) is looked
at on the next turn without a quiet period, unless something in it is open for writing (inotify
or /proc says so, or /proc cannot tell: see openwrites.py). The folders that arrived since the
last pass are asked about together, in one pass over /proc: a pass reads every descriptor of every
process (a few thousand links with a hundred jobs running), and one per folder made a burst of a
hundred folders wait seconds. A lone arrival is looked at at once; several since the last pass
are a burst, gathered while more keep coming (`_gather_arrivals`, at most a quarter second), so
that the burst costs one pass over /proc, whose cost grows with every descriptor on the host
(17,000-32,000 on the shared bench machine: half a second a pass there). At start no event has
said anything: /proc tells which jobs a process is still writing into (an upload under way
across a restart).

Deployment in progress (KUDU-DEPLOY.md Part A #4): while the site's deployment lock is held, by
this daemon or any other sharing the site, no change the watcher or a rescan found is settled:
added, changed and removed jobs all wait (their keys are *held*), running processes keep running,
and a job that exits restarts from its last settled copy (runtime/workcopy.py). When the lock is
released, one pass acts on everything held, and on everything still pending in the debouncer,
at once and without a quiet period (the deployment's end says its files are complete): each
changed continuous job restarts exactly once, an unchanged one keeps its process, a removed one
stops. A file still open for writing holds its job even then (a transfer beside the deployment).
Not held: intents (`refresh(settle=False)`, the API wrote the folder itself), and the start-up
scan (there is no settled copy to keep running, and deployments swap job folders in whole).
Decisions:
* The lock is probed (`deployment_in_progress`, records/lockprobe.py: a shared flock on its own
  read-only open, dropped at once) only when a pass has something to decide, never on a timer
  per job; while it holds, again every `HOLD_RECHECK_S`, in a thread (a lock on a hung share
  shows as a stuck stage, not a stuck loop). The prober cannot import `deploy` (the layers), and
  needs no more than the file.
* Readiness stays true during a deployment (it is no fault); `hold_note()` says "deployment in
  progress, N job changes held" for /readyz, and the log says it once per deployment, and once
  more when the held changes are applied.

Rescans in inotify mode are quick too (`Catalog.observe(quick=True)`, see poll mode below): they
repair what events missed, and any write leaves a folder's stamp (names, inodes, sizes, times)
changed. One in `FULL_RESCAN_EVERY` (every 5 minutes with the default `rescan_s`) reads every
folder in full: an interpreter installed on PATH, a settings.job behind a link. Reading every
folder in full every 30 s cost about 1.4 ms of CPU a job on the 2-core bench machine (a core for
7 s of every 30 at 5000 jobs); a quick pass costs about 0.02 ms a job of one file.

The watcher's threads are checked every `WATCHER_CHECK_S` and before each pass: one that died
(see watcher.py) is logged as an error naming it, and the observer is replaced; files that a
process holds open for writing then are found through /proc, as at start (the marks went with the
old observer).

Poll mode (`watch: poll`, for sites on NFS, CephFS, EFS: inotify sees only this host's writes,
never another NFS client's). Decisions:
* No watcher at all, not inotify plus polling: in poll mode every change is found by the poll
  anyway, and a half-working watch (local writes only) would make the same site behave in two
  ways depending on which host wrote. `watcher` stays None; `_check_watcher` has nothing to
  check; readiness reports its `watcher` check true (nothing can die) and /readyz says
  `"watch": "poll"`; the poll itself is this loop, whose liveness is the `discovery` check.
* The poll is the periodic rescan, run every `poll_s` instead of every `rescan_s`, with the
  rescan's rules unchanged: a change it finds is confirmed by a second look a quiet period
  later (copies that keep old mtimes), a folder whose newest file is younger than the quiet
  period is settling. A job already waiting in the debouncer is left to that look (marking it
  unconfirmed again would add a quiet period). So a job folder renamed in (old mtimes) or
  written fresh is picked up within `poll_s` + `debounce_s` (+ the pass and the start): 1.1 to
  2.0 s with the defaults (1 s + 1 s), measured; inotify mode takes about 40 ms.
* Cheap when idle: a poll pass is *quick* (`Catalog.observe(quick=True)`): each job folder is
  walked once with stat only (`folder_stamp`: names, inodes, sizes, times), and a folder whose
  stamp is the last look's is taken as that look saw it; only a changed folder is read (files
  hashed only when their identity changed, the script chosen, settings.job parsed). Every
  `rescan_s` the pass is a full one (an interpreter installed on PATH, a settings.job behind a
  link changed). 100 idle jobs of 9 entries: 18 to 25 ms of CPU a quick pass, 95 ms a full
  one; 100 jobs of 54 entries: 56 ms a quick pass (about 0.1 ms a job and 10 us a file: one
  lstat per entry, in Python; the cost grows with the files under the jobs tree). The drop
  sweep adds 0.2 ms and the lock probe 0.25 ms.
* Open for writing: no inotify mark says which files are open, so /proc is asked, after the
  read, about the jobs whose look would change something or that are settling
  (`_written_in_question`), never about idle ones (a look into /proc reads every descriptor on
  the host). It sees writers on this host only: a writer on another host that stalls inside a
  file for longer than the quiet period is not seen (no event and no /proc can tell); the
  quiet period, and the second look of the confirmation, are what stand for it there.
* The deployment lock is probed at every poll pass that has something to decide, which in
  poll mode is every pass (about 60 us, in the reading thread). While it is held, the poll is
  held too (the rescan is among what is held: `hold_note` says "and a rescan"), and the
  deployment's end looks at every folder at once, without a quiet period, as it does at what
  events held; a file open for writing (in /proc) still holds its job then.
* On NFS, a client caches attributes (`actimeo`, 3 to 60 s by default): a file another host
  writes may look unchanged to stat for that long, and the pick-up waits for it as well.

Stuck scans: the pass records what it is doing (`stage`) and since when; `stuck_stage()` names
it once it has run longer than `stuck_after_s`, and readiness turns false on that. Every read is
non-blocking by design (see jobsettings.py), so this is the alarm for what design missed (a hung
network file system, say).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ParamSpec, TypeVar

import structlog

from webjobsd.discovery.catalog import Catalog, Observation, RefreshResult
from webjobsd.discovery.openwrites import files_written_under, writers_under_each
from webjobsd.discovery.watcher import Debouncer, Hint, JobsWatcher, stop_observer
from webjobsd.model import JobKey

log = structlog.get_logger("webjobsd.discovery")

_P = ParamSpec("_P")
_T = TypeVar("_T")

# A pass over 1000 jobs reads their folders in a few seconds; one that takes a minute is stuck.
STUCK_AFTER_S = 60.0
# While a deployment holds job changes, the lock is probed again this often: the jobs follow its
# end within this, and a probe costs about 60 us (20 a second while a deployment runs is nothing;
# at 0.15 s this wait was a third of a deployment's request-to-restart time).
HOLD_RECHECK_S = 0.05
# How often watchdog's threads are checked when nothing else wakes discovery.
WATCHER_CHECK_S = 2.0
# Folders renamed in together (see `_gather_arrivals`): the next one of a burst reaches the loop
# within this of the last; at most this many such waits (a quarter of a second).
ARRIVALS_GAP_S = 0.01
ARRIVALS_GATHER_TURNS = 25
# Inotify mode: one rescan in this many reads every folder in full; the others are quick.
FULL_RESCAN_EVERY = 10


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
        deployment_in_progress: Callable[[], bool] | None = None,
        poll_s: float | None = None,
    ) -> None:
        """`deployment_in_progress`: whether the site's deployment lock is held (blocking).
        `poll_s`: poll mode (no watcher): a rescan this often is the source of events, a quick
        one but every `rescan_s` (see the module docstring)."""
        self.catalog = catalog
        self.debouncer = debouncer
        self.rescan_s = rescan_s
        self.poll_s = poll_s
        # Quick looks compare a folder's stamp with the last look's: every look is stamped.
        catalog.stamp_looks = True
        # When the next rescan reads every folder in full (not quick): see the module docstring.
        self._full_period_s = rescan_s if poll_s is not None else rescan_s * FULL_RESCAN_EVERY
        self._next_full = clock() + self._full_period_s
        self._on_changed = on_changed
        self._clock = clock
        self._wake = asyncio.Event()
        self._next_rescan = clock() + self.scan_period_s
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
        self._deployment_in_progress = deployment_in_progress
        # Hints that came due while a deployment held them (None: everything), and, while it
        # holds, when to probe the lock again and since when it has held.
        self._held: set[Hint] = set()
        self._recheck_at: float | None = None
        self._held_since: float | None = None
        self._probe_failures: set[int | None] = set()
        # The observer whose dead thread was last reported, and failed tries to replace it.
        self._dead_reported: object | None = None
        self._replace_failures = 0
        # Discovery's own reading thread (see the module docstring); made on first use.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="discovery")

    @property
    def polling(self) -> bool:
        return self.poll_s is not None

    @property
    def scan_period_s(self) -> float:
        """The period of the rescan: the poll interval in poll mode."""
        return self.poll_s if self.poll_s is not None else self.rescan_s

    async def _in_thread(
        self, func: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """`asyncio.to_thread`, on discovery's reading thread."""
        call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._reader, call)

    def hint(self, hint: Hint) -> None:
        """Called on the loop for every relevant file event (or by intents)."""
        self.debouncer.touch(hint, self._clock())
        self._wake.set()

    def arrived(self, key: JobKey) -> None:
        """A job folder was renamed into place in whole: complete, no quiet period needed."""
        self._arrived.add(key)
        self._wake.set()

    @property
    def holding(self) -> bool:
        """A deployment holds job changes (as of the last probe)."""
        return self._held_since is not None

    def _held_jobs(self) -> set[JobKey]:
        return {hint for hint in self._held | self._arrived if hint is not None}

    def hold_note(self) -> str | None:
        """What readiness says while a deployment holds job changes."""
        if not self.holding:
            return None
        count = len(self._held_jobs())
        rescan = ", and a rescan" if None in self._held else ""
        return f"deployment in progress, {count} job change{'s' * (count != 1)} held{rescan}"

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
        self._suspects = self._written_by_processes(targets)
        # One PATH walk per interpreter for the whole pass: at 1000 bash jobs, asking PATH per
        # job was a third of the start-up scan.
        observations = self.catalog.observe(targets, which=self.catalog.which_memo())
        return self._after(self.catalog.apply(observations, writing=self._suspects), full=True)

    def _written_by_processes(self, targets: Collection[JobKey]) -> set[JobKey]:
        """Blocking (/proc): the jobs some process holds a file of open for writing, when no
        event can tell (at start, after the watcher was replaced)."""
        written = files_written_under(self.catalog.jobs_root) or set()
        return {
            key
            for key in targets
            if any(_under(path, self.catalog.job_dir(key)) for path in written)
        }

    async def refresh(
        self,
        keys: set[JobKey] | None,
        *,
        confirm: bool = False,
        settle: bool = True,
        arrived: bool = False,
        released: bool = False,
        quick: bool = False,
        skip: Collection[Hint] = (),
    ) -> RefreshResult:
        """`arrived`: folders renamed in whole, with no writer /proc could see (openwrites.py).
        `released` (with `settle=False`): held while a deployment ran, looked at as it ended;
        files open for writing still hold their jobs. `quick`: a folder whose entries all
        look as they did is taken as it was (`Catalog.observe`). `skip`: keys not looked at by
        this pass (pending in the debouncer: looked at when due)."""
        written_only = arrived
        writing_before = self._writing(written_only=written_only)
        targets = [key for key in self.catalog.targets(keys) if key not in skip]
        suspects = self._suspects & set(targets)
        observations, still_written = await self._in_thread(
            self._observe, targets, suspects, settle, quick
        )
        self._suspects -= suspects - still_written
        writing = writing_before | self._writing(written_only=written_only) | still_written
        if not settle and not arrived and not released:
            # An intent: the daemon itself wrote the folder whole and closed every file. Marks
            # of its own writes may still be on their way from the watcher's thread (the close
            # events lag the writes); they must not hold the folder it just completed.
            writing = set()
        elif self.polling:
            writing |= await self._written_in_question(observations)
        result = self.catalog.apply(observations, confirm=confirm, writing=writing)
        return self._after(result, full=keys is None)

    def _observe(
        self, targets: Collection[JobKey], suspects: set[JobKey], settle: bool, quick: bool
    ) -> tuple[list[Observation], set[JobKey]]:
        """In the reading thread: one job at a time, so a stuck read names its job. Suspects
        (folders that arrived with a writer inside) are asked about again, before the read."""
        still_written = {key for key, writer in self._writers(suspects).items() if writer}
        observations: list[Observation] = []
        which = self.catalog.which_memo()
        for key in targets:
            self._set_stage(f"reading job folder {key}")
            observations.extend(
                self.catalog.observe([key], settle=settle, which=which, quick=quick)
            )
        self._set_stage("applying")
        return observations, still_written

    async def _written_in_question(self, observations: list[Observation]) -> set[JobKey]:
        """Poll mode: no inotify mark says which files are open for writing, so /proc is asked,
        after the read, about the jobs whose look would change something (or that are settling)
        only: an idle pass asks nothing (a look into /proc reads every descriptor on the host).
        A writer on another host is invisible here; the quiet period and the second look of a
        rescan stand for it."""
        asked = {o.key for o in observations if self.catalog.in_question(o)}
        if not asked:
            return set()
        writers = await self._in_thread(self._writers, asked)
        return {key for key, writer in writers.items() if writer}

    def _writers(self, keys: set[JobKey]) -> dict[JobKey, bool | None]:
        """In the reading thread: whether a process writes into each job folder (None: /proc
        cannot tell), from one pass over /proc for them all."""
        if not keys:
            return {}
        self._set_stage(f"looking for writers in {len(keys)} job folder(s)")
        folders = {self.catalog.job_dir(key): key for key in keys}
        return {folders[folder]: writer for folder, writer in writers_under_each(folders).items()}

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
        if self._recheck_at is not None:
            # Held: nothing is decided before the next probe (an overdue rescan included).
            return max(min(self._recheck_at, now + WATCHER_CHECK_S) - now, 0.0)
        deadline = min(self._next_rescan, now + WATCHER_CHECK_S)
        due = self.debouncer.next_due()
        if due is not None:
            deadline = min(deadline, due)
        return max(deadline - now, 0.0)

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self._reader.shutdown(wait=False)

    async def _run(self) -> None:
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
                await self._check_watcher()
                await self._pass()
            except Exception:
                # A scan that trips over one odd folder must not end discovery for all jobs.
                log.exception("discovery pass failed; retrying at the next rescan")
            finally:
                self._stage_since = None
                self._stuck_reported = False

    async def _check_watcher(self) -> None:
        """Replace the observer when one of its threads died (see watcher.py)."""
        watcher = self.watcher
        dead = watcher.dead_threads() if watcher is not None else []
        if watcher is None or not dead:
            return
        if self._dead_reported is not watcher.observer:
            # Once per dead observer: a replacement that fails is tried again at every check.
            self._dead_reported = watcher.observer
            log.error(
                "file watcher thread died; replacing the watcher (a full rescan follows)",
                threads=dead,
                restarts=watcher.restarts + 1,
            )
        try:
            old = watcher.replace_observer()
        except OSError as error:
            if self._replace_failures == 0:
                log.error("cannot replace the file watcher; retrying", error=str(error))
            self._replace_failures += 1
            return
        if self._replace_failures:
            log.info("file watcher replaced", failed_tries=self._replace_failures)
        self._replace_failures = 0
        self.stage = "stopping the old file watcher"
        if old is not None:
            await self._in_thread(stop_observer, old)
        # Open-for-write marks went with the old observer: /proc says who writes now.
        self.stage = "looking for writers after the watcher was replaced"
        targets = self.catalog.targets(None)
        self._suspects |= await self._in_thread(self._written_by_processes, targets)

    async def _held_by_deployment(self, due: set[Hint], now: float) -> bool:
        """Whether a deployment holds this pass's decisions; if so, `due` is kept for its end."""
        if self._deployment_in_progress is None:
            return False
        if self._recheck_at is None or now >= self._recheck_at:
            self.stage = "probing the deployment lock"
            held = await self._in_thread(self._probe_deployment)
            self._recheck_at = self._clock() + HOLD_RECHECK_S if held else None
        if self._recheck_at is None:
            return False
        self._held |= due
        if self.polling and now >= self._next_rescan:
            # Poll mode: the poll is the only way changes are found, and it is held too; the
            # deployment's end looks at every folder at once, as it does at what events held.
            self._held.add(None)
        self.last_pass_monotonic = now
        if self._held_since is None:
            self._held_since = now
            held_jobs = self._held_jobs()
            log.info(
                "deployment in progress, job changes held until it ends",
                held=len(held_jobs),
                jobs=sorted(str(key) for key in held_jobs),
            )
        return True

    def _probe_deployment(self) -> bool:
        """In a thread. A probe that fails (out of file descriptors, a lock file we may not
        read) cannot tell: discovery goes on as without a deployment rather than wait for
        ever, and says so once per kind of failure."""
        assert self._deployment_in_progress is not None
        try:
            return self._deployment_in_progress()
        except OSError as error:
            if error.errno not in self._probe_failures:
                self._probe_failures.add(error.errno)
                log.warning(
                    "cannot tell whether a deployment is in progress; job changes not held",
                    error=str(error),
                )
            return False

    async def _release(self, due: set[Hint], now: float) -> None:
        """The deployment ended: everything held or pending is looked at at once."""
        held = self._held | due | self.debouncer.pop_all()
        self._held = set()
        if self._held_since is not None:
            held_jobs = {hint for hint in held | self._arrived if hint is not None}
            log.info(
                "deployment ended, held job changes applied",
                held=len(held_jobs),
                jobs=sorted(str(key) for key in held_jobs),
                held_s=round(now - self._held_since, 3),
            )
            self._held_since = None
        try:
            # Folders renamed in whole go their own way (/proc is asked about writers first).
            await self._arrivals(now)
            if None in held:
                self._next_rescan = now + self.scan_period_s
                await self.refresh(None, settle=False, released=True)
            elif held:
                keys = {hint for hint in held if hint is not None}
                await self.refresh(keys, settle=False, released=True)
        except BaseException:
            # A pass that fails must not lose what it held: looked at again after a quiet period.
            for hint in held:
                self.debouncer.touch(hint, now)
            raise

    async def _pass(self) -> None:
        now = self._clock()
        due = self.debouncer.pop_due(now)
        deciding = bool(due or self._arrived or self._held) or now >= self._next_rescan
        if not deciding:
            self.last_pass_monotonic = now
            return
        if await self._held_by_deployment(due, now):
            return
        if self._held or self._held_since is not None:
            await self._release(due, now)
            due = set()
        else:
            await self._arrivals(now)
        await self._decide(due, now)

    async def _arrivals(self, now: float) -> None:
        if len(self._arrived) > 1:
            await self._gather_arrivals()
        if self._arrived:
            arrived, self._arrived = self._arrived, set()
            candidates = arrived - self._writing(written_only=True)
            writers = await self._in_thread(self._writers, candidates)
            complete = {key for key, writer in writers.items() if writer is False}
            # A writer /proc saw holds the job until /proc sees it no more (inotify never saw
            # that file opened); where /proc cannot tell, the usual way (quiet period) decides.
            self._suspects |= {key for key, writer in writers.items() if writer}
            for key in arrived - complete:
                self.debouncer.touch(key, now)
            if complete:
                await self.refresh(complete, settle=False, arrived=True)

    async def _gather_arrivals(self) -> None:
        """More than one folder arrived since the last pass: a burst (a script renaming staged
        jobs in one after the other) whose events reach the loop over tens of milliseconds. Wait
        while they keep coming (bounded), so that the burst costs one look into /proc and one
        read pass instead of several, each slowed by the job starts of the one before."""
        seen = len(self._arrived)
        for _ in range(ARRIVALS_GATHER_TURNS):
            self.stage = "gathering folders renamed in together"
            await asyncio.sleep(ARRIVALS_GAP_S)
            if len(self._arrived) == seen:
                return
            seen = len(self._arrived)

    async def _decide(self, due: set[Hint], now: float) -> None:
        if None in due:
            # Events on the jobs root or a kind folder: look at everything, events announced it.
            self._next_rescan = now + self.scan_period_s
            await self.refresh(None)
        elif now >= self._next_rescan:
            self._next_rescan = now + self.scan_period_s
            full = now >= self._next_full
            if full:
                self._next_full = now + self._full_period_s
            # Nothing announced what this scan may find: confirm changes with a second look.
            # Poll mode: a job already waiting for its quiet period is left to that look (the
            # poll's look would mark it unconfirmed again and add a quiet period to the wait).
            pending = self.debouncer.pending() if self.polling else set()
            await self.refresh(None, confirm=True, quick=not full, skip=pending)
            if due:
                await self.refresh({hint for hint in due if hint is not None})
        elif due:
            await self.refresh({hint for hint in due if hint is not None})
        else:
            self.last_pass_monotonic = now
