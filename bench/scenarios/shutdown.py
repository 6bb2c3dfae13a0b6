"""Scenario 4: N running jobs, the manager asked to stop -> every job process and it gone."""

from __future__ import annotations

import time

from bench import jobs
from bench.common import BenchError, is_running, marker_pids
from bench.harness import Harness
from bench.report import Result, at_most
from bench.systems import System


def wait_all_gone(system: System, tracked: set[int], timeout: float) -> float:
    """Poll the job processes known beforehand and the manager; confirm with a full scan.

    Returns the time at which nothing carrying the instance's marker ran any more (zombies
    count as gone: they have ended and only wait to be reaped) and the manager had exited.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tracked = {pid for pid in tracked if is_running(pid)}
        if not tracked and system.manager_gone():
            now = time.time()
            late = marker_pids(system.marker)
            if not late:
                return now
            tracked |= late
        time.sleep(0.002)
    raise BenchError(f"{system.name}: jobs or manager still running after {timeout:g} s")


def shutdown(h: Harness) -> list[Result]:
    count = h.sizes.bulk_jobs

    def sample(name: str, _index: int) -> list[float]:
        system = h.open(
            name, lambda s: [jobs.graceful(f"g{i}", s.stamps_path) for i in range(count)]
        )
        try:
            time.sleep(h.sizes.settle_s)
            tracked = marker_pids(system.marker)
            if len(tracked) < count:
                raise BenchError(f"{name}: only {len(tracked)} of {count} job processes found")
            before = system.terminate()
            return [(wait_all_gone(system, tracked, 120) - before) * 1000.0]
        finally:
            h.close(system)

    values = h.alternate(sample, rounds=min(h.rounds, h.sizes.heavy_rounds))
    notes = [
        "jobs trap SIGTERM/SIGINT, end their `sleep` child and exit 0; timed until no process "
        "with the run's marker in its environment is left and the manager has exited",
        "webjobsd and supervisord: SIGTERM to the daemon (supervisord stopasgroup=true); "
        "pm2: `pm2 kill` through its API",
    ]
    title = f"4 SIGTERM {count} jobs -> gone"
    return [Result(title, "ms", values, target=at_most(1000, "ms"), notes=notes)]
