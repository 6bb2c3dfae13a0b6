"""One deployment of the site, from the lock to the last status write (Part A #2-#9).

`Deployments` (one per daemon) starts deployments; a `Deployment` is one of them, holding the
site-wide deployment lock from `begin` to `finish`. Every source goes through it: zipdeploy,
OneDeploy and wardeploy (`http/zipdeploy.py`), a git push (`deploy/git.py`), a dropped site zip
(`deploy/drops.py`). The steps, as Kudu takes them (Part B §1.5):

1. `begin`: the lock with zero wait (409 `IN_PROGRESS` otherwise), then the Pending record
   ("Receiving changes."), before the caller answers anything: a client that polls
   `deployments/latest` at once must see this deployment, not the previous one.
2. `deploy_zip` extracts the package (`deploy.archive.extract_zip`, its guards) into a folder of
   the daemon's temp root, never into wwwroot, then `deploy_folder` syncs it: status Building,
   KuduSync's rules with the manifests, job folders swapped whole (`deploy.sync`).
3. `finish`: PostDeploymentActions after a success (`deploy.postactions`; a failing one fails the
   deployment), Success or Failed, the active deployment, retention, the lock released.
   `discard` instead ends a deployment that found nothing to deploy (its temp record goes).

Decisions:

* **Manifests** (Part B §1.5.6, §2.3): the previous manifest is the active deployment's, read at
  `begin` (a same-id redeploy may replace that record), else `SITE/site/firstDeploymentManifest`,
  else the built-in one (`hostingstart.html`). A sync into wwwroot with `manifest=True`
  (zipdeploy, git, a dropped zip) deletes what the previous manifest lists and writes the next
  one. Any other sync (OneDeploy, wardeploy, a target below wwwroot) deletes only when `clean`
  and copies the previous manifest unchanged, as Kudu's OneDeployBuilder does, so a later
  zipdeploy never deletes what OneDeploy placed.
* **Logs**: Kudu's lines ("Fetching changes.", "Cleaning up temp folders from previous zip
  deployments and extracting pushed zip file ...", "Running deployment command...",
  "Running post deployment command(s)...", "Deployment successful." / "Deployment Failed.");
  the sync's progress and each action's output are children of their step. A top-level line is
  the record's `progress`. `log` may be called from a worker thread (the sync's progress is).
* **Failure**: `deploy_*` log the reason as an Error entry and raise (`DeploymentFailed`, or the
  archive's `Refusal` as it is, so a synchronous request answers 400/413); the caller then calls
  `finish(reason)`. A failure never leaves half a job folder: jobs change by whole-folder swaps.
* **Background work** (`run`): a deployment the request does not wait for (async), or waits for
  without owning (sync: a client that disconnects must not cancel a half-done sync), runs as a
  task owned by `Deployments`. A daemon that stops waits for it, bounded by
  `SHUTDOWN_WAIT_S`; past that the task is cancelled without `finish`, so the lock stays held
  until the process exits, and the next start marks the record Failed (`repair_unfinished`).
* **A killed daemon**: the extraction folder is in this instance's temp root (cleaned at start);
  the sync's temporary files in wwwroot are named in a marker file (`sync_marker_path`) while it
  runs, and removed at the next start (`clean_after_kill`); half-built job folders are in this
  instance's staging folder, which `deploy.staging.clean_after_kill` already cleans.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from webjobsd.deploy.lock import IN_PROGRESS, DeploymentLock, deployment_in_progress
from webjobsd.deploy.postactions import ACTION_TIMEOUT_S, find_actions, run_action
from webjobsd.deploy.records import (
    DeploymentRecord,
    DeploymentStore,
    LogType,
    is_valid_deployment_id,
)
from webjobsd.deploy.staging import Staging
from webjobsd.deploy.sync import (
    SyncError,
    first_deployment_manifest,
    read_manifest,
    remove_sync_leftovers,
    sync_tree,
    write_manifest,
)
from webjobsd.limits import UploadLimits
from webjobsd.refusal import Refusal
from webjobsd.runtime.environment import without_daemon_secrets
from webjobsd.site import SiteLayout

log = structlog.get_logger("webjobsd.deploy.pipeline")

SHUTDOWN_WAIT_S: Final = 30.0
_MAX_REPLAYED_LINES: Final = 10_000
_MB: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class DeployRequest:
    deployer: str
    message: str = "Created via a push deployment"
    author: str = "N/A"
    author_email: str = "N/A"
    id: str | None = None  # None: a new 32-hex id (trackDeploymentProgress: a dashed uuid)
    temp: bool = False  # a temp-xxxxxxxx record until adopt_id (git: the sha is known later)
    restart: bool = True  # run PostDeploymentActions after a success


class DeploymentFailed(Exception):
    """A deployment step failed after the deployment was accepted; the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def sync_marker_path(layout: SiteLayout) -> Path:
    """Present while a sync writes into the site (see the module docstring)."""
    return layout.deployments_lock_path.with_name("deployments.sync.json")


class Deployments:
    """The deployments of this daemon's site; one per daemon (`ApiContext.deployments`)."""

    def __init__(
        self,
        layout: SiteLayout,
        store: DeploymentStore,
        *,
        app_settings: Callable[[], Mapping[str, str]],
        limits: UploadLimits,
        temp_dir: Path,
        environ: Mapping[str, str] | None = None,
        action_timeout_s: float = ACTION_TIMEOUT_S,
    ) -> None:
        self.layout = layout
        self.store = store
        self.app_settings = app_settings
        self.limits = limits
        self.temp_dir = temp_dir
        self.environ = dict(os.environ if environ is None else environ)
        self.action_timeout_s = action_timeout_s
        self.current: Deployment | None = None
        self._tasks: set[asyncio.Task[DeploymentRecord | None]] = set()
        self._closing = False

    @property
    def closing(self) -> bool:
        """The daemon stops: no new deployment begins (503)."""
        return self._closing

    def is_deploying(self) -> bool:
        """A deployment runs on this site, here or in another daemon sharing it."""
        return self.current is not None or deployment_in_progress(self.layout)

    async def begin(self, request: DeployRequest) -> Deployment:
        """The lock (Refusal 409 when taken) and the Pending record, before any answer."""
        if self._closing:
            raise Refusal(503, "The daemon is stopping; try again when it is back.")
        if request.id is not None and not is_valid_deployment_id(request.id):
            raise Refusal(400, f"'{request.id}' is not a valid deployment id.")
        lock = DeploymentLock(self.layout)
        owner = {
            "Operation": "deployment",
            "Deployer": request.deployer,
            "InstanceId": self.layout.instance_id,
            "Pid": os.getpid(),
        }
        if not await asyncio.to_thread(lock.try_acquire, owner):
            raise Refusal(409, IN_PROGRESS)
        try:
            record, previous = await asyncio.to_thread(self._open_record, request)
        except BaseException:
            lock.release()
            raise
        deployment = Deployment(self, record, lock, previous, request)
        self.current = deployment
        log.info("deployment begins", deployment=record.id, deployer=record.deployer)
        return deployment

    def _open_record(self, request: DeployRequest) -> tuple[DeploymentRecord, frozenset[str]]:
        previous = self.previous_manifest()
        store = self.store
        if request.id is not None:
            record_id = request.id
        else:
            record_id = store.new_temp_id() if request.temp else store.new_id()
        existing = store.get(record_id)
        if existing is not None:  # the same id again (a redeploy): a fresh record
            store.delete(record_id)
        record = store.create(
            id=record_id,
            deployer=request.deployer,
            message=request.message,
            author=request.author,
            author_email=request.author_email,
            is_temp=request.temp,
        )
        if existing is not None and existing.last_success_end_time is not None:
            record.last_success_end_time = existing.last_success_end_time
            store.save(record)
        return record, previous

    def previous_manifest(self) -> frozenset[str]:
        """The active deployment's manifest, else the first-deployment one (Part B §1.5.6)."""
        active = self.store.active_id()
        if active is not None:
            found = read_manifest(self.store.manifest_path(active))
            if found is not None:
                return frozenset(found)
        return frozenset(first_deployment_manifest(self.layout.site_root))

    def run(
        self, deployment: Deployment, work: Callable[[], Awaitable[None]]
    ) -> asyncio.Task[DeploymentRecord | None]:
        """`work` then `finish` (with the failure's reason, if any), as a task owned here."""
        task = asyncio.create_task(
            self._run(deployment, work), name=f"deployment-{deployment.record.id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(
        self, deployment: Deployment, work: Callable[[], Awaitable[None]]
    ) -> DeploymentRecord | None:
        try:
            await work()
        except asyncio.CancelledError:
            # The daemon stops and would not wait longer: no `finish` while a sync thread may
            # still write; the lock goes with the process, the next start repairs the record.
            log.warning("deployment abandoned at shutdown", deployment=deployment.record.id)
            raise
        except (Refusal, DeploymentFailed) as error:
            return await deployment.finish(error.message)
        except Exception as error:
            log.exception("deployment failed unexpectedly", deployment=deployment.record.id)
            return await deployment.finish(f"Unexpected error: {error!r}")
        return await deployment.finish()

    async def close(self, timeout_s: float = SHUTDOWN_WAIT_S) -> None:
        """At shutdown: no new deployment; the running one gets `timeout_s` to end."""
        self._closing = True
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            log.warning(
                "a deployment still runs at shutdown; the next start marks it failed",
                task=task.get_name(),
            )
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def clean_after_kill(self) -> None:
        """At start, before the API listens: what a killed deployment of this daemon left in
        its temp root, and a killed sync's temporary files in the site (when no deployment
        runs, as the lock proves). Blocking."""
        if self.temp_dir.is_dir():
            for entry in sorted(self.temp_dir.iterdir()):
                _remove(entry)
                log.info("removed what a killed deployment left", path=str(entry))
        marker = sync_marker_path(self.layout)
        if not marker.exists():
            return
        lock = DeploymentLock(self.layout)
        if not lock.try_acquire({"Operation": "cleaning after a killed sync"}):
            return
        try:
            try:
                target = Path(json.loads(marker.read_text())["target"])
            except (OSError, ValueError, KeyError, TypeError):
                target = self.layout.wwwroot
            removed = remove_sync_leftovers(target)
            log.warning(
                "a sync was killed; its temporary files are removed",
                target=str(target),
                files=removed,
            )
            marker.unlink(missing_ok=True)
        finally:
            lock.release()


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


class Deployment:
    """One running deployment; holds the site's deployment lock until `finish`."""

    def __init__(
        self,
        owner: Deployments,
        record: DeploymentRecord,
        lock: DeploymentLock,
        previous: frozenset[str],
        request: DeployRequest,
    ) -> None:
        self.record = record
        self.request = request
        self.error: str | None = None
        self._owner = owner
        self._store = owner.store
        self._layout = owner.layout
        self._lock = lock
        self._previous = previous
        self._loop = asyncio.get_running_loop()
        self._guard = threading.Lock()  # the record and its folder, between threads
        self._lines: list[str] = []
        self._subscribers: set[asyncio.Queue[str | None]] = set()
        self._logged_errors: set[str] = set()
        self._finished: DeploymentRecord | None = None

    # -- the log -----------------------------------------------------------------------------

    def log(self, message: str, type: LogType = LogType.MESSAGE, parent: str | None = None) -> str:
        """Append to the deployment's log (a top-level line becomes its `progress`); returns
        the entry's id. Blocking (a small append); safe from a worker thread."""
        with self._guard:
            entry = self._store.log(self.record.id).add(message, type, parent)
            if type == LogType.ERROR:
                self._logged_errors.add(message)
            if parent is None:
                self.record.progress = message
                self._store.save(self.record)
        self._loop.call_soon_threadsafe(self._publish, message)
        return entry

    async def _step(self, message: str) -> str:
        return await asyncio.to_thread(self.log, message)

    def _publish(self, line: str | None) -> None:
        if line is not None and len(self._lines) < _MAX_REPLAYED_LINES:
            self._lines.append(line)
        for queue in self._subscribers:
            queue.put_nowait(line)

    async def subscribe(self) -> AsyncIterator[str]:
        """Every log line, from the first one, as it is written; ends with the deployment."""
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        for earlier in self._lines:
            queue.put_nowait(earlier)
        if self._finished is not None:
            queue.put_nowait(None)
        else:
            self._subscribers.add(queue)
        try:
            while (line := await queue.get()) is not None:
                yield line
        finally:
            self._subscribers.discard(queue)

    # -- the record --------------------------------------------------------------------------

    def _save(self) -> None:
        with self._guard:
            self._store.save(self.record)

    async def adopt_id(self, id: str, *, author: str, author_email: str, message: str) -> None:
        """Give the (temp) record its real id, e.g. a pushed commit's sha; a record of that id
        from before is replaced."""
        if not is_valid_deployment_id(id):
            raise ValueError(f"not a deployment id: {id!r}")
        await asyncio.to_thread(self._adopt, id, author, author_email, message)

    def _adopt(self, new_id: str, author: str, author_email: str, message: str) -> None:
        store = self._store
        with self._guard:
            record = self.record
            if new_id != record.id:
                existing = store.get(new_id)
                if existing is not None:
                    store.delete(new_id)
                    record.last_success_end_time = existing.last_success_end_time
                os.rename(store.manifest_path(record.id).parent, store.manifest_path(new_id).parent)
                record.id = new_id
            record.author = author or "N/A"
            record.author_email = author_email or "N/A"
            record.message = message
            record.is_temp = False
            store.save(record)

    # -- the work ----------------------------------------------------------------------------

    async def deploy_zip(
        self,
        archive: Path,
        *,
        target: Path | None = None,
        clean: bool = False,
        manifest: bool = True,
    ) -> None:
        """Extract `archive` into the temp root (the archive guards apply), then
        `deploy_folder`. A refused archive raises its `Refusal` (400/413), logged."""
        self._check_open()
        await self._step("Fetching changes.")
        temp_dir = self._owner.temp_dir
        work = temp_dir / f"zipdeploy-{self.record.id}"
        extracted = work / "extracted"
        size = (await asyncio.to_thread(archive.stat)).st_size
        await self._step(
            "Cleaning up temp folders from previous zip deployments and extracting pushed zip "
            f"file {archive.name} ({size / _MB:.2f} MB) to {extracted}"
        )
        # Imported on first use (zipfile with it): see http/lazy.py's rule.
        from webjobsd.deploy.archive import extract_zip

        try:
            await asyncio.to_thread(_fresh_folder, temp_dir, extracted)
            try:
                await asyncio.to_thread(extract_zip, archive, extracted, self._owner.limits)
            except Refusal as refusal:
                await asyncio.to_thread(self.log, refusal.message, LogType.ERROR)
                self.error = refusal.message
                raise
            except OSError as error:
                failure = await self._failed(f"Extracting the zip file failed: {_describe(error)}")
                raise failure from error
            await self.deploy_folder(extracted, target=target, clean=clean, manifest=manifest)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def deploy_folder(
        self,
        source: Path,
        *,
        target: Path | None = None,
        clean: bool = False,
        manifest: bool = True,
    ) -> None:
        """KuduSync `source` into `target` (default wwwroot); job folders swapped whole."""
        self._check_open()
        layout = self._layout
        destination = (target or layout.wwwroot).absolute()
        use_manifest = manifest and destination == layout.wwwroot.absolute()
        previous = None if clean else (self._previous if use_manifest else frozenset())
        self.record.mark_building()
        await asyncio.to_thread(self._save)
        parent = await self._step("Running deployment command...")
        marker = sync_marker_path(layout)
        await asyncio.to_thread(
            _write_marker, marker, {"deployment": self.record.id, "target": str(destination)}
        )
        try:
            result = await asyncio.to_thread(
                sync_tree,
                source,
                destination,
                jobs_root=layout.jobs_root,
                staging=Staging.of(layout),
                previous=previous,
                progress=lambda line: self.log(line, parent=parent),
            )
        except (SyncError, OSError) as error:
            failure = await self._failed(f"The sync into {destination} failed: {_describe(error)}")
            raise failure from error
        finally:
            await asyncio.to_thread(marker.unlink, True)
        next_manifest = result.manifest if use_manifest else sorted(self._previous)
        await asyncio.to_thread(
            write_manifest, self._store.manifest_path(self.record.id), next_manifest
        )
        record = self.record
        record.changed_jobs = _merged(record.changed_jobs, result.changed_jobs)
        record.removed_jobs = _merged(record.removed_jobs, result.removed_jobs)
        summary = f"Copied {result.copied} files, deleted {result.deleted}."
        if result.changed_jobs:
            summary += " Job folders replaced: " + ", ".join(result.changed_jobs) + "."
        if result.removed_jobs:
            summary += " Job folders removed: " + ", ".join(result.removed_jobs) + "."
        await asyncio.to_thread(self.log, summary, LogType.MESSAGE, parent)
        await asyncio.to_thread(self._save)

    async def _failed(self, message: str) -> DeploymentFailed:
        await asyncio.to_thread(self.log, message, LogType.ERROR)
        self.error = message
        return DeploymentFailed(message)

    def _check_open(self) -> None:
        if self._finished is not None:
            raise RuntimeError(f"deployment {self.record.id} is finished")

    # -- the end -----------------------------------------------------------------------------

    async def finish(self, error: str | None = None) -> DeploymentRecord:
        """PostDeploymentActions (on success, if `restart`), Success or Failed, the active
        deployment, retention, the lock released. Idempotent."""
        if self._finished is not None:
            return self._finished
        record = self.record
        try:
            if error is None and self.request.restart:
                error = await self._post_deployment_actions()
            if error is not None:
                self.error = error
                if error not in self._logged_errors:
                    await asyncio.to_thread(self.log, error, LogType.ERROR)
                await self._step("Deployment Failed.")
                record.mark_failed()
            else:
                await self._step("Deployment successful.")
                record.mark_success()
            await asyncio.to_thread(self._close_record, error is None)
        finally:
            self._lock.release()
            self._finished = record
            if self._owner.current is self:
                self._owner.current = None
            self._loop.call_soon_threadsafe(self._publish, None)
        log.info(
            "deployment finished",
            deployment=record.id,
            status=record.status.name,
            changed_jobs=record.changed_jobs,
            removed_jobs=record.removed_jobs,
            error=error,
        )
        return record

    async def discard(self) -> None:
        """Nothing to deploy after all (a git push that moved no deployment branch): the temp
        record goes, as Kudu's temporary deployment always does, and the lock is released."""
        if self._finished is not None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(self._store.delete, self.record.id)
        finally:
            self._lock.release()
            self._finished = self.record
            if self._owner.current is self:
                self._owner.current = None
            self._loop.call_soon_threadsafe(self._publish, None)

    def _close_record(self, success: bool) -> None:
        store = self._store
        self._save()
        if success:
            store.set_active(self.record.id)
            # Kudu deletes it once a deployment succeeded (the active manifest takes over).
            (self._layout.site_root / "site" / "firstDeploymentManifest").unlink(missing_ok=True)
        try:
            store.purge()
        except OSError as error:
            log.warning("purging old deployment records failed", error=str(error))

    async def _post_deployment_actions(self) -> str | None:
        layout = self._layout
        actions, skipped = await asyncio.to_thread(find_actions, layout.post_deployment_actions_dir)
        if not actions and not skipped:
            return None
        parent = await self._step("Running post deployment command(s)...")
        for name in skipped:
            await asyncio.to_thread(
                self.log, f"Skipped '{name}': not executable.", LogType.WARNING, parent
            )
        environ = without_daemon_secrets(self._owner.environ)
        environ.update(self._owner.app_settings())
        environ.update(
            {
                "DEPLOYMENT_ID": self.record.id,
                "DEPLOYMENT_TARGET": str(layout.wwwroot),
                "WEBROOT_PATH": str(layout.wwwroot),
            }
        )
        for action in actions:
            await asyncio.to_thread(self.log, f"Running '{action.name}'.", LogType.MESSAGE, parent)
            failure = await run_action(
                action,
                cwd=layout.wwwroot,
                environ=environ,
                timeout_s=self._owner.action_timeout_s,
                emit=lambda line, _error: self.log(line, LogType.MESSAGE, parent),
            )
            if failure is not None:
                return failure
        return None


def _fresh_folder(temp_dir: Path, folder: Path) -> None:
    """Kudu's "cleaning up temp folders from previous zip deployments": everything else in the
    temp folder goes (one deployment at a time per site; the folder is this instance's)."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    for entry in temp_dir.iterdir():
        if entry != folder.parent:
            _remove(entry)
    if folder.exists():
        _remove(folder)
    folder.mkdir(parents=True, mode=0o700)


def _write_marker(path: Path, content: Mapping[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(dict(content)))
    os.replace(temp, path)


def _merged(old: list[str], new: list[str]) -> list[str]:
    return old + [item for item in new if item not in old]


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error)
