"""Fencing: the holder of a singleton lock checks that it still holds it, and gives the job up
before anyone else can be handed the lock.

Why: daemons on several hosts share a site on network storage (NFSv4, CephFS, EFS). When the
holder's host loses the storage (a network partition), the storage server lets the holder's
lease run out (90 s by default on Linux nfsd) and grants the lock to another host, which starts
the job. The partitioned holder learns nothing unless it asks: its copy keeps running and the
job runs twice. So the holder asks every `singleton_check_s`, and stops its copy when the
answer is "lost" or when no answer came for `singleton_fence_s`. With `singleton_fence_s` below
the lease minus the job's stop time, the holder's copy is gone before the lock can move.

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

A check that hangs (a hard mount whose server is unreachable) never answers: a watchdog that
does no I/O fences once no check has succeeded for `fence_s`. Hence two threads per held lock,
the checker and the watchdog, and nothing on the event loop, which a hung share would stop.
A checker stuck in the kernel is a daemon thread left behind; it ends (and closes its
descriptor) when its call returns. The checker works on a `dup` of the held descriptor, so the
owner may close its own at any time without the checker ever using a number reused for another
file. Cost: one open, one fstat, one 1-byte pread and one close per held lock per period.

The guard only decides and tells: `on_fence` is called once, from a guard thread, and must not
wait for the event loop (the supervisor stops the job from that thread, see `supervisor`).
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
        raise LockLost(f"{error.strerror or error} ({_errno_name(error)})") from error
    if (held.st_dev, held.st_ino) != (at_path.st_dev, at_path.st_ino):
        raise LockLost(
            f"the lock file was replaced: inode {held.st_ino} is held, {at_path.st_ino} is at "
            "the path"
        )


def _errno_name(error: OSError) -> str:
    return errno.errorcode.get(error.errno or 0, str(error.errno))


class LockGuard:
    """Checks one held lock every `check_s`; fences once (see the module docstring)."""

    def __init__(
        self,
        fd: int,
        path: Path,
        *,
        check_s: float,
        fence_s: float,
        on_fence: Callable[[Fence], None],
        name: str,
    ) -> None:
        """Takes ownership of `fd` (a dup of the holder's descriptor): closed by the checker."""
        self.path = path
        self._fd = fd
        self._check_s = check_s
        self._fence_s = fence_s
        self._on_fence = on_fence
        self._name = name
        self._mutex = threading.Lock()
        self._done = threading.Event()
        self._last_ok = time.monotonic()
        self.fence: Fence | None = None

    def start(self) -> None:
        for role, target in (("check", self._check_loop), ("watch", self._watch_loop)):
            threading.Thread(target=target, name=f"lock-{role}-{self._name}", daemon=True).start()

    def stop(self) -> None:
        """No fence after this returns (unless one is already under way). Never blocks."""
        with self._mutex:
            self._done.set()

    def _check_loop(self) -> None:
        try:
            while not self._done.wait(self._check_s):
                try:
                    verify(self._fd, self.path)
                except LockLost as lost:
                    self._fence(
                        Fence(
                            "singleton lock lost: stopping the job so that another host may run it",
                            str(lost),
                            lost=True,
                        )
                    )
                    return
                with self._mutex:
                    self._last_ok = time.monotonic()
        finally:
            # Here, not in `stop`: a close on a hung share blocks, and this thread may wait.
            os.close(self._fd)

    def _watch_loop(self) -> None:
        while True:
            with self._mutex:
                last_ok = self._last_ok
            remaining = last_ok + self._fence_s - time.monotonic()
            if remaining <= 0:
                since = time.monotonic() - last_ok
                self._fence(
                    Fence(
                        f"cannot verify the singleton lock for {self._fence_s:g} s: stopping "
                        "the job so that another host may run it",
                        f"no check completed in the last {since:.1f} s (the storage may be "
                        "unreachable)",
                        lost=False,
                    )
                )
                return
            if self._done.wait(remaining):
                return

    def _fence(self, fence: Fence) -> None:
        with self._mutex:
            if self._done.is_set():
                return
            self._done.set()
            self.fence = fence
        try:
            self._on_fence(fence)
        except Exception:
            log.exception("fencing failed", lock=str(self.path))
