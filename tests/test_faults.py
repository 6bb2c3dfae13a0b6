"""Fault injection: the daemon SIGKILLed at random moments, 50 rounds with a fixed seed.

After every restart: every run has a final status (or is the one the live daemon is running),
no status or history file is corrupt, and every job process belongs to the live daemon: nothing
orphaned, nothing running twice.
"""

from __future__ import annotations

import json
import random
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.helpers import DaemonProcess, Site, leaders, processes_with_marker, wait_for_sync
from webjobsd.runtime.jobprocess import free_loopback_port

SEED = 20261128
ROUNDS = 36


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def owned_by(pid: int, daemon_pid: int) -> bool:
    """The process descends from the live daemon (an orphan's chain ends at init)."""
    try:
        process = psutil.Process(pid)
        while process.pid > 1:
            if process.pid == daemon_pid:
                return True
            parent = process.parent()
            if parent is None:
                return False
            process = parent
    except psutil.NoSuchProcess:
        return True  # gone meanwhile: not an orphan
    return False


def check_invariants(site: Site, daemon_pid: int) -> None:
    for status_file in site.data.glob("continuous/*/status_*"):
        json.loads(status_file.read_text())
    for job_data in site.data.glob("triggered/*"):
        runs = sorted(p for p in job_data.iterdir() if p.is_dir() and p.name.isdigit())
        for index, run in enumerate(runs):
            try:
                status = json.loads((run / "status").read_text())
            except FileNotFoundError:
                continue  # created this instant by the live daemon, status not yet written
            newest = index == len(runs) - 1
            if status["Status"] in ("Running", "Initializing"):
                assert newest, f"{run.name} left {status['Status']} behind a newer run"
            else:
                assert "EndTime" in status, f"{run.name} ended without an end time"
    for pid in processes_with_marker(f"@{site.root}".encode()):
        assert owned_by(pid, daemon_pid), f"process {pid} outlived its daemon"
    assert len(leaders(site, "steady")) <= 1


@pytest.mark.timeout(150)  # 36 daemon starts: about 33 s idle, near 60 s on a loaded machine
def test_sigkill_at_random_moments_loses_and_leaks_nothing(site: Site, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    port = free_loopback_port()
    site.write_job("continuous", "steady", {"run.sh": "while true; do sleep 0.1; done\n"})
    site.write_job("continuous", "churn", {"run.sh": "sleep 0.05\nexit 1\n"})
    site.write_job(
        "triggered",
        "tick",
        {"run.sh": "sleep 0.3\n", "settings.job": '{"schedule": "* * * * * *"}'},
    )
    daemon: DaemonProcess | None = None
    try:
        for _ in range(ROUNDS):
            daemon = DaemonProcess(
                site, listen=f"127.0.0.1:{port}", restart_backoff_initial_s=0.05
            ).start()
            if rng.random() < 0.2:
                # Killed while starting: repairing, ending leftovers, or launching jobs.
                time.sleep(rng.uniform(0.0, 0.4))  # the random moment is the point here
            else:
                wait_for_sync(lambda: ready(port), timeout=20, what="daemon ready")
                check_invariants(site, daemon.pid)
                time.sleep(rng.uniform(0.0, 0.8))  # the random moment is the point here
            daemon.signal(signal.SIGKILL)
            daemon.wait()
            daemon = None
        daemon = DaemonProcess(site, listen=f"127.0.0.1:{port}").start()
        wait_for_sync(lambda: ready(port), timeout=20, what="daemon ready")
        wait_for_sync(lambda: len(leaders(site, "steady")) == 1, what="steady running once")
        check_invariants(site, daemon.pid)
        assert daemon.stop() == 0
        daemon = None
        assert not processes_with_marker(f"@{site.root}".encode())
        for run in site.data.glob("triggered/tick/*/status"):
            assert json.loads(run.read_text())["Status"] not in ("Running", "Initializing")
    finally:
        if daemon is not None:
            daemon.kill()
