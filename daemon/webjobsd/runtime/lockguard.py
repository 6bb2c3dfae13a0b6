"""Fencing: the holder of a singleton lock checks that it still holds it, and gives the job up
before anyone else can be handed the lock.

Why: daemons on several hosts share a site on network storage (NFSv4, CephFS, EFS). When the
holder's host loses the storage (a network partition), the storage server lets the holder's
lease run out (90 s by default on Linux nfsd) and grants the lock to another host, which starts
the job. The partitioned holder learns nothing unless it asks: its copy keeps running and the
job runs twice. So the holder asks every `check_s`, and stops its copy when the answer is "lost"
or when no answer came for `fence_s`. With `fence_s` below the lease minus the job's stop time,
the holder's copy is gone before the lock can move.

A check (`verify`):
* opens the lock's path read-only and compares the inode found there (st_dev, st_ino) with the
  one the held descriptor locks. An open rather than a stat: on NFS a stat may be answered from
  the attribute cache (up to `acregmax`, 60 s) without the server, while an open is checked
  with it (close-to-open consistency; an NFSv4 OPEN is a server call), so a check that
  completes means the server answered. A second open does not touch the lock: flock locks
  belong to the open file description (see `locks`). The open is non-blocking and never
  follows a link: whatever is at the path is only looked at.
* reads a byte through the held descriptor: once the NFS client has lost its locks
  (`nfs.recover_lost_locks=0`, the default) I/O on it fails with EIO.
Another inode or none at the path (the file was replaced or deleted: whoever locks the path now
locks another file, and nobody can see ours), or an error (EIO, ESTALE, ENOENT...) is a lost
lock.

A check that hangs (a hard mount whose server is unreachable) never answers, so a watchdog that
does no I/O fences every guard whose last successful check is `fence_s` old. Time is measured
on CLOCK_BOOTTIME, which runs while the host is suspended (the server's lease does too), and the
watchdog looks every `check_s` at least, so a resumed host fences within `check_s`. Two threads for
the whole daemon, not per lock: a daemon may hold hundreds of singleton locks, all on the same
share, and a hung check of one means the others cannot be checked either (they would hang
too); then each is fenced at its own bound, which is the point. Nothing runs on the event loop,
which a hung share would stop. The threads start with the first guard and then stay (daemon
threads: a checker stuck in the kernel never holds up the exit).

Descriptors: a guard works on a `dup` of the held descriptor, so the owner may close its own at
any time; the dup is closed by the checker thread once the guard ended, never while a check may
be using it (a number reused for another file would be checked instead). Cost: one open, one
fstat, one 1-byte pread and one close per held lock per period.

The guards only decide and tell: `on_fence(guard)` is called once per guard, from the checker or
the watchdog thread. It must return at once (every other guard waits meanwhile) and must not
wait for the event loop: the supervisor starts the job's stop in a thread of its own.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("webjobsd.lockguard")

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _now() -> float:
    """Seconds on a clock that also runs while the host is suspended: the storage's lease runs
    out meanwhile, and a suspension must count against `fence_s` (the monotonic clock stops)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class LockLost(Exception):
    """The lock is not held any more; the message says how we know."""


@dataclass(frozen=True, slots=True)
class Fence:
    """Why a holder gives its lock up: `event` for the log's message, `detail` for people."""

    event: str
    detail: str
    lost: bool  # True: the lock is known lost; False: it could not be verified in time


def verify(fd: int, path: Path) -> None:
    """Raise LockLost unless `path` still names the file `fd` holds and `fd` can be read."""
    try:
        at_path_fd = os.open(path, _OPEN_FLAGS)
        try:
            at_path = os.fstat(at_path_fd)
        finally:
            os.close(at_path_fd)
        held = os.fstat(fd)
        os.pread(fd, 1, 0)
    except OSError as error:
        name = errno.errorcode.get(error.errno or 0, str(error.errno))
        raise LockLost(f"{error.strerror or error} ({name})") from error
    if (held.st_dev, held.st_ino) != (at_path.st_dev, at_path.st_ino):
        raise LockLost(
            f"the lock file was replaced: inode {held.st_ino} is held, {at_path.st_ino} is at "
            "the path"
        )


class Guard:
    """One held lock under watch. `stop()` when the lock is let go; `fence` once fenced."""

    def __init__(
        self,
        guards: LockGuards,
        fd: int,
        path: Path,
        check_s: float,
        fence_s: float,
        on_fence: Callable[[Guard], None],
    ) -> None:
        self.path = path
        self.fence: Fence | None = None
        self._guards = guards
        self._fd = fd
        self._check_s = check_s
        self._fence_s = fence_s
        self._on_fence = on_fence
        now = _now()
        self._last_ok = now
        self._next_check = now + check_s
        self._ended = False  # stopped or fenced: no fence (any more) after this

    def stop(self) -> None:
        """No fence after this returns (unless one is already under way). Never blocks."""
        self._guards._end(self)


class LockGuards:
    """The daemon's held locks, checked by one thread and watched by another."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._checker_wake = threading.Condition(self._mutex)
        self._watchdog_wake = threading.Condition(self._mutex)
        self._guards: list[Guard] = []
        self._started = False

    def watch(
        self,
        fd: int,
        path: Path,
        *,
        check_s: float,
        fence_s: float,
        on_fence: Callable[[Guard], None],
    ) -> Guard:
        """Check the lock held through `fd` (a dup: owned and closed by the guards from now on)
        at `path` every `check_s`; `on_fence(guard)` once it is lost or unverified for `fence_s`
        (`guard.fence` says why)."""
        guard = Guard(self, fd, path, check_s, fence_s, on_fence)
        with self._mutex:
            self._guards.append(guard)
            if not self._started:
                self._started = True
                for role, target in (("check", self._check_loop), ("watch", self._watch_loop)):
                    name = f"lock-{role}"
                    threading.Thread(target=target, name=name, daemon=True).start()
            self._checker_wake.notify()
            self._watchdog_wake.notify()
        return guard

    def _end(self, guard: Guard) -> None:
        with self._mutex:
            guard._ended = True
            self._checker_wake.notify()  # its descriptor is closed there

    def _fence(self, guard: Guard, fence: Fence) -> None:
        with self._mutex:
            if guard._ended:
                return
            guard._ended = True
            guard.fence = fence
            self._checker_wake.notify()
        try:
            guard._on_fence(guard)
        except Exception:
            log.exception("fencing failed", lock=str(guard.path))

    def _check_loop(self) -> None:
        while True:
            with self._mutex:
                ended = [guard for guard in self._guards if guard._ended]
                self._guards = [guard for guard in self._guards if not guard._ended]
                now = _now()
                due = [guard for guard in self._guards if guard._next_check <= now]
                if not due and not ended:
                    upcoming = min((g._next_check for g in self._guards), default=None)
                    self._checker_wake.wait(None if upcoming is None else upcoming - now)
                    continue
            for guard in ended:
                # Here, not in `stop`: a close on a hung share blocks, and this thread may wait.
                os.close(guard._fd)
            for guard in due:
                self._check(guard)

    def _check(self, guard: Guard) -> None:
        try:
            verify(guard._fd, guard.path)
        except LockLost as lost:
            self._fence(
                guard,
                Fence(
                    "singleton lock lost: stopping the job so that another host may run it",
                    str(lost),
                    lost=True,
                ),
            )
            return
        with self._mutex:
            now = _now()
            guard._last_ok = now
            guard._next_check = now + guard._check_s

    def _watch_loop(self) -> None:
        while True:
            expired: list[tuple[Guard, float]] = []
            with self._mutex:
                now = _now()
                wait_s: float | None = None
                for guard in self._guards:
                    if guard._ended:
                        continue
                    bound = guard._last_ok + guard._fence_s
                    if bound <= now:
                        expired.append((guard, now - guard._last_ok))
                        continue
                    # A timed wait measures monotonic time, which stops while the host is
                    # suspended: waking every `check_s` too bounds how late a fence comes after
                    # a resume.
                    until = min(bound - now, guard._check_s)
                    wait_s = until if wait_s is None else min(wait_s, until)
                if not expired:
                    self._watchdog_wake.wait(wait_s)
                    continue
            for guard, since in expired:
                self._fence(
                    guard,
                    Fence(
                        f"cannot verify the singleton lock for {guard._fence_s:g} s: stopping "
                        "the job so that another host may run it",
                        f"no check completed in the last {since:.1f} s (the storage may be "
                        "unreachable)",
                        lost=False,
                    ),
                )
