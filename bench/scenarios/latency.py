"""Scenarios 1, 2, 3 and 5: from an action to the managed program's first instruction."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence

from bench import jobs
from bench.harness import Harness, JobsFor
from bench.report import Result, at_most
from bench.systems import FLOOR, FLOOR_NOTE, Pm2, System, Webjobsd

PEER_ADD = (
    "peers have no folder watching; their equivalent is timed: supervisord = program file "
    "written + what `supervisorctl update` does (reloadConfig + addProcessGroup over XML-RPC), "
    "pm2 = `pm2 start` through its API"
)
# A folder renamed in whole needs no quiet period; the target leaves room for the scan and spawn.
RENAMED_IN_MS = 50
# A burst of folders renamed in whole: the scan, the /proc look for writers, 100 spawns.
BURST_RENAMED_IN_MS = 500


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def _open_all(
    h: Harness, jobs_for: JobsFor | None = None, names: Sequence[str] | None = None
) -> dict[str, System]:
    return {name: h.open(name, jobs_for) for name in names or h.systems}


def drop(h: Harness) -> list[Result]:
    """1. A job folder renamed into App_Data/jobs/continuous -> its first instruction; then
    1b. one copied in place (`cp -r`), which must wait for its quiet period."""
    opened = _open_all(h)
    dropped = [0]

    def sampler(copied: bool) -> Callable[[str, int], list[float]]:
        def sample(name: str, _index: int) -> list[float]:
            system = opened[name]
            dropped[0] += 1
            job = jobs.sleeper(f"drop{dropped[0]}", system.stamps_path)
            before = system.add_copied([job]) if copied else system.add([job])
            return [_ms(system.stamps.wait_new(job.name, 0, 60).at - before)]

        return sample

    try:
        renamed = h.alternate(sampler(copied=False))
        copied = h.alternate(sampler(copied=True))
    finally:
        h.close_all()
    debounce_ms = h.debounce_s * 1000
    renamed_notes = [
        "webjobsd: a staged folder (files written a minute before) renamed into the continuous "
        "folder in whole, nothing open for writing: no quiet period",
        PEER_ADD,
    ]
    copied_notes = [
        f"webjobsd: `cp -r` of the staged folder into the continuous folder (new files written "
        f"in place): taken once quiet for the debounce, {debounce_ms:.0f} ms; "
        "target = debounce + 100 ms",
        "peers: the same equivalent as the renamed row (no folder watching, nothing to wait for)",
    ]
    return [
        Result(
            "1 drop renamed in -> instr",
            "ms",
            renamed,
            target=at_most(RENAMED_IN_MS, "ms"),
            notes=renamed_notes,
        ),
        Result(
            "1b drop copied in -> instr",
            "ms",
            copied,
            target=at_most(debounce_ms + 100, "ms"),
            notes=copied_notes,
        ),
    ]


def restart(h: Harness) -> list[Result]:
    """2. A continuous process SIGKILLed -> its replacement's first instruction (delay 0); the
    floor (bench/floor_supervisor.py) measured alongside."""
    systems = [*h.systems, FLOOR]
    opened = _open_all(h, lambda system: [jobs.sleeper("victim", system.stamps_path)], systems)

    def sample(name: str, _index: int) -> list[float]:
        system = opened[name]
        found = []
        for _ in range(h.sizes.samples_per_round):
            time.sleep(0.2)  # let the manager settle after the previous restart
            seen = system.stamps.count("victim")
            victim = system.stamps.latest("victim")
            assert victim is not None
            before = time.time()
            os.kill(victim.pid, signal.SIGKILL)
            found.append(_ms(system.stamps.wait_new("victim", seen, 30).at - before))
        return found

    try:
        values = h.alternate(sample, systems=systems)
    finally:
        h.close_all()
    notes = [
        "restart delay 0: webjobsd WEBJOBS_RESTART_TIME=0; supervisord autorestart=true, "
        "startsecs=0; pm2 autorestart, restart_delay 0, max_restarts 1e6",
        FLOOR_NOTE,
    ]
    return [Result("2 kill -> restarted", "ms", values, target=at_most(5, "ms"), notes=notes)]


def burst(h: Harness) -> list[Result]:
    """3. N job folders renamed in at once -> the last one's first instruction."""
    count = h.sizes.bulk_jobs

    def sample(name: str, _index: int) -> list[float]:
        system = h.open(name)
        try:
            batch = [jobs.sleeper(f"burst{i}", system.stamps_path) for i in range(count)]
            before = system.add(batch)
            first = system.stamps.wait_all_started([job.name for job in batch], 120)
            return [_ms(max(stamp.at for stamp in first.values()) - before)]
        finally:
            h.close(system)

    values = h.alternate(sample, rounds=min(h.rounds, h.sizes.heavy_rounds))
    notes = [
        f"webjobsd: {count} staged folders renamed in whole one after the other (no quiet "
        f"period); supervisord: one program file with {count} programs + update; pm2: one "
        f"start call with {count} apps"
    ]
    title = f"3 {count} renamed in -> all run"
    target = at_most(BURST_RENAMED_IN_MS, "ms")
    return [Result(title, "ms", values, target=target, notes=notes)]


def run(h: Harness) -> list[Result]:
    """5. A run requested over the API -> the script's first instruction."""
    opened = _open_all(h, lambda system: [jobs.one_shot("trig", system.stamps_path)])
    for system in opened.values():
        _ready_to_trigger(system)

    def sample(name: str, _index: int) -> list[float]:
        system = opened[name]
        found = []
        for _ in range(h.sizes.samples_per_round):
            seen = system.stamps.count("trig")
            before = system.trigger("trig")
            found.append(_ms(system.stamps.wait_new("trig", seen, 30).at - before))
            system.wait_trigger_done("trig", 30)
        return found

    try:
        values = h.alternate(sample)
    finally:
        h.close_all()
    notes = [
        "webjobsd: POST /api/triggeredwebjobs/trig/run (HTTP, no auth); supervisord: "
        "startProcess of an autostart=false program over XML-RPC (= `supervisorctl start`); "
        "pm2: restart of a stopped app through its API (= `pm2 restart`)"
    ]
    return [Result("5 run request -> instr", "ms", values, target=at_most(20, "ms"), notes=notes)]


def _ready_to_trigger(system: System) -> None:
    """The on-demand job is known and not running (PM2 runs a new app once at `start`)."""
    if isinstance(system, Webjobsd):
        system.wait_known(["trig"], 30)
    elif isinstance(system, Pm2):
        system.stamps.wait_new("trig", 0, 30)
        system.wait_trigger_done("trig", 30)
