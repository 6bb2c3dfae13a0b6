"""`watch: poll` (sites on NFS, CephFS, EFS, where writes by other hosts make no inotify event):
no inotify watch is made, the periodic full scan is the only source of events, and every rule
against half-copied jobs and zips still holds. A change here is found by nothing but the poll:
there is no watcher, and the inotify-mode rescan (`rescan_s`) is an hour away."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.helpers import Site, leaders, running_daemon, wait_for
from tests.test_api_deploy import zip_of
from tests.test_drops import starts
from webjobsd.app import Daemon
from webjobsd.deploy.pipeline import DeployRequest

POLL = {"watch": "poll", "poll_interval_s": 0.2, "rescan_s": 3600.0}
LOOP = 'echo "started {text}"\nwhile true; do sleep 0.2; done\n'


def inotify_watches() -> int:
    """The inotify watches this process holds: `inotify wd:` lines in /proc/self/fdinfo."""
    count = 0
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            with open(f"/proc/self/fdinfo/{fd}") as info:
                count += sum(line.startswith("inotify wd:") for line in info)
        except OSError:
            continue  # closed meanwhile
    return count


def watchdog_threads() -> list[str]:
    return [
        thread.name
        for thread in threading.enumerate()
        if type(thread).__module__.startswith("watchdog")
    ]


def start_lines(site: Site, name: str) -> list[str]:
    """The job's own `started ...` lines, without the log's time and instance prefix."""
    lines = site.job_log(name).splitlines()
    return [line.split("] ", 1)[-1] for line in lines if "] started " in line]


async def test_poll_mode_watches_nothing_and_finds_added_changed_and_removed_jobs(
    site: Site,
) -> None:
    """1. a daemon in poll mode adds no inotify watch and runs no watchdog thread; readiness
    says its watcher check is fine  2. a job folder renamed in is found and runs  3. a
    settings.job edit restarts it once  4. its folder removed stops it."""
    site.write_job("continuous", "first", {"run.sh": LOOP.format(text="first")})
    before = inotify_watches()
    async with running_daemon(site, **POLL) as daemon:
        assert daemon.watcher is None and daemon.discovery is not None
        assert daemon.discovery.watcher is None
        assert inotify_watches() == before, "poll mode made an inotify watch"
        assert watchdog_threads() == []
        assert daemon.readiness()["watcher"] is True
        await wait_for(lambda: leaders(site, "first"), what="first running")

        folder = site.write_job("continuous", "added", {"run.sh": LOOP.format(text="added")})
        await wait_for(lambda: leaders(site, "added"), what="added job running")
        await wait_for(lambda: start_lines(site, "added"), what="added job's output")

        (folder / "settings.job").write_text('{"note": "edited"}')
        await wait_for(lambda: starts(site, "added") == 2, what="restart for settings.job")
        spec = daemon.catalog.specs  # type: ignore[union-attr]
        assert any(dict(s.settings.raw).get("note") == "edited" for s in spec.values())

        pids = leaders(site, "added")
        await asyncio.to_thread(subprocess.run, ["rm", "-rf", str(folder)], check=True)
        await wait_for(lambda: not leaders(site, "added"), what="removed job stopped")
        assert pids and not any(os.path.exists(f"/proc/{pid}") for pid in pids)
        assert leaders(site, "first"), "the other job was disturbed"
        assert inotify_watches() == before and watchdog_threads() == []
        assert daemon.discovery.rescans >= 5, "the poll ran a few times"


WRITER = """
import sys, time
path, ready = sys.argv[1], sys.argv[2]
with open(path, "w") as out:
    for chunk in range(4):
        out.write(f"chunk{chunk};")
        out.flush()
        if chunk == 0:
            open(ready, "w").close()
        # Quiet for longer than the quiet period and the poll together: only the open file
        # says that the copy is under way.
        time.sleep(0.7)
"""


@contextmanager
def writer_process(path: Path, ready: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(ready)])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


async def test_poll_mode_holds_a_job_while_a_process_writes_into_it(site: Site) -> None:
    """1. a job folder is renamed in while a child process still writes its data file, in
    chunks 0.7 s apart (longer than the 0.3 s quiet period) over ~2 s  2. the job does not start
    until the writer closed the file (/proc says it is open)  3. it starts once, on the
    complete file."""
    (site.jobs / "continuous").mkdir(parents=True)
    async with running_daemon(site, **POLL) as daemon:
        staging = site.root / ".staging" / "slow"
        staging.mkdir(parents=True)
        (staging / "run.sh").write_text(LOOP.format(text="data=$(cat data.txt)"))
        old = time.time() - 60
        os.utime(staging / "run.sh", (old, old))
        ready = site.root / "writer-ready"
        with writer_process(staging / "data.txt", ready) as writer:
            await wait_for(ready.exists, what="the writer's first chunk")
            os.rename(staging, site.job_dir("continuous", "slow"))
            returncode = await asyncio.to_thread(writer.wait, 10)
        assert returncode == 0
        await wait_for(lambda: start_lines(site, "slow"), what="the job started")
        assert start_lines(site, "slow") == ["started data=chunk0;chunk1;chunk2;chunk3;"]
        assert starts(site, "slow") == 1
        assert daemon.watcher is None


async def test_poll_mode_waits_for_files_added_one_by_one(site: Site) -> None:
    """1. a job folder's script first, then ten more files one by one, 0.15 s apart (1.5 s in
    all: longer than the 0.6 s quiet period)  2. the job starts once, with all ten files."""
    (site.jobs / "continuous").mkdir(parents=True)
    async with running_daemon(site, **POLL, debounce_s=0.6):
        folder = site.job_dir("continuous", "trickle")
        (folder / "lib").mkdir(parents=True)
        (folder / "run.sh").write_text(LOOP.format(text="files=$(ls lib | wc -l)"))
        for index in range(10):
            await asyncio.sleep(0.15)  # the copy's own pace, not a synchronisation
            (folder / "lib" / f"part{index}.sh").write_text(f"echo {index}\n")
        await wait_for(lambda: start_lines(site, "trickle"), what="the job started")
        assert start_lines(site, "trickle") == ["started files=10"]
        assert starts(site, "trickle") == 1


def drops_seen(daemon: Daemon) -> int:
    assert daemon.drops is not None
    return daemon.drops.looked


async def test_poll_mode_deploys_dropped_zips_and_waits_for_a_zip_written_in_two_goes(
    site: Site,
) -> None:
    """1. a site zip copied into `site/deployments/drop/` deploys (the poll finds it) and its
    job runs  2. a job zip written in two goes, closed in between (a writer on another host:
    no process here holds it open), is not taken while it is no complete zip, and deploys once
    the rest is written  3. no inotify watch or watchdog thread all along."""
    drop_dir = site.root / "site" / "deployments" / "drop"
    drop_dir.mkdir(parents=True)
    kind_dir = site.jobs / "continuous"
    kind_dir.mkdir(parents=True)
    before = inotify_watches()
    job = "App_Data/jobs/continuous/sitejob/run.sh"
    site_zip = zip_of({"index.html": "<p>polled</p>", job: LOOP.format(text="sitejob")})
    async with running_daemon(site, **POLL) as daemon:
        assert inotify_watches() == before and watchdog_threads() == []
        (drop_dir / "site.zip.tmp").write_bytes(site_zip)
        os.rename(drop_dir / "site.zip.tmp", drop_dir / "site.zip")
        await wait_for(lambda: start_lines(site, "sitejob"), timeout=15, what="site zip deployed")
        await wait_for(lambda: not (drop_dir / "site.zip").exists(), what="site.zip consumed")
        assert (site.root / "site" / "wwwroot" / "index.html").read_text() == "<p>polled</p>"

        whole = zip_of({"run.sh": LOOP.format(text="zipped")})
        half = kind_dir / "zipped.zip"
        half.write_bytes(whole[: len(whole) // 2])
        looks = drops_seen(daemon)
        # Looked at over and over, past the quiet period: never taken, never failed.
        await wait_for(lambda: drops_seen(daemon) >= looks + 5, what="the half zip looked at")
        assert half.exists() and not (kind_dir / "zipped.zip.failed").exists()
        assert not leaders(site, "zipped")
        with open(half, "ab") as rest:
            rest.write(whole[len(whole) // 2 :])
        await wait_for(lambda: start_lines(site, "zipped"), timeout=15, what="zip deployed")
        await wait_for(lambda: not half.exists(), what="zipped.zip consumed")
        assert start_lines(site, "zipped") == ["started zipped"]
        assert inotify_watches() == before and watchdog_threads() == []


async def test_poll_mode_holds_job_changes_while_a_deployment_runs(site: Site) -> None:
    """1. a job runs v1  2. while a deployment holds the site lock, its script becomes v2: the
    polls go on and the job keeps v1 (the poll would take v2 within about 0.5 s)  3. once the
    deployment ends, the job restarts once, with v2; /readyz said `"watch": "poll"`."""
    folder = site.write_job("continuous", "held", {"run.sh": LOOP.format(text="v1")})
    async with running_daemon(site, **POLL) as daemon:
        discovery = daemon.discovery
        assert discovery is not None and daemon.http is not None
        await wait_for(lambda: start_lines(site, "held"), what="v1 running")
        body = await asyncio.to_thread(readyz, daemon.http.port)
        assert body["watch"] == "poll" and body["checks"]["watcher"] is True
        holder = await daemon.deployments.begin(DeployRequest(deployer="test", message="held"))
        try:
            (folder / "run.sh").write_text(LOOP.format(text="v2"))
            old = time.time() - 60
            os.utime(folder / "run.sh", (old, old))
            written = time.monotonic()
            await wait_for(
                lambda: discovery.holding and (discovery.last_pass_monotonic or 0) > written + 1.5,
                what="polls held past the time the change would take",
            )
            assert start_lines(site, "held") == ["started v1"]
        finally:
            await holder.finish()
        await wait_for(lambda: len(start_lines(site, "held")) == 2, what="v2 after the deployment")
        assert start_lines(site, "held") == ["started v1", "started v2"]


def readyz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
        return dict(json.loads(response.read()))
