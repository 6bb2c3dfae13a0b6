"""The watchdog adapter: file events become hints, debounced, for the catalog.

Events arrive on watchdog's thread and are handed to the event loop with `call_soon_threadsafe`,
nothing else happens on that thread. A path maps to a `JobKey` (`{kind}/{name}/...`); an event on
the jobs root or a kind folder itself means "rescan everything" (key None).

Watches: one recursive watch on the jobs root, re-made whenever the root's inode changes (the
root replaced). Decision, against ARCHITECTURE.md's older advice of one watch per job folder:
watchdog runs one emitter thread per scheduled watch, so per-job watches cost a thread per job
(1000 jobs: 1000 threads, about 30 MB resident and 8 GB of address space for their stacks). The
advice predates watchdog adding watches inside a folder moved into a recursive watch, which it
now does (tests/test_discovery.py holds it to that, for a job folder dropped into a kind folder
and for a sub-folder moved into a job). An inotify queue overflow is silent: the periodic rescan
is what makes that case correct; the watches only make things fast.

`Debouncer` is pure and clock-driven: a key is due once it has been quiet for `quiet_s`, or once
`cap_s` has passed since its first event even if writes never stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from webjobsd.discovery.ignore import is_ignored_relative_path
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
    def __init__(self, deliver: Callable[[str], None]) -> None:
        self._deliver = deliver

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        if event.is_directory and event.event_type == "modified":
            # A folder's own timestamp changes with every entry added or removed in it; the
            # entry's own event is the one that tells whether it matters (Kudu ignores it too).
            return
        self._deliver(os.fsdecode(event.src_path))
        dest = getattr(event, "dest_path", "")
        if dest:
            self._deliver(os.fsdecode(dest))


class JobsWatcher:
    def __init__(
        self,
        jobs_root: Path,
        loop: asyncio.AbstractEventLoop,
        on_hint: Callable[[Hint], None],
    ) -> None:
        self._jobs_root = jobs_root
        self._loop = loop
        self._on_hint = on_hint
        self._observer: BaseObserver | None = None
        self._handler = _Handler(self._from_thread)
        # The inode watched: a root replaced under the same name needs a new watch.
        self._watch: tuple[int, ObservedWatch] | None = None
        self.events_seen = 0

    def _from_thread(self, path: str) -> None:
        # Runs on watchdog's thread: hand over, nothing else.
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(self._deliver, path)

    def _deliver(self, path: str) -> None:
        hint = hint_for_path(self._jobs_root, path)
        if hint is False:
            return
        self.events_seen += 1
        self._on_hint(hint if isinstance(hint, JobKey) else None)

    def start(self) -> None:
        observer = Observer()
        observer.daemon = True
        self._observer = observer
        observer.start()
        self.sync()

    def sync(self) -> None:
        """Keep the one watch on the jobs root, re-made if the root was replaced.

        Cheap (one stat), so it runs after every refresh.
        """
        observer = self._observer
        if observer is None:
            return
        try:
            inode = self._jobs_root.stat().st_ino
        except OSError:
            self._unschedule()
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
        self._watch = (inode, watch)

    def _unschedule(self) -> None:
        entry, self._watch = self._watch, None
        if entry is not None and self._observer is not None:
            with contextlib.suppress(KeyError, OSError):
                self._observer.unschedule(entry[1])

    def is_alive(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def stop(self) -> None:
        observer = self._observer
        if observer is None:
            return
        self._observer = None
        observer.stop()
        observer.join(timeout=5)
