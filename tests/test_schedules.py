"""CRON schedules with a real clock, real runs, real daemons (in-process)."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta

import pytest

from tests.helpers import Site, running_daemon, wait_for
from tests.test_triggered import run_ids, status_of
from webjobsd.app import Daemon
from webjobsd.records.runstore import format_kudu_datetime, new_run_id
from webjobsd.runtime.cron import CronSchedule
from webjobsd.runtime.scheduler import JobSchedule, Scheduler
from webjobsd.runtime.triggered import AlreadyDone


def scheduler_log(site: Site, name: str) -> str:
    try:
        return (site.data_dir("triggered", name) / "job_scheduler.log").read_text()
    except OSError:
        return ""


def start_times(site: Site, name: str) -> list[datetime]:
    result = []
    for run_id in run_ids(site, name):
        start = status_of(site, name, run_id).get("StartTime")
        if start:
            result.append(datetime.fromisoformat(start.replace("Z", "+00:00")))
    return result


def fake_run(site: Site, name: str, started: datetime) -> None:
    folder = site.data_dir("triggered", name) / new_run_id(started)
    folder.mkdir(parents=True)
    (folder / "status").write_text(
        json.dumps(
            {
                "Trigger": "External - test",
                "Status": "Success",
                "StartTime": format_kudu_datetime(started),
                "EndTime": format_kudu_datetime(started + timedelta(seconds=1)),
            }
        )
    )


async def test_every_two_seconds_produces_runs_two_seconds_apart(site: Site) -> None:
    site.write_job(
        "triggered", "tick", {"run.sh": "exit 0\n", "settings.job": '{"schedule": "*/2 * * * * *"}'}
    )
    async with running_daemon(site):
        await wait_for(lambda: len(start_times(site, "tick")) >= 3, timeout=10, what="3 runs")
        occurrences = [occurrence_of(t, 2) for t in start_times(site, "tick")]
        assert len(set(occurrences)) == len(occurrences), "an occurrence ran twice"
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(occurrences)]
        assert gaps and all(gap == 2 for gap in gaps[:2]), gaps
        log = scheduler_log(site, "tick")
        assert "SYS INFO] Scheduling WebJob with 0,2,4,6,8,10," in log
        assert "next schedule expected in 00:00:0" in log
        assert "SYS INFO] WebJob invoked" in log
        first = run_ids(site, "tick")[0]
        assert status_of(site, "tick", first)["Trigger"].startswith("Schedule - 0,2,4,")


def occurrence_of(start: datetime, every_s: int) -> datetime:
    """The occurrence a run served: the schedule's last tick at or before its start."""
    base = start.replace(microsecond=0)
    return base - timedelta(seconds=base.second % every_s)


async def test_an_exact_one_shot_time_runs_exactly_once(site: Site) -> None:
    async with running_daemon(site) as daemon:
        at = datetime.now(UTC) + timedelta(seconds=3)
        expression = f"{at.second} {at.minute} {at.hour} {at.day} {at.month} *"
        site.write_job(
            "triggered",
            "once",
            {"run.sh": "exit 0\n", "settings.job": json.dumps({"schedule": expression})},
        )
        await wait_for(lambda: run_ids(site, "once"), timeout=10, what="the run")
        # Once it has fired, the schedule has no occurrence left within the year.
        await wait_for(
            lambda: _due(daemon, "once") is None or _due(daemon, "once") > at + timedelta(days=300),  # type: ignore[operator]
            what="nothing more due",
        )
        assert len(run_ids(site, "once")) == 1


def _due(daemon: Daemon, name: str) -> datetime | None:
    assert daemon.scheduler is not None
    entry = daemon.scheduler.schedules.get(name)
    return entry.due_at if entry else None


async def test_two_daemons_run_each_occurrence_once(site: Site) -> None:
    site.write_job(
        "triggered",
        "shared",
        {"run.sh": "exit 0\n", "settings.job": '{"schedule": "*/2 * * * * *"}'},
    )
    async with running_daemon(site), running_daemon(site, instance_id="two"):
        await wait_for(lambda: len(start_times(site, "shared")) >= 4, timeout=12, what="4 runs")
    times = start_times(site, "shared")
    occurrences = [t.replace(microsecond=0) for t in times]
    assert len(set(occurrences)) == len(occurrences), times


async def test_an_occurrence_finding_the_previous_run_still_going_is_skipped(site: Site) -> None:
    site.write_job(
        "triggered",
        "slow",
        {"run.sh": "sleep 2.5\n", "settings.job": '{"schedule": "* * * * * *"}'},
    )
    async with running_daemon(site):
        await wait_for(lambda: len(start_times(site, "slow")) >= 2, timeout=10, what="2 runs")
    times = start_times(site, "slow")
    assert (times[1] - times[0]).total_seconds() >= 2.5


async def test_a_bad_schedule_is_reported_and_nothing_crashes(site: Site) -> None:
    site.write_job(
        "triggered", "bad", {"run.sh": "exit 0\n", "settings.job": '{"schedule": "* * * *"}'}
    )
    site.write_job(
        "triggered", "good", {"run.sh": "exit 0\n", "settings.job": '{"schedule": "* * * * * *"}'}
    )
    async with running_daemon(site):
        await wait_for(
            lambda: 'Failed to parse schedule "* * * *"' in scheduler_log(site, "bad"),
            what="error logged",
        )
        assert "SYS ERR ] Failed to parse schedule" in scheduler_log(site, "bad")
        await wait_for(lambda: run_ids(site, "good"), what="the good job still runs")
        assert run_ids(site, "bad") == []


async def test_removing_the_schedule_is_logged_and_stops_runs(site: Site) -> None:
    job = site.write_job(
        "triggered", "tock", {"run.sh": "exit 0\n", "settings.job": '{"schedule": "* * * * * *"}'}
    )
    async with running_daemon(site) as daemon:
        await wait_for(lambda: run_ids(site, "tock"), what="a run")
        (job / "settings.job").write_text("{}")
        await wait_for(
            lambda: "Removing current schedule from WebJob" in scheduler_log(site, "tock"),
            what="removal logged",
        )
        assert daemon.scheduler is not None and "tock" not in daemon.scheduler.schedules


async def test_disable_schedule_setting(site: Site) -> None:
    site.write_job(
        "triggered", "off", {"run.sh": "exit 0\n", "settings.job": '{"schedule": "* * * * * *"}'}
    )
    async with running_daemon(site, environ={"WEBJOBS_DISABLE_SCHEDULE": "1"}) as daemon:
        assert daemon.scheduler is not None
        assert daemon.reconciler is not None and daemon.reconciler.passes >= 1
        assert "off" not in daemon.scheduler.schedules
        assert scheduler_log(site, "off") == ""


async def test_a_recently_missed_occurrence_runs_once_at_start(site: Site) -> None:
    site.write_job(
        "triggered", "late", {"run.sh": "exit 0\n", "settings.job": '{"schedule": "0 * * * * *"}'}
    )
    fake_run(site, "late", datetime.now(UTC) - timedelta(seconds=90))
    async with running_daemon(site):
        await wait_for(lambda: len(run_ids(site, "late")) == 2, timeout=5, what="catch-up run")
        assert "next schedule expected in 00:00:00" in scheduler_log(site, "late")


async def test_occurrences_missed_long_ago_are_reported_not_run(site: Site) -> None:
    site.write_job(
        "triggered", "old", {"run.sh": "exit 0\n", "settings.job": '{"schedule": "0 0 * * * *"}'}
    )
    last = datetime.now(UTC) - timedelta(hours=3, minutes=30)
    fake_run(site, "old", last)
    first_mark = last.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    expected = 0
    while first_mark + timedelta(hours=expected) <= datetime.now(UTC):
        expected += 1
    async with running_daemon(site):
        await wait_for(lambda: "Missed" in scheduler_log(site, "old"), what="missed warning")
        assert f"SYS WARN] Missed {expected} schedules, most recent at" in scheduler_log(
            site, "old"
        )
        assert len(run_ids(site, "old")) == 1


async def test_an_occurrence_served_by_another_daemon_is_not_run_again(site: Site) -> None:
    """1. the scheduler fires for the occurrence at T  2. another daemon already ran it
    (its run started at T + 0.2 s and is finished)  3. no second run; next one at T + 10 s."""
    site.write_job("triggered", "served", {"run.sh": "exit 0\n"})
    async with running_daemon(site) as daemon:
        assert daemon.triggered is not None
        occurrence = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
        occurrence -= timedelta(seconds=occurrence.second % 10)
        fake_run(site, "served", occurrence + timedelta(milliseconds=200))
        scheduler = Scheduler(
            layout=daemon.layout,
            app_settings=daemon.app_settings,
            store=daemon.run_store,
            triggered=daemon.triggered,
            clock=lambda: occurrence + timedelta(milliseconds=500),
        )
        entry = JobSchedule(
            "served", "*/10 * * * * *", None, CronSchedule.parse("*/10 * * * * *"), UTC
        )
        await scheduler._fire(entry)
        assert len(run_ids(site, "served")) == 1
        assert entry.due_at == occurrence + timedelta(seconds=10)
        scheduler.close()


async def test_the_run_lock_check_refuses_an_occurrence_already_served(site: Site) -> None:
    """The newest run was read before the other daemon created its run: the check under the
    run lock still sees it."""
    site.write_job("triggered", "late-reader", {"run.sh": "exit 0\n"})
    async with running_daemon(site) as daemon:
        occurrence = datetime.now(UTC) - timedelta(seconds=1)
        fake_run(site, "late-reader", occurrence + timedelta(milliseconds=100))
        assert daemon.triggered is not None
        with pytest.raises(AlreadyDone):
            await daemon.triggered.request_run("late-reader", occurrence=occurrence)
        assert len(run_ids(site, "late-reader")) == 1
