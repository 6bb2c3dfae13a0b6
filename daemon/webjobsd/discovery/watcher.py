"""The watchdog adapter: file events become hints, debounced, for the catalog.

Events arrive on watchdog's thread and are handed to the event loop with `call_soon_threadsafe`;
the only other thing done on that thread is dropping reads (see `CreatorOpens`). The observer's
inotify reader takes the kernel's queue in batches (see batchobserver.py): the daemon's own reads
inside the tree are events too, thousands of them in a scan.

A path maps to a `JobKey` (`{kind}/{name}/...`); an event on the jobs root or a kind folder
itself means "rescan everything" (key None).

Watches: one recursive watch on the jobs root, re-made whenever the root's inode changes (the
root replaced). The daemon never creates the jobs root (nor anything else inside wwwroot: `git
clone REPO site/wwwroot` needs it absent or empty): while it is missing, a non-recursive watch on
its nearest existing ancestor follows it down as the folders appear, and once the root exists the
real watch is made and a full rescan asked for (files written before the watch existed are only
found by a scan). A root removed and made again (`rm -rf wwwroot && git clone`) goes the same way.

Open for writing: the watcher feeds `OpenWrites` (see openwrites.py) and publishes the jobs that
have a file open for writing; the discovery service hands them to the catalog, which never settles
such a job. An upload tool's temp file counts for its job though its events are noise
(`writing_job`): rsync stalled inside `.big.bin.Xy12Ab` is a transfer under way. A job folder
renamed into place in whole (a deployment's staging folder, `mv`) is an *arrival*: complete at
once, it needs no quiet period. The observer reports unmatched moves as
moves (`generate_full_events`), so a folder moved in from outside the watch is told apart from a
folder made with mkdir and then filled.

Decision, against ARCHITECTURE.md's older advice of one watch per job folder: watchdog runs one
emitter thread per scheduled watch, so per-job watches cost a thread per job (1000 jobs: 1000
threads, about 30 MB resident and 8 GB of address space for their stacks). The advice predates
watchdog adding watches inside a folder moved into a recursive watch, which it now does
(tests/test_discovery.py holds it to that, for a job folder dropped into a kind folder and for a
sub-folder moved into a job). An inotify queue overflow is silent: the periodic rescan is what
makes that case correct; the watches only make things fast.

Dead threads: watchdog runs the watch on threads of its own (the observer that dispatches, the
inotify reader, one emitter per watch), and an exception in any of them ends that thread silently
while the observer itself may still be alive: events stop, and only the periodic rescan would
still see changes. `dead_threads()` names the threads that ended without being asked to (an
emitter whose watched folder was deleted stops itself, asked: that is no death); `is_alive()`, and
so readiness, is false while there are any. `replace_observer()` builds a new observer and makes
the watches again; the discovery service checks every few seconds and calls it (logging an
error that names the dead threads), and the new watch asks for a full rescan, since what
happened meanwhile is known to no event. The old observer is stopped by the caller, in a thread
(joining watchdog's threads blocks).

Not made at all in poll mode (`watch: poll`, config.py): on NFS, CephFS or EFS, inotify reports
this host's writes only, so a watch would see some changes and miss others depending on which
host wrote. There the discovery service's rescan, run every `poll_interval_s`, is the only
source of events (see service.py); the `Debouncer` below still times its second looks.

`Debouncer` is pure and clock-driven: a key is due once it has been quiet for `quiet_s`, or once
`cap_s` has passed since its first event even if writes never stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver, ObservedWatch

from webjobsd.discovery.batchobserver import BatchingInotifyObserver
from webjobsd.discovery.ignore import (
    IGNORED_DIRECTORIES,
    is_ignored_relative_path,
    is_upload_temp_name,
)
from webjobsd.discovery.openwrites import CreatorOpens, OpenWrites
from webjobsd.model import JobKey, JobKind

log = structlog.get_logger("webjobsd.watcher")

# A folder moved inside the watched tree (a deployment's staging folder renamed into place, a job
# renamed) keeps its inotify watch; watchdog re-registers it under the new path and warns that it
# replaces its own callback. That is its normal bookkeeping, not a fault; under `-W error` the
# warning would even end watchdog's thread.
WATCHDOG_REREGISTER_WARNING = r"Callback with id '\S+' already exists for watch"
warnings.filterwarnings("ignore", message=WATCHDOG_REREGISTER_WARNING, category=RuntimeWarning)

Hint = JobKey | None  # None: rescan everything


@dataclass(slots=True)
class _Pending:
    first: float
    last: float


class Debouncer:
    def __init__(self, quiet_s: float, cap_s: float) -> None:
        self.quiet_s = quiet_s
        self.cap_s = cap_s
        self._pending: dict[Hint, _Pending] = {}

    def touch(self, hint: Hint, now: float) -> None:
        entry = self._pending.get(hint)
        if entry is None:
            self._pending[hint] = _Pending(now, now)
        else:
            entry.last = now

    def _due_at(self, entry: _Pending) -> float:
        return min(entry.last + self.quiet_s, entry.first + self.cap_s)

    def pop_all(self) -> set[Hint]:
        """Every pending hint, due or not (a deployment ended: everything is looked at now)."""
        pending = set(self._pending)
        self._pending.clear()
        return pending

    def pending(self) -> set[Hint]:
        """The hints waiting for their quiet period."""
        return set(self._pending)

    def pop_due(self, now: float) -> set[Hint]:
        due = {hint for hint, entry in self._pending.items() if self._due_at(entry) <= now}
        for hint in due:
            del self._pending[hint]
        return due

    def next_due(self) -> float | None:
        if not self._pending:
            return None
        return min(self._due_at(entry) for entry in self._pending.values())


def hint_for_path(jobs_root: Path, path: str) -> Hint | bool:
    """The hint an event path gives; False when the event is noise."""
    try:
        rel = Path(os.path.relpath(path, jobs_root))
    except ValueError:
        return False
    parts = rel.parts
    if parts and parts[0] == "..":
        return False
    if not parts or parts == (".",):
        return None
    try:
        kind = JobKind(parts[0])
    except ValueError:
        return False
    if len(parts) == 1:
        return None
    if is_ignored_relative_path(parts[2:]):
        return False
    return JobKey(kind, parts[1])


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's thread: filters the reads out and hands the rest over."""

    def __init__(self, deliver: Callable[[str, str, str, bool], None]) -> None:
        self._deliver = deliver
        self._creator_opens = CreatorOpens()
        # Set when its observer was replaced: the old threads still running until it is
        # stopped must not feed marks of a watch that is gone.
        self.retired = False

    def on_any_event(self, event: FileSystemEvent) -> None:
        if self.retired:
            return
        src = os.fsdecode(event.src_path)
        kind = event.event_type
        now = time.monotonic()
        if not self._creator_opens.keep(
            kind, src, is_directory=event.is_directory, now=now, synthetic=event.is_synthetic
        ):
            return
        dest = os.fsdecode(getattr(event, "dest_path", "") or "")
        self._deliver(kind, src, dest, event.is_directory)


class _AncestorHandler(FileSystemEventHandler):
    def __init__(self, changed: Callable[[], None]) -> None:
        self._changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("opened", "closed_no_write", "closed"):
            self._changed()


def writing_job(jobs_root: Path, path: str) -> JobKey | None:
    """The job a file open for writing holds. An upload tool's temp name (rsync's
    `.NAME.XXXXXX`, lftp's `.in.NAME`) is noise for the content but not for completeness: a
    transfer stalled inside it is a transfer under way (see ignore.py)."""
    hint = hint_for_path(jobs_root, path)
    if isinstance(hint, JobKey):
        return hint
    if hint is None:
        return None
    parts = Path(os.path.relpath(path, jobs_root)).parts
    if len(parts) < 3 or not is_upload_temp_name(parts[-1]):
        return None
    if any(part in IGNORED_DIRECTORIES for part in parts[2:-1]):
        return None  # inside .git and the like: never job content, complete or not
    try:
        return JobKey(JobKind(parts[0]), parts[1])
    except ValueError:
        return None


def _arrived_job(jobs_root: Path, dest: str) -> JobKey | None:
    """The job whose folder `dest` is, when `dest` is a job folder itself."""
    hint = hint_for_path(jobs_root, dest)
    if not isinstance(hint, JobKey):
        return None
    return hint if Path(dest) == jobs_root / hint.kind.value / hint.name else None


def nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return candidate
    return Path(path.anchor or "/")


class JobsWatcher:
    def __init__(
        self,
        jobs_root: Path,
        loop: asyncio.AbstractEventLoop,
        on_hint: Callable[[Hint], None],
        on_arrival: Callable[[JobKey], None] | None = None,
    ) -> None:
        self._jobs_root = jobs_root
        self._loop = loop
        self._on_hint = on_hint
        self._on_arrival = on_arrival
        self._observer: BaseObserver | None = None
        self._handler = _Handler(self._from_thread)
        self._ancestor_handler = _AncestorHandler(self._ancestor_from_thread)
        # The inode watched: a root replaced under the same name needs a new watch.
        self._watch: tuple[int, ObservedWatch] | None = None
        # While the root is missing: ((the ancestor watched, its inode), its watch).
        self._ancestor: tuple[tuple[Path, int], ObservedWatch] | None = None
        self._writes = OpenWrites()
        # `start` could not make an observer (see `dead_threads`).
        self._never_made = False
        self.events_seen = 0
        # Observers made to replace one whose thread died (see the module docstring).
        self.restarts = 0
        self._stopped = False

    def _from_thread(self, kind: str, src: str, dest: str, is_directory: bool) -> None:
        # Runs on watchdog's thread: hand over, nothing else.
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(self._event, kind, src, dest, is_directory)

    def _ancestor_from_thread(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.sync)

    def _event(self, kind: str, src: str, dest: str, is_directory: bool) -> None:
        self._writes.event(kind, src, dest, is_directory=is_directory, now=time.monotonic())
        if kind in ("opened", "closed_no_write"):
            return
        if is_directory and kind == "modified":
            # A folder's own timestamp changes with every entry added or removed in it; the
            # entry's own event is the one that tells whether it matters (Kudu ignores it too).
            return
        if kind == "moved" and is_directory and self._on_arrival is not None:
            arrived = _arrived_job(self._jobs_root, dest)
            if arrived is not None:
                self._deliver(src)
                self.events_seen += 1
                self._on_arrival(arrived)
                return
        self._deliver(src)
        self._deliver(dest)

    def _deliver(self, path: str) -> None:
        if not path:
            return
        hint = hint_for_path(self._jobs_root, path)
        if hint is False:
            return
        self.events_seen += 1
        self._on_hint(hint if isinstance(hint, JobKey) else None)

    def open_for_write(self, *, written_only: bool = False) -> set[JobKey]:
        """Jobs with a file open for writing now (see openwrites.py)."""
        jobs: set[JobKey] = set()
        for path in self._writes.open_paths(time.monotonic(), written_only=written_only):
            job = writing_job(self._jobs_root, path)
            if job is not None:
                jobs.add(job)
        return jobs

    def start(self) -> None:
        """Make the observer and the watch. Out of descriptors or inotify instances (a flood of
        connections while the daemon starts, say) does not stop the start: the watcher is then
        reported like one whose threads died, and the discovery service's check makes it."""
        try:
            self._observer = _new_observer()
        except OSError as error:
            log.warning("cannot make the file watcher yet; trying again", error=str(error))
            self._never_made = True
            return
        # Start-up scans everything right after this: no rescan to ask for.
        self.sync(announce=False)

    def replace_observer(self) -> BaseObserver | None:
        """A new observer with the watches made again, asking for a full rescan (what happened
        while the old one was deaf is known to no event). Returns the old observer: the caller
        stops it in a thread (`stop_observer`). Raises OSError when no new one can be made (out
        of inotify instances): the old one is kept, to be replaced at the next try."""
        if self._stopped:
            return None
        new = _new_observer()
        self._never_made = False
        old, self._observer = self._observer, new
        # The old watches and their open-for-write marks went with the old observer; a fresh
        # handler forgets the creates it saw (their opens will come, if at all, to the new one).
        self._watch = None
        self._ancestor = None
        self._writes.clear()
        self._handler.retired = True
        self._handler = _Handler(self._from_thread)
        self.restarts += 1
        self.sync(announce=True)
        return old

    def dead_threads(self) -> list[str]:
        """watchdog's threads of the current observer that ended without being asked to."""
        observer = self._observer
        if self._stopped:
            return []
        if observer is None:
            return ["the observer, never made"] if self._never_made else []
        return [_describe(thread) for thread in _threads_of(observer) if _died(thread)]

    def sync(self, *, announce: bool = True) -> None:
        """Keep the one watch on the jobs root, re-made if the root was replaced; while the root
        is missing, watch its nearest existing ancestor instead.

        Cheap (a few stats), so it runs after every refresh and on every event of the ancestor.
        """
        observer = self._observer
        if observer is None:
            return
        try:
            inode = self._jobs_root.stat().st_ino
        except OSError:
            self._unschedule()
            self._watch_ancestor(observer)
            return
        if self._watch is not None and self._watch[0] == inode:
            return
        self._unschedule()
        try:
            watch = observer.schedule(self._handler, str(self._jobs_root), recursive=True)
        except OSError as error:
            # Root vanished between the stat and now, or the inotify watch limit is hit: the
            # periodic rescan still covers it.
            log.warning("cannot watch folder", folder=str(self._jobs_root), error=str(error))
            return
        self._unschedule_ancestor()
        self._watch = (inode, watch)
        if announce:
            # What was written before the watch existed is known to no event: look at all.
            self._on_hint(None)

    def _watch_ancestor(self, observer: BaseObserver) -> None:
        ancestor = nearest_existing(self._jobs_root.parent)
        try:
            inode = ancestor.stat().st_ino
        except OSError:
            self._loop.call_soon(self.sync)  # gone again meanwhile: look once more
            return
        if self._ancestor is not None and self._ancestor[0] == (ancestor, inode):
            return
        self._unschedule_ancestor()
        try:
            watch = observer.schedule(self._ancestor_handler, str(ancestor), recursive=False)
        except OSError as error:
            log.warning("cannot watch folder", folder=str(ancestor), error=str(error))
            return
        self._ancestor = ((ancestor, inode), watch)
        log.info(
            "waiting for the jobs root", jobs_root=str(self._jobs_root), watching=str(ancestor)
        )
        # The next level may have appeared between the stat and the watch.
        if self._jobs_root.is_dir() or nearest_existing(self._jobs_root.parent) != ancestor:
            self._loop.call_soon(self.sync)

    def _unschedule(self) -> None:
        entry, self._watch = self._watch, None
        if entry is not None:
            self._writes.clear()
            if self._observer is not None:
                with contextlib.suppress(KeyError, OSError):
                    self._observer.unschedule(entry[1])

    def _unschedule_ancestor(self) -> None:
        entry, self._ancestor = self._ancestor, None
        if entry is not None and self._observer is not None:
            with contextlib.suppress(KeyError, OSError):
                self._observer.unschedule(entry[1])

    @property
    def observer(self) -> BaseObserver | None:
        """The observer now in use (replaced when a thread of it died)."""
        return self._observer

    def is_alive(self) -> bool:
        """The observer and every thread of it running: events are arriving."""
        observer = self._observer
        return observer is not None and observer.is_alive() and not self.dead_threads()

    def stop(self) -> None:
        self._stopped = True
        observer, self._observer = self._observer, None
        if observer is not None:
            stop_observer(observer)


# A pass over the jobs tree queues an open and a close event per folder it lists and per file it
# reads; a job folder of one file, four. Twice that leaves room for the watch library's own walk
# after an overflow, which queues as many again (systemd/webjobsd.sysctl).
QUEUED_EVENTS_PER_JOB = 8
_MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")


def queue_shortfall(job_folders: int, limit: int | None = None) -> int | None:
    """The inotify queue size `job_folders` need, when the kernel's (`limit`, read from /proc
    when None) is smaller; None when it is enough or cannot be read. An overflowing queue
    loses events and, worse, sends the watch library into a walk of the whole tree that can
    overflow it again, over and over (measured at 5000 jobs: a core busy for good)."""
    if limit is None:
        try:
            limit = int(_MAX_QUEUED_EVENTS.read_text())
        except (OSError, ValueError):
            return None
    needed = job_folders * QUEUED_EVENTS_PER_JOB
    return needed if needed > limit else None


def _new_observer() -> BaseObserver:
    # Full events: an unmatched move is a move, not a create (see the module docstring).
    observer = BatchingInotifyObserver()
    observer.daemon = True
    observer.start()
    return observer


def stop_observer(observer: BaseObserver) -> None:
    """Stop an observer and wait (bounded) for its threads. Blocking: call it in a thread. A
    dead thread of it may leave watchdog's bookkeeping half done: errors are logged, not raised."""
    try:
        observer.stop()
        observer.join(timeout=5)
    except Exception as error:
        log.warning("stopping the old file watcher failed", error=repr(error))


def _threads_of(observer: BaseObserver) -> list[threading.Thread]:
    threads: list[threading.Thread] = [observer, *list(observer.emitters)]
    # The inotify reader (watchdog 5+ gives each InotifyObserver its own): no public name for
    # it, and it dies like the others (an exception while it hands an event over).
    reader = getattr(observer, "_inotify_fd", None)
    if isinstance(reader, threading.Thread):
        threads.append(reader)
    return threads


def _died(thread: threading.Thread) -> bool:
    """Started, ended, and not asked to stop (watchdog's threads say whether they were)."""
    if thread.ident is None or thread.is_alive():
        return False
    should_keep_running = getattr(thread, "should_keep_running", None)
    return bool(should_keep_running()) if callable(should_keep_running) else True


def _describe(thread: threading.Thread) -> str:
    watch = getattr(thread, "watch", None)
    where = f" watching {watch.path}" if isinstance(watch, ObservedWatch) else ""
    return f"{type(thread).__name__} {thread.name}{where}"
