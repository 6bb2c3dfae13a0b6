"""`/metrics`: scraped over a real socket and parsed with prometheus-client's own parser."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from webjobsd.http.metrics import (
    DaemonMetrics,
    JobRow,
    MetricsSource,
    add_metrics_route,
    build_metrics,
)

JOBS: list[JobRow] = [
    ("continuous", "worker", "Running"),
    ("continuous", "poller", "Running"),
    ("continuous", "broken", "PendingRestart"),
    ("triggered", "nightly", "Ready"),
    ("triggered", "report", "Running"),
]


def fake_source(
    *,
    jobs: list[JobRow] | None = None,
    restarts: dict[str, int] | None = None,
    events: int = 17,
    rescans: int = 4,
    info: Callable[[], dict[str, str]] | None = None,
) -> MetricsSource:
    """Plain data behind the seam the composition root fills in."""
    return MetricsSource(
        jobs=lambda: JOBS if jobs is None else jobs,
        restarts=lambda: {"worker": 0, "broken": 5} if restarts is None else restarts,
        watcher_events=lambda: events,
        rescans=lambda: rescans,
        info=info or (lambda: {"version": "0.1.0", "instance_id": "abc123", "site": "/srv/site"}),
    )


@asynccontextmanager
async def served(metrics: DaemonMetrics) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    app = web.Application()
    add_metrics_route(app, metrics)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield session, str(server.make_url("/metrics"))
    finally:
        await server.close()


async def scrape(session: aiohttp.ClientSession, url: str) -> list[Sample]:
    async with session.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await response.text()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    matches = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(matches) == 1, f"{name}{labels}: {matches}"
    return matches[0]


async def test_three_successful_runs_count_three() -> None:
    metrics = build_metrics(fake_source())
    for duration in (0.5, 42.0, 7200.5):
        metrics.run_started("nightly")
        metrics.run_finished("nightly", "Success", duration)
    metrics.run_started("nightly")
    metrics.run_finished("nightly", "Failed", 3.0)
    async with served(metrics) as (session, url):
        samples = await scrape(session, url)
    finished = "webjobsd_runs_finished_total"
    assert value(samples, finished, job_name="nightly", status="Success") == 3
    assert value(samples, finished, job_name="nightly", status="Failed") == 1
    assert value(samples, "webjobsd_runs_started_total", job_name="nightly") == 4


async def test_duration_histogram_buckets_and_count() -> None:
    metrics = build_metrics(fake_source())
    for duration in (0.5, 42.0, 7200.5, 3.0):
        metrics.run_finished("nightly", "Success", duration)
    async with served(metrics) as (session, url):
        samples = await scrape(session, url)
    name = "webjobsd_run_duration_seconds"
    assert value(samples, f"{name}_count", job_name="nightly") == 4
    assert value(samples, f"{name}_sum", job_name="nightly") == pytest.approx(7246.0)
    assert value(samples, f"{name}_bucket", job_name="nightly", le="1.0") == 1
    assert value(samples, f"{name}_bucket", job_name="nightly", le="60.0") == 3
    assert value(samples, f"{name}_bucket", job_name="nightly", le="3600.0") == 3
    assert value(samples, f"{name}_bucket", job_name="nightly", le="14400.0") == 4
    assert value(samples, f"{name}_bucket", job_name="nightly", le="+Inf") == 4


async def test_reconcile_latency_and_log_bytes() -> None:
    metrics = build_metrics(fake_source())
    metrics.observe_reconcile(0.004)
    metrics.observe_reconcile(0.2)
    metrics.add_log_bytes("worker", 100)
    metrics.add_log_bytes("worker", 28)
    metrics.add_log_bytes("worker", 0)
    async with served(metrics) as (session, url):
        samples = await scrape(session, url)
    name = "webjobsd_reconcile_latency_seconds"
    assert value(samples, f"{name}_count") == 2
    assert value(samples, f"{name}_bucket", le="0.005") == 1
    assert value(samples, f"{name}_bucket", le="0.25") == 2
    assert value(samples, "webjobsd_log_bytes_written_total", job_name="worker") == 128


async def test_snapshot_families() -> None:
    metrics = build_metrics(fake_source())
    async with served(metrics) as (session, url):
        samples = await scrape(session, url)
    assert value(samples, "webjobsd_jobs", type="continuous", status="Running") == 2
    assert value(samples, "webjobsd_jobs", type="continuous", status="PendingRestart") == 1
    assert value(samples, "webjobsd_jobs", type="triggered", status="Ready") == 1
    assert value(samples, "webjobsd_jobs", type="triggered", status="Running") == 1
    assert value(samples, "webjobsd_process_restarts_total", job_name="broken") == 5
    assert value(samples, "webjobsd_process_restarts_total", job_name="worker") == 0
    assert value(samples, "webjobsd_watcher_events_total") == 17
    assert value(samples, "webjobsd_rescans_total") == 4
    info = {"version": "0.1.0", "instance_id": "abc123", "site": "/srv/site"}
    assert value(samples, "webjobsd_info", **info) == 1


async def test_snapshots_are_read_at_scrape_time() -> None:
    jobs: list[JobRow] = [("triggered", "nightly", "Ready")]
    metrics = build_metrics(fake_source(jobs=jobs))
    async with served(metrics) as (session, url):
        first = await scrape(session, url)
        jobs[0] = ("triggered", "nightly", "Running")
        second = await scrape(session, url)
    assert value(first, "webjobsd_jobs", type="triggered", status="Ready") == 1
    assert value(second, "webjobsd_jobs", type="triggered", status="Running") == 1
    assert not [s for s in second if s.name == "webjobsd_jobs" and s.labels["status"] == "Ready"]


async def test_failing_snapshot_leaves_the_rest_of_the_scrape() -> None:
    def broken() -> dict[str, str]:
        raise RuntimeError("info is unavailable")

    metrics = build_metrics(fake_source(info=broken))
    metrics.run_finished("nightly", "Success", 1.0)
    async with served(metrics) as (session, url):
        samples = await scrape(session, url)
    assert not [s for s in samples if s.name == "webjobsd_info"]
    assert value(samples, "webjobsd_rescans_total") == 4
    assert value(samples, "webjobsd_runs_finished_total", job_name="nightly", status="Success") == 1


async def test_instances_do_not_share_state() -> None:
    one = build_metrics(fake_source(rescans=1))
    two = build_metrics(fake_source(rescans=2))
    assert one.registry is not two.registry
    one.run_finished("nightly", "Success", 1.0)
    async with served(one) as (session, url):
        first = await scrape(session, url)
    async with served(two) as (session, url):
        second = await scrape(session, url)
    assert value(first, "webjobsd_runs_finished_total", job_name="nightly", status="Success") == 1
    assert not [s for s in second if s.name == "webjobsd_runs_finished_total"]
    assert value(first, "webjobsd_rescans_total") == 1
    assert value(second, "webjobsd_rescans_total") == 2


def test_forget_job_drops_its_series() -> None:
    metrics = build_metrics(fake_source())
    metrics.run_started("gone")
    metrics.run_finished("gone", "Success", 1.0)
    metrics.run_finished("gone", "Failed", 1.0)
    metrics.add_log_bytes("gone", 10)
    metrics.run_finished("kept", "Success", 1.0)
    metrics.forget_job("gone")
    metrics.forget_job("never-seen")
    text = metrics.render().decode()
    assert 'job_name="gone"' not in text
    assert 'job_name="kept"' in text
