"""Kudu's JSON shapes (Part B §1.3): jobs, runs, history. Pure functions of snapshots.

URLs are absolute, built from a base (`scheme://host[:port]`) that the caller derives from the
request. VFS URLs use the legacy `/vfs/` prefix and job URLs the current `/api/{type}webjobs/`
form, as Kudu does. `runCommand` is emitted beside `run_command` (Part A #1).

What a job shows besides its spec comes from its data folder; `ContinuousFacts`,
`TriggeredFacts` and `RunFacts` are those facts, read elsewhere (`http.readmodel`), so that the
JSON is a function of `(base, spec, facts, now)` and nothing else.

Below both of its users, the API (`http`) and the webhooks (`webhooks.events`, whose
`TriggeredJobFinished` body is the run JSON): neither layer owns the shapes, so neither imports
the other for them, and data flows one way (the import-linter contracts in pyproject.toml).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from webjobsd.model import JobKind, JobSpec, RunStatus
from webjobsd.records.runstore import RunRecord, format_kudu_datetime, format_timespan

DOTNET_DEFAULT_DATE = "0001-01-01T00:00:00"


@dataclass(frozen=True, slots=True)
class RunFacts:
    record: RunRecord
    # Kudu computes Aborted on read, so what is shown may differ from what is stored.
    shown_status: RunStatus
    has_output: bool
    has_error_log: bool


@dataclass(frozen=True, slots=True)
class ContinuousFacts:
    status: str
    detailed_status: str
    using_sdk: bool
    # Why the job is held in its status ("instance: reason", see records/status.py), else None.
    error: str | None = None

    @property
    def moves_with_time(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class TriggeredFacts:
    latest: RunFacts | None
    has_scheduler_log: bool
    using_sdk: bool

    @property
    def moves_with_time(self) -> bool:
        """An unfinished run's duration grows, so its JSON differs from one instant to the next."""
        return self.latest is not None and self.latest.record.end_time is None


JobFacts = ContinuousFacts | TriggeredFacts


def job_url(base: str, kind: JobKind, name: str) -> str:
    return f"{base}/api/{kind.value}webjobs/{name}"


def run_url(base: str, name: str, run_id: str) -> str:
    return f"{base}/api/triggeredwebjobs/{name}/history/{run_id}"


def vfs_url(base: str, relative: str) -> str:
    return f"{base}/vfs/{relative}"


def dashboard_job_url(base: str, kind: JobKind, name: str) -> str:
    """The job's page in our dashboard, the `#/job/{type}/{name}` route of its app.js (Kudu's
    `/azurejobs/#/jobs/...` page does not exist here). Job names need no escaping."""
    return f"{base}/dashboard/#/job/{kind.value}/{name}"


def common_fields(base: str, spec: JobSpec, using_sdk: bool) -> dict[str, Any]:
    kind, name = spec.key.kind, spec.key.name
    return {
        "name": name,
        "run_command": spec.command.run_command,
        "runCommand": spec.command.run_command,
        "url": job_url(base, kind, name),
        "extra_info_url": dashboard_job_url(base, kind, name),
        "type": kind.value,
        "error": None,
        "using_sdk": using_sdk,
        "settings": dict(spec.settings.raw),
    }


def continuous_job(
    base: str,
    spec: JobSpec,
    *,
    status: str,
    detailed_status: str,
    using_sdk: bool,
    error: str | None = None,
) -> dict[str, Any]:
    name = spec.key.name
    return {
        "status": status,
        # Kudu's wire format ends each instance's line with CRLF (the logs use LF, Part A #15).
        "detailed_status": detailed_status.replace("\n", "\r\n"),
        "log_url": vfs_url(base, f"data/jobs/continuous/{name}/job_log.txt"),
        **common_fields(base, spec, using_sdk),
        "error": error,
    }


def run_json(
    base: str,
    record: RunRecord,
    *,
    now: datetime,
    shown_status: RunStatus,
    has_output: bool,
    has_error_log: bool,
) -> dict[str, Any]:
    name, run_id = record.job_name, record.run_id
    folder = f"data/jobs/triggered/{name}/{run_id}"
    return {
        "id": run_id,
        "name": run_id,
        "status": shown_status.value,
        "start_time": format_kudu_datetime(record.start_time),
        "end_time": format_kudu_datetime(record.end_time)
        if record.end_time
        else DOTNET_DEFAULT_DATE,
        "duration": format_timespan(record.duration(now)),
        "output_url": vfs_url(base, f"{folder}/output_log.txt") if has_output else None,
        "error_url": vfs_url(base, f"{folder}/error_log.txt") if has_error_log else None,
        "url": run_url(base, name, run_id),
        "job_name": name,
        "trigger": record.trigger,
    }


def triggered_job(
    base: str,
    spec: JobSpec,
    *,
    latest_run: dict[str, Any] | None,
    has_scheduler_log: bool,
    using_sdk: bool,
) -> dict[str, Any]:
    name = spec.key.name
    return {
        "latest_run": latest_run,
        "history_url": f"{base}/api/triggeredwebjobs/{name}/history",
        "scheduler_logs_url": vfs_url(base, f"data/jobs/triggered/{name}/job_scheduler.log")
        if has_scheduler_log
        else None,
        **common_fields(base, spec, using_sdk),
    }


def run_facts_json(base: str, facts: RunFacts, now: datetime) -> dict[str, Any]:
    return run_json(
        base,
        facts.record,
        now=now,
        shown_status=facts.shown_status,
        has_output=facts.has_output,
        has_error_log=facts.has_error_log,
    )


def job_json(base: str, spec: JobSpec, facts: JobFacts, now: datetime) -> dict[str, Any]:
    """One job as Kudu shows it, in a list or alone."""
    if isinstance(facts, ContinuousFacts):
        return continuous_job(
            base,
            spec,
            status=facts.status,
            detailed_status=facts.detailed_status,
            using_sdk=facts.using_sdk,
            error=facts.error,
        )
    latest = facts.latest
    return triggered_job(
        base,
        spec,
        latest_run=run_facts_json(base, latest, now) if latest is not None else None,
        has_scheduler_log=facts.has_scheduler_log,
        using_sdk=facts.using_sdk,
    )


def etag_of(values: Iterable[Mapping[str, Any] | Any]) -> str:
    """A quoted lowercase hex tag over what a list shows (opaque to clients, stable here)."""
    digest = hashlib.sha256()
    for value in values:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return f'"{digest.hexdigest()[:32]}"'


def etag_of_body(body: bytes) -> str:
    """The same form of tag over a rendered body: it changes whenever a byte does."""
    return f'"{hashlib.sha256(body).hexdigest()[:32]}"'


def swagger(names: Iterable[str]) -> dict[str, Any]:
    """Kudu's Swagger 2.0 document of triggered jobs, keyed by the deprecated run route; its
    `host` is Kudu's literal `placeHolder`, which tools replace with the real host."""
    paths = {
        f"/api/triggeredjobs/{name}/run": {
            "post": {
                "deprecated": False,
                "operationId": name,
                "consumes": [],
                "produces": [],
                "responses": {
                    "200": {"description": "Success"},
                    "default": {"description": "Success"},
                },
                "parameters": [
                    {
                        "name": "arguments",
                        "in": "query",
                        "description": "Web Job Arguments",
                        "required": False,
                        "type": "string",
                    }
                ],
            }
        }
        for name in names
    }
    return {
        "swagger": "2.0",
        "info": {"version": "v1", "title": "WebJobs"},
        "host": "placeHolder",
        "schemes": ["https"],
        "paths": paths,
    }
