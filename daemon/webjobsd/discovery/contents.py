"""A job folder's content: which files make the job, and what identifies that content.

This module is the one definition of "the job's files", shared by the catalog (what it
fingerprints) and the working copy (what it copies, then verifies against the fingerprint), so
that what runs and what was fingerprinted are the same set of files by construction.

The content of a folder is every entry below it except noise (`ignore.py`: upload temp files,
editor files, VCS folders): a regular file counts by its SHA-256 and its exec bit, a symbolic link
by its target (links are never followed), a folder by being there (folders are copied, but do not
enter the fingerprint: an empty folder appearing restarts nothing). Anything else (a FIFO, a
socket, a device) is *skipped*: listed in `FolderContent.skipped` so that the caller can say so
once, never read, never copied.

Decisions:
* A job's fingerprint is its content, not its timestamps: the relative path, the kind (file,
  executable file, link), the SHA-256 (or link target) of each entry, then the parsed settings.
  So a copy tool that keeps old timestamps (`rsync -a`, `unzip`, `cp -a` of a reproducible build)
  still changes it when a byte changes, and a redeploy of identical files (`touch`, `rsync -a`,
  `--checksum`, a re-uploaded zip that swaps the folder) changes nothing and restarts nothing.
* Hashes are cached per file identity `(dev, ino, size, mtime_ns, ctime_ns)`. Inode and ctime are
  what no copy tool can set, so any write, rename or replacement gives a new identity and the file
  is read again; a file with the same identity is not read (a periodic rescan of unchanged
  folders only stats). The cache of a folder holds only the files its latest scan saw.
* A hash is not cached when the file changed within `RACY_S` of being read (git's "racily clean"
  rule): file timestamps move in coarse ticks (a jiffy, or a second on some file systems), so a
  second write in the same tick can keep the identity. Such a file is read again next time.
* Files are opened with `O_NOFOLLOW | O_NONBLOCK` and read only when `fstat` says regular: a FIFO
  swapped in after the walk looked never blocks the scan.
* The walk keeps its own stack: a folder 500 levels deep is no `RecursionError`.

Blocking: everything here reads the disk; callers run it in a worker thread.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import json
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from webjobsd.discovery.ignore import (
    ALWAYS_RELEVANT,
    IGNORED_DIRECTORIES,
    is_ignored_name,
    is_upload_temp_name,
)
from webjobsd.model import JobSettings
from webjobsd.records.safeopen import special_kind

CHUNK_BYTES = 1024 * 1024
RACY_S = 2.0
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

# (dev, ino, size, mtime_ns, ctime_ns) packed: the cache holds one per file of every job, and
# packed bytes take a third of the memory of a tuple of ints.
FileIdentity = bytes
_IDENTITY = struct.Struct("<QQqqq")


class EntryKind(enum.StrEnum):
    FILE = "file"
    EXECUTABLE = "exec"
    LINK = "link"


@dataclass(frozen=True, slots=True)
class ContentEntry:
    rel: str
    kind: EntryKind
    digest: str  # SHA-256 of the bytes, or the target of a link


@dataclass(frozen=True, slots=True)
class FolderContent:
    entries: tuple[ContentEntry, ...]  # sorted by path
    # The newest mtime of the entries and of upload temp files (a folder is settling while an
    # upload writes its temp file); 0.0 for an empty folder.
    newest_mtime: float = 0.0
    skipped: tuple[str, ...] = ()  # "path (what)" of special files, sorted
    # Files still being written were not read (see `read_content`'s `writing_window`): the
    # entries are incomplete and make no fingerprint.
    deferred: bool = False


@dataclass(frozen=True, slots=True)
class Found:
    """One entry met by `walk_job_folder` (noise already left out)."""

    rel: str
    path: str
    stat: os.stat_result


def identity_of(st: os.stat_result) -> FileIdentity:
    return _IDENTITY.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


_PASSED_OVER_ERRNOS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ELOOP}
)


def walk_job_folder(root: str | os.PathLike[str], *, upload_temps: bool = False) -> Iterator[Found]:
    """Every entry below `root` that is not noise, folders before what they hold; no recursion.

    Folders are yielded (and entered) unless they are links. With `upload_temps`, upload temp
    files are yielded too (the scan wants their mtime). Raises OSError when `root` itself cannot
    be read; entries that vanish during the walk are passed over.
    """
    top = os.fspath(root)
    stack: list[tuple[str, str]] = [(top, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)
        except OSError as error:
            # A sub-folder that vanished or cannot be entered is passed over; any other error
            # (out of file descriptors, I/O) would give a partial look that reads as a change.
            if directory == top or error.errno not in _PASSED_OVER_ERRNOS:
                raise
            continue
        subfolders: list[tuple[str, str]] = []
        for entry in entries:
            name = entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            rel = prefix + name
            if stat.S_ISDIR(st.st_mode):
                if name in IGNORED_DIRECTORIES:
                    continue
                yield Found(rel, entry.path, st)
                subfolders.append((entry.path, rel + "/"))
                continue
            if is_ignored_name(name) and not (upload_temps and is_upload_temp_name(name)):
                continue
            yield Found(rel, entry.path, st)
        # Reversed onto the stack: folders are visited in listing order, parents first.
        stack.extend(reversed(subfolders))


def open_regular(path: str, *, dir_fd: int | None = None) -> tuple[int, os.stat_result] | None:
    """An fd for reading `path` if it is (still) a regular file, else None. Never blocks."""
    try:
        fd = os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        # ELOOP: a link now stands there (O_NOFOLLOW); ENXIO: a socket. Neither is a file.
        if error.errno in (errno.ELOOP, errno.ENXIO):
            return None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        # Reads of a regular file never block; clear the flag anyway, as readers may expect.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def hash_fd(fd: int) -> bytes:
    # Reads ask for no more than the file holds (plus the byte that shows its end): `os.read`
    # allocates what it asks for, and a MiB is above glibc's mmap threshold (malloc.py), so each
    # small file cost two mmap/munmap pairs, which wait on the process's memory-map lock while
    # jobs fork (reading 100 new job folders during a burst of starts: 130 us -> 39 us a file).
    digest = hashlib.sha256()
    size = min(CHUNK_BYTES, os.fstat(fd).st_size + 1)
    while chunk := os.read(fd, size):
        digest.update(chunk)
    return digest.digest()


def is_racy(st: os.stat_result, now: float) -> bool:
    return now - max(st.st_mtime, st.st_ctime) < RACY_S


def file_kind(st: os.stat_result) -> EntryKind:
    return EntryKind.EXECUTABLE if st.st_mode & 0o111 else EntryKind.FILE


class HashCache:
    """SHA-256 of files by identity, per scanned folder; safe to share between threads.

    A folder maps each relative path to its identity followed by the raw digest, in one bytes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folders: dict[str, dict[str, bytes]] = {}
        self.files_hashed = 0  # how many files were read, for tests and figures

    def known(self, folder: str) -> dict[str, bytes]:
        with self._lock:
            return self._folders.get(folder, {})

    def replace(self, folder: str, hashes: dict[str, bytes]) -> None:
        """The hashes a scan of `folder` saw: the entries of files gone are dropped with it."""
        with self._lock:
            self._folders[folder] = hashes

    def forget(self, folder: str) -> None:
        with self._lock:
            self._folders.pop(folder, None)

    def count_hashed(self) -> None:
        with self._lock:
            self.files_hashed += 1

    def __len__(self) -> int:
        with self._lock:
            return sum(len(hashes) for hashes in self._folders.values())


def read_content(
    root: str | os.PathLike[str],
    cache: HashCache | None = None,
    *,
    now: float | None = None,
    writing_window: tuple[float, float] | None = None,
) -> FolderContent:
    """The content of the folder `root` (see the module docstring). Raises OSError if unreadable.

    `now`: the wall-clock time of the scan, for the racy rule (default: the current time).
    `writing_window`: (after, until): a file whose mtime falls in it is being written; it is not
    read (a growing upload of gigabytes would be hashed again at every look while the folder
    settles) and the result is marked `deferred`.
    """
    folder = os.fspath(root)
    known = cache.known(folder) if cache is not None else {}
    seen: dict[str, bytes] = {}
    entries: list[ContentEntry] = []
    skipped: list[str] = []
    newest = 0.0
    deferred = False
    now = time.time() if now is None else now
    for found in walk_job_folder(folder, upload_temps=True):
        st = found.stat
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            continue
        name = found.rel.rsplit("/", 1)[-1]
        if is_ignored_name(name):  # an upload temp file: only "still being written" counts
            newest = max(newest, st.st_mtime)
            continue
        if stat.S_ISLNK(mode):
            try:
                target = os.readlink(found.path)
            except FileNotFoundError:
                continue
            entries.append(ContentEntry(found.rel, EntryKind.LINK, target))
            newest = max(newest, st.st_mtime)
            continue
        what = special_kind(mode)
        if what is not None:
            skipped.append(f"{found.rel} ({what})")
            continue
        newest = max(newest, st.st_mtime)
        if writing_window is not None and writing_window[0] < st.st_mtime <= writing_window[1]:
            deferred = True
            entries.append(ContentEntry(found.rel, file_kind(st), ""))
            continue
        identity = identity_of(st)
        cached = known.get(found.rel)
        if cached is not None and cached.startswith(identity):
            seen[found.rel] = cached
            digest = cached[_IDENTITY.size :].hex()
            entries.append(ContentEntry(found.rel, file_kind(st), digest))
            continue
        opened = open_regular(found.path)
        if opened is None:
            continue
        fd, opened_stat = opened
        try:
            raw = hash_fd(fd)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if cache is not None:
            cache.count_hashed()
        identity = identity_of(opened_stat)
        if identity_of(after) == identity and not is_racy(after, now):
            seen[found.rel] = identity + raw
        entries.append(ContentEntry(found.rel, file_kind(opened_stat), raw.hex()))
    if cache is not None:
        cache.replace(folder, seen)
    entries.sort(key=lambda entry: entry.rel)
    skipped.sort()
    return FolderContent(tuple(entries), newest, tuple(skipped), deferred)


_IGNORED_DIRECTORY_NAMES = frozenset(os.fsencode(name) for name in IGNORED_DIRECTORIES)


def folder_stamp(root: str | os.PathLike[str], now: float) -> bytes:
    """A digest of the name, type and identity (inode, size, times) of every entry below
    `root` (VCS folders left out, as the walk does): equal stamps, the same folder as far as
    stat can tell. b"" when it proves nothing: a file changed within `RACY_S` (it may change
    again under the same identity) or an entry that could not be read. A lean walk of its own
    (no entries built, no cache looked up): a poll pass stamps every job folder, and compares
    the stamp with the last look's before reading anything more. Blocking."""
    digest = hashlib.blake2b(digest_size=16)
    # Bytes paths: no decoding of names that are only hashed.
    stack = [(os.fsencode(root), b"")]
    try:
        while stack:
            directory, prefix = stack.pop()
            with os.scandir(directory) as listing:
                for entry in listing:
                    st = entry.stat(follow_symlinks=False)
                    rel = prefix + entry.name
                    digest.update(rel)
                    digest.update(identity_of(st))
                    digest.update(b"%o\0" % st.st_mode)
                    if stat.S_ISDIR(st.st_mode):
                        if entry.name not in _IGNORED_DIRECTORY_NAMES:
                            stack.append((entry.path, rel + b"/"))
                    elif now - max(st.st_mtime, st.st_ctime) < RACY_S:
                        return b""
    except OSError:
        return b""
    return digest.digest()


def content_digest(content: FolderContent) -> str:
    """The SHA-256 over the entries that make the code (settings.job and disable.job excluded:
    they enter a fingerprint through the parsed settings and the disabled flag)."""
    digest = hashlib.sha256()
    for entry in content.entries:
        if entry.rel.rsplit("/", 1)[-1] in ALWAYS_RELEVANT:
            continue
        line = f"{entry.rel}\0{entry.kind.value}\0{entry.digest}\n"
        digest.update(line.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def fingerprint_of(content: FolderContent, settings: JobSettings) -> str:
    """A job's fingerprint: its content and its parsed settings. Changes iff either does."""
    digest = hashlib.sha256()
    digest.update(content_digest(content).encode())
    digest.update(json.dumps(dict(settings.raw), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
