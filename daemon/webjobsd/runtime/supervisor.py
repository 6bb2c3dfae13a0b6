"""Continuous jobs: one unit per job, each a small state machine driven by its own task.

The supervisor owns the processes of continuous jobs and nothing else. The reconciler hands a unit
a *target* (the spec to run and whether it should run at all, or "retired"); the unit's task walks
from where it is to that target: starting, restarting after an exit with backoff, or walking the
stop ladder. Targets are replaced, never queued, so a burst of changes costs one restart.

States are Kudu's continuous statuses (Part B §5.1). Every change goes through `_transition`,
which appends Kudu's `Status changed to ...` line to the job log, logs why in the daemon log and
has `status_{instance}` written atomically: the latest status only, by the writes thread
(`runtime.writes`, in order), and during a launch (an exit or a start up to the spawn) only once
the process is spawned, or after `LAUNCH_STATUS_DELAY_S` for a slow launch.

Restart path: the exit of the leader (its pipes at EOF) is enough to decide; the scan of `/proc`
that ends the old tree's leftovers runs after the replacement's spawn (`_end_exited`), and an
unchanged copy of a few files is checked on the loop (`WorkingCopy.reusable`). Both were most of
a restart's time: 2.3 ms of scan at 94 processes, 7-10 ms of thread hops on a busy host.

Singletons where the site's file locks do not exclude (the start-up check, `records.lockcheck`):
the unit does not start the job unless `allow_singletons_without_locks` is set; it shows
`InactiveInstance` (this instance does not run the singleton, as when another holds it) with the
reason, says it once in the job log, and waits with no timer: only a new target or a reload
(`Supervisor.config_changed`) can change the answer.

Restart policy (Part A #10): after an exit the delay starts at `restart_backoff_initial_s` and
doubles up to `WEBJOBS_RESTART_TIME` (read at the moment of the exit); it resets once a process has
stayed up for `restart_backoff_reset_s`.

Singleton fencing (`runtime.lockguard`): while a unit holds its singleton lock, a guard checks
it from the guards' two threads (the daemon's, never the loop's). When the guard fences (the lock
is lost, or could not be checked for `singleton_fence_s`), everything that must happen before
another host may run the job happens off the event loop, because the loop writes the job log and
the status to the share and stops with it when the share hangs:
* the guard thread that fenced logs the error, tells the loop, and starts a thread that walks
  the stop ladder on the process it found running (`jobprocess.stop_tree_blocking`: shutdown
  file in the local temp folder, SIGTERM, SIGKILL after `stopping_wait_time`; /proc and signals
  only);
* the loop marks the job stopped, reaps the process and drains its pipes, and releases the lock
  in a thread of its own (an unlock or close on a hung share blocks; not the default executor,
  which a few hung calls would fill), with a fresh `FileLock` for the next try. A process spawned
  while the guard looked (the thread did not see it) is stopped by the loop's own ladder, before
  the lock is let go;
* then the unit tries the lock again like any other instance (InactiveInstance while another
  holds it). A lock is taken only on the file system the site's data was on when the daemon
  started (`SupervisorContext.data_device`): a lost mount shows the local folder under it,
  where the daemon's own log and status writes make the folders again, and a lock nobody else
  can see would run the job twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from webjobsd.config import AppSettings, DaemonConfig
from webjobsd.model import ContinuousStatus, JobKey, JobSpec
from webjobsd.records.joblog import JobLogWriter, LogLevel
from webjobsd.records.lockcheck import LockCheck
from webjobsd.records.openlogs import OpenLogBudget
from webjobsd.records.starts import StartHistory, starts_path
from webjobsd.records.status import write_continuous_status
from webjobsd.runtime import pipereader, proctree
from webjobsd.runtime.environment import JobLaunch, job_environment
from webjobsd.runtime.jobprocess import (
    JobProcess,
    StartedProcesses,
    exit_description,
    free_loopback_port,
    stop_tree_blocking,
)
from webjobsd.runtime.lockguard import Fence, Guard, LockGuards
from webjobsd.runtime.locks import FileLock
from webjobsd.runtime.procrecords import ProcessRecords
from webjobsd.runtime.proctree import ProcessIdentity, new_token
from webjobsd.runtime.reconciler import Actual, ContinuousRuntime
from webjobsd.runtime.runas import RunAs, prepare_job_data_folder, reclaim_data_folder
from webjobsd.runtime.wakeup import Wakeup
from webjobsd.runtime.workcopy import FolderChanged, WorkingCopy, describe_error
from webjobsd.runtime.writes import OrderedWrites
from webjobsd.site import JOB_DATA_FOLDER, SiteLayout

log = structlog.get_logger("webjobsd.supervisor")

# A singleton job that another instance holds tries the lock again this often: the lock's release
# (its holder's host died, or stopped the job) is heard of only by trying, so this bounds the
# failover on local locks (on NFS the server's lease comes first). A try is one open, one
# non-blocking flock and one close, a few microseconds locally and one round trip on NFS: at 1 s,
# three hosts with a hundred singleton jobs make 200 tries a second between them.
SINGLETON_RETRY_S = 1.0
COPY_FAILURE_RETRY_S = 60.0
COPY_FAILURE_MAX_S = 3600.0
SETTLE_RETRY_S = 5.0
UNIT_CRASH_BACKOFF_S = 5.0
FORCED_STOP_BOUND_S = 5.0
# Least wait after a start that made no process (EMFILE, a missing interpreter), whatever
# WEBJOBS_RESTART_TIME says: with a restart time of 0 nothing else paced the retries, and a job
# that could not start spun the event loop (5000 jobs under a 20,000-descriptor limit: 100 % of
# a core, a warning per millisecond). A process that ran is paced by its own fork and exit.
START_FAILURE_MIN_S = 1.0
# During a launch (exit or start → spawn), the longest a status change waits to be written.
LAUNCH_STATUS_DELAY_S = 0.05
STOP_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class Target:
    spec: JobSpec
    run: bool
    retired: bool = False
    reason: str = ""


_MAX_DOUBLINGS = 30


@dataclass(slots=True)
class RestartBackoff:
    consecutive_exits: int = 0

    def next_delay(
        self, *, uptime_s: float, initial_s: float, reset_after_s: float, cap_s: float
    ) -> float:
        if uptime_s >= reset_after_s:
            self.consecutive_exits = 0
        self.consecutive_exits += 1
        # The exponent is clamped: a job crash-looping for days must not overflow the float.
        doublings = min(self.consecutive_exits - 1, _MAX_DOUBLINGS)
        return float(min(initial_s * 2**doublings, cap_s))


@dataclass(slots=True)
class SupervisorContext:
    """Everything a unit needs from the daemon, built once by the composition root."""

    layout: SiteLayout
    config: DaemonConfig
    app_settings: AppSettings
    base_environ: Mapping[str, str]
    records: ProcessRecords
    hostname: str = field(default_factory=socket.gethostname)
    run_as: RunAs | None = None
    on_log_bytes: Callable[[str, int], None] | None = None
    # (job name, exit code or None when it could not start, uptime s, restart delay s,
    # consecutive quick exits): an unexpected exit, for webhooks. Must not block.
    on_exit: Callable[[str, int | None, float, float, int], None] | None = None
    # What the units started and have not seen end: the shutdown's last sweep.
    started: StartedProcesses = field(default_factory=StartedProcesses)
    # Status files and process records of continuous jobs, off the loop (runtime.writes).
    writes: OrderedWrites = field(default_factory=OrderedWrites)
    # The start-up check of the site's file locks (records.lockcheck); None: not checked.
    lock_check: LockCheck | None = None
    # st_dev of the site's data/jobs at start: singleton locks are taken there only (fencing).
    data_device: int | None = None
    # The held singleton locks' checks (fencing, runtime.lockguard).
    lock_guards: LockGuards = field(default_factory=LockGuards)
    # The job logs held open at once (records.openlogs): a job's log is the one descriptor per
    # running job that can be given back, and 5000 jobs need it given back.
    open_logs: OpenLogBudget = field(default_factory=OpenLogBudget)
    # Called on the loop after every spawn, continuous or triggered (runtime.heaprelease).
    after_start: Callable[[], None] | None = None

    def singleton_refusal(self) -> str | None:
        """Why singleton jobs may not start here, or None when they may: the site's locks do
        not exclude and the configuration does not allow singletons without them."""
        check = self.lock_check
        if check is None or check.works or self.config.allow_singletons_without_locks:
            return None
        return (
            "WebJob singleton refused: the site's file locks do not exclude "
            f"({check.describe_mount()}), so another daemon could run it at the same time; "
            "set allow_singletons_without_locks: true to run it anyway"
        )

    def log_counter(self, job_name: str) -> Callable[[int], None] | None:
        counter = self.on_log_bytes
        if counter is None:
            return None
        # Called from a pipe's reader thread too (`pipereader`): delivered on the loop.
        return pipereader.on_loop(functools.partial(counter, job_name))

    def hand_over(self, working_root: Path | None, data_dir: Path) -> None:
        """Before a start (blocking: call in a thread): the data folder stays the daemon's,
        the job's own folder in it and its working copy are the job's user's (`runtime.runas`)."""
        data_dir.mkdir(parents=True, exist_ok=True)
        reclaim_data_folder(data_dir)
        prepare_job_data_folder(data_dir / JOB_DATA_FOLDER, self.run_as)
        if self.run_as is not None and working_root is not None:
            self.run_as.hand_over(working_root, recursive=True)


@dataclass(frozen=True, slots=True)
class _Running:
    """What a fencing thread needs to stop the unit's process without the loop."""

    process: JobProcess
    shutdown_file: Path
    wait_s: float


def _release_in_thread(lock: FileLock, job: str) -> None:
    try:
        lock.release()
    except OSError as error:
        # The descriptor is closed whatever the unlock said: the kernel drops the lock with it.
        log.warning("cannot release the singleton lock", job=job, error=str(error))


class _HandOverFailed(Exception):
    """The job's folders could not be made or handed to its user (an OSError inside)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _format_seconds(value: float) -> str:
    return f"{value:g}"


class ContinuousUnit:
    # A unit lives as long as its job, one per job: as slots its 32 fields take about 0.3 kB,
    # against 1.6 kB for the dict an instance of more than 30 attributes gets.
    __slots__ = (
        "_backoff",
        "_changed",
        "_context",
        "_copy_failures",
        "_copy_problem",
        "_ending",
        "_exited",
        "_fence",
        "_fence_covers",
        "_forced",
        "_guard",
        "_launching",
        "_lock_problem",
        "_log",
        "_reason",
        "_refused",
        "_running",
        "_singleton",
        "_singleton_setting",
        "_slot",
        "_starts",
        "_status_flush",
        "_status_written",
        "_stopped_by_us",
        "_target",
        "_unlocked_said",
        "_workcopy",
        "key",
        "port",
        "process",
        "restarts",
        "status",
    )

    def __init__(self, target: Target, context: SupervisorContext) -> None:
        self.key: JobKey = target.spec.key
        self._target = target
        self._context = context
        self._changed = Wakeup()
        self.status: ContinuousStatus | None = None
        # Why the job is held in its status (shown as the job's `error`), None when it is not.
        self._reason: str | None = None
        self._status_written: tuple[ContinuousStatus, str | None] | None = None
        self._status_flush: asyncio.Handle | None = None
        # Between the start of a launch and its spawn, status writes wait (see `_launch`).
        self._launching = False
        self.restarts = 0
        self.process: JobProcess | None = None
        # A process that exited on its own and whose leftovers are still to be ended (after the
        # next spawn, or before any wait): see `_end_exited`.
        self._exited: JobProcess | None = None
        self._ending: set[asyncio.Task[None]] = set()
        self.port: int | None = None
        self._log = JobLogWriter(
            context.layout.job_log_path(self.key),
            instance_id=context.layout.instance_id,
            max_bytes=context.config.log_max_bytes,
            generations=context.config.log_generations,
            on_written=context.log_counter(self.key.name),
            open_logs=context.open_logs,
        )
        self._starts = StartHistory(
            starts_path(context.layout.data_dir(self.key), context.layout.instance_id),
            submit=context.writes.submit,
        )
        self._backoff = RestartBackoff()
        self._workcopy = WorkingCopy(
            target.spec.job_dir, context.layout.working_copies_dir(self.key)
        )
        self._singleton = FileLock(
            context.layout.singleton_lock_path(self.key), device=context.data_device
        )
        self._singleton_setting: bool | None = None
        # Refused for want of working locks (`_hold_singleton_if_needed`): said once, not per
        # wake; and whether running one without them was said.
        self._refused: str | None = None
        self._unlocked_said = False
        # Fencing (see the module docstring): the guard of the held lock, the fence once the
        # loop has heard of it, the process the guard's thread stops itself (set by that thread
        # before it tells the loop), and what that thread reads to find the running process.
        self._guard: Guard | None = None
        self._fence: Fence | None = None
        self._fence_covers: JobProcess | None = None
        self._running: _Running | None = None
        self._lock_problem: str | None = None
        self._slot = f"{self.key.kind.value}.{self.key.name}"
        self._forced = False
        self._stopped_by_us = False
        # The last copy problem said in the job log, per fingerprint, and failures in a row.
        self._copy_problem: tuple[str, str] | None = None
        self._copy_failures: dict[str, int] = {}

    # -- targets -----------------------------------------------------------------------------

    @property
    def target(self) -> Target:
        return self._target

    def set_target(self, target: Target) -> None:
        self._target = target
        self._changed.set()

    def force(self) -> None:
        """Second signal to the daemon: no more grace, SIGKILL at once."""
        self._forced = True
        self._changed.set()

    async def _wait_changed(self, timeout: float | None = None) -> bool:
        self._end_launch()
        if not await self._changed.wait(timeout=timeout):
            return False
        self._changed.clear()
        return True

    # -- state -------------------------------------------------------------------------------

    def _say(self, level: LogLevel, message: str) -> None:
        """A host line in the job log, held and written with the status (`_flush_status`), or
        earlier with the job's first output, or by the launch's copying thread (`open_now`).
        A start says four things; each written on the loop as it was said cost a `stat` and a
        `write` there, a quarter of the loop's time at 1000 starts and on a restart's path."""
        if self._log.hold_system(level, message):
            self._schedule_status_flush()

    def _transition(self, status: ContinuousStatus, why: str, *, reason: str | None = None) -> None:
        """Move to `status`. `reason`: why the job is held there, for people; a new status
        without one clears it, the same status without one keeps it (a retry of the same wait)."""
        if status is self.status:
            if reason is not None and reason != self._reason:
                self._reason = reason
                self._schedule_status_flush()
            return
        self._reason = reason
        log.info(
            "job status",
            job=str(self.key),
            status=status.value,
            previous=self._status_name(),
            why=why,
        )
        self.status = status
        self._say(LogLevel.INFO, f"Status changed to {status.value}")
        # The file is written later, not here: a restart passes through PendingRestart,
        # Starting and Running within a millisecond, and readers only ever need the latest.
        # Outside a launch it is the loop's next turn; during one, after the spawn (`_launch`).
        self._schedule_status_flush()

    def _schedule_status_flush(self) -> None:
        if self._status_flush is None:
            loop = asyncio.get_running_loop()
            if self._launching:
                # Bounded: a launch that copies a large job still shows Starting meanwhile.
                self._status_flush = loop.call_later(LAUNCH_STATUS_DELAY_S, self._flush_status)
            else:
                self._status_flush = loop.call_soon(self._flush_status)

    def _flush_status(self) -> None:
        """Write what was said (`_say`) and the status, if either is new."""
        if self._status_flush is not None:
            self._status_flush.cancel()
            self._status_flush = None
        if not self._launching:
            # During a launch the held lines go out from the copying thread (`open_now`) or
            # after the spawn (`_end_launch`): a status written while the copy waits its turn
            # among a thousand must not have the loop open the log for them.
            self._log.flush_held()
        status = self.status
        if status is None or (status, self._reason) == self._status_written:
            return
        self._status_written = (status, self._reason)
        self._context.writes.submit(
            self._write_status, asyncio.get_running_loop(), status, self._reason
        )

    def _write_status(
        self, loop: asyncio.AbstractEventLoop, status: ContinuousStatus, reason: str | None
    ) -> None:
        """In the writes thread."""
        try:
            write_continuous_status(self._context.layout, self.key, status, reason)
        except OSError as error:
            log.error("cannot write status file", job=str(self.key), error=str(error))
            # Not written: the next flush of the same status tries again.
            loop.call_soon_threadsafe(self._status_not_written, (status, reason))

    def _status_not_written(self, failed: tuple[ContinuousStatus, str | None]) -> None:
        if self._status_written == failed:
            self._status_written = None

    def _status_name(self) -> str | None:
        return self.status.value if self.status else None

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            # The log is opened by the first launch's copying thread (`_prepare_root`).
            await self._loop()
        finally:
            if self.process is not None:
                await self._close_process(self.process)
                self._starts.ended("stopped", self.process.returncode)
                self._forget_process()
            self._end_exited()
            if self._ending:
                await asyncio.gather(*self._ending, return_exceptions=True)
            self._release_singleton(note=False)
            self._flush_status()
            self._starts.flush()
            self._log.close()

    def _end_exited(self) -> None:
        """End what is left of the process that exited on its own (its leftovers, pipes).

        Deferred from the exit to here so that a restart spawns first: ending leftovers scans
        `/proc` (milliseconds, more on a busy host), and the old tree's token never matches
        the new process, so the order does not matter to the result.
        """
        process, self._exited = self._exited, None
        if process is None:
            return
        task = asyncio.create_task(self._close_exited(process), name=f"end-{self.key}")
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _close_exited(self, process: JobProcess) -> None:
        await self._close_process(process)
        if self.process is None:
            # The slot names the newest process: a replacement already saved its own record.
            self._forget_process()

    async def _close_process(self, process: JobProcess) -> None:
        """The unit ends only once its process is gone: a unit forgotten with a live process
        would have the job started a second time. A failing close (out of file descriptors)
        is retried; a cancellation (the forced end of a shutdown) ends the wait."""
        while True:
            try:
                # Bounded: a process stuck in the kernel must not keep the daemon from exiting.
                await asyncio.wait_for(process.close(), FORCED_STOP_BOUND_S)
                return
            except (TimeoutError, asyncio.CancelledError):
                return
            except Exception as error:
                log.error("cannot end job process; retrying", job=str(self.key), error=repr(error))
                try:
                    await asyncio.sleep(STOP_RETRY_S)
                except asyncio.CancelledError:
                    return

    async def _loop(self) -> None:
        while True:
            self._changed.clear()
            target = self._target
            if target.retired:
                self._transition(ContinuousStatus.STOPPED, target.reason or "job removed")
                if target.reason != "shutdown":
                    # A restarted daemon discards stale copies itself; a removed job must not
                    # leave its copy (nor its shutdown folder) behind.
                    self._workcopy.discard()
                    shutil.rmtree(self._context.layout.shutdown_dir(self.key), ignore_errors=True)
                return
            if not target.run:
                self._release_singleton()
                self._transition(ContinuousStatus.STOPPED, "disabled")
                await self._wait_changed()
                continue
            if not await self._hold_singleton_if_needed(target):
                continue
            await self._run_once(target)

    async def _hold_singleton_if_needed(self, target: Target) -> bool:
        wanted = target.spec.settings.is_singleton
        if self._singleton_setting is None:
            self._say(LogLevel.INFO, f"WebJob singleton setting is {wanted}")
        elif self._singleton_setting != wanted:
            self._say(
                LogLevel.INFO,
                f"WebJob singleton setting changed from {self._singleton_setting} to {wanted}",
            )
        self._singleton_setting = wanted
        if not wanted:
            self._refused = None
        if not wanted or self._fenced():
            self._release_singleton()
            if not wanted:
                return True
        if self._singleton.held:
            return True
        if not self._singleton_allowed():
            # No retry timer: only a new target, or a reload that may allow it, changes this.
            await self._wait_changed()
            return False
        previous_owner = FileLock.read_owner(self._singleton.path)
        try:
            acquired = self._singleton.try_acquire(self._singleton_owner_info(None))
            if acquired:
                self._start_guard()
        except OSError as error:
            # The share is gone or failing (EIO, a lost mount): not this unit's end.
            self._singleton.release()
            problem = f"Cannot take the singleton lock: {error}"
            if problem != self._lock_problem:
                self._lock_problem = problem
                log.error(
                    "cannot take the singleton lock",
                    job=str(self.key),
                    lock=str(self._singleton.path),
                    error=str(error),
                )
            self._transition(
                ContinuousStatus.INACTIVE_INSTANCE, "cannot take the lock", reason=problem
            )
            await self._wait_changed(SINGLETON_RETRY_S)
            return False
        self._lock_problem = None
        if acquired:
            self._say(LogLevel.INFO, "WebJob singleton lock is acquired")
            await self._end_previous_holder_leftovers(previous_owner)
            return True
        self._transition(ContinuousStatus.INACTIVE_INSTANCE, "another instance holds the lock")
        await self._wait_changed(SINGLETON_RETRY_S)
        return False

    def _singleton_allowed(self) -> bool:
        """False while singletons are refused here (see `SupervisorContext.singleton_refusal`);
        the refusal goes to the job log and the status once, however often the unit wakes."""
        refusal = self._context.singleton_refusal()
        if refusal is None:
            self._refused = None
            check = self._context.lock_check
            if check is not None and not check.works and not self._unlocked_said:
                self._unlocked_said = True
                self._say(
                    LogLevel.WARN,
                    "WebJob singleton runs although the site's file locks do not exclude "
                    f"({check.describe_mount()}): allow_singletons_without_locks is true",
                )
            return True
        if self._refused != refusal:
            self._refused = refusal
            self._say(LogLevel.ERR, refusal)
        log.debug("singleton job refused: the site's file locks do not exclude", job=str(self.key))
        self._transition(
            ContinuousStatus.INACTIVE_INSTANCE, "file locks do not exclude", reason=refusal
        )
        return False

    def recheck_singleton(self) -> None:
        """The configuration changed: a refused singleton looks again (nothing else wakes)."""
        if self._refused is not None:
            self._changed.set()

    def _start_guard(self) -> None:
        loop = asyncio.get_running_loop()
        config = self._context.config
        self._guard = self._context.lock_guards.watch(
            self._singleton.duplicate(),
            self._singleton.path,
            check_s=config.singleton_check_s,
            fence_s=config.singleton_fence_s,
            on_fence=lambda guard: self._fence_from_thread(loop, guard),
        )

    def _fenced(self) -> bool:
        """The held lock was fenced, whether or not the loop has heard of it yet."""
        guard = self._guard
        return self._fence is not None or (guard is not None and guard.fence is not None)

    def _fence_from_thread(self, loop: asyncio.AbstractEventLoop, guard: Guard) -> None:
        """In a guard thread: say it, tell the loop, stop the running process."""
        fence = guard.fence
        if fence is None or self._guard is not guard:
            return  # that hold ended meanwhile: its process (if any) was stopped by the loop
        running = self._running
        # Before the loop hears of it: the loop stops by itself only what this thread does not.
        self._fence_covers = running.process if running is not None else None
        log.error(fence.event, job=str(self.key), lock=str(guard.path), reason=fence.detail)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is ending
            loop.call_soon_threadsafe(self._notice_fence, guard, fence)
        if running is not None:
            # A thread per fence (rare): the guards' threads serve every other lock meanwhile.
            threading.Thread(
                target=self._stop_fenced_tree,
                args=(running,),
                name=f"fence-stop-{self._slot}",
                daemon=True,
            ).start()

    def _stop_fenced_tree(self, running: _Running) -> None:
        """In a thread of its own: the ladder, without the loop (see the module docstring)."""
        graceful = stop_tree_blocking(
            running.process.identity, running.wait_s, running.shutdown_file
        )
        log.warning(
            "job stopped: its singleton lock was fenced",
            job=str(self.key),
            pid=running.process.pid,
            graceful=graceful,
        )

    def _notice_fence(self, guard: Guard, fence: Fence) -> None:
        if self._guard is not guard:
            return  # that hold ended meanwhile
        self._fence = fence
        self._changed.set()

    def _singleton_owner_info(self, identity: ProcessIdentity | None) -> dict[str, Any]:
        return {
            "OperationName": "Acquiring continuous WebJob singleton lock",
            "AcquiredDateTime": datetime.now(UTC).isoformat(),
            "InstanceId": self._context.layout.instance_id,
            "HostName": self._context.hostname,
            "DaemonPid": os.getpid(),
            "Process": identity.to_json() if identity else None,
        }

    async def _end_previous_holder_leftovers(self, owner: Mapping[str, Any] | None) -> None:
        """A holder that died without stopping its job leaves the process behind on this host."""
        if not owner or owner.get("HostName") != self._context.hostname:
            return
        raw = owner.get("Process")
        if not isinstance(raw, dict):
            return
        try:
            identity = ProcessIdentity.from_json(raw)
        except (KeyError, TypeError, ValueError):
            return
        killed = await proctree.asignal_members(identity, signal.SIGKILL)
        if killed:
            self._say(
                LogLevel.WARN, f"Ended {killed} process(es) left by the previous lock holder"
            )

    def _release_singleton(self, *, note: bool = True) -> None:
        """Let the lock go (its process is gone). After a fence, without waiting for the share."""
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.stop()
        fence, self._fence = self._fence, None
        self._fence_covers = None
        if fence is None and guard is not None:
            fence = guard.fence  # decided in the guard's thread, not yet heard of here
        if fence is not None:
            lock = self._singleton
            self._singleton = FileLock(lock.path, device=self._context.data_device)
            threading.Thread(
                target=_release_in_thread,
                args=(lock, str(self.key)),
                name=f"lock-release-{self._slot}",
                daemon=True,
            ).start()
            if note:
                self._say(
                    LogLevel.WARN,
                    f"WebJob singleton lock is lost ({fence.detail}): the job was stopped so "
                    "that another instance may run it",
                )
            return
        if self._singleton.held:
            self._singleton.release()
            if note:
                self._say(LogLevel.INFO, "WebJob singleton lock is released")

    async def _run_once(self, target: Target) -> None:
        """One launch: prepare, spawn, supervise. From here to the spawn is the restart's
        critical path: status files are written after the spawn (or after
        `LAUNCH_STATUS_DELAY_S`), the exited process's leftovers are ended after it, and the
        folder work is one thread hop."""
        self._begin_launch()
        try:
            launched = await self._launch(target)
        finally:
            self._end_launch()
        if launched is None:
            return
        process, shutdown_file = launched
        if process is None:
            await self._after_exit(target, uptime_s=0.0)
            return
        await self._supervise(target, process, shutdown_file)

    def _begin_launch(self) -> None:
        self._launching = True
        self._reschedule_status_flush()

    def _end_launch(self) -> None:
        """The spawn happened (or the launch waits or gave up): what was held goes out now."""
        self._launching = False
        self._reschedule_status_flush()
        if self._log.holding():
            # A status written during the launch left them (`_flush_status`), and lines said
            # after it were held behind them, so no `_say` arranged a flush: a job that never
            # prints would never show them. (A flush still pending makes this nothing.)
            self._schedule_status_flush()
        self._end_exited()

    def _reschedule_status_flush(self) -> None:
        """A pending flush is timed again by whether a launch is under way now."""
        if self._status_flush is not None:
            self._status_flush.cancel()
            self._status_flush = None
            self._schedule_status_flush()

    async def _launch(self, target: Target) -> tuple[JobProcess | None, Path] | None:
        """None when nothing was started (the unit waited, or the target moved on); else the
        process, None when it could not be started, and its shutdown file."""
        spec = target.spec
        self._transition(ContinuousStatus.STARTING, "starting")
        root = await self._prepare_root(spec)
        if root is None or self._target is not target:
            return None
        if self._fenced():
            return None  # the loop lets the lock go and tries again
        shutdown_file = self._shutdown_file()
        self.port = free_loopback_port()
        launch = JobLaunch(
            key=self.key, working_root=root, shutdown_file=shutdown_file, port=self.port
        )
        env = job_environment(
            self._context.base_environ,
            self._context.app_settings.all_for_jobs(),
            self._context.layout,
            launch,
        )
        command = spec.command
        self._say(
            LogLevel.INFO,
            f"Run script '{command.script_name}' with script host - '{command.host}'",
        )
        self._transition(ContinuousStatus.RUNNING, "launching")
        cwd = root / command.script_dir if command.script_dir else root
        try:
            self.process = await JobProcess.spawn(
                command.argv(),
                cwd=cwd,
                env=env,
                token=new_token(),
                on_stdout=lambda block: self._log.console_block(LogLevel.INFO, block),
                on_stderr=lambda block: self._log.console_block(LogLevel.ERR, block),
                max_line_bytes=self._context.config.max_line_bytes,
                run_as=self._context.run_as,
            )
        except Exception as error:
            # Whatever the cause (missing interpreter, bad environment, exec format), the job
            # backs off like a process that exited at once; it never takes the unit down.
            self._say(LogLevel.ERR, f"Failed to start process: {error}")
            self._starts.started(None)
            self._starts.ended("failed to start")
            log.warning("cannot start job process", job=str(self.key), error=repr(error))
            return None, shutdown_file
        self._running = _Running(
            self.process, shutdown_file, spec.settings.stopping_wait_s(self.key.kind)
        )
        self._context.started.add(self.process)
        if self._context.after_start is not None:
            self._context.after_start()
        self._starts.started(self.process.pid)
        self._remember_process(self.process.identity)
        return self.process, shutdown_file

    async def _prepare_root(self, spec: JobSpec) -> Path | None:
        """The folder to run `spec` from, or None after waiting (the loop then looks again).

        A restart while the folder is being changed reuses the copy made for `spec` (see
        workcopy.py); only when there is none, or for an in-place job, does it wait here for the
        catalog's next settled spec. A copy that fails is the job's error: said once per version
        of the job files, retried when they change or after a long backoff, never a unit crash.
        """
        loop = asyncio.get_running_loop()
        data_dir = self._context.layout.data_dir(self.key)

        def note(message: str) -> None:
            # Called from the copying thread: hand the line to the loop's thread.
            loop.call_soon_threadsafe(self._say, LogLevel.INFO, message)

        def prepare() -> Path:
            # The copy, the hand-over and the log's opening (with the lines held so far) in one
            # hop: a thousand jobs starting queue for the same few threads, and a first write
            # (mkdir, create) on the loop cost it a quarter of its time.
            self._log.open_now()
            if spec.is_in_place:
                found = self._workcopy.check_in_place(spec)
            else:
                found = self._workcopy.prepare(spec, note)
            hand_over(found)
            return found

        def hand_over(found: Path) -> None:
            try:
                self._context.hand_over(None if spec.is_in_place else found, data_dir)
            except OSError as error:
                raise _HandOverFailed(error) from error

        try:
            # A restart of an unchanged job of a few files: no thread hop (workcopy.reusable).
            reused = None if spec.is_in_place else self._workcopy.reusable(spec)
            if reused is not None:
                # One lstat per folder when it was handed over before, as a reused copy was.
                hand_over(reused)
                return reused
            root = await asyncio.to_thread(prepare)
        except _HandOverFailed as failed:
            # The job's error (a full disk, a folder that cannot be made), not the unit's.
            problem = f"Failed to prepare the job's folders: {failed.error}"
            self._say(LogLevel.ERR, problem)
            self._transition(ContinuousStatus.PENDING_RESTART, "cannot prepare", reason=problem)
            await self._wait_changed(COPY_FAILURE_RETRY_S)
            return None
        except FolderChanged as change:
            waiting = f"Waiting for the job folder: {change}"
            self._report_copy_problem(spec, LogLevel.INFO, waiting)
            self._transition(ContinuousStatus.STARTING, "folder changing", reason=waiting)
            await self._wait_changed(SETTLE_RETRY_S)
            return None
        except Exception as error:
            # Anything (a full disk, a name too long, a folder too deep): the job's error.
            failures = self._copy_failures.get(spec.fingerprint, 0) + 1
            self._copy_failures = {spec.fingerprint: failures}
            delay = min(COPY_FAILURE_RETRY_S * 2 ** min(failures - 1, 10), COPY_FAILURE_MAX_S)
            problem = f"Failed to copy job files: {describe_error(error)}"
            if self._report_copy_problem(spec, LogLevel.ERR, problem):
                log.warning("cannot copy job files", job=str(self.key), error=problem)
                self._say(
                    LogLevel.INFO,
                    f"Retrying when the job files change, or in {_format_seconds(delay)} seconds",
                )
            self._transition(
                ContinuousStatus.PENDING_RESTART, "cannot copy job files", reason=problem
            )
            await self._wait_changed(delay)
            return None
        self._copy_problem = None
        self._copy_failures = {}
        return root

    def _report_copy_problem(self, spec: JobSpec, level: LogLevel, message: str) -> bool:
        """Write `message` to the job log unless it was said for this version of the files."""
        problem = (spec.fingerprint, message)
        if self._copy_problem == problem:
            return False
        self._copy_problem = problem
        self._say(level, message)
        return True

    def _shutdown_file(self) -> Path:
        folder = self._context.layout.shutdown_dir(self.key)
        # Kudu empties the folder at each start: a leftover file would stop the new process.
        if folder.is_dir():
            for leftover in folder.iterdir():
                with contextlib.suppress(OSError):
                    leftover.unlink()
        return folder / new_token()[:12]

    async def _supervise(self, target: Target, process: JobProcess, shutdown_file: Path) -> None:
        # While the process runs the unit waits on its flag and the leader's exit, with no task
        # of its own (`runtime.wakeup`); only from the exit to the output's end is there one.
        output_end: asyncio.Task[int] | None = None
        try:
            while True:
                await self._changed.wait(also=output_end or process.leader_exit)
                if self._fence is not None:
                    # Even when it exited already: the fence's SIGTERM may be why.
                    self._changed.clear()
                    self._stopped_by_us = True
                    await self._stop_fenced(process, target, shutdown_file)
                    break
                if output_end is None and process.leader_exit.done():
                    if process.output_ended:
                        # Usually so: the pipes' EOF is read in the same turn as the exit, or
                        # before. No task, and two loop turns less on a restart's path.
                        break
                    output_end = asyncio.create_task(process.wait_exit(), name=f"wait-{self.key}")
                    continue
                if output_end is not None and output_end.done():
                    break
                self._changed.clear()
                new = self._target
                if self._forced:
                    self._stopped_by_us = True
                    await process.kill()
                    break
                if not new.retired and new.run and new.spec.fingerprint == target.spec.fingerprint:
                    # Same code and settings, still wanted: nothing to do for this process.
                    target = new
                    continue
                self._stopped_by_us = process.returncode is None
                await self._stop_until_gone(process, target, shutdown_file)
                break
        finally:
            if output_end is not None and not output_end.done():
                output_end.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await output_end
        code = process.returncode
        uptime = time.monotonic() - process.started_monotonic
        self.process = None
        self._running = None
        # The end goes on record before anything that may raise.
        if code is None or self._stopped_by_us:
            self._starts.ended("stopped", code)
            self._forget_process()
            self._stopped_by_us = False
            return
        self._starts.ended("exited", code)
        # Its leftovers are ended (and its record removed) once the replacement is spawned:
        # from here to that spawn is a launch.
        self._exited = process
        self._begin_launch()
        # It exited on its own, maybe at the same moment as a change arrived: say so either way.
        self._report_exit(code)
        if self._target is target and not self._forced:
            await self._after_exit(target, uptime, code)

    async def _stop_until_gone(self, process: JobProcess, old: Target, shutdown_file: Path) -> None:
        """The stop ladder, walked again if it fails (out of file descriptors, say): a unit
        never moves on, or ends, while its process may still run."""
        while True:
            try:
                if self._forced:
                    await process.kill()
                else:
                    await self._stop(process, old, self._target, shutdown_file)
                return
            except Exception as error:
                log.error(
                    "stopping the job process failed; retrying",
                    job=str(self.key),
                    error=repr(error),
                )
            await self._wait_changed(STOP_RETRY_S)

    async def _stop_fenced(self, process: JobProcess, old: Target, shutdown_file: Path) -> None:
        """The guard's thread walks the ladder on the process it saw (the kill must not wait for
        the loop, see the module docstring): the loop waits for the end and reaps. A process
        that thread did not see (spawned meanwhile) gets the loop's own ladder."""
        if self._fence_covers is not process:
            await self._stop_until_gone(process, old, shutdown_file)
            return
        self._transition(ContinuousStatus.STOPPING, "singleton lock fenced")
        wait_s = old.spec.settings.stopping_wait_s(self.key.kind)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.shield(process.wait_exit()), wait_s + FORCED_STOP_BOUND_S
            )
        await self._close_process(process)
        self._transition(ContinuousStatus.STOPPED, "singleton lock fenced")

    async def _stop(
        self, process: JobProcess, old: Target, new: Target, shutdown_file: Path
    ) -> None:
        if new.retired and new.reason == "shutdown":
            self._say(LogLevel.INFO, "WebJob is stopping due to website shutting down")
        elif not new.retired and new.spec.fingerprint != old.spec.fingerprint:
            self._say(
                LogLevel.INFO, "Detected WebJob file/s were updated, refreshing WebJob"
            )
        self._transition(ContinuousStatus.STOPPING, new.reason or "stop requested")
        wait_s = old.spec.settings.stopping_wait_s(self.key.kind)
        stop = asyncio.create_task(process.stop(wait_s, shutdown_file), name=f"stop-{self.key}")
        while not stop.done():
            await self._changed.wait(also=stop)
            self._changed.clear()
            if self._forced and not stop.done():
                await process.kill()
        graceful = await stop
        if not graceful:
            self._say(
                LogLevel.WARN,
                f"WebJob process did not stop within {_format_seconds(wait_s)} seconds; killed",
            )
        self._transition(ContinuousStatus.STOPPED, "process stopped")

    def _report_exit(self, code: int) -> None:
        if code == 0:
            self._transition(ContinuousStatus.SUCCESS, "process exited with code 0")
        else:
            self._say(LogLevel.ERR, f"Job failed due to {exit_description(code)}")

    async def _after_exit(self, target: Target, uptime_s: float, code: int | None = None) -> None:
        config = self._context.config
        delay = self._backoff.next_delay(
            uptime_s=uptime_s,
            initial_s=config.restart_backoff_initial_s,
            reset_after_s=config.restart_backoff_reset_s,
            cap_s=float(self._context.app_settings.restart_time_s),
        )
        if code is None:
            delay = max(delay, START_FAILURE_MIN_S)
        self.restarts += 1
        self._say(
            LogLevel.INFO, f"Process went down, waiting for {_format_seconds(delay)} seconds"
        )
        log.info(
            "restart scheduled",
            job=str(self.key),
            delay_s=delay,
            consecutive_exits=self._backoff.consecutive_exits,
            uptime_s=round(uptime_s, 3),
        )
        if self._context.on_exit is not None:
            exits = self._backoff.consecutive_exits
            self._context.on_exit(self.key.name, code, uptime_s, delay, exits)
        self._transition(ContinuousStatus.PENDING_RESTART, f"waiting {delay:g} s")
        if delay > 0:
            await self._wait_changed(delay)
        # Kudu releases the singleton lock between runs so that a crashing job may move.
        self._release_singleton()

    def _remember_process(self, identity: ProcessIdentity) -> None:
        self._context.writes.submit(self._save_record, identity)
        if self._singleton.held:
            with contextlib.suppress(OSError):
                self._singleton.update_owner(self._singleton_owner_info(identity))

    def _save_record(self, identity: ProcessIdentity) -> None:
        """In the writes thread."""
        try:
            self._context.records.save(self._slot, identity)
        except OSError as error:
            log.error("cannot persist process record", job=str(self.key), error=str(error))

    def _forget_process(self) -> None:
        # Through the same queue as the save: a record is never removed before it is written.
        self._context.writes.submit(self._context.records.remove, self._slot)


class Supervisor(ContinuousRuntime):
    """Owns the continuous units: creates, retargets and retires them; shuts them all down."""

    def __init__(self, context: SupervisorContext) -> None:
        self._context = context
        self._units: dict[JobKey, ContinuousUnit] = {}
        self._tasks: dict[JobKey, asyncio.Task[None]] = {}
        self._retiring: dict[asyncio.Task[None], ContinuousUnit] = {}
        self._crashed: dict[JobKey, float] = {}

    @property
    def units(self) -> Mapping[JobKey, ContinuousUnit]:
        return self._units

    def config_changed(self) -> None:
        """After a reload: singletons refused for want of working locks may now be allowed."""
        for unit in self._units.values():
            unit.recheck_singleton()

    def _stopping_unit(self, key: JobKey) -> tuple[asyncio.Task[None], ContinuousUnit] | None:
        for task, unit in self._retiring.items():
            if unit.key == key and not task.done():
                return task, unit
        return None

    def is_stopping(self, key: JobKey) -> bool:
        return self._stopping_unit(key) is not None

    def targets(self) -> Mapping[JobKey, Actual]:
        return {
            key: Actual(unit.target.spec.fingerprint, unit.target.run)
            for key, unit in self._units.items()
        }

    def add(self, spec: JobSpec, run: bool) -> None:
        stopping = self._stopping_unit(spec.key)
        if stopping is not None:
            # The job came back while its old unit is still stopping: reuse that unit, so that
            # one job never has two processes, two copies or two status writers.
            task, retiring = stopping
            del self._retiring[task]
            self._units[spec.key] = retiring
            self._tasks[spec.key] = task
            retiring.set_target(Target(spec, run, reason="job added again"))
            return
        crashed_at = self._crashed.get(spec.key)
        if crashed_at is not None and time.monotonic() - crashed_at < UNIT_CRASH_BACKOFF_S:
            return  # the next reconcile pass tries again
        unit = ContinuousUnit(Target(spec, run), self._context)
        self._units[spec.key] = unit
        task = asyncio.create_task(unit.run(), name=f"unit-{spec.key}")
        task.add_done_callback(self._unit_done)
        self._tasks[spec.key] = task

    def retarget(self, spec: JobSpec, run: bool) -> None:
        unit = self._units[spec.key]
        reason = "files changed" if spec.fingerprint != unit.target.spec.fingerprint else ""
        if not reason:
            reason = "enabled" if run else "disabled"
        unit.set_target(Target(spec, run, reason=reason))

    def retire(self, key: JobKey, reason: str = "job removed") -> None:
        unit = self._units.pop(key)
        task = self._tasks.pop(key)
        self._retiring[task] = unit
        unit.set_target(Target(unit.target.spec, False, retired=True, reason=reason))

    def _unit_done(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("job unit crashed", task=task.get_name(), error=repr(error), exc_info=error)
            # A unit that dies must not take the job down for good: forget it, and the next
            # reconcile pass creates a fresh one.
            for key, known in list(self._tasks.items()):
                if known is task:
                    del self._tasks[key]
                    del self._units[key]
                    self._crashed[key] = time.monotonic()

    async def shutdown(self, force: asyncio.Event) -> None:
        """Retire every unit with the stop ladder; on `force`, SIGKILL whatever remains."""
        for key in list(self._units):
            self.retire(key, reason="shutdown")
        retiring = dict(self._retiring)
        if not retiring:
            await self._context.writes.close()
            return
        forcing: asyncio.Task[bool] = asyncio.create_task(force.wait(), name="shutdown-force")
        try:
            waiting: set[asyncio.Future[Any]] = {*retiring, forcing}
            while len(waiting) > 1:
                _, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if forcing.done():
                    for task, unit in retiring.items():
                        if not task.done():
                            unit.force()
                    self._end_started("forced")
                    _, stuck = await asyncio.wait(retiring, timeout=FORCED_STOP_BOUND_S)
                    for task in stuck:
                        # Its process got SIGKILL above; the unit is still waiting for a
                        # thread (to scan, reap, drain). The daemon does not wait longer.
                        log.error("job unit did not end after SIGKILL", task=task.get_name())
                        task.cancel()
                    await asyncio.gather(*stuck, return_exceptions=True)
                    break
        finally:
            forcing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await forcing
            self._end_started("exit")
            # The units' last statuses and record removals are written before the daemon ends.
            await self._context.writes.close()

    def _end_started(self, when: str) -> None:
        """SIGKILL whatever the units started and have not seen end, now, on the loop's thread.

        Not through a thread like the units' own stops: a thread may be busy or queued (a scan
        stuck on a slow host, the executor full), the forced bound runs out, and a kill
        cancelled while still queued is never sent — the daemon exited leaving the job behind.
        Blocking the loop for one or a few scans of /proc at that point delays nothing that
        matters more.
        """
        if not self._context.started.unfinished():
            return
        reached = self._context.started.end_unfinished()
        if reached:
            log.warning(
                "killed job processes the stop ladder had not ended", processes=reached, at=when
            )
