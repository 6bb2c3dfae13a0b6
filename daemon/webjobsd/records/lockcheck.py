"""Whether `flock` on the site's storage excludes anything: a check made once at start-up.

Owns: the check itself (two opens of one lock file, the second's exclusive `flock` must fail
with EWOULDBLOCK while the first holds it), finding the mount that holds the site in
`/proc/self/mountinfo`, and the `LockCheck` result. What the daemon does with the result
(refuse singleton jobs, say so in its log and on /readyz) belongs to its callers.

Why: daemons on several hosts share the site (NFSv4, CephFS, EFS) and coordinate through flock'd
files in it: `singleton.job.lock`, `triggeredJob.lock`, the deployment lock, the instances'
locks. Some FUSE and SMB mounts (and NFS mounted with `local_lock=flock`, across hosts) accept
`flock` without excluding anything: every daemon then "holds" every singleton lock, and a
singleton job runs on each of them. Nothing fails; only a check that expects a refusal sees it.

Decisions:

* Two descriptors from two `open()`s in this one process: `flock` locks belong to the open file
  description (see `runtime.locks`), so the second open contends with the first as another
  process would. This catches a mount that does not exclude at all; one that excludes only
  within a host (NFS `local_lock=flock`) cannot be told from a working one by a single host.
* The file is `data/webjobsd/lockcheck.lock`, beside the instance locks, opened writable (NFS
  emulates an exclusive flock with a write lock) through `records.safeopen` like every lock
  file. It is shared by the daemons of the site and never deleted (`runtime.locks` says why).
  Two daemons starting at once may meet on it: a first `flock` refused means another daemon's
  check holds it, so it is retried for a short while; refused all along, that foreign hold has
  shown that locks exclude, and the check says so.
* The mount is the entry of `/proc/self/mountinfo` with the longest mount point that is a
  prefix (whole path components) of the resolved folder; among equal ones the last, which is
  mounted on top. Fields are split on single spaces (an empty source stays a field) and lines
  on LF only; the kernel escapes space, tab, LF and backslash as `\\ooo`, and those escapes are
  undone. The file is read with `surrogateescape`, as `os.fsdecode` reads paths.
* A hung mount must not hang the start: `check_site_locks` runs the check in a thread of its
  own (not the loop's default executor, which `asyncio.run` joins at exit) and stops waiting
  after `CHECK_TIMEOUT_S`. A check that did not finish is a check that failed: nothing shows
  that the locks exclude.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from webjobsd.records import safeopen

__all__ = [
    "CHECK_FILE_NAME",
    "CHECK_TIMEOUT_S",
    "LockCheck",
    "Mount",
    "check_locks",
    "check_site_locks",
    "mount_of",
    "parse_mountinfo",
]

CHECK_FILE_NAME: Final = "lockcheck.lock"
CHECK_TIMEOUT_S: Final = 10.0
MOUNTINFO: Final = Path("/proc/self/mountinfo")
# Another daemon's check holds the file for microseconds; this covers a few of them in a row.
_BUSY_RETRIES: Final = 50
_BUSY_PAUSE_S: Final = 0.01
# A mountinfo file is a few hundred bytes per mount; a host with thousands stays far below.
_MAX_MOUNTINFO_BYTES: Final = 16 * 1024 * 1024

_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of `/proc/self/mountinfo`: where, what kind, from where."""

    mount_point: str
    fs_type: str
    source: str
    # "major:minor", the `st_dev` of every file on this mount.
    device: str


@dataclass(frozen=True, slots=True)
class LockCheck:
    """The result: `works` only when the second open's lock was refused with EWOULDBLOCK.

    The mount fields are None when the mount could not be found (no `/proc`). `error` says what
    was seen when `works` is False (and, when it is True, anything unusual on the way).
    """

    works: bool
    mount_point: str | None
    fs_type: str | None
    source: str | None
    error: str | None = None
    lock_file: str | None = None

    def describe_mount(self) -> str:
        """`mount /srv (fs fuse.sshfs, source host:/export)`, for messages."""
        if self.mount_point is None:
            return "mount unknown"
        return f"mount {self.mount_point} (fs {self.fs_type}, source {self.source})"


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a `/proc/PID/mountinfo` text, in its order; malformed lines are skipped.

    A line: `ID PARENT MAJOR:MINOR ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER`.
    """
    mounts = []
    for line in text.split("\n"):
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < separator + 3:
            continue
        mounts.append(
            Mount(
                mount_point=_unescape(fields[4]),
                fs_type=_unescape(fields[separator + 1]),
                source=_unescape(fields[separator + 2]),
                device=fields[2],
            )
        )
    return mounts


def mount_of(path: str, mounts: Iterable[Mount]) -> Mount | None:
    """The mount holding absolute, resolved `path`: the longest mount point that is `path` or
    one of its parent folders; the last of equal ones (the top of a stack of mounts)."""
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point
        inside = point == "/" or path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.mount_point)):
            best = mount
    return best


def _find_mount(folder: Path, mountinfo: Path, *, resolve: bool) -> Mount | None:
    try:
        with open(mountinfo, "rb") as handle:
            raw = handle.read(_MAX_MOUNTINFO_BYTES)
    except OSError:
        return None
    path = Path(os.path.abspath(folder))
    # Resolving stats every component: on a hung mount it hangs, so the caller may skip it.
    if resolve:
        try:
            path = folder.resolve()
        except (OSError, RuntimeError):  # a loop of links: the unresolved path is the best guess
            pass
    return mount_of(str(path), parse_mountinfo(raw.decode("utf-8", "surrogateescape")))


def _result(mount: Mount | None, works: bool, error: str | None, lock_file: Path) -> LockCheck:
    return LockCheck(
        works=works,
        mount_point=mount.mount_point if mount else None,
        fs_type=mount.fs_type if mount else None,
        source=mount.source if mount else None,
        error=error,
        lock_file=str(lock_file),
    )


def _open(path: Path) -> int:
    try:
        return safeopen.open_file(path, os.O_RDWR | os.O_CREAT)
    except safeopen.UnsafeFileError as error:
        # A link or a FIFO at the name is no lock anyone holds (runtime.locks): replace it.
        if not safeopen.remove_unsafe(path, error):
            raise
        return safeopen.open_file(path, os.O_RDWR | os.O_CREAT)


def _describe(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0, str(error.errno))
    return f"{name}: {error.strerror or error}"


def check_locks(folder: Path, *, mountinfo: Path = MOUNTINFO) -> LockCheck:
    """Run the check on `folder/lockcheck.lock` (folder created if missing). Blocking: file
    I/O on the site, which may be remote; see `check_site_locks`. Never raises an OSError: what
    went wrong is the result's `error`."""
    lock_file = folder / CHECK_FILE_NAME
    mount = _find_mount(folder, mountinfo, resolve=True)
    first = second = -1
    try:
        folder.mkdir(parents=True, exist_ok=True)
        first = _open(lock_file)
        second = _open(lock_file)
        for attempt in range(_BUSY_RETRIES + 1):
            try:
                fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == _BUSY_RETRIES:
                    note = "another holder kept the lock file throughout; its hold excluded ours"
                    return _result(mount, True, note, lock_file)
                time.sleep(_BUSY_PAUSE_S)  # another daemon's check: microseconds
        try:
            fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _result(mount, True, None, lock_file)
        except OSError as error:
            detail = f"the second lock failed with {_describe(error)}, not EWOULDBLOCK"
            return _result(mount, False, detail, lock_file)
        detail = "a second open of the lock file took the exclusive lock while the first held it"
        return _result(mount, False, detail, lock_file)
    except OSError as error:
        return _result(mount, False, f"cannot check: {_describe(error)}", lock_file)
    finally:
        for fd in (second, first):
            if fd >= 0:
                # Explicit unlock, then close: closing alone releases only the last reference.
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except OSError:
                    pass
                os.close(fd)


async def check_site_locks(
    folder: Path, *, timeout_s: float = CHECK_TIMEOUT_S, mountinfo: Path = MOUNTINFO
) -> LockCheck:
    """`check_locks` in a thread of its own, waited for at most `timeout_s`.

    A thread stuck on a hung mount is left behind (a daemon thread: it does not hold up the exit);
    the result then says the check did not finish, with the mount found without resolving links.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[LockCheck] = loop.create_future()

    def settle(outcome: LockCheck | BaseException) -> None:
        if done.done():
            return  # the wait ended first
        if isinstance(outcome, BaseException):
            done.set_exception(outcome)
        else:
            done.set_result(outcome)

    def work() -> None:
        outcome: LockCheck | BaseException
        try:
            outcome = check_locks(folder, mountinfo=mountinfo)
        except BaseException as error:  # a bug: handed to the waiting coroutine, raised there
            outcome = error
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    threading.Thread(target=work, name="lockcheck", daemon=True).start()
    try:
        return await asyncio.wait_for(done, timeout_s)
    except TimeoutError:
        mount = _find_mount(folder, mountinfo, resolve=False)
        detail = f"the check did not finish within {timeout_s:g} s: the storage does not answer"
        return _result(mount, False, detail, folder / CHECK_FILE_NAME)
