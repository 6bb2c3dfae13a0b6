"""`GET /api/schedules`: each scheduled triggered job in words, with the scheduler's next run.

1. Every state a schedule can be in: set (words, zone, the timer's instant), one that never fires,
   one that does not parse; jobs without a schedule and continuous jobs are not listed.
2. An edit to `settings.job` shows in the answer once the daemon has seen it.
3. `WEBSITE_TIME_ZONE` (a Windows name) is the zone the words and the next run are read in.
4. `WEBJOBS_DISABLE_SCHEDULE` turns every entry to `disabled`, words still given.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.helpers import Site
from tests.test_api_jobs import api, get_json, poll
from webjobsd.records.runstore import parse_kudu_datetime


def scheduled(site: Site, name: str, schedule: str) -> None:
    site.write_job(
        "triggered", name, {"run.sh": "exit 0\n", "settings.job": f'{{"schedule": "{schedule}"}}'}
    )


async def test_every_state_of_a_schedule(site: Site) -> None:
    scheduled(site, "nightly", "0 30 2 * * *")
    scheduled(site, "leap", "0 0 0 30 Feb *")
    scheduled(site, "broken", "0 0 0 * *")
    site.write_job("triggered", "manual", {"run.sh": "exit 0\n"})
    site.write_job(
        "continuous",
        "worker",
        {"run.sh": "exec sleep 1000\n", "settings.job": '{"schedule": "0 * * * * *"}'},
    )
    async with api(site) as (_daemon, session, base):
        before = datetime.now(UTC)
        entries = await get_json(session, f"{base}/api/schedules")
        assert [entry["name"] for entry in entries] == ["broken", "leap", "nightly"]
        broken, leap, nightly = entries

        assert nightly["schedule"] == "0 30 2 * * *"
        assert nightly["description"] == "At 02:30 every day"
        assert nightly["time_zone"] == "UTC"
        assert nightly["status"] == "scheduled"
        assert nightly["error"] is None
        next_run = parse_kudu_datetime(nightly["next_run"])
        assert (next_run.hour, next_run.minute, next_run.second) == (2, 30, 0)
        assert before - timedelta(seconds=5) < next_run <= before + timedelta(days=1)

        assert leap["status"] == "never"
        assert leap["next_run"] is None
        assert "never runs" in leap["description"]

        assert broken["status"] == "invalid"
        assert broken["description"] is None
        assert "expected 6 fields" in broken["error"]

        settings = site.job_dir("triggered", "nightly") / "settings.job"
        settings.write_text('{"schedule": "0 */5 * * * Mon-Fri"}')
        entry = await poll(
            lambda: get_json(session, f"{base}/api/schedules"),
            lambda entries: (
                entries[2]["schedule"] == "0 */5 * * * Mon-Fri"
                and entries[2]["status"] == "scheduled"
            ),
            what="the edited schedule",
        )
        assert entry[2]["description"] == "Every 5 minutes, Monday to Friday"


async def test_the_time_zone_of_the_site(site: Site) -> None:
    scheduled(site, "nightly", "0 30 2 * * *")
    environ = {"WEBSITE_TIME_ZONE": "W. Europe Standard Time"}
    async with api(site, environ=environ) as (_daemon, session, base):
        (entry,) = await get_json(session, f"{base}/api/schedules")
        assert entry["time_zone"] == "Europe/Berlin"
        next_run = parse_kudu_datetime(entry["next_run"])
        # 02:30 in Berlin is 01:30 UTC in winter and 00:30 UTC in summer.
        assert (next_run.hour, next_run.minute) in ((1, 30), (0, 30))


async def test_schedules_disabled_for_the_site(site: Site) -> None:
    scheduled(site, "nightly", "0 30 2 * * *")
    async with api(site, environ={"WEBJOBS_DISABLE_SCHEDULE": "1"}) as (_daemon, session, base):
        (entry,) = await get_json(session, f"{base}/api/schedules")
        assert entry["status"] == "disabled"
        assert entry["next_run"] is None
        assert entry["description"] == "At 02:30 every day"
