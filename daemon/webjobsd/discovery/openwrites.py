"""Which files of the jobs tree are open for writing, as inotify reports them.

A transfer that stalls inside one file (FTP, rsync, scp over a slow link) leaves the file's mtime
unchanged for as long as it stalls, so the quiet-period rule alone takes the job as complete and
starts it from a truncated file. inotify says more than mtimes: a file that was written to
(`IN_MODIFY`), or created and then opened (`IN_CREATE` + `IN_OPEN`: the creating `open`), is open
for writing until `IN_CLOSE_WRITE`. The catalog never settles a job with such a file.

Decisions:
* Only the creator's open counts after a create: links (`ln`, `ln -s`) and `mknod` create
  entries without opening them, and a reader's open is not a writer's. A create not followed by
  its open within `_CREATE_OPEN_WINDOW_S` is forgotten.
* The events watchdog makes up for the content of a folder moved in or within the tree
  (`is_synthetic`: a create or a move per entry) are not passed on at all. The folder's own move
  event comes first and names everything they would (its job, an arrival, or a rescan), and marks
  move with it; passed on, a hundred folders renamed in at once brought a hundred job hints that
  read every folder again a quiet period later, and no creator's open ever follows them.
* A mark ends at `IN_CLOSE_WRITE` (a writer that dies has its files closed by the kernel, so the
  close comes then too), at delete, and moves with a rename.
* After the creator's open, every open and close of the file is counted, and a close without
  write is passed on only when it closes the last open one. Reads of a file being created are
  common (the catalog hashes it, a working copy copies it): the reader's close must not end the
  writer's mark. The kernel reports the close of a file opened for writing as `IN_CLOSE_WRITE`
  even when nothing was written, so a close without write is never the creator's; it ends the
  mark only when no open is left (the "creator" was a reader after all: a hard link, `ln`, read
  at once).
* vim's swap files stay open for a whole editing session; they never hold a job. Other noise
  (ignore.py) holds none either, except upload temp names (rsync's `.NAME.XXXXXX`, lftp's
  `.in.NAME`): a transfer stalled inside one is under way (the watcher maps those to their job).
* The safety cap `OPEN_WRITE_CAP_S` (15 minutes): a file open longer than that is taken as it
  is, with a warning naming it. It covers the close events inotify can lose (queue overflow, a
  watch re-made) and a writer that holds a file open for good. FTP servers drop an idle data
  connection well within it (vsftpd after 5 minutes, pure-ftpd after 15), which closes the file.
* An open without a write yet counts (FTP servers buffer: the first bytes of a transfer that
  stalls at once may not have reached the file; tests/test_drops.py shows it with pyftpdlib).
* A folder renamed into place in whole may hold files still open for writing that inotify never
  saw opened (written outside the watch). `writers_under_each` asks /proc before such an arrival
  is taken without a quiet period, and again while it holds the job (one pass over /proc for
  every folder that arrived together); when it cannot tell (a daemon that may not read every
  process's descriptors, i.e. not root), the arrival goes the usual way, quiet period included.
  For an arrival, /proc has the last word: only written marks count.
* Pure and clock-driven, fed on the event loop by the watcher; the watcher maps paths to jobs.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Collection
from pathlib import Path

import structlog

log = structlog.get_logger("webjobsd.openwrites")

OPEN_WRITE_CAP_S = 15 * 60.0
# The creator's open is the same system call as the create: its event follows at once.
_CREATE_OPEN_WINDOW_S = 1.0
_NEVER_HOLDING = ("*.swp", "*.swo", "*.swx")


def _holds(path: str) -> bool:
    name = os.path.basename(path)
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in _NEVER_HOLDING)


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + os.sep)


class CreatorOpens:
    """Which `opened` events are worth passing on: only the creator's, right after its create.

    Runs on watchdog's thread (it only filters): every read of a job file (the catalog, a
    working copy being made, an in-place job) opens it, and those opens must not each cost a
    hand-over to the event loop.
    """

    def __init__(self) -> None:
        self._created: dict[str, float] = {}
        # Files whose creator's open was passed on -> opens of them not closed yet (the creator's
        # and any reader's since). The last close is passed on, whatever its kind.
        self._passed: dict[str, int] = {}

    def keep(
        self, kind: str, path: str, *, is_directory: bool, now: float, synthetic: bool = False
    ) -> bool:
        """Whether to pass the event on. `synthetic`: watchdog made it up (the entries of a
        folder moved in are reported as created, of one moved within the tree as moved)."""
        if synthetic:
            return False
        if is_directory:
            return kind not in ("opened", "closed_no_write")
        # Insertion order is time order: stop at the first recent one.
        for known, at in list(self._created.items()):
            if now - at < _CREATE_OPEN_WINDOW_S:
                break
            del self._created[known]
        if kind == "created":
            self._created[path] = now
        elif kind == "opened":
            if path in self._passed:
                self._passed[path] += 1  # a reader's open while the creator's is still open
                return False
            if self._created.pop(path, None) is None:
                return False
            self._passed[path] = 1
        elif kind in ("closed", "closed_no_write"):
            self._created.pop(path, None)
            left = self._passed.get(path)
            if left is None:
                return kind == "closed"
            if kind == "closed" or left <= 1:
                del self._passed[path]
                return True
            self._passed[path] = left - 1
            return False
        elif kind == "deleted":
            self._created.pop(path, None)
            self._passed.pop(path, None)
        return True


class OpenWrites:
    """Fed on the event loop with the events `CreatorOpens` kept."""

    def __init__(self, cap_s: float = OPEN_WRITE_CAP_S) -> None:
        self.cap_s = cap_s
        self._open: dict[str, float] = {}  # path -> first seen open for writing
        self._written: set[str] = set()  # marks that saw a write, not only the creator's open

    def event(self, kind: str, path: str, dest: str, *, is_directory: bool, now: float) -> None:
        """One watchdog event (`kind` is its event_type)."""
        if kind == "deleted" or (kind == "moved" and not dest):
            self._drop(path, is_directory)
        elif kind == "moved":
            if path:  # moved in from outside the watch: nothing was known of it
                self._move(path, dest, is_directory)
        elif is_directory:
            return
        elif kind in ("opened", "modified"):
            if _holds(path):
                self._open.setdefault(path, now)
                if kind == "modified":
                    self._written.add(path)
        elif kind == "closed" or (kind == "closed_no_write" and path not in self._written):
            # A close without write ends an open that never wrote: it was a reader's after all.
            self._open.pop(path, None)
            self._written.discard(path)

    def _matching(self, path: str, is_directory: bool) -> list[str]:
        return [p for p in self._open if (_under(p, path) if is_directory else p == path)]

    def _drop(self, path: str, is_directory: bool) -> None:
        for known in self._matching(path, is_directory):
            del self._open[known]
            self._written.discard(known)

    def _move(self, src: str, dest: str, is_directory: bool) -> None:
        for old in self._matching(src, is_directory):
            new = dest + old[len(src) :]
            self._open[new] = self._open.pop(old)
            if old in self._written:
                self._written.discard(old)
                self._written.add(new)

    def open_paths(self, now: float, *, written_only: bool = False) -> dict[str, float]:
        """Paths open for writing (with since when), marks past the cap dropped with a warning.
        `written_only`: leave out opens that have not written yet (see the module docstring)."""
        for path, since in list(self._open.items()):
            if now - since >= self.cap_s:
                del self._open[path]
                self._written.discard(path)
                log.warning(
                    "file open for writing longer than the cap; taken as it is",
                    file=path,
                    open_s=round(now - since),
                    cap_s=self.cap_s,
                )
        if written_only:
            return {path: since for path, since in self._open.items() if path in self._written}
        return dict(self._open)

    def clear(self) -> None:
        """The watch was re-made: closes of the old one will never arrive."""
        self._open.clear()
        self._written.clear()


def writers_under_each(folders: Collection[Path]) -> dict[Path, bool | None]:
    """For each folder: True when some process holds a file under it open for writing, False
    when none does, None when it cannot be told. One pass over /proc answers for all of them (a
    hundred folders renamed in at once must not cost a hundred passes: each reads every
    descriptor of every process). Blocking: call it in a thread."""
    if not folders:
        return {}
    scanned = _scan_written(os.path.commonpath([os.fspath(folder) for folder in folders]))
    if scanned is None:
        return dict.fromkeys(folders)
    found, unknown = scanned
    answers: dict[Path, bool | None] = {}
    for folder in folders:
        prefix = f"{folder}{os.sep}"
        if any(path.startswith(prefix) for path in found):
            answers[folder] = True
        else:
            answers[folder] = None if unknown else False
    return answers


def files_written_under(folder: Path) -> set[str] | None:
    """The files under `folder` that some process holds open for writing (from /proc), or None
    when it cannot be told (a process whose descriptors may not be read)."""
    scanned = _scan_written(os.fspath(folder))
    if scanned is None:
        return None
    found, unknown = scanned
    return None if unknown and not found else found


def _scan_written(folder: str) -> tuple[set[str], bool] | None:
    """One pass over /proc: the files under `folder` open for writing, and whether some
    process's descriptors could not be read (None: /proc itself cannot be read)."""
    prefix = folder + os.sep
    unknown = False
    found: set[str] = set()
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return None
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        except PermissionError:
            unknown = True
            continue
        except OSError:
            return None
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith(prefix) and _opened_for_writing(pid, fd):
                found.add(target)
    return found, unknown


def _opened_for_writing(pid: str, fd: str) -> bool:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as info:
            for line in info:
                if line.startswith("flags:"):
                    flags = int(line.split()[1], 8)
                    return flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
    except (OSError, ValueError, IndexError):
        return False  # closed meanwhile
    return False
