"""The events hooks can subscribe to, and their bodies.

* `TriggeredJobFinished` (Kudu's): the run JSON, as GET /api/triggeredwebjobs/{name}/history/{id}
  answers it, with Kudu's serializer rules for hooks: indented, null values omitted.
* `ContinuousJobStopped` (ours): a continuous job's process ended without being asked to (or could
  not start) and a restart is scheduled.
* `ContinuousJobCrashLoop` (ours): the job reached `CRASH_LOOP_EXITS` consecutive quick exits (the
  restart backoff's count, reset once a process stays up for `restart_backoff_reset_s`). Sent once
  per loop, when the count reaches the threshold, so a job crashing for days does not page anyone
  every minute; `ContinuousJobStopped` still goes out at each exit.

URLs in bodies need a base (`scheme://host`): the caller passes the last one seen by a request, as
Kudu does with its "last known" base (KUDU-WEBJOBS.md §5).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from webjobsd.model import JobKind
from webjobsd.records.runstore import RunRecord, format_kudu_datetime
from webjobsd.runtime.jobprocess import exit_description
from webjobsd.site import SiteLayout
from webjobsd.views import job_url, run_json, vfs_url

TRIGGERED_JOB_FINISHED: Final = "TriggeredJobFinished"
CONTINUOUS_JOB_STOPPED: Final = "ContinuousJobStopped"
CONTINUOUS_JOB_CRASH_LOOP: Final = "ContinuousJobCrashLoop"
EVENTS: Final = (TRIGGERED_JOB_FINISHED, CONTINUOUS_JOB_STOPPED, CONTINUOUS_JOB_CRASH_LOOP)

CRASH_LOOP_EXITS: Final = 5


@dataclass(frozen=True, slots=True)
class ContinuousExit:
    """A continuous job's process ended on its own (`code` None: it could not start)."""

    job_name: str
    instance_id: str
    code: int | None
    uptime_s: float
    restart_delay_s: float
    consecutive_exits: int
    at: datetime


def triggered_job_finished(base: str, layout: SiteLayout, record: RunRecord) -> dict[str, Any]:
    """The run JSON of a finished run (blocking: it looks for the run's log files)."""
    folder = layout.data_jobs_root / JobKind.TRIGGERED.value / record.job_name / record.run_id
    body = run_json(
        base,
        record,
        now=record.end_time or datetime.now(UTC),
        shown_status=record.status,
        has_output=os.path.exists(folder / "output_log.txt"),
        has_error_log=os.path.exists(folder / "error_log.txt"),
    )
    # Kudu serialises hook bodies with NullValueHandling.Ignore.
    return {key: value for key, value in body.items() if value is not None}


def continuous_exit_events(ended: ContinuousExit) -> list[str]:
    """The events one exit raises, in the order they are sent."""
    events = [CONTINUOUS_JOB_STOPPED]
    if ended.consecutive_exits == CRASH_LOOP_EXITS:
        events.append(CONTINUOUS_JOB_CRASH_LOOP)
    return events


def continuous_exit_body(base: str, event: str, ended: ContinuousExit) -> dict[str, Any]:
    code = ended.code
    body: dict[str, Any] = {
        "event": event,
        "job_name": ended.job_name,
        "job_type": JobKind.CONTINUOUS.value,
        "instance_id": ended.instance_id,
        "time": format_kudu_datetime(ended.at),
        "exit_code": code if code is not None and code >= 0 else None,
        "signal": exit_description(code)[len("signal ") :]
        if code is not None and code < 0
        else None,
        "reason": exit_description(code) if code is not None else "the process could not start",
        "uptime_s": round(ended.uptime_s, 3),
        "restart_delay_s": ended.restart_delay_s,
        "consecutive_exits": ended.consecutive_exits,
        "url": job_url(base, JobKind.CONTINUOUS, ended.job_name),
        "log_url": vfs_url(base, f"data/jobs/continuous/{ended.job_name}/job_log.txt"),
    }
    if event == CONTINUOUS_JOB_CRASH_LOOP:
        body["threshold"] = CRASH_LOOP_EXITS
    return body
