"""While a deployment runs, the jobs wait (KUDU-DEPLOY.md Part A #4): real daemons sharing a site,
the site's deployment lock held from this test exactly as a deploying daemon holds it (flock,
exclusive), job folders rewritten in place slowly, one removed, one added. Nothing restarts,
starts or stops until the lock is released; then each changed job restarts exactly once, the
unchanged one keeps its process, the removed one stops, the added one starts. An intent through
the API is not held."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    FAST_CONFIG,
    DaemonProcess,
    Site,
    leaders,
    running_daemon,
    wait_for,
    wait_for_sync,
)
from webjobsd.discovery.catalog import Catalog
from webjobsd.discovery.service import HOLD_RECHECK_S, DiscoveryService
from webjobsd.discovery.watcher import Debouncer
from webjobsd.model import JobKey, JobKind
from webjobsd.records.lockprobe import is_locked_by_other
from webjobsd.runtime.jobprocess import free_loopback_port
from webjobsd.site import SiteLayout

QUIET_S = float(FAST_CONFIG["debounce_s"])
REPORTER = 'echo "start code=$(cat code.txt) lib=$(cat lib.txt 2>/dev/null)"\nexec sleep 600\n'
# A job that exits after a moment, again and again (restarted every ~0.5 s).
EXITING = 'echo "start code=$(cat code.txt) lib="\nsleep 0.3\nexit 3\n'
INSTANCES = ("one", "two")


@contextlib.contextmanager
def deployment_lock(site: Site) -> Iterator[None]:
    """The site's deployment lock, held as a deploying daemon holds it."""
    path = SiteLayout.build(site.root, instance_id="x", temp_root=site.temp).deployments_lock_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with deployment_lock_at(path):
        yield


@contextlib.contextmanager
def deployment_lock_at(path: Path) -> Iterator[None]:
    """flock, exclusive, on its own open of the file (so probes in this process see it held)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def start_lines(site: Site, name: str, instance: str) -> list[str]:
    """What job `name` printed as it started on `instance` (Kudu's shared job log)."""
    lines = site.job_log(name).splitlines()
    return [
        line[line.index("start code=") :]
        for line in lines
        if f"> {instance}: " in line and "start code=" in line
    ]


def readyz(port: int) -> dict[str, object]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as error:
        return dict(json.loads(error.read()))
    except OSError:
        return {}


def post(port: int, path: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


def test_a_deployment_holds_every_job_change_on_every_daemon_until_it_ends(site: Site) -> None:
    """1. two daemons (instances one and two) run six jobs  2. the deployment lock is taken;
    `changed` gets new code, `grown` a new file and, after a stall past the quiet period, new
    code, `removed` is deleted, `added` is renamed in: both daemons hold all of it (readiness
    says so), nothing restarts, starts or stops; `exiting`, which exits on its own, gets new code
    too: its restarts meanwhile run its last settled code  3. `stopped` is stopped through daemon
    one's API meanwhile: an intent, not held, it stops there at once (daemon two sees only
    files: held)  4. the lock is released: `changed` and `grown` restart exactly once each with
    their new code, `steady` keeps its process, `removed` stops, `added` starts once, `stopped`
    stops on daemon two, `exiting` runs its new code."""
    for name in ("changed", "grown", "removed", "steady", "stopped"):
        site.write_job("continuous", name, {"run.sh": REPORTER, "code.txt": "v1"})
    site.write_job("continuous", "exiting", {"run.sh": EXITING, "code.txt": "v1"})
    ports = {instance: free_loopback_port() for instance in INSTANCES}
    daemons = [
        DaemonProcess(
            site,
            instance,
            listen=f"127.0.0.1:{ports[instance]}",
            log_level="info",
            # Each instance its own temp folder (working copies), as on separate hosts.
            temp_dir=str(site.temp / instance),
            # `exiting` restarts every time after 0.2 s (its 0.3 s of uptime resets the delay).
            restart_backoff_reset_s=0.1,
        )
        for instance in INSTANCES
    ]
    try:
        for daemon in daemons:
            daemon.start()
        for daemon, port in zip(daemons, ports.values(), strict=True):
            wait_for_sync(
                lambda d=daemon, p=port: readyz(p).get("ready") or d.process.poll() is not None,
                timeout=30,
                what=f"daemon {daemon.instance_id} ready",
            )
            assert daemon.process is not None and daemon.process.poll() is None, daemon.log()
        for instance in INSTANCES:
            for name in ("changed", "grown", "removed", "steady", "stopped", "exiting"):
                wait_for_sync(
                    lambda name=name, instance=instance: start_lines(site, name, instance),
                    timeout=30,
                    what=f"{name} started on {instance}",
                )
        steady = {instance: leaders(site, "steady", instance) for instance in INSTANCES}
        assert all(len(pids) == 1 for pids in steady.values()), steady

        def restarted() -> list[str]:
            return [
                f"{name}@{instance}"
                for instance in INSTANCES
                for name in ("changed", "grown", "removed", "steady")
                if len(start_lines(site, name, instance)) != 1
            ] + [f"added@{i}" for i in INSTANCES if start_lines(site, "added", i)]

        def held_everywhere(count: int) -> bool:
            """Both daemons hold `count` job changes (or, without a hold, something restarted)."""
            if restarted():
                return True
            return all(
                any(f"{count} job change" in note for note in readyz(port).get("notes", []))  # type: ignore[attr-defined]
                for port in ports.values()
            )

        jobs = site.jobs / "continuous"
        with deployment_lock(site):
            held_at = time.monotonic()
            (jobs / "changed" / "code.txt").write_text("v2")
            (jobs / "exiting" / "code.txt").write_text("v2")
            exits = {i: len(start_lines(site, "exiting", i)) for i in INSTANCES}
            wait_for_sync(lambda: held_everywhere(2), timeout=20, what="2 changes held")
            assert restarted() == []
            (jobs / "grown" / "lib.txt").write_text("new")
            wait_for_sync(lambda: held_everywhere(3), timeout=20, what="3 changes held")
            # The stall: `grown` is half rewritten for longer than the quiet period.
            stalled_until = time.monotonic() + 2 * QUIET_S
            wait_for_sync(lambda: time.monotonic() > stalled_until, what="a stall")
            (jobs / "grown" / "code.txt").write_text("v2")
            shutil.rmtree(jobs / "removed")
            wait_for_sync(lambda: held_everywhere(4), timeout=20, what="4 changes held")
            site.write_job("continuous", "added", {"run.sh": REPORTER, "code.txt": "v1"})
            wait_for_sync(lambda: held_everywhere(5), timeout=20, what="5 changes held")
            # `exiting` restarted meanwhile, from its last settled copy.
            wait_for_sync(
                lambda: all(len(start_lines(site, "exiting", i)) > exits[i] + 1 for i in INSTANCES),
                what="exiting restarted while held",
            )
            assert all(
                set(start_lines(site, "exiting", i)) == {"start code=v1 lib="} for i in INSTANCES
            )
            assert time.monotonic() - held_at > 3 * QUIET_S

            assert post(ports["one"], "/api/continuouswebjobs/stopped/stop") == 200
            wait_for_sync(
                lambda: not leaders(site, "stopped", "one"), what="stopped at once on one"
            )
            assert leaders(site, "stopped", "two"), "daemon two acted on a file while held"
            assert restarted() == []
            assert all(leaders(site, "removed", instance) for instance in INSTANCES)
        released = time.monotonic()

        def applied() -> bool:
            return all(
                len(start_lines(site, "changed", instance)) == 2
                and len(start_lines(site, "grown", instance)) == 2
                and start_lines(site, "added", instance)
                and not leaders(site, "removed", instance)
                and not leaders(site, "stopped", instance)
                and start_lines(site, "exiting", instance)[-1] == "start code=v2 lib="
                for instance in INSTANCES
            )

        wait_for_sync(applied, timeout=20, what="the held changes applied")
        latency = time.monotonic() - released
        # Absence cannot be awaited: a second restart would come from a late look at the
        # folders, within a quiet period or two of the release.
        quiet_until = time.monotonic() + 4 * QUIET_S
        wait_for_sync(lambda: time.monotonic() > quiet_until, what="a few quiet periods")
        for instance in INSTANCES:
            assert start_lines(site, "changed", instance) == [
                "start code=v1 lib=",
                "start code=v2 lib=",
            ]
            assert start_lines(site, "grown", instance) == [
                "start code=v1 lib=",
                "start code=v2 lib=new",
            ]
            assert start_lines(site, "added", instance) == ["start code=v1 lib="]
            assert start_lines(site, "steady", instance) == ["start code=v1 lib="]
            assert start_lines(site, "removed", instance) == ["start code=v1 lib="]
            assert leaders(site, "steady", instance) == steady[instance]
            assert "notes" not in readyz(ports[instance])
        print(f"held changes applied {latency:.3f} s after the lock was released")
        for daemon in daemons:
            assert daemon.stop() == 0
        for daemon in daemons:
            log = daemon.log()
            assert log.count("deployment in progress, job changes held until it ends") == 1, log
            assert log.count("deployment ended, held job changes applied") == 1, log
    finally:
        for daemon in daemons:
            with contextlib.suppress(Exception):
                daemon.stop()  # its jobs stopped with it, even when the test failed
            daemon.kill_if_running()


async def test_a_rescan_settles_nothing_while_held_and_the_lock_is_probed_only_to_decide(
    tmp_path: Path,
) -> None:
    """Discovery alone, no watcher: only a rescan can find a change. 1. idle: the lock is not
    probed  2. the lock is held, a job folder appears, a rescan is asked for: the job is held
    (the lock is probed again every ~150 ms meanwhile)  3. released: the job is applied at once
    4. idle again: no more probes."""
    root = tmp_path / "jobs"
    lock = tmp_path / "locks" / "deployments.lock"
    probes: list[float] = []

    def probe() -> bool:
        probes.append(time.monotonic())
        return is_locked_by_other(lock)

    changed: list[set[JobKey]] = []
    service = DiscoveryService(
        Catalog(root, settle_s=0.0),
        debouncer=Debouncer(0.1, 1.0),
        rescan_s=30.0,
        on_changed=changed.append,
        deployment_in_progress=probe,
    )
    task = asyncio.create_task(service.run(), name="discovery-under-test")
    try:
        idle_until = time.monotonic() + 0.5
        await wait_for(lambda: time.monotonic() > idle_until, what="an idle while")
        assert probes == []
        lock.parent.mkdir(parents=True)
        with deployment_lock_at(lock):
            job = root / "continuous" / "late"
            job.mkdir(parents=True)
            (job / "run.sh").write_text("echo\n")
            service.request_rescan()
            await wait_for(lambda: len(probes) >= 4, what="probes while held")
            assert service.holding
            assert changed == []
            assert service.hold_note() == "deployment in progress, 0 job changes held"
        released = time.monotonic()
        await wait_for(lambda: changed, what="applied once released")
        assert changed == [{JobKey(JobKind.CONTINUOUS, "late")}]
        assert time.monotonic() - released < 1.0
        gaps = [later - earlier for earlier, later in itertools.pairwise(probes)]
        # Re-probed at its interval while held: neither a hot loop nor a stall.
        assert all(0.8 * HOLD_RECHECK_S < gap < 1.0 for gap in gaps), gaps
        count = len(probes)
        idle_until = time.monotonic() + 0.6
        await wait_for(lambda: time.monotonic() > idle_until, what="an idle while")
        assert len(probes) == count
        assert not service.holding and service.hold_note() is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.skipif(shutil.which("flock") is None, reason="flock(1) is not installed")
async def test_a_copy_under_flock_of_the_deployment_lock_restarts_the_job_once(site: Site) -> None:
    """A deployment of one's own: `flock site/locks/deployments.lock sh -c '...'` around a copy
    that writes code.txt, pauses past the quiet period, then writes lib.txt. 1. nothing restarts
    before the copy ends (without the hold, the job would restart with code.txt alone)  2. the
    job restarts once, with both files."""
    job = site.write_job("continuous", "copied", {"run.sh": REPORTER, "code.txt": "v1"})
    source = site.root.parent / "build"
    source.mkdir()
    (source / "code.txt").write_text("v2")
    (source / "lib.txt").write_text("new")
    lock = SiteLayout.build(site.root, instance_id="x", temp_root=site.temp).deployments_lock_path
    lock.parent.mkdir(parents=True, exist_ok=True)
    pause = 4 * QUIET_S  # the stall inside the copy
    script = f'cp "$1/code.txt" "$2/" && sleep {pause} && cp "$1/lib.txt" "$2/"'
    async with running_daemon(site, instance_id="solo") as daemon:
        await wait_for(lambda: start_lines(site, "copied", "solo"), what="v1 running")
        copy = await asyncio.create_subprocess_exec(
            *("flock", str(lock), "sh", "-c", script, "copy", str(source), str(job))
        )
        assert await asyncio.wait_for(copy.wait(), 30) == 0
        assert start_lines(site, "copied", "solo") == ["start code=v1 lib="]
        await wait_for(lambda: len(start_lines(site, "copied", "solo")) == 2, what="restart")
        discovery = daemon.discovery
        assert discovery is not None
        await wait_for(lambda: discovery.debouncer.next_due() is None, what="nothing pending")
        quiet_until = time.monotonic() + 3 * QUIET_S
        await wait_for(lambda: time.monotonic() > quiet_until, what="a few quiet periods")
    assert start_lines(site, "copied", "solo") == ["start code=v1 lib=", "start code=v2 lib=new"]
