"""Scenario 6: a job writes N MiB of numbered lines to stdout; how fast do they reach the log?

The baseline is the same writer with its stdout redirected to a file (`writer > file`). The
clock starts at the writer's own first-instruction stamp and stops at the modification time of
the file that received the last line. Afterwards every log file (rotated ones too) is counted.

The end is the file's modification time, not the moment the harness sees the line, so how often
the harness looks changes nothing in the figure; it only decides how much CPU the harness takes
from the system it measures while the writer floods. Each look lists and stats the candidate
log files (up to 100 rotated names) and reads a tail: every 5 ms that took enough of the second
core to cost webjobsd and supervisord a quarter of their throughput, while the baseline runs
with no one looking. The harness looks every `LOOK_EVERY_S` instead.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import jobs
from bench.common import Stamps, wait_until
from bench.harness import Harness
from bench.report import Result, Target, ratio_at_least
from bench.systems import System
from bench.writer import BLOCK_BYTES, LINES_PER_BLOCK, PAD, last_line

BASELINE = "writer > file"
LINE_TAIL = PAD + b"\n"  # every writer line ends so; no line of a manager's own does
ROTATE_BYTES = 100 * 1024 * 1024
GENERATIONS = 3
# See the module docstring: the figure does not depend on it.
LOOK_EVERY_S = 0.05


def _mib(count: int) -> float:
    return count / (1024 * 1024)


def count_lines(newest_first: list[Path]) -> int:
    """Writer lines in a log and its rotated generations, read oldest first as one stream (a
    manager that rotates by size may cut a line in two across files)."""
    total = 0
    carry = b""
    for path in reversed(newest_first):
        try:
            data = carry + path.read_bytes()
        except FileNotFoundError:
            continue
        total += data.count(LINE_TAIL)
        carry = data[-len(LINE_TAIL) :]  # a line cut here completes in the next file
        carry = b"" if carry == LINE_TAIL else carry
    return total


def _tail(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - size))
            return handle.read()
    except FileNotFoundError:
        return b""


def _newest_nonempty(newest_first: list[Path]) -> Path | None:
    for path in newest_first:
        try:
            if path.stat().st_size:
                return path
        except FileNotFoundError:
            continue
    return None


def wait_last_line(files: Callable[[], list[Path]], blocks: int, timeout: float) -> float:
    """Until the log ends with the writer's last line; returns that file's modification time.

    The newest non-empty file counts, not the current one alone: a manager that rotates once a
    write has taken the file past its limit (supervisord) leaves an empty current log when the
    last write is the one that does so.
    """
    last = last_line(blocks)

    def ended() -> Path | None:
        newest = _newest_nonempty(files())
        return newest if newest is not None and _tail(newest, len(last)) == last else None

    path = wait_until(ended, timeout, "the last line", interval=LOOK_EVERY_S)
    return os.stat(path).st_mtime_ns / 1e9


def baseline_sample(blocks: int) -> tuple[float, int]:
    folder = Path(tempfile.mkdtemp(prefix="wjbench-baseline-"))
    try:
        stamps = folder / "stamps"
        output = folder / "out.txt"
        with open(output, "wb") as handle:
            command = jobs.writer_command("writer", stamps, blocks, linger=False)
            subprocess.run(command, stdout=handle, check=True)
        started = Stamps(stamps).first_by_name()["writer"].at
        seconds = os.stat(output).st_mtime_ns / 1e9 - started
        return seconds, count_lines([output])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def system_sample(h: Harness, name: str, blocks: int) -> tuple[float, int]:
    options = h.options(log_rotate_bytes=ROTATE_BYTES, log_generations=GENERATIONS)
    system: System = h.open(
        name, lambda s: [jobs.log_writer("writer", s.stamps_path, blocks)], options=options
    )
    try:
        started = system.stamps.first_by_name()["writer"].at
        finished = wait_last_line(lambda: system.log_files("writer"), blocks, 300)
        time.sleep(0.2)  # nothing should follow; give a late writer the chance to show up
        return finished - started, count_lines(system.log_files("writer"))
    finally:
        h.close(system)


def logs(h: Harness) -> list[Result]:
    blocks = math.ceil(h.sizes.log_mib * 1024 * 1024 / BLOCK_BYTES)
    size_mib = _mib(blocks * BLOCK_BYTES)
    expected = blocks * LINES_PER_BLOCK
    lost: dict[str, list[float]] = {}

    def sample(name: str, _index: int) -> list[float]:
        if name == BASELINE:
            seconds, lines = baseline_sample(blocks)
        else:
            seconds, lines = system_sample(h, name, blocks)
        lost.setdefault(name, []).append(float(expected - lines))
        return [size_mib / seconds]

    order = [BASELINE, *h.systems]
    rounds = min(h.rounds, h.sizes.heavy_rounds)
    speed = h.alternate(sample, rounds=rounds, systems=order)
    notes = [
        f"{size_mib:.0f} MiB = {expected:,} lines of 100 bytes, written once by one Python "
        "process (blocks of 1000 lines), which then lingers without output",
        f"each system keeps {GENERATIONS} rotated generations of {_mib(ROTATE_BYTES):.0f} MiB "
        "(webjobsd log_max_bytes/log_generations, supervisord stdout_logfile_maxbytes/backups; "
        "pm2 has no rotation without its logrotate module); webjobsd adds Kudu's "
        "`[date > bench0: INFO] ` prefix to every line, the peers write lines as they are",
        "end = modification time of the log that got the last line; the harness looks for it "
        f"every {LOOK_EVERY_S * 1000:.0f} ms (looking more often only takes CPU from the system "
        "measured, which the unobserved baseline never pays)",
    ]
    nothing_lost = Target("= 0", lambda value, _ref: value == 0)
    return [
        Result(
            "6 stdout -> log",
            "MiB/s",
            speed,
            reference=BASELINE,
            target=ratio_at_least(0.8, "baseline"),
            notes=notes,
            digits=0,
        ),
        Result(
            "6 lines lost",
            "lines",
            lost,
            reference=BASELINE,
            target=nothing_lost,
            digits=0,
            judged_on=max,
        ),
    ]
