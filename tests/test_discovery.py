"""Discovery with real inotify and real folders: what restarts a job and what does not."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from tests.helpers import Site, leaders, running_daemon, wait_for
from webjobsd.discovery.catalog import Catalog
from webjobsd.discovery.service import DiscoveryService
from webjobsd.discovery.watcher import QUEUED_EVENTS_PER_JOB, Debouncer, queue_shortfall
from webjobsd.model import JobKey, JobKind
from webjobsd.runtime.reconciler import Reconciler
from webjobsd.runtime.scheduler import Scheduler

LOOP = {"run.sh": "echo started $$\nwhile true; do sleep 0.2; done\n"}


def restarts(site: Site, name: str) -> int:
    return site.job_log(name).count("Status changed to Running")


async def test_editor_and_ftp_temp_files_do_not_restart_a_job(site: Site) -> None:
    job_dir = site.write_job("continuous", "quiet", LOOP)
    async with running_daemon(site) as daemon:
        await wait_for(lambda: leaders(site, "quiet"), what="running")
        assert daemon.watcher is not None
        seen = daemon.watcher.events_seen
        for noise in (".run.sh.swp", "run.sh~", "4913", "bundle.zip.part", ".#run.sh"):
            (job_dir / noise).write_text("noise")
        # A relevant write after the noise proves the events were delivered and filtered.
        (job_dir / "marker.txt").write_text("real change")
        await wait_for(lambda: restarts(site, "quiet") == 2, what="restart for marker.txt")
        assert daemon.watcher.events_seen - seen <= 3, "noise events reached the debouncer"


async def test_a_sub_folder_moved_into_a_job_is_watched(site: Site) -> None:
    job_dir = site.write_job("continuous", "nested", LOOP)
    async with running_daemon(site):
        await wait_for(lambda: leaders(site, "nested"), what="running")
        staging = site.root / "lib-staging"
        (staging / "deep").mkdir(parents=True)
        (staging / "deep" / "helper.sh").write_text("echo v1\n")
        staging.rename(job_dir / "lib")
        await wait_for(lambda: restarts(site, "nested") == 2, what="restart for the new folder")
        (job_dir / "lib" / "deep" / "helper.sh").write_text("echo v2\n")
        await wait_for(lambda: restarts(site, "nested") == 3, what="restart for a nested edit")


async def test_many_jobs_are_watched_by_one_watch(site: Site) -> None:
    """Every job folder is watched, down to nested files, without a watch (and its thread) per
    job; edits are seen through events alone (the periodic rescan is an hour away)."""
    count = 160
    for index in range(count):
        site.write_job("triggered", f"job{index:03d}", {"run.sh": "echo\n"})
    async with running_daemon(site, rescan_s=3600.0) as daemon:
        catalog = daemon.catalog
        assert catalog is not None
        key = JobKey(JobKind.TRIGGERED, f"job{count - 1:03d}")
        before = catalog.specs[key].fingerprint
        assert threading.active_count() < 40, "a thread per job folder"
        (site.job_dir("triggered", key.name) / "settings.job").write_text('{"note": 1}')
        await wait_for(lambda: catalog.specs[key].fingerprint != before, what="edit seen")
        # A folder dropped in after the start is watched too, down to a nested file.
        dropped = site.write_job("triggered", "late", {"run.sh": "echo\n", "lib/x.sh": "1\n"})
        late = JobKey(JobKind.TRIGGERED, "late")
        await wait_for(lambda: late in catalog.specs, what="dropped job found")
        first = catalog.specs[late].fingerprint
        (dropped / "lib" / "x.sh").write_text("2\n")
        await wait_for(lambda: catalog.specs[late].fingerprint != first, what="nested edit seen")


async def test_the_periodic_rescan_finds_what_no_event_announced(tmp_path: Path) -> None:
    """1. discovery without any watcher  2. a job folder appears  3. the rescan finds it."""
    root = tmp_path / "jobs"
    changed: list[set[JobKey]] = []
    service = DiscoveryService(
        Catalog(root, settle_s=0.0),
        debouncer=Debouncer(0.1, 1.0),
        rescan_s=0.2,
        on_changed=changed.append,
    )
    task = asyncio.create_task(service.run(), name="discovery-under-test")
    try:
        job = root / "continuous" / "late"
        job.mkdir(parents=True)
        (job / "run.sh").write_text("echo\n")
        await wait_for(lambda: changed, timeout=5, what="rescan")
        assert changed[0] == {JobKey(JobKind.CONTINUOUS, "late")}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_rescans_in_inotify_mode_read_unchanged_folders_in_full_only_now_and_then(
    tmp_path: Path,
) -> None:
    """A rescan repairs missed events: a folder whose entries are as the last look saw them is
    not read again (no script chosen, no PATH asked) but by one rescan in FULL_RESCAN_EVERY."""
    root = tmp_path / "jobs"
    job = root / "continuous" / "idle"
    job.mkdir(parents=True)
    (job / "run.sh").write_text("echo\n")
    # A file whose ctime is within the stamp's racy window (2 s) is always read in full.
    quiet_from = time.monotonic() + 2.5
    asked: list[str] = []

    def which(name: str) -> str | None:
        asked.append(name)
        return f"/usr/bin/{name}"

    changed: list[set[JobKey]] = []
    service = DiscoveryService(
        Catalog(root, settle_s=0.0, which=which),
        debouncer=Debouncer(0.01, 1.0),
        rescan_s=0.05,
        on_changed=changed.append,
    )
    task = asyncio.create_task(service.run(), name="discovery-under-test")
    try:
        await wait_for(lambda: time.monotonic() > quiet_from, timeout=10, what="quiet files")
        asked_before, rescans_before = len(asked), service.rescans
        await wait_for(
            lambda: service.rescans >= rescans_before + 40, timeout=30, what="40 rescans"
        )
        # Full reads every 0.5 s, rescans every 0.05 s: a full read each time would ask PATH
        # at every rescan.
        assert asked_before >= 1
        assert len(asked) - asked_before <= (service.rescans - rescans_before) // 2
        # A change is still found by a quick rescan.
        (job / "run.sh").write_text("echo changed\n")
        seen = len(changed)
        await wait_for(lambda: len(changed) > seen, timeout=10, what="the change found")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_job_that_cannot_start_does_not_disturb_the_others(site: Site) -> None:
    site.write_unstartable_job("continuous", "broken")
    site.write_job("continuous", "fine", LOOP)
    async with running_daemon(site):
        await wait_for(lambda: leaders(site, "fine"), what="good job running")
        await wait_for(
            lambda: "Failed to start process" in site.job_log("broken"), what="error logged"
        )
        await wait_for(lambda: site.status("broken") == "PendingRestart", what="backing off")
        # Status files are written after the spawn, by the writes thread, unit by unit: the
        # other job's may land a moment after the broken one's.
        await wait_for(lambda: site.status("fine") == "Running", what="good job's status")
        assert leaders(site, "fine")


async def test_the_loops_end_when_cancelled_just_as_they_are_woken(site: Site) -> None:
    """The daemon's shutdown cancels its discovery, reconcile and schedule loops and waits for
    them. A cancellation landing in the loop turns between a wake-up and the loop resuming must
    end the loop too: `asyncio.wait_for` (Python 3.11) swallowed it there, the loop went on, and
    the shutdown waited for it forever (a SIGTERM at the moment a job folder changed)."""
    async with running_daemon(site) as daemon:
        supervisor, triggered = daemon.supervisor, daemon.triggered
        assert supervisor is not None and triggered is not None

        def discovery() -> tuple[Coroutine[Any, Any, None], Callable[[], None]]:
            service = DiscoveryService(
                Catalog(site.jobs, settle_s=0.0),
                debouncer=Debouncer(0.1, 1.0),
                rescan_s=30.0,
                on_changed=lambda _keys: None,
            )
            return service.run(), lambda: service.hint(JobKey(JobKind.CONTINUOUS, "none"))

        def reconciler() -> tuple[Coroutine[Any, Any, None], Callable[[], None]]:
            loop = Reconciler(
                specs=dict, jobs_stopped=lambda: False, runtime=supervisor, tick_s=30.0
            )
            return loop.run(), loop.wake

        def scheduler() -> tuple[Coroutine[Any, Any, None], Callable[[], None]]:
            loop = Scheduler(
                layout=daemon.layout,
                app_settings=daemon.app_settings,
                store=daemon.run_store,
                triggered=triggered,
            )
            return loop.run(), lambda: loop.sync({})

        for name, make in (
            ("discovery", discovery),
            ("reconciler", reconciler),
            ("scheduler", scheduler),
        ):
            for turns in range(6):
                body, wake = make()
                task = asyncio.create_task(body, name=f"{name}-under-test")
                for _ in range(5):
                    await asyncio.sleep(0)  # loop turns: the loop reaches its wait
                wake()
                for _ in range(turns):
                    await asyncio.sleep(0)  # the moment of the cancellation, counted in turns
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=5)
                if not done:
                    task.cancel()
                    await asyncio.wait({task}, timeout=5)
                assert done, f"{name} went on after a cancellation {turns} turns after a wake-up"


def test_the_inotify_queue_is_judged_against_the_job_folders() -> None:
    # The kernel's default (16384) holds 2048 job folders of the kind the bench uses, not 5000.
    assert queue_shortfall(2000, limit=16384) is None
    assert queue_shortfall(5000, limit=16384) == 5000 * QUEUED_EVENTS_PER_JOB
    assert queue_shortfall(5000, limit=262144) is None
    # Read from /proc when not given: this kernel's value, whatever it is, gives an answer.
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    assert queue_shortfall(limit) == limit * QUEUED_EVENTS_PER_JOB
