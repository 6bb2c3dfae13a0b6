"""Discovery under attack, against the real daemon process: out of file descriptors, a FIFO named
settings.job, a scan that never ends. Jobs keep running (once), discovery keeps discovering, and
readiness tells the truth."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import DaemonProcess, Site, kill_jobs, leaders, wait_for, wait_for_sync
from webjobsd.discovery.catalog import Catalog
from webjobsd.discovery.service import DiscoveryService
from webjobsd.discovery.watcher import Debouncer
from webjobsd.runtime.jobprocess import free_loopback_port

LOOP = "while true; do sleep 0.2; done\n"


def get_json(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def ready(port: int) -> bool:
    try:
        return get_json(port, "/readyz")[0] == 200
    except OSError:
        return False


def job_names(port: int, kind: str) -> set[str]:
    status, body = get_json(port, f"/api/{kind}webjobs")
    assert status == 200
    assert isinstance(body, list)
    return {str(job["name"]) for job in body}


@contextlib.contextmanager
def out_of_descriptors(pid: int) -> Iterator[None]:
    """The process may open no more file descriptors: its limit drops to 3, below every free
    number, while what it has open stays open (3, not less: poll() refuses more descriptors than
    the limit, and the watcher polls two). Idle connections no longer get there: the listener
    caps connections at half the limit."""
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, before[1]))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, before)


def test_running_out_of_file_descriptors_keeps_every_job_and_duplicates_none(site: Site) -> None:
    """1. a daemon runs a continuous job, a triggered run and a job about to be deleted  2. its
    descriptor limit drops to what it has open; a job folder is touched, SIGHUP forces a rescan,
    the doomed job's folder is removed  3. the rescan fails to read: jobs keep their processes,
    the run goes on; the removed job's stop fails and is retried  4. the limit is restored: the
    removed job's process is gone, every other job still has its one process, and nothing
    started twice."""
    site.write_job("continuous", "steady", {"run.sh": LOOP})
    doomed = site.write_job("continuous", "doomed", {"run.sh": LOOP})
    site.write_job("triggered", "longrun", {"run.sh": "sleep 120\n"})
    port = free_loopback_port()
    daemon = DaemonProcess(
        site,
        listen=f"127.0.0.1:{port}",
        log_level="info",
    ).start()
    try:
        wait_for_sync(lambda: ready(port), timeout=20, what="daemon ready")
        steady = wait_for_sync(lambda: leaders(site, "steady"), what="steady running")
        doomed_pids = wait_for_sync(lambda: leaders(site, "doomed"), what="doomed running")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/triggeredwebjobs/longrun/run", method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 202
        run = wait_for_sync(lambda: leaders(site, "longrun"), what="run running")
        with out_of_descriptors(daemon.pid):
            os.utime(site.job_dir("continuous", "steady"))
            daemon.signal(signal.SIGHUP)
            wait_for_sync(
                lambda: (
                    "keeping what was known of the job" in daemon.log()
                    or "job removed" in daemon.log()
                ),
                timeout=20,
                what="a rescan that hit the descriptor limit",
            )
            os.rename(doomed, site.root / "doomed-gone")
            wait_for_sync(
                lambda: "job removed" in daemon.log(), timeout=20, what="doomed job removed"
            )
            assert "job=continuous/steady" not in _removed_lines(daemon)
            assert "job=triggered/longrun" not in _removed_lines(daemon)
        wait_for_sync(lambda: not leaders(site, "doomed"), timeout=30, what="doomed stopped")
        wait_for_sync(lambda: ready(port), timeout=20, what="ready again")
        daemon.signal(signal.SIGHUP)
        wait_for_sync(lambda: "steady" in job_names(port, "continuous"), what="steady listed")
        assert leaders(site, "steady") == steady
        assert leaders(site, "longrun") == run
        assert "job unit crashed" not in daemon.log()
        assert site.job_log("steady").count("Status changed to Running") == 1
        assert doomed_pids[0] not in leaders(site, "doomed")
    finally:
        daemon.kill_if_running()
        kill_jobs(site, "longrun", "steady", "doomed")


def _removed_lines(daemon: DaemonProcess) -> str:
    return "\n".join(line for line in daemon.log().splitlines() if "job removed" in line)


def test_a_fifo_named_settings_job_does_not_wedge_discovery(site: Site) -> None:
    """1. a job whose settings.job is a FIFO (no writer ever)  2. a job dropped later is still
    discovered, a deleted one is seen gone, /readyz says ready  3. SIGTERM stops the daemon at
    once (no second signal)."""
    job = site.write_job("continuous", "fifo", {"run.sh": LOOP})
    os.mkfifo(job / "settings.job")
    site.write_job("triggered", "gone", {"run.sh": "echo\n"})
    port = free_loopback_port()
    daemon = DaemonProcess(site, listen=f"127.0.0.1:{port}", log_level="info").start()
    try:
        wait_for_sync(lambda: ready(port), timeout=20, what="daemon ready")
        site.write_job("triggered", "late", {"run.sh": "echo\n"})
        shutil.rmtree(site.job_dir("triggered", "gone"))
        wait_for_sync(
            lambda: job_names(port, "triggered") == {"late"}, timeout=15, what="late found"
        )
        assert ready(port)
        assert "a FIFO, not a file" in daemon.log()
        begin = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=15) == 0
        assert time.monotonic() - begin < 10
    finally:
        daemon.kill_if_running()


async def test_a_stuck_pass_is_named_and_ends_readiness(tmp_path: Path) -> None:
    """1. a discovery pass blocks inside a folder read (an interpreter lookup that hangs, as a
    hung network file system would)  2. past the bound, the service names the stage  3. once the
    read returns, the stage is cleared."""
    root = tmp_path / "jobs"
    (root / "continuous" / "slow").mkdir(parents=True)
    (root / "continuous" / "slow" / "run.sh").write_text("echo\n")
    release = threading.Event()
    entered = threading.Event()

    def hanging_which(name: str) -> str | None:
        entered.set()
        release.wait(30)
        return f"/usr/bin/{name}"

    service = DiscoveryService(
        Catalog(root, settle_s=0.0, which=hanging_which),
        debouncer=Debouncer(0.05, 1.0),
        rescan_s=0.05,
        on_changed=lambda _keys: None,
        stuck_after_s=0.3,
    )
    task = asyncio.create_task(service.run(), name="discovery-under-test")
    try:
        await wait_for(entered.is_set, what="the pass entered the read")
        stage = await wait_for(service.stuck_stage, timeout=5, what="stuck stage named")
        assert "continuous/slow" in stage
        release.set()
        await wait_for(lambda: service.stuck_stage() is None, what="stage cleared")
    finally:
        release.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
