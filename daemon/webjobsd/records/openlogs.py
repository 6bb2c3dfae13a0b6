"""A bound on the job logs held open at once: the least recently written is closed first.

A running job costs the daemon three descriptors that cannot be given back while it runs (its
stdout and stderr pipes and the pidfd the loop waits on) and one that can: its open log. Holding
every log open made it four per job, so that 5000 jobs needed 20,000 descriptors and a host with
that limit failed its last starts with EMFILE. Most jobs write rarely (a line at start, a line
now and then): their log is closed when the budget is needed for another one, and reopened by
its next write (`JobLogWriter` reopens whatever it does not hold, as it does after a rotation by
another instance). A job that writes often stays at the recent end and is never closed.

The budget is a fraction of the soft file limit (`limit_for`), so that the logs can never take
the descriptors the pipes, pidfds, connections and deployments need.

Closing a log belongs to its writer, under the writer's own lock. The budget only asks
(`release_idle`), never waits: a writer busy writing is by definition recent, and two writers
each opening a file while the other is the oldest could otherwise wait for each other forever.
One that could not be asked stays at the old end and is asked again by the next opening.
"""

from __future__ import annotations

import resource
import threading
from collections import OrderedDict
from typing import Final, Protocol

__all__ = ["DEFAULT_SHARE", "IdleClosable", "OpenLogBudget", "limit_for"]

# One descriptor in eight of the soft limit for logs: 2500 of 20,000, 8192 of 65,536, 128 of
# the common interactive 1024.
DEFAULT_SHARE: Final = 8
_MIN_OPEN: Final = 16


class IdleClosable(Protocol):
    def release_idle(self) -> bool:
        """Close the file unless it is being written this instant; True when closed (or when
        nothing was open)."""
        ...


def limit_for(soft_limit: int, share: int = DEFAULT_SHARE) -> int:
    """How many logs a process with `soft_limit` descriptors may hold open."""
    if soft_limit == resource.RLIM_INFINITY or soft_limit <= 0:
        soft_limit = 1 << 20
    return max(_MIN_OPEN, soft_limit // share)


class OpenLogBudget:
    """Thread-safe: writers report from whichever thread writes (the loop, pipe readers)."""

    def __init__(self, limit: int | None = None) -> None:
        if limit is None:
            soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            limit = limit_for(soft)
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self._lock = threading.Lock()
        # Oldest first; the values are unused (an ordered set).
        self._open: OrderedDict[IdleClosable, None] = OrderedDict()
        self.closed_idle = 0  # logs closed to stay within the budget (metrics, tests)

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, writer: IdleClosable) -> None:
        """`writer` opened its file: it becomes the most recent; the oldest beyond the limit
        are asked to close theirs. Called with `writer`'s own lock held."""
        victims: list[IdleClosable] = []
        with self._lock:
            self._open[writer] = None
            self._open.move_to_end(writer)
            while len(self._open) > self.limit:
                oldest = next(iter(self._open))
                if oldest is writer:
                    break
                del self._open[oldest]
                victims.append(oldest)
        refused = [victim for victim in victims if not victim.release_idle()]
        closed = len(victims) - len(refused)
        with self._lock:
            self.closed_idle += closed
            for victim in reversed(refused):
                if victim not in self._open:
                    self._open[victim] = None
                    self._open.move_to_end(victim, last=False)

    def used(self, writer: IdleClosable) -> None:
        """`writer` wrote to the file it holds: it becomes the most recent."""
        with self._lock:
            if writer in self._open:
                self._open.move_to_end(writer)

    def dropped(self, writer: IdleClosable) -> None:
        """`writer` closed its file (rotation, an error, the end of the job)."""
        with self._lock:
            self._open.pop(writer, None)
