"""Liveness and readiness over HTTP, without credentials."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Site, running_daemon, wait_for
from tests.test_api_jobs import api


async def test_readyz_turns_unready_when_a_core_task_dies(site: Site) -> None:
    """1. a running daemon is ready  2. its reconciler task dies  3. /readyz answers 503
    naming the reconciler, while /healthz still answers."""
    async with api(site) as (daemon, _session, base), aiohttp.ClientSession() as anonymous:
        async with anonymous.get(f"{base}/readyz") as response:
            assert response.status == 200
            body = await response.json()
        assert body["ready"] is True
        assert set(body["checks"]) == {"watcher", "discovery", "reconciler", "scheduler"}
        assert body["watch"] == "inotify"
        reconciler = daemon._tasks["reconciler"]
        reconciler.cancel()  # fault injection: a core loop is gone
        await asyncio.gather(reconciler, return_exceptions=True)
        async with anonymous.get(f"{base}/readyz") as response:
            assert response.status == 503
            body = await response.json()
        assert body["checks"]["reconciler"] is False
        assert "reconciler" in body["message"]
        async with anonymous.get(f"{base}/healthz") as response:
            assert response.status == 200


async def test_metrics_count_what_happened(site: Site) -> None:
    """Three runs through the API → three Success in the run counter, read with
    prometheus-client's own parser; job gauges and info are there too."""
    site.write_job("triggered", "counted", {"run.sh": "exit 0\n"})
    site.write_job("continuous", "svc", {"run.sh": "while true; do sleep 0.2; done\n"})
    async with api(site) as (daemon, session, base):
        assert daemon.triggered is not None
        for _ in range(3):
            async with session.post(f"{base}/api/triggeredwebjobs/counted/run") as response:
                assert response.status == 202
            await wait_for(lambda: "counted" not in daemon.triggered.active, what="run done")
        await wait_for(lambda: site.status("svc") == "Running", what="svc running")
        async with session.get(f"{base}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    finished = ("webjobsd_runs_finished_total", (("job_name", "counted"), ("status", "Success")))
    assert samples[finished] == 3
    assert samples[("webjobsd_runs_started_total", (("job_name", "counted"),))] == 3
    assert samples[("webjobsd_jobs", (("status", "Running"), ("type", "continuous")))] == 1
    assert samples[("webjobsd_run_duration_seconds_count", (("job_name", "counted"),))] == 3
    assert any(name == "webjobsd_info" for name, _ in samples)
    assert samples[("webjobsd_reconcile_latency_seconds_count", ())] >= 1
    assert samples[("webjobsd_log_bytes_written_total", (("job_name", "counted"),))] > 0


async def test_systemd_hears_ready_and_watchdog_pings_stop_with_the_loop(
    site: Site, tmp_path: Path
) -> None:
    """1. a daemon with NOTIFY_SOCKET and WATCHDOG_USEC  2. READY=1 after the first reconcile,
    then WATCHDOG=1 pings  3. the reconciler's loop dies  4. the pings stop."""
    address = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(address))
    sock.setblocking(False)
    received: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                received.append(sock.recv(4096).decode())
            except BlockingIOError:
                return received

    environ = {"NOTIFY_SOCKET": str(address), "WATCHDOG_USEC": "200000"}
    try:
        async with running_daemon(site, environ=environ, reconcile_tick_s=0.2) as daemon:
            await wait_for(lambda: any("READY=1" in m for m in drain()), what="READY=1")
            assert daemon.reconciler is not None and daemon.reconciler.passes >= 1
            await wait_for(
                lambda: sum("WATCHDOG=1" in m for m in drain()) >= 3, what="watchdog pings"
            )
            reconciler = daemon._tasks["reconciler"]
            reconciler.cancel()  # fault injection: the loop the pings vouch for is gone
            await asyncio.gather(reconciler, return_exceptions=True)
            # Asserting that pings do NOT come needs time to pass: let the heartbeat go stale
            # (3 ticks), then watch a window of three ping periods.
            await asyncio.sleep(3 * 0.2 + 0.3)
            before = sum("WATCHDOG=1" in m for m in drain())
            await asyncio.sleep(0.6)
            assert sum("WATCHDOG=1" in m for m in drain()) == before
        assert any("STOPPING=1" in m for m in drain())
    finally:
        sock.close()


async def test_password_from_systemd_load_credential(site: Site, tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "webjobsd-password").write_text("from-systemd\n")
    environ = {
        "CREDENTIALS_DIRECTORY": str(credentials),
        "WEBJOBSD_USERNAME": "",
        "WEBJOBSD_PASSWORD": "",
    }
    async with running_daemon(site, auth=True, environ=environ, auth_username="ops") as daemon:
        assert daemon.credentials is not None
        assert daemon.credentials.check("ops", "from-systemd")
        assert not daemon.credentials.check("ops", "other")
