"""Working copies ("shadow copies", Part B §4.3): jobs run from a copy unless `is_in_place`.

Running from a copy means a deployment can overwrite the job folder while the old process is still
running. This module owns the copies of one job and the rule of when one may be run.

Decisions:
* A copy is made for a spec, and runs only that spec's code. `prepare(spec)` returns the current
  copy when it was built for `spec.fingerprint` (the content identity the catalog settled on) and
  the job has not changed its files in it; otherwise it builds a new copy. The live folder is not
  looked at to reuse a copy: a restart or a run while the folder is being written (the catalog
  keeps the last settled spec while a folder settles) runs the LAST SETTLED copy, never a copy of
  half-written files. The catalog, not the copy, decides when new code is there: when the
  fingerprint moves, the copy is rebuilt, whatever the timestamps say.
* A new copy is verified: each copied file is hashed (the copy's own bytes, read back once
  written), and the copy must have exactly the spec's fingerprint. If the folder changed between
  the catalog's look and the copy (a new upload began), the new copy is thrown away, the previous
  one is kept, and `FolderChanged` tells the caller to wait for the catalog's next settled spec.
  The price: while a new copy is made and verified, the job takes twice its size in the temp
  folder.
* An in-place job has no copy to fall back on: `check_in_place` verifies the live folder has the
  spec's fingerprint (through a hash cache: stat-only for unchanged files) and raises
  `FolderChanged` otherwise, so that the caller waits for the folder to settle.
* The copy holds what the fingerprint covers (`discovery/contents.py`): noise (upload temp files,
  editor files, `.git`, `__pycache__`) is not copied, links are copied as links, a FIFO, socket or
  device is skipped with one job-log line naming it.
* The job's own writes into its copy: a file it created does not count; a file of the copy it
  changed, replaced or removed (inode, size or mtime differ from what was written) makes the next
  start build a new copy, as Kudu does. The ctime is not compared there: handing the copy over to
  `run_as_user` changes it.
* Copying and removing walk with their own stack (a folder 500 levels deep is no
  `RecursionError`). A failure raises from `prepare` with the partial copy removed; the caller
  reports it as the job's error.

* `reusable(spec)` is `prepare`'s first step alone, for a copy of a few files: a restart or a
  run of an unchanged job reuses its copy, and checking it costs one `lstat` per file, less than
  a hop to a thread and back (which on a busy host is most of a restart's time). Anything else
  (a job of many files, a copy to build, an in-place job) goes to `prepare` in a thread.

Blocking: callers run `prepare`, `check_in_place` and `discard` in a thread; `reusable` is
bounded by `REUSE_CHECK_MAX_FILES` lstats and may run on the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from webjobsd.discovery.contents import (
    CHUNK_BYTES,
    ContentEntry,
    EntryKind,
    FolderContent,
    HashCache,
    file_kind,
    fingerprint_of,
    hash_fd,
    open_regular,
    read_content,
    walk_job_folder,
)
from webjobsd.model import JobSpec
from webjobsd.records.safeopen import special_kind

Note = Callable[[str], None]
CopyStat = tuple[int, int, int]  # inode, size, mtime_ns of a file as written into the copy
# Read and write: the copy is hashed after it is written.
_WRITE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
COPY_RANGE_BYTES = 64 * 1024 * 1024
# The most files `reusable` checks; a copy of more is checked by `prepare`, in a thread.
REUSE_CHECK_MAX_FILES = 32
# copy_file_range is refused across some file systems (old kernels), by some (FUSE, NFS without
# support), or not there at all; read and write then.
_NO_COPY_RANGE = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
)


class FolderChanged(Exception):
    """The job folder no longer holds what the catalog settled on: wait for its next look."""


@dataclass(frozen=True, slots=True)
class BuiltCopy:
    content: FolderContent
    stats: dict[str, CopyStat]


def copy_job_folder(source: Path, target: Path, note: Note) -> BuiltCopy:
    """Copy the job files of `source` into the existing empty folder `target`, hashing as it goes.

    Times and modes are kept. Raises OSError on any failure (the caller removes `target`).
    """
    entries: list[ContentEntry] = []
    stats: dict[str, CopyStat] = {}
    folders: list[tuple[str, os.stat_result]] = []
    for found in walk_job_folder(source):
        destination = os.path.join(target, found.rel)
        mode = found.stat.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(destination, 0o700)
            folders.append((destination, found.stat))
        elif stat.S_ISLNK(mode):
            try:
                link_target = os.readlink(found.path)
            except FileNotFoundError:
                continue
            os.symlink(link_target, destination)
            entries.append(ContentEntry(found.rel, EntryKind.LINK, link_target))
        elif (what := special_kind(mode)) is not None:
            note(f"Skipped '{found.rel}': a {what} is not a job file and is not copied.")
        else:
            copied = _copy_file(found.path, destination)
            if copied is not None:
                entry, copy_stat = copied
                entries.append(ContentEntry(found.rel, entry[0], entry[1]))
                stats[found.rel] = copy_stat
    # Folder modes last: a read-only folder must receive its files first.
    for destination, folder_stat in reversed(folders):
        os.chmod(destination, stat.S_IMODE(folder_stat.st_mode))
        os.utime(destination, ns=(folder_stat.st_atime_ns, folder_stat.st_mtime_ns))
    entries.sort(key=lambda entry: entry.rel)
    return BuiltCopy(FolderContent(tuple(entries)), stats)


def _copy_file(source: str, destination: str) -> tuple[tuple[EntryKind, str], CopyStat] | None:
    """Copy one file, then hash the copy itself: the digest is of the bytes that will run."""
    opened = open_regular(source)
    if opened is None:
        return None  # gone or no longer a file: the verification sees the difference
    fd, source_stat = opened
    try:
        out = os.open(destination, _WRITE_FLAGS, 0o600)
        try:
            _copy_bytes(fd, out)
            os.lseek(out, 0, os.SEEK_SET)
            digest = hash_fd(out).hex()
            os.fchmod(out, stat.S_IMODE(source_stat.st_mode))
            os.utime(out, ns=(source_stat.st_atime_ns, source_stat.st_mtime_ns))
            written = os.fstat(out)
        finally:
            os.close(out)
    finally:
        os.close(fd)
    kind = file_kind(source_stat)
    return (kind, digest), (written.st_ino, written.st_size, written.st_mtime_ns)


def _copy_bytes(source: int, destination: int) -> None:
    """In the kernel when it can (copy_file_range: no bytes through Python, reflinks on file
    systems that have them), else by read and write."""
    try:
        while os.copy_file_range(source, destination, COPY_RANGE_BYTES):
            pass
        return
    except OSError as error:
        if error.errno not in _NO_COPY_RANGE:
            raise
    # Start over: the failed call may have copied part of the file.
    os.lseek(source, 0, os.SEEK_SET)
    os.lseek(destination, 0, os.SEEK_SET)
    os.ftruncate(destination, 0)
    while chunk := os.read(source, CHUNK_BYTES):
        view = memoryview(chunk)
        while view:
            view = view[os.write(destination, view) :]


def remove_tree(path: Path) -> None:
    """Remove `path` and everything below it, best effort, without recursion or following links."""
    top = os.fspath(path)
    folders: list[str] = []
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            if os.path.islink(folder):
                os.unlink(folder)  # only `top` can be one: links below are never entered
                continue
            # A job may have made a folder of its copy read-only; it is still ours to remove.
            os.chmod(folder, 0o700)
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(folder)  # a file or link where a folder was expected
            continue
        folders.append(folder)
        for entry in entries:
            try:
                is_folder = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_folder = False
            if is_folder:
                stack.append(entry.path)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


class WorkingCopy:
    def __init__(self, source: Path, parent: Path) -> None:
        self._source = source
        self._parent = parent
        self._current: Path | None = None
        self._built_for: str | None = None
        self._stats: dict[str, CopyStat] = {}
        self._hashes = HashCache()  # for in-place jobs, whose live folder is checked

    @property
    def current(self) -> Path | None:
        return self._current

    @property
    def built_for(self) -> str | None:
        """The fingerprint the current copy holds."""
        return self._built_for

    def _damage(self) -> str | None:
        """Why the current copy no longer holds what was copied (the job changed it), or None."""
        assert self._current is not None
        for rel, written in self._stats.items():
            try:
                now = os.lstat(self._current / rel)
            except OSError:
                return (
                    f"Job directory change detected: Job file '{rel}' exists in source "
                    "directory but not in working directory."
                )
            if (now.st_ino, now.st_size, now.st_mtime_ns) != written:
                return (
                    f"Job directory change detected: Job file '{rel}' timestamp differs "
                    "between source and working directories."
                )
        return None

    def reusable(self, spec: JobSpec) -> Path | None:
        """The current copy when it was built for `spec`, is intact, and is small enough to
        check here (see the module docstring); None means: ask `prepare`."""
        current = self._current
        if (
            current is None
            or self._built_for != spec.fingerprint
            or len(self._stats) > REUSE_CHECK_MAX_FILES
            or not current.is_dir()
            or self._damage() is not None
        ):
            return None
        return current

    def prepare(self, spec: JobSpec, note: Note) -> Path:
        """The folder to run `spec` from: the copy made for it, or a new verified copy.

        Raises FolderChanged when the live folder no longer holds `spec`'s files, and OSError
        (or anything else) when the copy cannot be made; the previous copy stays either way.
        """
        if self._current is not None and self._current.is_dir():
            if self._built_for == spec.fingerprint:
                reason = self._damage()
                if reason is None:
                    return self._current
                note(reason)
            else:
                note("Job directory change detected: the job files changed since the last copy.")
        elif self._current is None:
            # Copies left by an earlier daemon or an earlier unit of this job.
            remove_tree(self._parent)
        self._parent.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(dir=self._parent))
        try:
            built = copy_job_folder(self._source, target, note)
        except BaseException:
            remove_tree(target)
            raise
        if fingerprint_of(built.content, spec.settings) != spec.fingerprint:
            remove_tree(target)
            raise FolderChanged(
                "the job folder changed since its files were last settled; waiting for it to settle"
            )
        previous = self._current
        self._current, self._built_for, self._stats = target, spec.fingerprint, built.stats
        if previous is not None:
            remove_tree(previous)
        return target

    def check_in_place(self, spec: JobSpec) -> Path:
        """The job folder itself, once it holds `spec`'s files (raises FolderChanged until then)."""
        content = read_content(self._source, self._hashes)
        if fingerprint_of(content, spec.settings) != spec.fingerprint:
            raise FolderChanged(
                "the job folder is being changed; an in-place job waits for it to settle"
            )
        return self._source

    def discard(self) -> None:
        """Remove every copy of this job (the per-job temp folder)."""
        remove_tree(self._parent)
        self._current = None
        self._built_for = None
        self._stats = {}


def describe_error(error: BaseException, limit: int = 500) -> str:
    """One line for a log: the error's type and message, never a traceback, never huge."""
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
