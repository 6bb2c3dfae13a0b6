"""Larger pipes for jobs that write a lot, within what the kernel lets this user have.

A job's stdout and stderr are pipes of 64 KiB. A job that writes fast fills one, blocks, and the
daemon's next read takes at most 64 KiB: capture then runs at the pace of many small reads. A
pipe of `PIPE_BYTES` (F_SETPIPE_SZ) lets the writer run ahead and each read take more.

Why not every pipe: Linux counts enlarged pipe capacity per user against
`/proc/sys/fs/pipe-user-pages-soft` (64 MiB by default); once a user is over it, every pipe that
user creates afterwards gets 8 KiB instead of 64 KiB, the daemon's and its jobs' (a job running
as the daemon's user shares the count). So a pipe is enlarged only once it has carried
`ENLARGE_AFTER_BYTES` (quiet jobs never take any), and an unprivileged daemon keeps its enlarged
pipes to a quarter of the soft limit. Root (CAP_SYS_RESOURCE) is not counted by the kernel and
has no budget here either.

State is per process and used from the event loop thread only.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Final

PIPE_BYTES: Final = 1024 * 1024
ENLARGE_AFTER_BYTES: Final = 1024 * 1024
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SOFT_LIMIT: Final = Path("/proc/sys/fs/pipe-user-pages-soft")


def _allowed_pipes() -> int | None:
    """How many pipes this process may enlarge at once; None for no limit."""
    if os.geteuid() == 0:
        return None
    try:
        pages = int(_SOFT_LIMIT.read_text())
    except (OSError, ValueError):
        return 0
    if pages == 0:  # no soft limit configured
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") // 4 // PIPE_BYTES


class PipeBudget:
    def __init__(self, allowed: int | None) -> None:
        self.allowed = allowed
        self.in_use = 0

    def enlarge(self, fileno: int) -> bool:
        """Enlarge the pipe if the budget allows; True if it now counts against it."""
        if self.allowed is not None and self.in_use >= self.allowed:
            return False
        try:
            fcntl.fcntl(fileno, _F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:  # pipe-max-size lower, or the kernel's own limit reached
            return False
        self.in_use += 1
        return True

    def give_back(self) -> None:
        self.in_use = max(0, self.in_use - 1)


_budget: PipeBudget | None = None


def budget() -> PipeBudget:
    """This process's budget, read from the kernel's settings at first use."""
    global _budget
    if _budget is None:
        _budget = PipeBudget(_allowed_pipes())
    return _budget
