"""Triggered jobs: a run on request, one at a time per job, recorded in the run history.

`TriggeredJobs.request_run` is the one entry point (the scheduler, the HTTP API and tests call it).
It refuses with Kudu's 409 texts, reserves the job on this daemon before anything else can happen,
then the run's own task takes the run lock (`triggeredJob.lock`, an flock that also holds across
daemons sharing the site) and records the run as `Initializing`; `request_run` returns as soon as
the run is recorded and the process starts right after. What Kudu does before the process and a
client cannot tell from after it is done once the process is spawned: the `Running` status file
(its log line stays before the spawn, ahead of any output) and the history retention (Kudu's runs
before the new run is created; ours after, keeping one more, so the same runs remain).

A run walks `Initializing → Running → Success | Failed | Stopped`; every transition is written
atomically to `{runId}/status` and logged as `Status changed to ...` in `output_log.txt`. The run
ends with `Failed` on a non-zero exit, an idle timeout (Kudu's rule, Part B §4.6: no output and no
CPU change for `WEBJOBS_IDLE_TIMEOUT`), or any error while starting; with `Stopped` when the job is
removed while running (Part A #7) or the daemon shuts down (Part A #12).

Decisions:
* The work of a run belongs to its task, not to the caller: a caller that goes away (an HTTP
  client disconnecting) neither cancels the run nor leaves its lock behind. Run tasks are never
  cancelled by the daemon; stopping and forcing are requests the task acts on, so every run ends
  with a status, an end time and its lock released.
* `WEBJOBS_IDLE_TIMEOUT=0` disables the idle timeout (Kudu's code would kill at the first check).
* At daemon shutdown a run gets `stopping_wait_time` to finish by itself (its own result is kept if
  it does), then SIGTERM and `min(5 s, stopping_wait_time)` more before SIGKILL.
* A run requested while the job folder is being written runs the last settled copy; with none
  for the current spec it waits for the folder to settle (workcopy.py, `_prepare`).
* A scheduled request carries the occurrence it is for; under the run lock, a run that already
  started at or after that occurrence (another daemon won) makes the request a quiet no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from webjobsd.model import JobKey, JobKind, JobSpec, RunStatus
from webjobsd.records.joblog import JobLogWriter, LogLevel
from webjobsd.records.runstore import RunRecord, RunStore
from webjobsd.runtime import proctree
from webjobsd.runtime.environment import JobLaunch, job_environment
from webjobsd.runtime.jobprocess import JobProcess, exit_description
from webjobsd.runtime.locks import FileLock
from webjobsd.runtime.proctree import new_token
from webjobsd.runtime.supervisor import FORCED_STOP_BOUND_S, SupervisorContext
from webjobsd.runtime.workcopy import FolderChanged, WorkingCopy, describe_error

log = structlog.get_logger("webjobsd.triggered")

ALREADY_RUNNING = "Cannot start a new run since job is already running."
JOBS_STOPPED = 'WebJobs are currently in "stopped" state.'
IDLE_CHECK_S = 1.0
SHUTDOWN_LADDER_MAX_S = 5.0
SETTLE_RETRY_S = 5.0
SETTLE_WAIT_MIN_S = 120.0
SPEC_POLL_S = 0.2


class RunRefused(Exception):
    """A run cannot be started; `message` is what the client is told."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JobNotFound(RunRefused):
    pass


class RunConflict(RunRefused):
    pass


class InvalidArguments(RunRefused):
    pass


class AlreadyDone(RunRefused):
    """A scheduled occurrence that another run already served."""


def split_arguments(arguments: str | None) -> tuple[str, ...]:
    """Part A #17: shell-like words; quoted words with spaces stay one argument."""
    if not arguments:
        return ()
    try:
        return tuple(shlex.split(arguments))
    except ValueError as error:
        raise InvalidArguments(f"Invalid arguments: {error}.") from error


async def first_of(
    *coros: Coroutine[Any, Any, Any] | asyncio.Future[Any], timeout: float | None = None
) -> int | None:
    """Index of the first awaitable to finish (None on timeout); the others are cancelled."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for index, task in enumerate(tasks):
            if task in done:
                return index
        return None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(slots=True)
class ActiveRun:
    spec: JobSpec
    recorded: asyncio.Future[RunRecord]
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    forced: asyncio.Event = field(default_factory=asyncio.Event)
    record: RunRecord | None = None
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None
    history_trimmed: bool = False
    # Set before the final status is written: the run is over, only its bookkeeping remains.
    finishing: bool = False


def _retrieve(future: asyncio.Future[RunRecord]) -> None:
    # A caller that went away leaves nobody to read a refusal; read it so it is not reported.
    if not future.cancelled():
        future.exception()


class TriggeredJobs:
    def __init__(
        self,
        context: SupervisorContext,
        store: RunStore,
        *,
        specs: Callable[[], Mapping[JobKey, JobSpec]],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_run_started: Callable[[RunRecord], None] | None = None,
        on_run_finished: Callable[[RunRecord], None] | None = None,
    ) -> None:
        self._on_run_started = on_run_started
        self._context = context
        self._store = store
        self._specs = specs
        self._clock = clock
        self._on_run_finished = on_run_finished
        self._active: dict[str, ActiveRun] = {}
        self._workcopies: dict[str, WorkingCopy] = {}
        self._shutting_down = False

    @property
    def active(self) -> Mapping[str, ActiveRun]:
        return self._active

    # -- requests ----------------------------------------------------------------------------

    async def request_run(
        self,
        name: str,
        *,
        arguments: str | None = None,
        trigger: str = "External - ",
        occurrence: datetime | None = None,
    ) -> RunRecord:
        spec = self._specs().get(JobKey(JobKind.TRIGGERED, name))
        if spec is None:
            raise JobNotFound(f"No triggered job named {name!r}.")
        if self._shutting_down or self._context.app_settings.jobs_stopped:
            raise RunConflict(JOBS_STOPPED)
        extra = split_arguments(arguments)
        ending = self._active.get(name)
        if ending is not None and ending.finishing and ending.task is not None:
            # Its final status may already be on disk: a client that read it and asks for the
            # next run at once must not get a 409 for the few milliseconds of bookkeeping left.
            await asyncio.wait({ending.task}, timeout=FORCED_STOP_BOUND_S)
        if name in self._active:
            raise RunConflict(ALREADY_RUNNING)
        # Reserved before the first await: a stop, a removal or a shutdown sees this run from
        # now on, and a second request on this daemon is refused without touching the disk.
        active = ActiveRun(spec, asyncio.get_running_loop().create_future())
        active.recorded.add_done_callback(_retrieve)
        self._active[name] = active
        active.task = asyncio.create_task(
            self._run(active, arguments, extra, trigger, occurrence), name=f"run-{name}"
        )
        return await asyncio.shield(active.recorded)

    def _record_new_run(
        self, lock: FileLock, name: str, trigger: str, occurrence: datetime | None
    ) -> RunRecord:
        owner = {
            "OperationName": "Running triggered WebJob",
            "InstanceId": self._context.layout.instance_id,
            "HostName": self._context.hostname,
            "AcquiredDateTime": self._clock().isoformat(),
        }
        if not lock.try_acquire(owner):
            raise RunConflict(ALREADY_RUNNING)
        try:
            if occurrence is not None:
                latest = self._store.latest(name)
                if latest is not None and latest.start_time >= occurrence:
                    raise AlreadyDone("This occurrence already ran.")
            return self._store.create_run(name, trigger, self._clock())
        except BaseException:
            lock.release()
            raise

    # -- one run -----------------------------------------------------------------------------

    async def _run(
        self,
        active: ActiveRun,
        arguments: str | None,
        extra: tuple[str, ...],
        trigger: str,
        occurrence: datetime | None,
    ) -> None:
        name = active.spec.key.name
        lock = FileLock(self._context.layout.run_lock_path(active.spec.key))
        try:
            record = await asyncio.to_thread(self._record_new_run, lock, name, trigger, occurrence)
        except Exception as error:
            self._active.pop(name, None)
            active.recorded.set_exception(error)
            return
        active.record = record
        active.recorded.set_result(record)
        if self._on_run_started is not None:
            try:
                self._on_run_started(record)
            except Exception:
                log.exception("run-started hook failed", job=name, run=record.run_id)
        await self._execute(active, record, lock, arguments, extra)

    async def _execute(
        self,
        active: ActiveRun,
        record: RunRecord,
        lock: FileLock,
        arguments: str | None,
        extra: tuple[str, ...],
    ) -> None:
        spec, name = active.spec, active.spec.key.name
        output = JobLogWriter(
            self._store.output_log_path(name, record.run_id),
            self._context.layout.instance_id,
            cap_bytes=self._context.config.run_log_cap_bytes,
            create_folder=False,
            on_written=self._context.log_counter(name),
            open_logs=self._context.open_logs,
        )
        process: JobProcess | None = None
        slot = f"triggered.{name}"
        status = RunStatus.FAILED
        try:
            output.system(LogLevel.INFO, f"Status changed to {RunStatus.INITIALIZING.value}")
            # A run of an unchanged job of a few files: no thread hop (workcopy.reusable).
            copy = self._workcopies.get(name)
            reused = None
            if copy is not None and not spec.is_in_place and not active.stop_requested.is_set():
                reused = copy.reusable(spec)
            if reused is not None:
                root: Path | None = reused
            elif active.stop_requested.is_set():
                root = None
            else:
                root = await self._prepare(active, output)
            spec = active.spec  # the catalog's newer spec when the run waited for one
            if root is None or active.stop_requested.is_set():
                status = RunStatus.STOPPED
                output.system(LogLevel.INFO, f"WebJob is stopping: {active.stop_reason}")
                return
            copy_root = None if spec.is_in_place else root
            data_dir = self._context.layout.data_dir(spec.key)
            if reused is not None:
                # One lstat per folder when it was handed over before, as a reused copy was.
                self._context.hand_over(copy_root, data_dir)
            else:
                await asyncio.to_thread(self._context.hand_over, copy_root, data_dir)
            command = spec.command
            env = job_environment(
                self._context.base_environ,
                self._context.app_settings.all_for_jobs(),
                self._context.layout,
                JobLaunch(
                    key=spec.key, working_root=root, run_id=record.run_id, arguments=arguments or ""
                ),
            )
            output.system(
                LogLevel.INFO,
                f"Run script '{command.script_name}' with script host - '{command.host}'",
            )
            # The line now, before any output of the process; the status file once it runs.
            output.system(LogLevel.INFO, f"Status changed to {RunStatus.RUNNING.value}")
            process = await JobProcess.spawn(
                command.argv(extra),
                cwd=root / command.script_dir if command.script_dir else root,
                env=env,
                token=new_token(),
                on_stdout=lambda block: output.console_block(LogLevel.INFO, block),
                on_stderr=lambda block: output.console_block(LogLevel.ERR, block),
                max_line_bytes=self._context.config.max_line_bytes,
                run_as=self._context.run_as,
            )
            if self._context.after_start is not None:
                self._context.after_start()
            record = self._write_status(record, RunStatus.RUNNING)
            active.record = record
            with contextlib.suppress(OSError):
                self._context.records.save(slot, process.identity)
            await self._trim_history(active)
            status = await self._watch(active, process, output)
        except Exception as error:
            output.system(LogLevel.ERR, f"{type(error).__name__}: {error}")
            log.warning("run failed", job=name, run=record.run_id, error=str(error))
            status = RunStatus.FAILED
        finally:
            await self._finish(active, record, status, process, lock, output, slot)

    async def _finish(
        self,
        active: ActiveRun,
        record: RunRecord,
        status: RunStatus,
        process: JobProcess | None,
        lock: FileLock,
        output: JobLogWriter,
        slot: str,
    ) -> None:
        """Always: the tree ended, the status final with an end time, the lock released."""
        name = active.spec.key.name
        try:
            if process is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.shield(process.close()), timeout=FORCED_STOP_BOUND_S
                    )
            await self._trim_history(active)  # a run that never started counts too
        finally:
            try:
                self._context.records.remove(slot)
            except OSError as error:
                log.warning("cannot remove process record", job=name, error=str(error))
            # The final status is fsync'ed (runstore): in a thread, not on the loop. The lock is
            # released in that thread right after it, so that another daemon that reads the
            # final status finds the lock free too.
            active.finishing = True
            record = await self._transition_in_thread(
                record, status, output, end=True, release=lock
            )
            active.record = record
            output.close()
            self._active.pop(name, None)
            log.info("run finished", job=name, run=record.run_id, status=status.value)
            if self._on_run_finished is not None:
                try:
                    self._on_run_finished(record)
                except Exception:
                    log.exception("run-finished hook failed", job=name, run=record.run_id)

    async def _trim_history(self, active: ActiveRun) -> None:
        """Kudu trims the history before it creates a run; here once the process is spawned
        (or the run ended without one), under the same run lock, keeping one more run (this
        one, the newest): the same runs remain, and the trimming is off the run's critical
        path."""
        if active.history_trimmed:
            return
        active.history_trimmed = True
        name = active.spec.key.name
        try:
            await asyncio.to_thread(
                self._store.apply_retention, name, self._context.app_settings.history_size + 1
            )
        except Exception as error:
            # A history that cannot be trimmed must not stop a run (nor fail one that runs).
            log.warning("cannot trim run history", job=name, error=repr(error))

    async def _prepare(self, active: ActiveRun, output: JobLogWriter) -> Path | None:
        """The folder to run from; None when the run was stopped meanwhile.

        A run requested while the job folder is being written runs the copy made for the spec
        the catalog last settled on (see workcopy.py). When there is no such copy and the folder
        no longer holds that spec's files, the run waits (still Initializing) for the catalog's
        next settled spec and runs that, or fails once the folder has not settled in
        `_settle_wait_s`.
        """
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self._settle_wait_s()
        waiting_said = False

        def note(message: str) -> None:
            # Called from the copying thread: hand the line to the loop's thread.
            loop.call_soon_threadsafe(output.system, LogLevel.INFO, message)

        while not active.stop_requested.is_set():
            spec = active.spec
            copy = self._workcopies.get(spec.key.name)
            if copy is None:
                copy = WorkingCopy(spec.job_dir, self._context.layout.working_copies_dir(spec.key))
                self._workcopies[spec.key.name] = copy
            try:
                if spec.is_in_place:
                    return await asyncio.to_thread(copy.check_in_place, spec)
                return await asyncio.to_thread(copy.prepare, spec, note)
            except FolderChanged as change:
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"The job folder did not settle within {self._settle_wait_s():g} seconds"
                    ) from change
                if not waiting_said:
                    output.system(LogLevel.INFO, f"Waiting for the job folder: {change}")
                    waiting_said = True
                await self._next_spec(active, min(SETTLE_RETRY_S, deadline - time.monotonic()))
            except Exception as error:
                raise RuntimeError(f"Failed to copy job files: {describe_error(error)}") from error
        return None

    def _settle_wait_s(self) -> float:
        config = self._context.config
        return max(SETTLE_WAIT_MIN_S, 2 * config.debounce_cap_s + config.rescan_s)

    async def _next_spec(self, active: ActiveRun, timeout: float) -> None:
        """Until the catalog has a newer spec for the job (taken into `active`), a stop, or
        `timeout`."""
        deadline = time.monotonic() + timeout
        key, fingerprint = active.spec.key, active.spec.fingerprint
        while time.monotonic() < deadline and not active.stop_requested.is_set():
            newer = self._specs().get(key)
            if newer is not None and newer.fingerprint != fingerprint:
                active.spec = newer
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(active.stop_requested.wait(), SPEC_POLL_S)

    def _status_for_exit(self, code: int, output: JobLogWriter) -> RunStatus:
        if code == 0:
            return RunStatus.SUCCESS
        output.system(LogLevel.ERR, f"Job failed due to {exit_description(code)}")
        return RunStatus.FAILED

    async def _watch(
        self, active: ActiveRun, process: JobProcess, output: JobLogWriter
    ) -> RunStatus:
        winner = await first_of(
            process.wait(), active.stop_requested.wait(), self._idle_watch(process, output)
        )
        if winner == 0:
            code = process.returncode
            return self._status_for_exit(code if code is not None else -1, output)
        if winner == 2:
            await process.kill()
            return RunStatus.FAILED
        return await self._stop_process(active, process, output)

    async def _stop_process(
        self, active: ActiveRun, process: JobProcess, output: JobLogWriter
    ) -> RunStatus:
        wait_s = active.spec.settings.stopping_wait_s(JobKind.TRIGGERED)
        reason = active.stop_reason or "stop requested"
        if reason == "shutdown":
            output.system(LogLevel.INFO, "WebJob is stopping due to website shutting down")
            # Part A #12: the run may finish by itself first; then its own result stands.
            finished = await first_of(process.wait(), active.forced.wait(), timeout=wait_s)
            if finished == 0 and process.returncode is not None:
                return self._status_for_exit(process.returncode, output)
            wait_s = min(SHUTDOWN_LADDER_MAX_S, wait_s)
        else:
            output.system(LogLevel.INFO, f"WebJob is stopping: {reason}")
        if active.forced.is_set():
            await process.kill()
            return RunStatus.STOPPED
        stop = asyncio.ensure_future(process.stop(wait_s))
        if await first_of(asyncio.shield(stop), active.forced.wait()) == 1:
            await process.kill()
        graceful = await stop
        if not graceful:
            output.system(
                LogLevel.WARN, f"WebJob process did not stop within {wait_s:g} seconds; killed"
            )
        return RunStatus.STOPPED

    async def _idle_watch(self, process: JobProcess, output: JobLogWriter) -> None:
        """Returns once the run has been idle for the timeout (Kudu's rule, §4.6)."""
        timeout_s = self._context.app_settings.idle_timeout_s
        if timeout_s <= 0:
            await asyncio.Event().wait()
        last_cpu: float | None = None
        quiet_since = process.last_activity_monotonic
        while True:
            await asyncio.sleep(min(IDLE_CHECK_S, timeout_s / 4))
            if process.last_activity_monotonic > quiet_since:
                # Any output resets everything, the CPU sample included.
                quiet_since = process.last_activity_monotonic
                last_cpu = None
            now = time.monotonic()
            if now - quiet_since < timeout_s:
                continue
            cpu = await asyncio.to_thread(proctree.tree_cpu_seconds, process.identity)
            if last_cpu is None or cpu != last_cpu:
                # The first sample, or CPU moved: busy, not stuck. Look again a timeout later.
                last_cpu = cpu
                quiet_since = now
                continue
            output.console(
                LogLevel.ERR,
                f"Command '{shlex.join(process.argv)}' was aborted due to no output nor CPU "
                f"activity for {timeout_s} seconds. You can increase the SCM_COMMAND_IDLE_TIMEOUT "
                "app setting (or WEBJOBS_IDLE_TIMEOUT if this is a WebJob) if needed.",
            )
            return

    async def _transition_in_thread(
        self,
        record: RunRecord,
        status: RunStatus,
        output: JobLogWriter,
        *,
        end: bool = False,
        release: FileLock | None = None,
    ) -> RunRecord:
        updated = record.with_status(status, end_time=self._clock() if end else None)

        def write() -> None:
            try:
                self._store.write(updated)
            finally:
                if release is not None:
                    release.release()

        # The line first: a client that reads the output once the status says the run ended
        # finds the whole of it.
        output.system(LogLevel.INFO, f"Status changed to {status.value}")
        try:
            await asyncio.to_thread(write)
        except OSError as error:
            log.error("cannot write run status", job=record.job_name, error=str(error))
        return updated

    def _write_status(
        self, record: RunRecord, status: RunStatus, *, end: bool = False
    ) -> RunRecord:
        updated = record.with_status(status, end_time=self._clock() if end else None)
        try:
            self._store.write(updated)
        except OSError as error:
            log.error("cannot write run status", job=record.job_name, error=str(error))
        return updated

    # -- stopping ----------------------------------------------------------------------------

    def stop_run(self, name: str, reason: str) -> bool:
        active = self._active.get(name)
        if active is None:
            return False
        active.stop_reason = active.stop_reason or reason
        active.stop_requested.set()
        return True

    def stop_removed(self, specs: Mapping[JobKey, JobSpec]) -> None:
        """Part A #7: a job deleted while it runs has its run stopped."""
        for name in list(self._active):
            if JobKey(JobKind.TRIGGERED, name) not in specs:
                self.stop_run(name, "job removed")

    def begin_shutdown(self) -> None:
        """From now on every request is refused (Kudu's 'stopped' conflict)."""
        self._shutting_down = True

    async def shutdown(self) -> None:
        """Stop every run (Part A #12) and wait until none is left."""
        self.begin_shutdown()
        while self._active:
            for name in list(self._active):
                self.stop_run(name, "shutdown")
            tasks = [a.task for a in self._active.values() if a.task is not None]
            await asyncio.gather(*tasks, return_exceptions=True)

    def force(self) -> None:
        """Second signal: no more grace, SIGKILL every run now."""
        for active in self._active.values():
            active.stop_reason = active.stop_reason or "shutdown"
            active.forced.set()
            active.stop_requested.set()
