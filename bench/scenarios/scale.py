"""Scenario 11 (`scale`): 5000 running jobs: start, the manager's RSS and idle CPU, and the list.

It shows how the cost grows with the number of jobs: RSS per job against scenario 7's (a
constant cost per job, nothing quadratic), idle CPU at 5000 against scenario 8's at 100 (a
manager that polls something per job burns CPU in proportion; one that waits on events does
not). Heavy (5000 processes per sample): one round, left out of `--quick`.

What it needs of the machine: about 5000 processes more than usual (each job is a bash script
that becomes `sleep`: one process per job; `ulimit -u` and the pids cgroup must allow them), and
open files for the managers: webjobsd keeps 3 descriptors per job (stdout and stderr pipes, a
pidfd) and at most an eighth of its limit in open job logs (`records/openlogs.py`: 17,514 open
at 5000 jobs under a limit of 20,000), supervisord about 4 (it is configured with
`minfds=16384`), PM2 a few per app. `ulimit -n` is checked before the scenario starts; a
system that cannot start 5000 jobs within START_TIMEOUT_S is reported in the notes, not
skipped silently.
"""

from __future__ import annotations

import contextlib
import re
import resource
import time
from collections.abc import Iterator
from pathlib import Path

from bench import httpload, jobs
from bench.common import SETTLED_CPU_PERCENT, cpu_seconds, rss_bytes, settle_quiet
from bench.harness import Harness, JobsFor
from bench.report import Result
from bench.systems import System, Webjobsd

MB = 1_000_000
START_TIMEOUT_S = 900.0
FILES_PER_JOB = 4  # supervisord keeps about 4 open per job; webjobsd 3 and a share for logs
LIST_PATH = "/api/webjobs"
# After the last job's first instruction, before CPU and RSS are read: a manager may still be
# finishing its start-up (status files, the first heap release) for a while at this size. It is
# settled once a 1 s window shows less than SETTLED_CPU_PERCENT of a core, at least SETTLE_S
# and at most SETTLE_MAX_S after; a manager that polls per job never settles, and its idle CPU
# then shows it.
SETTLE_S = 5.0
SETTLE_MAX_S = 180.0


def _sleepers(count: int) -> JobsFor:
    def make(system: System) -> list[jobs.Job]:
        return [jobs.sleeper(f"s{i:04d}", system.stamps_path) for i in range(count)]

    return make


def limits_note(count: int) -> str:
    files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    processes, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    shown = "unlimited" if processes == resource.RLIM_INFINITY else str(processes)
    enough = files >= FILES_PER_JOB * count + 1000
    return (
        f"limits of this run: open files {files} ({'enough' if enough else 'TOO FEW'} for "
        f"{FILES_PER_JOB} per job), processes {shown}"
    )


SYSCTL_FILE = Path(__file__).resolve().parents[2] / "systemd" / "webjobsd.sysctl"
QUEUE_KNOB = Path("/proc/sys/fs/inotify/max_queued_events")


@contextlib.contextmanager
def inotify_queue_of_the_unit() -> Iterator[str]:
    """The inotify queue size `systemd/webjobsd.sysctl` installs, for this scenario only (as
    root), put back afterwards; yields the note saying what the run had."""
    wanted_match = re.search(
        r"^fs\.inotify\.max_queued_events\s*=\s*(\d+)", SYSCTL_FILE.read_text(), re.M
    )
    before = int(QUEUE_KNOB.read_text())
    wanted = int(wanted_match.group(1)) if wanted_match else before
    changed = False
    if before < wanted:
        try:
            QUEUE_KNOB.write_text(str(wanted))
            changed = True
        except OSError:
            pass
    now = int(QUEUE_KNOB.read_text())
    try:
        yield (
            f"inotify queue (fs.inotify.max_queued_events) {now}"
            + (f", raised from {before} as systemd/webjobsd.sysctl does" if changed else "")
            + ("" if now >= wanted else f": SHORT of the {wanted} systemd/webjobsd.sysctl sets")
        )
    finally:
        if changed:
            QUEUE_KNOB.write_text(str(before))


def settle(pid: int) -> float:
    """Seconds until the manager settled (see SETTLED_CPU_PERCENT), from now."""
    return settle_quiet(pid, SETTLE_S, SETTLE_MAX_S)


def scale(h: Harness) -> list[Result]:
    count = h.sizes.scale_jobs
    window = h.sizes.idle_window_s
    # Every system gets its row, empty (n/a) where it could not start the jobs.
    start: dict[str, list[float]] = {name: [] for name in h.systems}
    rss: dict[str, list[float]] = {name: [] for name in h.systems}
    per_job: dict[str, list[float]] = {name: [] for name in h.systems}
    cpu: dict[str, list[float]] = {name: [] for name in h.systems}
    settled: dict[str, list[float]] = {name: [] for name in h.systems}
    listing: dict[str, list[float]] = {"webjobsd": []}
    failed: list[str] = []

    def empty_rss(name: str) -> float:
        system = h.open(name)
        try:
            time.sleep(h.sizes.settle_s)
            return rss_bytes(system.manager_pid) / MB
        finally:
            h.close(system)

    def sample(name: str, _index: int) -> list[float]:
        try:
            system = h.open(name, _sleepers(count), start_timeout=START_TIMEOUT_S)
        except Exception as error:  # a peer that cannot: said in the notes
            failed.append(f"{name} could not start {count} jobs: {type(error).__name__}: {error}")
            h.progress(failed[-1])
            h.close_all()
            return []
        try:
            start[name].append(system.start_seconds())
            pid = system.manager_pid
            settled[name].append(settle(pid))
            cpu_before, clock = cpu_seconds(pid), time.monotonic()
            time.sleep(window)
            used = cpu_seconds(pid) - cpu_before
            cpu[name].append(100.0 * used / (time.monotonic() - clock))
            megabytes = rss_bytes(pid) / MB
            rss[name].append(megabytes)
            if isinstance(system, Webjobsd):
                listing["webjobsd"] += httpload.latencies(system.url + LIST_PATH, 20)
        finally:
            h.close(system)
        # Per job: above the same manager with no jobs, measured right after.
        per_job[name].append((megabytes - empty_rss(name)) * 1000.0 / count)
        return [megabytes]

    with inotify_queue_of_the_unit() as queue_note:
        h.alternate(sample, rounds=1)
    notes = [
        f"{count} continuous jobs (`exec sleep infinity`) configured before the manager starts;"
        " start = manager started -> every job's first instruction",
        f"settled: from every job's first instruction until a 1 s window of the manager's CPU"
        f" shows under {SETTLED_CPU_PERCENT:g} % of a core (at least {SETTLE_S:g} s, at most"
        f" {SETTLE_MAX_S:g} s: the tail of its start-up, e.g. status files)",
        f"idle CPU: utime+stime of the manager over {window:g} s, once settled; RSS per job:"
        " (RSS at this size - RSS of the same manager with no jobs)"
        " / jobs",
        limits_note(count),
        queue_note,
        *failed,
    ]
    list_note = (
        f"GET {LIST_PATH} (both kinds) with {count} running jobs: one keep-alive connection, 20"
        " sequential requests after 5 warm-up; webjobsd only (the peers have no such API)"
    )
    title = f"11 {count} jobs"
    return [
        Result(f"{title}: start", "s", start, notes=notes, digits=2),
        Result(f"{title}: settled", "s", settled, digits=1),
        Result(f"{title}: RSS", "MB", rss),
        Result(f"{title}: RSS per job", "kB", per_job),
        Result(f"{title}: idle CPU", "%", cpu, digits=2),
        Result(f"{title}: GET list", "ms", listing, notes=[list_note], digits=1),
    ]
