"""Triggered jobs: a run on request, one at a time per job, recorded in the run history.

`TriggeredJobs.request_run` is the one entry point (the scheduler, the HTTP API and tests call it).
It refuses with Kudu's 409 texts, takes the job's run lock (`triggeredJob.lock`, an flock that also
holds across daemons sharing the site), applies history retention, records the run as
`Initializing` and returns: the process starts right after, in the run's own task.

A run walks `Initializing → Running → Success | Failed | Stopped`; every transition is written
atomically to `{runId}/status` and logged as `Status changed to ...` in `output_log.txt`. The run
ends with `Failed` on a non-zero exit, an idle timeout (Kudu's rule, Part B §4.6: no output and no
CPU change for `WEBJOBS_IDLE_TIMEOUT`), or any error while starting; with `Stopped` when the job is
removed while running (Part A #7) or the daemon shuts down (Part A #12).

Decisions:
* `WEBJOBS_IDLE_TIMEOUT=0` disables the idle timeout (Kudu's code would kill at the first check).
* At daemon shutdown a run gets `stopping_wait_time` to finish by itself, then SIGTERM and
  `min(5 s, stopping_wait_time)` more before SIGKILL, so shutdown stays bounded.
* A scheduled request carries the occurrence it is for; under the run lock, a run that already
  started at or after that occurrence (another daemon won) makes the request a quiet no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from webjobsd.model import JobKey, JobKind, JobSpec, RunStatus
from webjobsd.records.joblog import JobLogWriter, LogLevel
from webjobsd.records.runstore import RunRecord, RunStore
from webjobsd.runtime import proctree
from webjobsd.runtime.environment import JobLaunch, job_environment
from webjobsd.runtime.jobprocess import JobProcess, exit_description
from webjobsd.runtime.locks import FileLock
from webjobsd.runtime.proctree import new_token
from webjobsd.runtime.supervisor import SupervisorContext
from webjobsd.runtime.workcopy import WorkingCopy

log = structlog.get_logger("webjobsd.triggered")

ALREADY_RUNNING = "Cannot start a new run since job is already running."
JOBS_STOPPED = 'WebJobs are currently in "stopped" state.'
IDLE_CHECK_S = 1.0
SHUTDOWN_LADDER_MAX_S = 5.0


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


@dataclass(slots=True)
class ActiveRun:
    record: RunRecord
    spec: JobSpec
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None
    stop_requested: asyncio.Event | None = None


class TriggeredJobs:
    def __init__(
        self,
        context: SupervisorContext,
        store: RunStore,
        *,
        specs: Callable[[], Mapping[JobKey, JobSpec]],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_run_finished: Callable[[RunRecord], None] | None = None,
    ) -> None:
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
        if name in self._active:
            raise RunConflict(ALREADY_RUNNING)
        lock = FileLock(self._context.layout.run_lock_path(spec.key))
        record = await asyncio.to_thread(self._record_new_run, lock, name, trigger, occurrence)
        active = ActiveRun(record, spec, stop_requested=asyncio.Event())
        self._active[name] = active
        active.task = asyncio.create_task(
            self._run(active, lock, arguments, extra), name=f"run-{name}-{record.run_id}"
        )
        return record

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
            history = self._context.app_settings.history_size
            self._store.apply_retention(name, history)
            return self._store.create_run(name, trigger, self._clock())
        except BaseException:
            lock.release()
            raise

    # -- one run -----------------------------------------------------------------------------

    async def _run(
        self, active: ActiveRun, lock: FileLock, arguments: str | None, extra: tuple[str, ...]
    ) -> None:
        record, spec, name = active.record, active.spec, active.record.job_name
        output = JobLogWriter(
            self._store.output_log_path(name, record.run_id),
            self._context.layout.instance_id,
            cap_bytes=self._context.config.run_log_cap_bytes,
        )
        process: JobProcess | None = None
        slot = f"triggered.{name}"
        status = RunStatus.FAILED
        try:
            output.system(LogLevel.INFO, f"Status changed to {RunStatus.INITIALIZING.value}")
            root = await self._prepare(spec, output)
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
            record = self._transition(record, RunStatus.RUNNING, output)
            active.record = record
            cwd = root / command.script_dir if command.script_dir else root
            process = await JobProcess.spawn(
                command.argv(extra),
                cwd=cwd,
                env=env,
                token=new_token(),
                on_stdout=lambda lines: output.console_lines(LogLevel.INFO, lines),
                on_stderr=lambda lines: output.console_lines(LogLevel.ERR, lines),
                max_line_bytes=self._context.config.max_line_bytes,
            )
            with contextlib.suppress(OSError):
                self._context.records.save(slot, process.identity)
            status = await self._watch(active, process, output)
        except asyncio.CancelledError:
            status = RunStatus.STOPPED
            raise
        except Exception as error:
            output.system(LogLevel.ERR, f"{type(error).__name__}: {error}")
            log.warning("run failed", job=name, run=record.run_id, error=str(error))
            status = RunStatus.FAILED
        finally:
            if process is not None:
                await process.close()
            self._context.records.remove(slot)
            record = self._transition(record, status, output, end=True)
            active.record = record
            lock.release()
            output.close()
            self._active.pop(name, None)
            log.info("run finished", job=name, run=record.run_id, status=status.value)
            if self._on_run_finished is not None:
                self._on_run_finished(record)

    async def _prepare(self, spec: JobSpec, output: JobLogWriter) -> Path:
        if spec.is_in_place:
            return spec.job_dir
        copy = self._workcopies.get(spec.key.name)
        if copy is None:
            copy = WorkingCopy(spec.job_dir, self._context.layout.working_copies_dir(spec.key))
            self._workcopies[spec.key.name] = copy

        def note(message: str) -> None:
            # Called from the copying thread: hand the line to the loop's thread.
            loop.call_soon_threadsafe(output.system, LogLevel.INFO, message)

        loop = asyncio.get_running_loop()
        try:
            return await asyncio.to_thread(copy.prepare, note)
        except OSError as error:
            raise RuntimeError(f"Failed to copy job files: {error}") from error

    async def _watch(
        self, active: ActiveRun, process: JobProcess, output: JobLogWriter
    ) -> RunStatus:
        assert active.stop_requested is not None
        exited = asyncio.create_task(process.wait(), name=f"wait-run-{active.record.run_id}")
        stop = asyncio.create_task(active.stop_requested.wait(), name="run-stop-request")
        idle = asyncio.create_task(self._idle_watch(process, output), name="run-idle-watch")
        try:
            await asyncio.wait({exited, stop, idle}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                code = exited.result()
                if code == 0:
                    return RunStatus.SUCCESS
                output.system(LogLevel.ERR, f"Job failed due to {exit_description(code)}")
                return RunStatus.FAILED
            if idle.done() and idle.result():
                await process.kill()
                return RunStatus.FAILED
            await self._stop_process(active, process, output)
            return RunStatus.STOPPED
        finally:
            for task in (exited, stop, idle):
                if not task.done():
                    task.cancel()
            await asyncio.gather(exited, stop, idle, return_exceptions=True)

    async def _stop_process(
        self, active: ActiveRun, process: JobProcess, output: JobLogWriter
    ) -> None:
        wait_s = active.spec.settings.stopping_wait_s(JobKind.TRIGGERED)
        reason = active.stop_reason or "stop requested"
        if reason == "shutdown":
            output.system(LogLevel.INFO, "WebJob is stopping due to website shutting down")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(process.wait()), timeout=wait_s)
            wait_s = min(SHUTDOWN_LADDER_MAX_S, wait_s)
        else:
            output.system(LogLevel.INFO, f"WebJob is stopping: {reason}")
        if process.returncode is None:
            graceful = await process.stop(wait_s)
            if not graceful:
                output.system(
                    LogLevel.WARN,
                    f"WebJob process did not stop within {wait_s:g} seconds; killed",
                )

    async def _idle_watch(self, process: JobProcess, output: JobLogWriter) -> bool:
        """True once the run has been idle for the timeout (Kudu's two-sample rule)."""
        timeout_s = self._context.app_settings.idle_timeout_s
        if timeout_s <= 0:
            await asyncio.Event().wait()
        last_cpu: float | None = None
        quiet_since = process.last_activity_monotonic
        while True:
            await asyncio.sleep(min(IDLE_CHECK_S, timeout_s / 4))
            now = time.monotonic()
            quiet_since = max(quiet_since, process.last_activity_monotonic)
            if now - quiet_since < timeout_s:
                continue
            cpu = await asyncio.to_thread(proctree.tree_cpu_seconds, process.identity)
            if last_cpu is None or cpu != last_cpu:
                # The first sample, or CPU moved: the job is busy, not stuck.
                last_cpu = cpu
                quiet_since = now
                continue
            command = shlex.join(process.argv)
            output.console(
                LogLevel.ERR,
                f"Command '{command}' was aborted due to no output nor CPU activity for "
                f"{timeout_s} seconds. You can increase the SCM_COMMAND_IDLE_TIMEOUT app setting "
                "(or WEBJOBS_IDLE_TIMEOUT if this is a WebJob) if needed.",
            )
            return True

    def _transition(
        self, record: RunRecord, status: RunStatus, output: JobLogWriter, *, end: bool = False
    ) -> RunRecord:
        updated = record.with_status(status, end_time=self._clock() if end else None)
        try:
            self._store.write(updated)
        except OSError as error:
            log.error("cannot write run status", job=record.job_name, error=str(error))
        output.system(LogLevel.INFO, f"Status changed to {status.value}")
        return updated

    # -- stopping ----------------------------------------------------------------------------

    def stop_run(self, name: str, reason: str) -> bool:
        active = self._active.get(name)
        if active is None or active.stop_requested is None:
            return False
        active.stop_reason = active.stop_reason or reason
        active.stop_requested.set()
        return True

    def stop_removed(self, specs: Mapping[JobKey, JobSpec]) -> None:
        """Part A #7: a job deleted while it runs has its run stopped."""
        for name in list(self._active):
            if JobKey(JobKind.TRIGGERED, name) not in specs:
                self.stop_run(name, "job removed")

    async def shutdown(self) -> None:
        self._shutting_down = True
        tasks = [a.task for a in self._active.values() if a.task is not None]
        for name in list(self._active):
            self.stop_run(name, "shutdown")
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def force(self) -> None:
        for active in list(self._active.values()):
            if active.task is not None:
                active.task.cancel()
        tasks = [a.task for a in self._active.values() if a.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
