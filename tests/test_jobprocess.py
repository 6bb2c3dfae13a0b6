"""`JobProcess` on real processes: the output pipes it reads, and how their end is found.

1. An output pipe that carried a lot is enlarged to `PIPE_BYTES`, as the job itself sees it;
   a quiet one is not; the budget of enlarged pipes holds.
2. Output arrives as blocks of whole lines, in order, the unterminated rest last.
3. A descendant that cannot be traced (its own session, without the token) and keeps stdout open
   delays the end by the drain deadline only; what was printed before is all there.
4. A descendant that a first scan cannot see (as between fork and exec) is ended by the next.
5. Fifty jobs stopped together (shutdown file, SIGTERM, wait, final kill) cost a handful of host
   scans in all, not a few per job; each job got its shutdown file and ended gracefully.
6. The allocator thresholds are set on glibc.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import platform
import signal
import sys
import time
from pathlib import Path

import psutil

from tests.helpers import wait_for
from webjobsd.malloc import tune_malloc
from webjobsd.runtime import pipesize, proctree
from webjobsd.runtime.jobprocess import JobProcess
from webjobsd.runtime.pipesize import ENLARGE_AFTER_BYTES, PIPE_BYTES, PipeBudget
from webjobsd.runtime.proctree import TOKEN_VARIABLE

F_GETPIPE_SZ = 1032


async def spawn(tmp_path: Path, argv: list[str]) -> tuple[JobProcess, list[bytes], list[bytes]]:
    out: list[bytes] = []
    err: list[bytes] = []
    process = await JobProcess.spawn(
        argv,
        cwd=tmp_path,
        env=dict(os.environ),
        token=f"test-{tmp_path.name}",
        on_stdout=out.append,
        on_stderr=err.append,
        max_line_bytes=1024 * 1024,
    )
    return process, out, err


async def test_a_busy_pipe_is_enlarged_and_a_quiet_one_is_not(tmp_path: Path) -> None:
    # Once 2 MiB went into the 64 KiB pipe, the daemon has read more than ENLARGE_AFTER_BYTES.
    script = (
        "import fcntl, sys\n"
        f"print(fcntl.fcntl(1, {F_GETPIPE_SZ}), file=sys.stderr)\n"
        f"sys.stdout.buffer.write(b'x' * {2 * ENLARGE_AFTER_BYTES} + b'\\n')\n"
        "sys.stdout.flush()\n"
        f"print(fcntl.fcntl(1, {F_GETPIPE_SZ}), file=sys.stderr)\n"
        f"print(fcntl.fcntl(2, {F_GETPIPE_SZ}), file=sys.stderr)\n"
    )
    process, _out, err = await spawn(tmp_path, [sys.executable, "-c", script])
    assert await process.wait() == 0
    assert b"".join(err).split() == [b"65536", b"%d" % PIPE_BYTES, b"65536"]
    assert pipesize.budget().in_use == 0  # given back when the pipes closed


def test_the_budget_caps_enlarged_pipes() -> None:
    budget = PipeBudget(allowed=1)
    pipes = [os.pipe(), os.pipe()]
    try:
        assert budget.enlarge(pipes[0][0]) is True
        assert budget.enlarge(pipes[1][0]) is False
        assert fcntl.fcntl(pipes[1][0], F_GETPIPE_SZ) == 65536
        budget.give_back()
        assert budget.enlarge(pipes[1][0]) is True
        assert fcntl.fcntl(pipes[1][0], F_GETPIPE_SZ) == PIPE_BYTES
        assert PipeBudget(allowed=None).enlarge(pipes[0][1]) is True
    finally:
        for read_end, write_end in pipes:
            os.close(read_end)
            os.close(write_end)


async def test_output_comes_as_blocks_of_whole_lines(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "for n in range(50000):\n"
        "    sys.stdout.write(f'line {n}\\n')\n"
        "sys.stdout.write('no newline at the end')\n"
    )
    process, out, _err = await spawn(tmp_path, [sys.executable, "-c", script])
    assert await process.wait() == 0
    assert all(block.endswith(b"\n") for block in out)
    lines = b"".join(out).split(b"\n")[:-1]
    assert lines == [b"line %d" % n for n in range(50000)] + [b"no newline at the end"]


async def test_an_untraceable_holder_of_stdout_delays_the_end_by_the_drain_only(
    tmp_path: Path,
) -> None:
    # The leader waits until the holder has dropped the token, so no scan can still find it.
    script = (
        f"setsid env -u {TOKEN_VARIABLE} sh -c 'echo $$ > holder; exec sleep 60' &\n"
        "while [ ! -s holder ]; do sleep 0.01; done\n"
        "echo before exit\n"
    )
    process, out, _err = await spawn(tmp_path, ["bash", "-c", script])
    holder_file = tmp_path / "holder"
    holder: int | None = None
    try:
        await wait_for(
            lambda: holder_file.exists() and holder_file.read_text().strip().isdigit(),
            what="holder pid",
        )
        holder = int(holder_file.read_text())
        started = time.monotonic()
        assert await process.wait() == 0
        elapsed = time.monotonic() - started
        # Still running, still holding the pipe: the end came from the drain deadline.
        assert psutil.Process(holder).status() != psutil.STATUS_ZOMBIE
        assert b"".join(out).endswith(b"before exit\n")
        assert 0.5 < elapsed < 5, elapsed
    finally:
        if holder is not None:
            os.kill(holder, signal.SIGKILL)


async def test_a_descendant_missed_by_the_first_scan_is_ended_by_the_next(
    tmp_path: Path,
) -> None:
    # The child runs without the token for 50 ms, in the group of a leader that is gone by then
    # (so the group is not trusted), then gets the token back: only a later scan can see it.
    script = (
        f"token=${TOKEN_VARIABLE}\n"
        f"env -u {TOKEN_VARIABLE} sh -c "
        f'"echo \\$\\$ > hidden; sleep 0.05; exec env {TOKEN_VARIABLE}=$token sleep 60" &\n'
        "while [ ! -s hidden ]; do sleep 0.005; done\n"
    )
    process, _out, _err = await spawn(tmp_path, ["bash", "-c", script])
    hidden_file = tmp_path / "hidden"
    hidden: int | None = None
    try:
        assert await process.wait() == 0
        hidden = int(hidden_file.read_text())  # written before the leader exited
        await wait_for(
            lambda: (
                not psutil.pid_exists(hidden)
                or psutil.Process(hidden).status() == psutil.STATUS_ZOMBIE
            ),
            timeout=5,
            what="the hidden descendant ended",
        )
    finally:
        if hidden is None and hidden_file.exists():
            hidden = int(hidden_file.read_text() or 0) or None
        if hidden is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hidden, signal.SIGKILL)


async def test_a_wave_of_stops_costs_a_few_host_scans_not_some_per_job(tmp_path: Path) -> None:
    jobs = 50
    # Each job traps SIGTERM, ends its child and exits 0 (the bench's shutdown job); it says
    # "ready" once the trap is set, so the stop finds it running.
    script = "trap 'kill $child; exit 0' TERM; sleep 60 & child=$!; echo ready > \"$1\"; wait"
    processes: list[JobProcess] = []
    try:
        for number in range(jobs):
            argv = ["bash", "-c", script, "job", str(tmp_path / f"ready-{number}")]
            processes.append((await spawn(tmp_path, argv))[0])
        await wait_for(
            lambda: all((tmp_path / f"ready-{n}").exists() for n in range(jobs)),
            timeout=30,
            what="every job ready",
        )
        before = proctree.host_scans_taken()
        graceful = await asyncio.gather(
            *(
                process.stop(10, tmp_path / f"shutdown-{n}" / "shutdown")
                for n, process in enumerate(processes)
            )
        )
        scans = proctree.host_scans_taken() - before
    finally:
        for process in processes:
            await process.close()
    assert all(graceful)
    assert all((tmp_path / f"shutdown-{n}" / "shutdown").exists() for n in range(jobs))
    left = await asyncio.gather(*(proctree.afind_members(p.identity) for p in processes))
    assert not any(left), left
    # Per job the ladder takes at least three looks at /proc (SIGTERM, "gone?", the final
    # kill): one scan per look shared by the whole wave is a handful; one per job, 150 or more.
    assert scans <= 12, scans


def test_malloc_is_tuned_on_glibc() -> None:
    """The daemon's `serve` sets the allocator thresholds (see `webjobsd.malloc`)."""
    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")
