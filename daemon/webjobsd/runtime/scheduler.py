"""CRON schedules of triggered jobs (Part B §6): registration, timers, firing, de-duplication.

The scheduler owns one timer per scheduled job and its `job_scheduler.log`. `sync(specs)` is
level-triggered: called after every reconcile pass, it registers new or changed schedules (the
expression, or the time zone from `WEBSITE_TIME_ZONE`), removes those that are gone or disabled
(`WEBJOBS_DISABLE_SCHEDULE`), and leaves the rest alone.

Registration applies Kudu's missed-run rule against the newest run on disk: an occurrence missed by
at most 10 minutes runs at once (one catch-up), older ones are reported as `Missed N schedules`.
Firing re-reads the newest run first (another daemon sharing the site may have served the
occurrence), then requests the run with the occurrence it is for; the run lock and the
"already served" check under it make one run per occurrence across daemons. A run still going when
its next occurrence comes makes that occurrence skip.

The wall clock is a parameter; the loop re-evaluates at least every minute so that a clock step
(NTP, suspend) does not leave a timer far off.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

import structlog

from webjobsd.config import AppSettings
from webjobsd.model import JobKey, JobKind, JobSpec
from webjobsd.records.joblog import JobLogWriter, LogLevel
from webjobsd.records.runstore import RunStore, format_timespan
from webjobsd.runtime.cron import CronError, CronSchedule, next_interval, resolve_timezone
from webjobsd.runtime.triggered import AlreadyDone, RunConflict, RunRefused, TriggeredJobs
from webjobsd.site import SiteLayout

log = structlog.get_logger("webjobsd.scheduler")

SCHEDULER_LOG = "job_scheduler.log"
SCHEDULER_LOG_MAX_BYTES = 1024 * 1024
MAX_SLEEP_S = 60.0
NEVER_RUN_OFFSET = timedelta(minutes=1)


@dataclass(slots=True)
class JobSchedule:
    name: str
    expression: str
    time_zone: str | None
    schedule: CronSchedule | None
    tz: tzinfo
    due_at: datetime | None = None


class Scheduler:
    def __init__(
        self,
        *,
        layout: SiteLayout,
        app_settings: AppSettings,
        store: RunStore,
        triggered: TriggeredJobs,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._layout = layout
        self._app_settings = app_settings
        self._store = store
        self._triggered = triggered
        self._clock = clock
        self._schedules: dict[str, JobSchedule] = {}
        self._logs: dict[str, JobLogWriter] = {}
        self._wake = asyncio.Event()
        self.last_pass_monotonic: float | None = None

    @property
    def schedules(self) -> Mapping[str, JobSchedule]:
        return self._schedules

    def _log(self, name: str) -> JobLogWriter:
        writer = self._logs.get(name)
        if writer is None:
            path = self._layout.data_dir(JobKey(JobKind.TRIGGERED, name)) / SCHEDULER_LOG
            writer = JobLogWriter(
                path,
                self._layout.instance_id,
                max_bytes=SCHEDULER_LOG_MAX_BYTES,
                generations=1,
            )
            self._logs[name] = writer
        return writer

    # -- registration ------------------------------------------------------------------------

    def sync(self, specs: Mapping[JobKey, JobSpec]) -> None:
        disabled = self._app_settings.flag("WEBJOBS_DISABLE_SCHEDULE")
        time_zone = self._app_settings.get("WEBSITE_TIME_ZONE")
        wanted: dict[str, str] = {}
        if not disabled:
            for key, spec in specs.items():
                if key.kind is JobKind.TRIGGERED and isinstance(spec.settings.schedule, str):
                    wanted[key.name] = spec.settings.schedule
        for name in list(self._schedules):
            if name not in wanted:
                self._remove(name)
        for name, expression in wanted.items():
            current = self._schedules.get(name)
            if current is None or (current.expression, current.time_zone) != (
                expression,
                time_zone,
            ):
                self._register(name, expression, time_zone)
        self._wake.set()

    def _remove(self, name: str) -> None:
        schedule = self._schedules.pop(name)
        if schedule.schedule is not None:
            self._log(name).system(LogLevel.INFO, "Removing current schedule from WebJob")
            log.info("schedule removed", job=name)
        writer = self._logs.pop(name, None)
        if writer is not None:
            writer.close()

    def _register(self, name: str, expression: str, time_zone: str | None) -> None:
        writer = self._log(name)
        try:
            tz = resolve_timezone(time_zone)
            schedule = CronSchedule.parse(expression)
        except (CronError, ValueError) as error:
            had_schedule = name in self._schedules and self._schedules[name].schedule is not None
            writer.system(LogLevel.ERR, f'Failed to parse schedule "{expression}". Error: {error}')
            if had_schedule:
                writer.system(LogLevel.INFO, "Removing current schedule from WebJob")
            log.warning("schedule does not parse", job=name, schedule=expression, error=str(error))
            # Kept as a failed entry so that the same error is not logged at every pass.
            self._schedules[name] = JobSchedule(name, expression, time_zone, None, UTC)
            return
        entry = JobSchedule(name, expression, time_zone, schedule, tz)
        self._schedules[name] = entry
        latest = self._store.latest(name)
        now = self._clock()
        result = next_interval(
            schedule,
            last_run=latest.start_time.astimezone(tz) if latest else None,
            now=now.astimezone(tz),
            ignore_missed=False,
        )
        if result is None:
            writer.system(LogLevel.WARN, f"Schedule {schedule.expanded()} never fires again")
            return
        if result.missed and result.most_recent_missed is not None:
            writer.system(
                LogLevel.WARN,
                f"Missed {result.missed} schedules, most recent at "
                f"{result.most_recent_missed.isoformat()}",
            )
        entry.due_at = now + result.delay
        writer.system(
            LogLevel.INFO,
            f"Scheduling WebJob with {schedule.expanded()} next schedule expected in "
            f"{format_timespan(result.delay)}",
        )
        log.info("schedule registered", job=name, schedule=expression, due_at=str(entry.due_at))

    # -- the timer loop ----------------------------------------------------------------------

    def _sleep_s(self) -> float:
        dues = [s.due_at for s in self._schedules.values() if s.due_at is not None]
        if not dues:
            return MAX_SLEEP_S
        delay = (min(dues) - self._clock()).total_seconds()
        return max(0.0, min(delay, MAX_SLEEP_S))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            now = self._clock()
            for entry in list(self._schedules.values()):
                if entry.due_at is not None and entry.due_at <= now:
                    try:
                        await self._fire(entry)
                    except Exception:
                        log.exception("scheduled invocation failed", job=entry.name)
                        entry.due_at = self._clock() + timedelta(seconds=MAX_SLEEP_S)
            self.last_pass_monotonic = loop.time()
            # Not wait_for: on Python 3.11 it swallows a cancellation that arrives just as the
            # event is set, and this loop would outlive the daemon's shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._sleep_s()):
                    await self._wake.wait()

    async def _fire(self, entry: JobSchedule) -> None:
        schedule = entry.schedule
        assert schedule is not None
        writer = self._log(entry.name)
        now = self._clock()
        latest = self._store.latest(entry.name)
        last_start = latest.start_time if latest else now - NEVER_RUN_OFFSET
        tz = entry.tz
        result = next_interval(
            schedule, last_run=last_start.astimezone(tz), now=now.astimezone(tz), ignore_missed=True
        )
        if result is None:
            entry.due_at = None
            return
        if result.delay > timedelta(0):
            # Another daemon sharing the site already served this occurrence.
            entry.due_at = now + result.delay
            writer.system(
                LogLevel.INFO, f"Next schedule expected in {format_timespan(result.delay)}"
            )
            return
        occurrence = schedule.next_after(last_start.astimezone(tz))
        try:
            await self._triggered.request_run(
                entry.name, trigger=f"Schedule - {schedule.expanded()}", occurrence=occurrence
            )
            writer.system(LogLevel.INFO, "WebJob invoked")
        except AlreadyDone:
            log.debug("occurrence already served", job=entry.name)
        except RunConflict as conflict:
            # Kudu swallows the 409: the previous run is still going (or WebJobs are stopped),
            # and this occurrence is skipped.
            log.debug("scheduled run skipped", job=entry.name, reason=conflict.message)
        except RunRefused as refused:
            writer.system(LogLevel.WARN, f"Scheduled run refused: {refused.message}")
        now = self._clock()
        following = next_interval(
            schedule, last_run=now.astimezone(tz), now=now.astimezone(tz), ignore_missed=False
        )
        entry.due_at = None if following is None else now + following.delay

    def close(self) -> None:
        for writer in self._logs.values():
            writer.close()
        self._logs.clear()
