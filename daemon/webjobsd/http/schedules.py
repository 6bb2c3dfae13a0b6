"""`GET /api/schedules`: every triggered job's CRON schedule, in words, with its next occurrence.

Ours, not Kudu's (Kudu shows the schedule only as the `schedule` setting and the scheduler log).
The dashboard's jobs page reads it; scripts may too.

One entry per triggered job whose `settings.job` has a `schedule`, sorted by name:

* `status`: `scheduled` (a timer is set: `next_run` is when it fires, which may be "now" for a
  catch-up of a missed occurrence), `never` (valid, but no occurrence is left: `0 0 0 30 2 *`),
  `invalid` (does not parse: `error` says why, in the words the scheduler log uses), `disabled`
  (`WEBJOBS_DISABLE_SCHEDULE` is set), or `pending` (deployed a moment ago: this daemon's
  scheduler has not registered it yet).
* `description`: `runtime.cronwords` on the parsed schedule, so the words are those of what runs.
* `time_zone`: the zone the schedule is read in (`WEBSITE_TIME_ZONE`, UTC by default).

`next_run` is this daemon's own timer, not a fresh computation: it is what will happen, including
the catch-up and missed-run rules of the scheduler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from webjobsd.http.context import CONTEXT
from webjobsd.model import JobKind
from webjobsd.records.runstore import format_kudu_datetime
from webjobsd.runtime.cron import CronError, CronSchedule, resolve_timezone
from webjobsd.runtime.cronwords import describe
from webjobsd.runtime.scheduler import JobSchedule


@dataclass(frozen=True, slots=True)
class SiteZone:
    """The site's `WEBSITE_TIME_ZONE`, resolved once per request."""

    setting: str | None
    name: str | None
    error: str | None

    @classmethod
    def resolve(cls, setting: str | None) -> SiteZone:
        try:
            tz = resolve_timezone(setting)
        except ValueError as error:  # UnknownTimeZoneError among others
            return cls(setting, None, str(error))
        return cls(setting, getattr(tz, "key", None) or str(tz), None)


def schedule_entry(
    name: str,
    expression: str,
    registered: JobSchedule | None,
    *,
    disabled: bool,
    zone: SiteZone,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "schedule": expression,
        "description": None,
        "time_zone": None,
        "status": "pending",
        "next_run": None,
        "error": None,
    }
    try:
        parsed = CronSchedule.parse(expression)
    except CronError as error:
        entry.update(status="invalid", error=str(error))
        return entry
    entry["description"] = describe(parsed)
    entry["time_zone"] = zone.name
    if zone.error is not None:
        entry.update(status="invalid", error=zone.error)
    elif disabled:
        entry["status"] = "disabled"
    elif registered is not None and (registered.expression, registered.time_zone) == (
        expression,
        zone.setting,
    ):
        if registered.due_at is not None:
            entry.update(status="scheduled", next_run=format_kudu_datetime(registered.due_at))
        elif registered.schedule is not None:
            entry["status"] = "never"
    return entry


async def list_schedules(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    registered: Mapping[str, JobSchedule] = ctx.schedules() if ctx.schedules else {}
    disabled = ctx.app_settings.flag("WEBJOBS_DISABLE_SCHEDULE")
    zone = SiteZone.resolve(ctx.app_settings.get("WEBSITE_TIME_ZONE"))
    entries = [
        schedule_entry(
            key.name,
            spec.settings.schedule,
            registered.get(key.name),
            disabled=disabled,
            zone=zone,
        )
        for key, spec in sorted(ctx.specs().items(), key=lambda item: item[0].name)
        if key.kind is JobKind.TRIGGERED and isinstance(spec.settings.schedule, str)
    ]
    return web.json_response(entries)
