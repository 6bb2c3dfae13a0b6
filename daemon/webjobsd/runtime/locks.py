"""Advisory file locks that say who holds them (Part A #18).

Owns: taking, holding and releasing one lock file (`triggeredJob.lock`, `singleton.job.lock`,
an instance's lock), and the owner information written inside it. The lock itself is the truth
about liveness; the JSON inside is a hint for people and for repairs (which host, which daemon,
which process), and may be stale: it survives its writer's death.

Must not: decide who *should* hold a lock, retry or wait (acquiring is non-blocking; the caller
owns the retry policy), or delete lock files.

Why `fcntl.flock` and not `fcntl.lockf`/`fcntl(F_SETLK)`: POSIX record locks belong to the
*process* and are silently released when the process closes *any* descriptor of the file — a
`read_owner()` or a liveness probe in the holder's own process would drop the holder's lock, and
two `FileLock`s on the same file in one process would both "succeed". `flock` locks belong to the
open file description: two opens in one process contend like two processes do, and closing some
other descriptor of the file changes nothing. The kernel drops the lock when the last descriptor
of the description closes, so a holder that dies (even by SIGKILL) releases it at once.
Descriptors are opened with O_CLOEXEC so that job processes never inherit, and thus never
prolong, a lock held by the daemon.

Shared storage: on NFS the Linux client emulates `flock` with whole-file POSIX locks on the
server, so locks work across hosts (an exclusive lock needs the file open for writing, which we
do) unless the share is mounted with `local_lock=flock|all`, which makes them host-local.

Why release never deletes the file: a waiter may already have opened the old inode; if we unlink
it, that waiter locks the orphan while a third party creates and locks a new file at the path —
two holders. Lock files therefore live forever (they are tiny). `try_acquire` also checks, after
locking, that its inode is still the one at the path, and retries otherwise; whoever deletes a
job's data folder (and its lock files with it) must only do so when no run can hold them.

Lock files sit in folders a job's process may once have been able to write (data folders handed
to `run_as_user` by older versions): they are opened through `records.safeopen`, never through a
link, never blocking on a FIFO. Such an entry at a lock's name cannot be a lock anyone holds (no
holder could open it), so `try_acquire` removes it, says so in the log, and creates the file.

All methods do blocking file I/O; on slow shared storage call them through `asyncio.to_thread`.
A `FileLock` is not thread-safe. The owner info is not fsync'ed: it is a hint, and after a crash
of the host no holder it could name survives (a torn or empty file reads as "no owner"); an fsync
cost a triggered run milliseconds before its process could start.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from webjobsd.records import lockprobe, safeopen

# How often to retry when the file was replaced between our open and our flock. Each retry
# needs someone to unlink the file again in that window, so more than a couple means churn.
_REPLACED_RETRIES = 3
# The owner info is a few hundred bytes; more is not ours.
_MAX_OWNER_BYTES = 64 * 1024


class ForeignFileSystem(OSError):
    """The lock file is not on the file system it must be on (see `FileLock`)."""


class FileLock:
    """One exclusive, non-blocking, advisory lock on `path`.

    Use as a context manager to guarantee release; entering does not acquire:

        with FileLock(path) as lock:
            if lock.try_acquire({"InstanceId": ...}):
                ...

    A `FileLock` that is dropped without `release()` keeps the lock until the process exits
    (the descriptor is deliberately not closed by garbage collection: losing a lock silently is
    worse than holding it too long).
    """

    def __init__(self, path: Path | str, *, device: int | None = None) -> None:
        """`device`: the file system (st_dev) the lock must be on, or `try_acquire` raises
        `ForeignFileSystem`. A lost mount of shared storage shows the local folder under it,
        where any writer's `mkdir -p` makes the lock's folders again, and a lock taken on a
        file there is a lock nobody else can see."""
        self.path = Path(path)
        self._device = device
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"FileLock({str(self.path)!r}, held={self.held})"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self, owner_info: Mapping[str, Any]) -> bool:
        """Take the lock if free and write `owner_info` into it; False if someone holds it.

        Creates missing parent folders. Returns True only once the owner info is on disk; if
        writing it fails, the lock is released and the error raised. Raises RuntimeError if this
        object already holds the lock, TypeError/ValueError if `owner_info` is not JSON-able,
        `ForeignFileSystem` if the file is not on `device`.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FileLock")
        data = _encode(owner_info)  # before locking: a bad owner must not leave the lock taken
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_REPLACED_RETRIES):
            try:
                fd = safeopen.open_file(self.path, os.O_RDWR | os.O_CREAT)
            except safeopen.UnsafeFileError as error:
                if not safeopen.remove_unsafe(self.path, error):
                    raise
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            if _is_current_inode(fd, self.path):
                break
            # Unlinked or replaced between our open and our flock: we locked an orphan inode
            # that nobody else will ever open. Start over on whatever is at the path now.
            os.close(fd)
        else:
            return False
        try:
            device = self._device if self._device is None else os.fstat(fd).st_dev
            if device != self._device:
                raise ForeignFileSystem(
                    f"{self.path} is on another file system (device {device}) than expected "
                    f"({self._device}): is the shared storage mounted?"
                )
            _write_owner(fd, data)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def update_owner(self, owner_info: Mapping[str, Any]) -> None:
        """Rewrite the owner info while holding (e.g. once the job's process is known)."""
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not held by this FileLock")
        _write_owner(self._fd, _encode(owner_info))

    def duplicate(self) -> int:
        """A new descriptor (close-on-exec) of the held lock's open file description, for a
        checker in another thread (`lockguard`). Closing it never releases the lock while this
        object holds it; `release` unlocks the description explicitly, whoever still has a dup."""
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not held by this FileLock")
        return os.dup(self._fd)

    def release(self) -> None:
        """Unlock and close; idempotent. The file and its (now stale) owner info stay."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Explicit unlock: closing only releases when no other descriptor shares the open
            # file description (a fork that has not exec'd yet would keep it alive).
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    @staticmethod
    def read_owner(path: Path | str) -> dict[str, Any] | None:
        """The owner info last written to `path`, without locking; None if absent or unreadable.

        Says nothing about liveness: a dead holder's info stays until the next holder writes.
        A reader racing a write may see a half-written file, hence None rather than an error.
        Safe to call from the holder's own process (see the module docstring on flock).
        """
        try:
            data = safeopen.read_bytes(Path(path), _MAX_OWNER_BYTES)
        except OSError:
            return None
        try:
            value = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    @staticmethod
    def is_locked_by_other(path: Path | str) -> bool:
        """True if some open of `path` holds the lock — another process or another `FileLock`
        in this one (flock is per open file description); a holder asks `held` instead.

        The probe takes and drops a shared lock on a separate read-only open. While it holds it
        (microseconds), a concurrent `try_acquire` elsewhere fails: acquirers must treat a
        failure as "try later", never as proof of a live owner. A missing file is not locked and
        is not created. The probe is `records.lockprobe`'s, which discovery asks too.
        """
        return lockprobe.is_locked_by_other(path)


def _encode(owner_info: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(owner_info), separators=(",", ":"), ensure_ascii=False).encode()


def _is_current_inode(fd: int, path: Path) -> bool:
    try:
        at_path = path.lstat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)


def _write_owner(fd: int, data: bytes) -> None:
    # In place: the lock lives on this inode, so write-then-rename is not an option. Writing
    # before truncating means a reader never sees an empty file when the length is unchanged.
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], written)
    os.ftruncate(fd, len(data))
