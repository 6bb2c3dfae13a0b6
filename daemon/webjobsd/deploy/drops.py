"""Zip-and-drop (KUDU-DEPLOY.md Part A #11; Kudu has none): a zip file dropped on disk deploys.

* `NAME.zip` in a jobs kind folder (`App_Data/jobs/continuous/` or `…/triggered/`) deploys job
  `NAME` exactly as `PUT /api/{type}webjobs/NAME` with that zip would (`deploy.jobpackage`), then
  the zip is removed. A zip that cannot be deployed (not a zip, unsafe, no runnable script, an
  invalid job name) is renamed `NAME.zip.failed`, with `NAME.zip.failed.txt` beside it saying
  why; the job as it was keeps running. A later good `NAME.zip` removes the `.failed` pair.
* A whole-site zip in `SITE/site/deployments/drop/` is a zipdeploy through the pipeline (record
  and log, deployer `drop`), consumed after (on failure kept as `.failed` + `.failed.txt` too).
  While another deployment holds the site lock it waits and tries again: that is no error.

When a dropped file is taken: once its writer is done and it is a zip. inotify's close-write
says the writer closed it; a file renamed in (`cp` to a temp name then `mv`, `PUT /api/vfs`, an
rsync), seen only by a sweep (present at start, an event lost) or created without an open (a
hard link) has no close to wait for: /proc says whether some process still holds it open for
writing (discovery's `files_written_under`). A file still open is never taken, however long it
has been quiet (an FTP upload that stalls mid-file): its close-write brings it back. Where /proc
cannot tell (a daemon that may not read every process's descriptors), a file is taken once it
has been quiet for the quiet period and reads as a complete zip, or once it has been quiet for
`OPEN_WRITE_CAP_S` (then a broken file fails). A file the daemon may not read, rename or
remove (the daemon's user does not own it, the folder is not writable) is logged with its name
and left as it is until it changes (inode, size, mtime or ctime): it is not deployed again at
every sweep.

Decisions:

* **Its own small watch, not the discovery watcher.** A watchdog observer with non-recursive
  watches on the two kind folders and the drop folder (three watches, whatever the number of
  jobs; watchdog's threads: one per watch and the observer's). A folder that does not exist
  yet is waited for by a watch on its nearest existing ancestor, which follows it down as
  folders appear (as the discovery watcher does for the jobs root), and the folder is swept for
  zips once watched. The observer is of the discovery watcher's kind
  (`discovery/batchobserver.py`): every job folder the daemon lists is an open and a close on
  a kind folder's watch, and it drops those as it reads them, in batches. The daemon creates
  none of the three: nothing inside wwwroot (`git clone` needs it absent or empty), and no drop
  folder among the deployment records (whoever drops makes it, `mkdir -p
  site/deployments/drop`). A sweep every rescan period catches what an event missed (a queue
  overflow). Discovery is not asked for anything and does not know of drops: data flows one
  way, the drop service writes a job folder (renamed into place in whole) and discovery sees
  it as any other arrival, starting or restarting the job once.
* **Poll mode (`watch: poll`): no watch, a sweep every `poll_interval_s`.** On shared storage
  (NFS, CephFS, EFS) another host's writes make no inotify event, so no observer is started
  (no inotify instance, no watchdog thread) and the sweep, every poll interval instead of every
  rescan period, is what finds a zip. A sweep costs three `scandir`s when nothing is dropped.
  No close-write is ever seen, and /proc sees writers on this host only: a file a local process
  holds open for writing is still never taken, and otherwise a file is taken once it has been
  quiet (by its mtime) for the quiet period *and* reads as a complete zip, as where /proc cannot
  tell. So a zip another host is still copying (its central directory, at the end, not written
  yet) waits, and is deployed at the first sweep after it is complete and quiet: pick-up within
  `poll_interval_s` + the quiet period. The price: a broken zip that will never be completed is
  failed only after `OPEN_WRITE_CAP_S` (15 minutes), not at once (no writer can be seen done).
* **Zips are not jobs.** The catalog takes only folders as jobs, so `*.zip`, `*.zip.failed` and
  `*.zip.failed.txt` files in a kind folder are never jobs nor job errors (a test holds it).
* **One drop at a time, in arrival order.** The service is one task. Every drop waits while a
  deployment (of any daemon on the site) holds the deployment lock, probed every
  `LOCKED_RETRY_S`: a site zip may carry the very job, and one site deployment runs at a time.
  A job drop does not take the lock itself, exactly as `PUT /api/{type}webjobs/NAME` does not.
* **Consumed only if unchanged.** The zip is removed (or renamed `.failed`) only if it is still
  the file that was deployed (same inode, size, mtime, ctime): a new version written meanwhile
  is deployed next, never deleted unseen. A kill between the deploy and the removal deploys the
  same zip again at the next start, which changes nothing (same content, same fingerprint).
* **A writer done with a broken zip fails it.** Once its writer has closed it (or /proc shows no
  writer), a file that does not read as a zip (an upload broken off, a truncated download) gets
  `.failed` at once: nothing will complete it, and a resumed upload appends to a file that is
  no longer the one its client thinks. Upload it again.
* Hidden files (`.x.zip`) are upload tools' temp names and are left alone, as are other files.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver, ObservedWatch

from webjobsd.deploy.jobpackage import deploy_job_package
from webjobsd.deploy.lock import deployment_in_progress
from webjobsd.deploy.pipeline import Deployments, DeployRequest
from webjobsd.deploy.records import DeployStatus
from webjobsd.discovery.batchobserver import BatchingInotifyObserver
from webjobsd.discovery.openwrites import OPEN_WRITE_CAP_S, files_written_under
from webjobsd.discovery.watcher import nearest_existing
from webjobsd.limits import UploadLimits
from webjobsd.model import INVALID_JOB_NAME, JobKey, JobKind, is_valid_job_name
from webjobsd.records.atomic import write_bytes_atomic
from webjobsd.refusal import Refusal
from webjobsd.site import SiteLayout

log = structlog.get_logger("webjobsd.deploy.drops")

ZIP_SUFFIX: Final = ".zip"
FAILED_SUFFIX: Final = ".failed"
REASON_SUFFIX: Final = ".failed.txt"
# While a deployment holds the site lock, a drop is looked at again this often.
LOCKED_RETRY_S: Final = 1.0
# Watches re-made in a row before giving up until the next sweep (folders appearing meanwhile).
_SYNC_ROUNDS: Final = 8

Identity = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns


class Changed(enum.Enum):
    """The dropped file is no longer the one that was deployed (a new version arrived)."""

    CHANGED = "changed"


CHANGED: Final = Changed.CHANGED


def is_drop_name(name: str) -> bool:
    """A file name the service takes: `*.zip`, not hidden (upload tools' temp names)."""
    return name.lower().endswith(ZIP_SUFFIX) and not name.startswith(".") and name != ZIP_SUFFIX


def failed_path(zip_path: Path) -> Path:
    return zip_path.with_name(zip_path.name + FAILED_SUFFIX)


def reason_path(zip_path: Path) -> Path:
    return zip_path.with_name(zip_path.name + REASON_SUFFIX)


def _identity(st: os.stat_result) -> Identity:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stat_identity(path: Path) -> Identity | None:
    """The file's identity, or None when no regular file is there (a link is no drop)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return _identity(st) if stat.S_ISREG(st.st_mode) else None


def is_complete_zip(path: Path) -> bool:
    """The file ends with a central directory zipfile can read (a half-written zip does not).
    Raises PermissionError when the file may not be read."""
    import zipfile  # on first use: see http/lazy.py's rule

    try:
        with zipfile.ZipFile(path):
            return True
    except PermissionError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError):
        return False


def reason_text(zip_name: str, target: DropTarget, reason: str) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if target.key is not None:
        consequence = f"Nothing was changed: job {target.key} is as it was."
    else:
        consequence = "The deployment's log says what was done (GET /api/deployments/ID/log)."
    return (
        f"{zip_name} could not be deployed to {target.what} ({now}):\n{reason}\n\n"
        f"{consequence} Drop a corrected {zip_name} to try again; once it deploys, this file "
        "and the .failed zip beside it are removed.\n"
    )


@dataclass(frozen=True, slots=True)
class DropTarget:
    """What a dropped file deploys: a job (its key, the name not checked yet) or the whole
    site (key None)."""

    key: JobKey | None

    @property
    def what(self) -> str:
        return f"job {self.key}" if self.key is not None else "the site"


@dataclass(slots=True)
class _Candidate:
    path: Path
    target: DropTarget
    due: float | None  # monotonic; None: wait for an event or the next sweep
    closed: bool = False  # a close-write of its writer was seen since it was last taken


class _Handler(FileSystemEventHandler):
    """On watchdog's thread: drop the reads, hand the rest to the loop."""

    def __init__(self, deliver: Callable[[str, str, str, bool], None]) -> None:
        self._deliver = deliver

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        dest = os.fsdecode(getattr(event, "dest_path", "") or "")
        self._deliver(event.event_type, os.fsdecode(event.src_path), dest, event.is_directory)


class _Watches:
    """The three watched folders, or the nearest existing ancestor of a missing one."""

    def __init__(self, folders: list[Path], handler: _Handler) -> None:
        self.folders = folders
        self._handler = handler
        self._observer: BaseObserver | None = None
        self._watched: dict[Path, tuple[int, ObservedWatch]] = {}
        # Asked to watch, but no observer could be made yet: `sync` tries again.
        self._start_failed = False

    def start(self) -> bool:
        """Make the observer. Out of descriptors or inotify instances (a flood of connections
        while the daemon starts, say) is no reason to stop: the drop folders are swept every
        rescan meanwhile, and each sweep tries again (False until then, said once)."""
        try:
            observer = BatchingInotifyObserver()
        except OSError as error:
            if not self._start_failed:
                log.warning(
                    "cannot watch the drop folders yet; sweeping them at every rescan until a "
                    "watch can be made",
                    error=str(error),
                )
            self._start_failed = True
            return False
        observer.daemon = True
        observer.start()
        self._observer = observer
        if self._start_failed:
            log.info("watching the drop folders")
        self._start_failed = False
        return True

    def wanted(self) -> dict[Path, int]:
        found: dict[Path, int] = {}
        for folder in self.folders:
            path = folder if folder.is_dir() else nearest_existing(folder.parent)
            with contextlib.suppress(OSError):
                found[path] = path.stat().st_ino
        return found

    def sync(self) -> set[Path]:
        """Watch what is wanted now; return the drop folders newly watched (to sweep)."""
        if self._observer is None and self._start_failed:
            self.start()
        observer = self._observer
        if observer is None:
            return set()
        newly: set[Path] = set()
        for _ in range(_SYNC_ROUNDS):
            wanted = self.wanted()
            current = {path: inode for path, (inode, _watch) in self._watched.items()}
            if wanted == current:
                break
            for path in [p for p in self._watched if wanted.get(p) != current[p]]:
                _inode, watch = self._watched.pop(path)
                with contextlib.suppress(KeyError, OSError):
                    observer.unschedule(watch)
            for path, inode in wanted.items():
                if path in self._watched:
                    continue
                try:
                    watch = observer.schedule(self._handler, str(path), recursive=False)
                except OSError as error:
                    log.warning("cannot watch folder", folder=str(path), error=str(error))
                    continue
                self._watched[path] = (inode, watch)
                if path in self.folders:
                    newly.add(path)
        return newly

    def stop(self) -> None:
        self._start_failed = False
        observer, self._observer = self._observer, None
        self._watched.clear()
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)


class DropService:
    """Watches the drop folders and deploys what is dropped there, one file at a time."""

    def __init__(
        self,
        layout: SiteLayout,
        limits: UploadLimits,
        *,
        quiet_s: float,
        rescan_s: float,
        polling: bool = False,
        deployments: Deployments | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`rescan_s`: the period of the sweep; `polling`: poll mode, no watch, the sweep is
        the only source of events (see the module docstring)."""
        self.layout = layout
        self.polling = polling
        self.deployments = deployments
        self.limits = limits
        self.quiet_s = quiet_s
        self.rescan_s = rescan_s
        self._clock = clock
        self._kind_dirs = {layout.kind_dir(kind): kind for kind in JobKind}
        self._drop_dir = layout.deployments_drop_dir
        self._candidates: dict[Path, _Candidate] = {}
        # Files left as they are (unreadable, not removable) until they change.
        self._left: dict[Path, Identity] = {}
        self._wake = asyncio.Event()
        self._next_sweep = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watches = _Watches([*self._kind_dirs, self._drop_dir], _Handler(self._from_thread))
        self.deployed = 0  # drops deployed (jobs and sites)
        self.looked = 0  # looks at a dropped file (whether its writer is done, and so on)
        self.resyncs = 0  # events that had the watched folders looked at again
        self._in_pass = False
        self._closing = False

    # -- noticing ----------------------------------------------------------------------------

    def start(self) -> None:
        """Watch, and sweep everything at the first turn of `run`."""
        self._loop = asyncio.get_running_loop()
        if not self.polling:
            self._watches.start()
            self._watches.sync()
        self._next_sweep = self._clock()

    async def close(self) -> None:
        """At shutdown: no more watches made (events still arriving are ignored), then the
        watch thread ends."""
        self._closing = True
        await asyncio.to_thread(self._watches.stop)

    def _from_thread(self, kind: str, src: str, dest: str, is_directory: bool) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(self._event, kind, src, dest, is_directory)

    def target_of(self, path: Path) -> DropTarget | None:
        """What a file at `path` would deploy, or None when it is no drop."""
        if not is_drop_name(path.name):
            return None
        if path.parent == self._drop_dir:
            return DropTarget(None)
        kind = self._kind_dirs.get(path.parent)
        if kind is None:
            return None
        name = path.name[: -len(ZIP_SUFFIX)]
        return DropTarget(JobKey(kind, name))

    def _event(self, kind: str, src: str, dest: str, is_directory: bool) -> None:
        now = self._clock()
        if kind == "modified" and is_directory and Path(src) in self._watches.folders:
            # A drop folder's own timestamp, changed by every entry added or removed (a job
            # folder renamed in): which folders to watch is the same. An ancestor watched in
            # place of a missing folder is another matter: its change may be that folder made.
            return
        watched = set(self._watches.folders)
        for path_text in (src, dest):
            if not path_text:
                continue
            path = Path(path_text)
            if path in watched or path.parent not in watched:
                # A watched folder itself, or something in an ancestor watched while a folder
                # is missing: the folders to watch may have changed.
                self._resync()
                return
        if is_directory:
            return
        if kind == "closed":
            self._note(Path(src), now, closed=True)
        elif kind == "created":
            # Its close-write normally comes first; a hard link has none.
            self._note(Path(src), now + self.quiet_s)
        elif kind == "moved":
            if src:
                self._candidates.pop(Path(src), None)
            if dest:
                self._note(Path(dest), now)
        elif kind == "deleted":
            self._candidates.pop(Path(src), None)

    def _note(self, path: Path, due: float, *, closed: bool = False) -> None:
        target = self.target_of(path)
        if target is None:
            return
        known = self._candidates.get(path)
        if known is None:
            self._candidates[path] = _Candidate(path, target, due, closed)
        else:
            known.closed = known.closed or closed
            known.due = due if known.due is None else min(known.due, due)
        self._wake.set()

    def _resync(self) -> None:
        if self._closing:
            return
        self.resyncs += 1
        for folder in self._watches.sync():
            self._sweep_folder(folder)

    def _sweep_folder(self, folder: Path) -> None:
        now = self._clock()
        try:
            with os.scandir(folder) as entries:
                names = [e.name for e in entries if e.is_file(follow_symlinks=False)]
        except OSError:
            return
        for name in names:
            # Known ones too: a file waiting for its close-write is asked about again, in case
            # the event was lost.
            self._note(folder / name, now)

    def sweep(self) -> None:
        """Look at every watched folder (start, the periodic rescan, missed events)."""
        self._next_sweep = self._clock() + self.rescan_s
        try:
            self._resync()
        except Exception:
            # The sweep does not need the watches: without them drops wait for the next one.
            log.exception("cannot renew the drop folders' watches; sweeping them anyway")
        for folder in self._watches.folders:
            self._sweep_folder(folder)  # a missing folder is simply empty

    # -- acting ------------------------------------------------------------------------------

    def _timeout(self) -> float:
        now = self._clock()
        deadline = self._next_sweep
        for candidate in self._candidates.values():
            if candidate.due is not None:
                deadline = min(deadline, candidate.due)
        return max(deadline - now, 0.0)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._timeout())
            self._wake.clear()
            self._in_pass = True
            try:
                if self._clock() >= self._next_sweep:
                    self.sweep()
                await self._act_on_due()
            except Exception:
                # One odd file must not end the service for every later drop.
                log.exception("drop pass failed; trying again at the next sweep")
            finally:
                self._in_pass = False

    def idle(self) -> bool:
        """No pass running and nothing due now (files waiting for their writer are not due)."""
        now = self._clock()
        return not self._in_pass and not any(
            c.due is not None and c.due <= now for c in self._candidates.values()
        )

    async def _act_on_due(self) -> None:
        now = self._clock()
        due = sorted(
            (c for c in self._candidates.values() if c.due is not None and c.due <= now),
            key=lambda c: (c.due, str(c.path)),
        )
        for candidate in due:
            if self._candidates.get(candidate.path) is not candidate:
                continue  # gone or replaced meanwhile
            try:
                await self._consider(candidate)
            except Exception:
                # Not looked at again at once (that would spin): at its next event or sweep.
                candidate.due = None
                log.exception(
                    "cannot handle a dropped zip; trying again at the next sweep",
                    file=str(candidate.path),
                )

    async def _consider(self, candidate: _Candidate) -> None:
        path = candidate.path
        self.looked += 1
        identity = await asyncio.to_thread(_stat_identity, path)
        if identity is None:
            self._candidates.pop(path, None)
            self._left.pop(path, None)
            return
        if self._left.get(path) == identity:
            candidate.due = None
            return
        self._left.pop(path, None)
        if await asyncio.to_thread(deployment_in_progress, self.layout):
            # A site zip may carry the very job, and only one deployment runs at a time: wait
            # (a probe of the lock, cheaper than asking /proc every time).
            candidate.due = self._clock() + LOCKED_RETRY_S
            return
        ready, due = await asyncio.to_thread(self._readiness, path, identity, candidate.closed)
        if not ready:
            candidate.due = due
            return
        if await asyncio.to_thread(_stat_identity, path) != identity:
            # Its writer was still at it while it was looked at: look again.
            candidate.due = self._clock()
            return
        candidate.closed = False
        candidate.due = None
        done = await self._deploy(candidate, identity)
        if done and self._candidates.get(path) is candidate and candidate.due is None:
            self._candidates.pop(path, None)

    def _readiness(self, path: Path, identity: Identity, closed: bool) -> tuple[bool, float | None]:
        """In a thread: whether the writer is done. (ready, when to look again if not)."""
        real = os.path.realpath(path)
        writers = files_written_under(Path(os.path.dirname(real)))
        if writers is not None and real in writers:
            # Open for writing: its close-write (or the next sweep) brings it back.
            return (False, None)
        if not self.polling and (writers is not None or closed):
            return (True, None)
        # Poll mode (a writer on another host is invisible to /proc, and no close-write is
        # seen), or /proc cannot tell: quiet and complete.
        age_s = time.time() - identity[2] / 1e9
        if age_s < self.quiet_s:
            return (False, self._clock() + self.quiet_s - age_s)
        try:
            complete = is_complete_zip(path)
        except PermissionError:
            return (True, None)  # the deploy says so, with the file's name
        return (complete or age_s >= OPEN_WRITE_CAP_S, None)

    async def _deploy(self, candidate: _Candidate, identity: Identity) -> bool:
        """Deploy one ready file; True when it is dealt with (consumed, failed or left)."""
        path, target = candidate.path, candidate.target
        try:
            await asyncio.to_thread(_check_readable, path)
        except OSError as error:
            self._leave(path, identity, "cannot read the dropped zip", error)
            return True
        if target.key is None:
            return await self._deploy_site(candidate, identity)
        key = target.key
        log.info("deploying a dropped zip", file=str(path), job=str(key))
        try:
            if not is_valid_job_name(key.name):
                raise Refusal(400, INVALID_JOB_NAME)
            await asyncio.to_thread(
                deploy_job_package, self.layout, self.limits, key, path, True, path.name
            )
        except Refusal as refusal:
            await self._fail(path, identity, target, refusal.message)
            return True
        except OSError as error:
            # Disk full, a folder not writable, a race with an API deploy of the same job:
            # nothing changed, the file stays and is tried again at the next sweep.
            log.error(
                "cannot deploy a dropped zip; trying again at the next sweep",
                file=str(path),
                job=str(key),
                error=str(error),
            )
            return True
        self.deployed += 1
        log.info("deployed a dropped zip", file=str(path), job=str(key))
        await self._consume(path, identity)
        return True

    async def _deploy_site(self, candidate: _Candidate, identity: Identity) -> bool:
        """A zipdeploy through the pipeline: its record and log, deployer `drop`."""
        path, deployments = candidate.path, self.deployments
        if deployments is None:
            self._left[path] = identity
            log.error("no deployments in this daemon; the dropped site zip is left", file=str(path))
            return True
        request = DeployRequest(deployer="drop", message=f"Dropped {path.name}")
        try:
            deployment = await deployments.begin(request)
        except Refusal as refusal:
            # Another deployment holds the site lock (409): try again soon, no error. The daemon
            # is stopping (503): the next start takes it.
            candidate.due = self._clock() + LOCKED_RETRY_S if refusal.status == 409 else None
            return False
        log.info("deploying a dropped site zip", file=str(path), deployment=deployment.record.id)
        # Owned by the deployments (a stopping daemon waits for it, bounded), not by this task.
        record = await asyncio.shield(
            deployments.run(deployment, lambda: deployment.deploy_zip(path))
        )
        if record is None:
            return True  # abandoned at shutdown: the zip stays for the next start
        if record.status is DeployStatus.SUCCESS:
            self.deployed += 1
            log.info("deployed a dropped site zip", file=str(path), deployment=record.id)
            await self._consume(path, identity)
        else:
            reason = deployment.error or record.status_text or "The deployment failed."
            await self._fail(
                path, identity, candidate.target, f"{reason}\n(deployment {record.id})"
            )
        return True

    # -- consuming ---------------------------------------------------------------------------

    async def _consume(self, path: Path, identity: Identity) -> None:
        """Remove the deployed zip (if unchanged) and an older `.failed` pair."""
        problem = await asyncio.to_thread(_remove_consumed, path, identity)
        if problem is CHANGED:
            log.info("a dropped zip changed while it was deployed; looking again", file=str(path))
            self._note(path, self._clock())
        elif isinstance(problem, OSError):
            self._leave(path, identity, "deployed, but cannot remove the dropped zip", problem)

    async def _fail(self, path: Path, identity: Identity, target: DropTarget, reason: str) -> None:
        log.warning(
            "a dropped zip cannot be deployed; renamed .failed",
            file=str(path),
            target=target.what,
            reason=reason,
        )
        problem = await asyncio.to_thread(_mark_failed, path, identity, target, reason)
        if problem is CHANGED:
            log.info("a dropped zip changed while it was deployed; looking again", file=str(path))
            self._note(path, self._clock())
        elif isinstance(problem, OSError):
            self._leave(path, identity, "cannot rename the failed drop", problem)

    def _leave(self, path: Path, identity: Identity, problem: str, error: OSError) -> None:
        """Leave a file as it is until it changes, with one line naming it."""
        self._left[path] = identity
        log.error(
            problem + "; left as it is until it changes",
            file=str(path),
            error=error.strerror or str(error),
        )


def _check_readable(path: Path) -> None:
    with open(path, "rb"):
        pass


def _remove_consumed(path: Path, identity: Identity) -> OSError | Changed | None:
    """Blocking: remove the deployed zip (if unchanged) and an older `.failed` pair; the error
    when the zip may not be removed, CHANGED when it is no longer the file deployed."""
    if _stat_identity(path) != identity:
        return CHANGED
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        return error
    for stale in (failed_path(path), reason_path(path)):
        try:
            stale.unlink(missing_ok=True)
        except OSError as error:
            log.warning("cannot remove an older failed drop", file=str(stale), error=str(error))
    return None


def _mark_failed(
    path: Path, identity: Identity, target: DropTarget, reason: str
) -> OSError | Changed | None:
    """Blocking: `NAME.zip.failed.txt` says why, then the zip becomes `NAME.zip.failed`; the
    error when that may not be done, CHANGED when it is no longer the file that failed."""
    if _stat_identity(path) != identity:
        return CHANGED
    try:
        write_bytes_atomic(reason_path(path), reason_text(path.name, target, reason).encode())
    except OSError as error:
        return error
    try:
        os.replace(path, failed_path(path))
    except OSError as error:
        # No reason beside a zip that is not `.failed` (the log has it).
        with contextlib.suppress(OSError):
            reason_path(path).unlink()
        return error
    return None
