"""Liveness and readiness over HTTP, without credentials."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Site, wait_for
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
