"""Opening the daemon's own files without following links and without blocking.

Owns: every open the daemon makes of its records (status, start history, run statuses, logs,
locks, its state files), and the creation of the temp file of an atomic write. The other
modules of `records` and `runtime.locks` open files through here only; a twin elsewhere would
be the one place an attack still works.

Why: a job's data folder used to belong to the job's user (`run_as_user`), and a job could put a
symbolic link, a hard link or a FIFO where the daemon (root) opens its files by name. Following
the link made the daemon append job output to, or overwrite, any file of the system; opening
the FIFO blocked the event loop forever. Data folders now stay the daemon's (`runtime.runas`),
so a job can no longer put anything there; these rules are the second line, for folders an
older version handed over and for whatever else lands there:

* A folder is opened with `O_DIRECTORY | O_NOFOLLOW`, and the file relative to that descriptor
  with `O_NOFOLLOW | O_NONBLOCK`: the last component is never a link, and opening a FIFO or a
  device never waits for its other end.
* What was opened must be a regular file (`fstat`); one opened for writing must also have a
  single link, so that a hard link to another file is not written through. Anything else is
  refused with `UnsafeFileError`, an `OSError` whose message says what the file is.
* The temp file of an atomic write is created with `O_CREAT | O_EXCL | O_NOFOLLOW` in the folder
  descriptor, its mode set with `fchmod` (never by path), and it is renamed relative to that
  descriptor.

Folders above the last one are not checked component by component: they are the site's own
(`SITE/data/...`), made by the daemon, and checking each one would cost a syscall per component
on every log write. `O_NONBLOCK` stays set on the descriptor: it changes nothing for a regular
file.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path
from typing import Final

import structlog

__all__ = [
    "UnsafeFileError",
    "create_temp_at",
    "open_at",
    "open_file",
    "open_folder",
    "read_bytes",
    "remove_unsafe",
    "special_kind",
]

log = structlog.get_logger("webjobsd.safeopen")

_FOLDER_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITING: Final = os.O_WRONLY | os.O_RDWR
_TEMP_ATTEMPTS: Final = 100


class UnsafeFileError(OSError):
    """The name is a link, a FIFO, a socket, a device or a hard-linked file: not opened."""


def special_kind(mode: int) -> str | None:
    """What a non-regular, non-link, non-folder entry is, for messages; None for those three."""
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _describe(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    kind = special_kind(mode)
    return f"a {kind}" if kind not in (None, "special file") else "not a regular file"


def _unsafe(reason: str, path: str | os.PathLike[str]) -> UnsafeFileError:
    return UnsafeFileError(errno.ELOOP, f"is {reason}, not a regular file", os.fspath(path))


def open_folder(path: Path, *, create: bool = False) -> int:
    """A descriptor of the folder `path` (not through a link at its last component).

    `create`: make it, and missing parents, when it does not exist.
    """
    try:
        return os.open(path, _FOLDER_FLAGS)
    except FileNotFoundError:
        if not create:
            raise
    path.mkdir(parents=True, exist_ok=True)
    return os.open(path, _FOLDER_FLAGS)


def open_at(
    folder_fd: int, name: str, flags: int, mode: int = 0o644, *, shown: Path | None = None
) -> int:
    """Open the regular file `name` of the folder `folder_fd`; see the module docstring.

    `shown` is the path errors name (`name` alone otherwise).
    """
    where = shown if shown is not None else name
    try:
        fd = os.open(name, flags | _FILE_FLAGS, mode, dir_fd=folder_fd)
    except OSError as error:
        # ELOOP: the name is a link. ENXIO: a socket, or a FIFO with no reader (O_WRONLY).
        if error.errno in (errno.ELOOP, errno.ENXIO):
            try:
                kind = _describe(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode)
            except OSError:
                kind = "not a regular file"
            raise _unsafe(kind, where) from error
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _unsafe(_describe(st.st_mode), where)
        if flags & _WRITING and st.st_nlink > 1:
            raise _unsafe(f"a file with {st.st_nlink} hard links", where)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(path: Path, flags: int, mode: int = 0o644) -> int:
    """Open the regular file `path` safely (its folder must exist); returns the descriptor."""
    folder_fd = open_folder(path.parent)
    try:
        return open_at(folder_fd, path.name, flags, mode, shown=path)
    finally:
        os.close(folder_fd)


def read_bytes(path: Path | str, limit: int) -> bytes:
    """At most `limit` bytes from the start of the regular file `path`."""
    path = Path(path)
    fd = open_file(path, os.O_RDONLY)
    try:
        chunks: list[bytes] = []
        left = limit
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def create_temp_at(folder_fd: int, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """A new, empty file `{prefix}{random}{suffix}` in `folder_fd`, open for writing (mode
    0600 until the caller's `fchmod`); never an existing file, never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_TEMP_ATTEMPTS):
        name = f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(name, flags, 0o600, dir_fd=folder_fd), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp file name", prefix)


def remove_unsafe(path: Path, error: UnsafeFileError) -> bool:
    """Remove the entry `path` that `error` refused, unless it is a folder; True if removed.

    Only the entry goes: a link is removed, never what it points to. Said in the daemon's log,
    naming the file, because whatever put it there is something to look into.
    """
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            log.error("cannot replace a folder with a regular file", file=str(path))
            return False
        os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError as failure:
        log.error("cannot remove an unsafe file", file=str(path), error=str(failure))
        return False
    log.warning(
        "refused an unsafe file and replaced it with a regular one",
        file=str(path),
        problem=error.strerror,
    )
    return True
