"""`JobProcess` on real processes: the output pipes it reads, and how their end is found.

1. Both output pipes are enlarged to `PIPE_BYTES`, as the job itself sees them.
2. Output arrives as blocks of whole lines, in order, the unterminated rest last.
3. A descendant that cannot be traced (its own session, without the token) and keeps stdout open
   delays the end by the drain deadline only; what was printed before is all there.
4. The allocator thresholds are set on glibc.
"""

from __future__ import annotations

import os
import platform
import signal
import sys
import time
from pathlib import Path

import psutil

from webjobsd.malloc import tune_malloc
from webjobsd.runtime.jobprocess import PIPE_BYTES, JobProcess
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


async def test_both_pipes_are_enlarged(tmp_path: Path) -> None:
    script = (
        "import fcntl, sys\n"
        f"print(fcntl.fcntl(1, {F_GETPIPE_SZ}))\n"
        f"print(fcntl.fcntl(2, {F_GETPIPE_SZ}), file=sys.stderr)\n"
    )
    process, out, err = await spawn(tmp_path, [sys.executable, "-c", script])
    assert await process.wait() == 0
    assert out == [b"%d\n" % PIPE_BYTES]
    assert err == [b"%d\n" % PIPE_BYTES]


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
        f"setsid env -u {TOKEN_VARIABLE} sh -c 'touch dropped; exec sleep 60' &\n"
        "echo $!\n"
        "while [ ! -e dropped ]; do sleep 0.01; done\n"
        "echo before exit\n"
    )
    process, out, _err = await spawn(tmp_path, ["bash", "-c", script])
    holder = int(b"".join(out).split()[0]) if out else None
    try:
        started = time.monotonic()
        assert await process.wait() == 0
        elapsed = time.monotonic() - started
        holder = int(b"".join(out).split()[0])
        # Still running, still holding the pipe: the end came from the drain deadline.
        assert psutil.Process(holder).status() != psutil.STATUS_ZOMBIE
        assert b"".join(out).endswith(b"before exit\n")
        assert 0.5 < elapsed < 5, elapsed
    finally:
        if holder is not None:
            os.kill(holder, signal.SIGKILL)


def test_malloc_is_tuned_on_glibc() -> None:
    """The daemon's `serve` sets the allocator thresholds (see `webjobsd.malloc`)."""
    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")
