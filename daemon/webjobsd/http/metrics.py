"""Prometheus metrics: one dedicated registry per daemon, served as `GET /metrics`.

What this module owns
---------------------
* `MetricsSource`: the seam through which the composition root lends read-only snapshots
  (jobs and their statuses, restart counts, watcher events, rescans, daemon info). It is a
  dataclass of plain callables, so this module never imports `app.py` and tests feed it lambdas.
* `DaemonMetrics`: the registry, a collector that turns those snapshots into metric families at
  scrape time, and the instrumented metrics the daemon updates as things happen (runs started
  and finished, run durations, log bytes written, reconcile latency).
* `add_metrics_route`: the aiohttp handler that renders the registry in the text format.

Decisions
---------
* **A dedicated `CollectorRegistry`, never the global one.** Two daemons (or two tests) in one
  process must not share or collide on series, and we do not want the client library's default
  process/platform collectors mixed into our namespace implicitly.
* **Snapshots are read at scrape time, not copied into gauges.** State already has one owner
  (catalog, supervisor, watcher, discovery); a collector asks for it when Prometheus asks, so
  nothing can drift. Counters the daemon already keeps (`unit.restarts`, `watcher.events_seen`,
  `discovery.rescans`) are exposed as counters; a reset (a job unit recreated, the daemon
  restarted) is what Prometheus' `rate()` already handles.
* **One failing snapshot does not fail the scrape.** Each source is read under its own guard;
  a failure is logged and only that family is left out.
* **Rendering runs on the event loop**, not in a thread: the snapshot callables read state the
  loop owns, and the text for a few hundred series is small.
* **Label names avoid Prometheus' target labels.** Prometheus attaches `job` and `instance` to
  every scraped series; an exported label of the same name is renamed `exported_job` /
  `exported_instance` (or silently overrides with `honor_labels`). So the WebJob's name is
  `job_name` and the daemon's instance id is `instance_id` (see `JOB_LABEL`, `INSTANCE_LABEL`).
* **Bounded cardinality.** Labels are job names, job types and statuses only - never run ids
  or arguments. `forget_job` drops a deleted job's instrumented series.
* Duration buckets reach 24 hours (triggered WebJobs routinely run for hours); reconcile latency
  buckets span a millisecond to ten seconds.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import structlog
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

log = structlog.get_logger("webjobsd.metrics")

NAMESPACE = "webjobsd"
JOB_LABEL = "job_name"
INSTANCE_LABEL = "instance_id"

# (kind, job name, status); status is the job's current status text (Kudu's wording).
JobRow = tuple[str, str, str]

T = TypeVar("T")

RUN_DURATION_BUCKETS = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    86400.0,
)
RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class MetricsSource:
    """Read-only snapshots lent by the composition root; each is called once per scrape."""

    jobs: Callable[[], Iterable[JobRow]]
    """Every known job as (kind, name, status), e.g. ("continuous", "worker", "Running")."""
    restarts: Callable[[], Mapping[str, int]]
    """Job name -> process restarts so far (continuous jobs)."""
    watcher_events: Callable[[], int]
    """File-system events the watcher has seen."""
    rescans: Callable[[], int]
    """Full rescans discovery has made."""
    info: Callable[[], Mapping[str, str]]
    """Keys `version`, `instance_id` (or `instance`) and `site`; missing keys export as ""."""


class SnapshotCollector(Collector):
    """Builds the snapshot families from a `MetricsSource` on every scrape."""

    def __init__(self, source: MetricsSource) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        # Names only: lets the registry check collisions without reading the daemon's state.
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        source = self._source
        jobs, restarts, events, rescans, info = self._families()
        if (rows := _read("jobs", source.jobs)) is not None:
            for (kind, status), count in sorted(Tally((k, s) for k, _n, s in rows).items()):
                jobs.add_metric([kind, status], count)
            yield jobs
        if (per_job := _read("restarts", source.restarts)) is not None:
            for name, count in sorted(per_job.items()):
                restarts.add_metric([name], count)
            yield restarts
        if (seen := _read("watcher_events", source.watcher_events)) is not None:
            events.add_metric([], seen)
            yield events
        if (scans := _read("rescans", source.rescans)) is not None:
            rescans.add_metric([], scans)
            yield rescans
        if (details := _read("info", source.info)) is not None:
            instance = details.get("instance_id", details.get("instance", ""))
            info.add_metric(
                [],
                {
                    "version": str(details.get("version", "")),
                    INSTANCE_LABEL: str(instance),
                    "site": str(details.get("site", "")),
                },
            )
            yield info

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
        InfoMetricFamily,
    ]:
        return (
            GaugeMetricFamily(
                f"{NAMESPACE}_jobs", "Jobs by type and current status.", labels=["type", "status"]
            ),
            CounterMetricFamily(
                f"{NAMESPACE}_process_restarts",
                "Restarts of continuous job processes.",
                labels=[JOB_LABEL],
            ),
            CounterMetricFamily(
                f"{NAMESPACE}_watcher_events", "File-system events seen by the jobs watcher."
            ),
            CounterMetricFamily(f"{NAMESPACE}_rescans", "Full rescans of the jobs folder."),
            InfoMetricFamily(NAMESPACE, "Daemon version, instance and site."),
        )


def _read(what: str, snapshot: Callable[[], T]) -> T | None:
    try:
        return snapshot()
    except Exception:
        log.exception("metrics snapshot failed", snapshot=what)
        return None


class DaemonMetrics:
    """The daemon's registry, its snapshot collector and the metrics updated as events happen."""

    def __init__(self, source: MetricsSource) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(source))
        self.runs_started = Counter(
            f"{NAMESPACE}_runs_started",
            "Triggered runs started.",
            [JOB_LABEL],
            registry=self.registry,
        )
        self.runs_finished = Counter(
            f"{NAMESPACE}_runs_finished",
            "Triggered runs finished, by final status.",
            [JOB_LABEL, "status"],
            registry=self.registry,
        )
        self.run_duration_seconds = Histogram(
            f"{NAMESPACE}_run_duration_seconds",
            "Duration of finished triggered runs.",
            [JOB_LABEL],
            buckets=RUN_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.log_bytes_written = Counter(
            f"{NAMESPACE}_log_bytes_written",
            "Bytes appended to job logs.",
            [JOB_LABEL],
            registry=self.registry,
        )
        self.reconcile_latency_seconds = Histogram(
            f"{NAMESPACE}_reconcile_latency_seconds",
            "Duration of one reconcile pass.",
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self._statuses: dict[str, set[str]] = {}

    def run_started(self, job: str) -> None:
        self.runs_started.labels(job).inc()

    def run_finished(self, job: str, status: str, duration_s: float) -> None:
        self.runs_finished.labels(job, status).inc()
        self._statuses.setdefault(job, set()).add(status)
        # A clock step must not produce a negative observation.
        self.run_duration_seconds.labels(job).observe(max(0.0, duration_s))

    def add_log_bytes(self, job: str, n: int) -> None:
        if n > 0:
            self.log_bytes_written.labels(job).inc(n)

    def observe_reconcile(self, seconds: float) -> None:
        self.reconcile_latency_seconds.observe(max(0.0, seconds))

    def forget_job(self, job: str) -> None:
        """Drop a deleted job's instrumented series so removed jobs do not accumulate."""
        for metric in (self.runs_started, self.run_duration_seconds, self.log_bytes_written):
            _remove(metric, job)
        for status in self._statuses.pop(job, set()):
            _remove(self.runs_finished, job, status)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _remove(metric: Counter | Histogram, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass  # never observed for this job


def build_metrics(source: MetricsSource) -> DaemonMetrics:
    return DaemonMetrics(source)


def add_metrics_route(app: web.Application, metrics: DaemonMetrics) -> None:
    """Register `GET /metrics` (Prometheus text format) on `app`."""

    async def serve_metrics(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", serve_metrics)
