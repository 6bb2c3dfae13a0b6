"""Scenarios 7 and 8: the manager's own RSS with 0, N and M jobs; its CPU while N jobs idle."""

from __future__ import annotations

import time

from bench import jobs
from bench.common import SETTLED_CPU_PERCENT, cpu_seconds, rss_bytes, settle_quiet
from bench.harness import Harness, JobsFor
from bench.report import Result, Target, at_most
from bench.systems import FLOOR, FLOOR_NOTE, System

MB = 1_000_000
RSS_TARGETS = {100: 45.0, 1000: 80.0}
START_TARGETS_S = {1000: 2.5}
# RSS is read once the manager is done starting its jobs (status files and the like): at
# least `settle_s` after the last job's first instruction, then until a 1 s window of its CPU
# shows under SETTLED_CPU_PERCENT of a core (as scenario 11 does), at most SETTLE_MAX_S.
SETTLE_MAX_S = 60.0


def _sleepers(count: int) -> JobsFor:
    def make(system: System) -> list[jobs.Job]:
        return [jobs.sleeper(f"s{i}", system.stamps_path) for i in range(count)]

    return make


def _rss_target(count: int) -> Target | None:
    limit = RSS_TARGETS.get(count)
    return at_most(limit, "MB") if limit is not None else None


def memory(h: Harness) -> list[Result]:
    results = []
    for count in (0, h.sizes.bulk_jobs, h.sizes.big_jobs):
        big = count == h.sizes.big_jobs
        rounds = min(h.rounds, h.sizes.big_rounds if big else h.sizes.heavy_rounds)
        results += _memory_at(h, count, rounds)
    return results


def _memory_at(h: Harness, count: int, rounds: int) -> list[Result]:
    startup: dict[str, list[float]] = {}

    def sample(name: str, _index: int) -> list[float]:
        system = h.open(name, _sleepers(count), start_timeout=600)
        try:
            if count:
                startup.setdefault(name, []).append(system.start_seconds())
            pid = system.manager_pid
            settle_quiet(pid, h.sizes.settle_s, SETTLE_MAX_S)
            return [rss_bytes(pid) / MB]
        finally:
            h.close(system)

    rss = h.alternate(sample, rounds=rounds, systems=[*h.systems, FLOOR])
    notes = []
    if count == 0:
        notes.append(
            "VmRSS of the manager process alone, read after all jobs ran (`exec sleep infinity`)"
            f" and the manager settled (at least {h.sizes.settle_s:g} s, then until a 1 s window"
            f" under {SETTLED_CPU_PERCENT:g} % of a core); pm2: its daemon (God) process, whose"
            " children the apps are"
        )
        notes.append(FLOOR_NOTE)
    results = [
        Result(f"7 RSS, {count} jobs", "MB", rss, target=_rss_target(count), notes=notes),
    ]
    if count == h.sizes.big_jobs:
        note = (
            "manager started with the jobs configured -> every job's first instruction (the "
            "jobs' own stamps; the harness writing the jobs' files comes before the start)"
        )
        limit = START_TARGETS_S.get(count)
        target = at_most(limit, "s") if limit is not None else None
        results.append(
            Result(f"7 start {count} jobs", "s", startup, target=target, notes=[note], digits=2)
        )
    return results


def idle_cpu(h: Harness) -> list[Result]:
    count = h.sizes.bulk_jobs
    window = h.sizes.idle_window_s

    def sample(name: str, _index: int) -> list[float]:
        system = h.open(name, _sleepers(count))
        try:
            time.sleep(h.sizes.settle_s)
            pid = system.manager_pid
            cpu_before, began = cpu_seconds(pid), time.monotonic()
            time.sleep(window)
            used = cpu_seconds(pid) - cpu_before
            return [100.0 * used / (time.monotonic() - began)]
        finally:
            h.close(system)

    values = h.alternate(sample, rounds=min(h.rounds, h.sizes.heavy_rounds))
    notes = [
        f"utime+stime of the manager process (not its children) over {window:g} s, "
        f"{h.sizes.settle_s:g} s after all {count} jobs ran; resolution 1 clock tick (10 ms)"
    ]
    title = f"8 idle CPU, {count} jobs"
    return [Result(title, "%", values, target=at_most(0.5, "%"), notes=notes, digits=2)]
