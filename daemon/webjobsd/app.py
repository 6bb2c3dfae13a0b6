"""The composition root: builds every part, starts named guarded tasks, handles signals, and
orders shutdown. No other module creates long-lived tasks or installs signal handlers.

Start-up order matters: take the instance lock (one live daemon per instance id and site), end what
a previous life left behind, scan, and only then start anything. Shutdown runs the stop ladder of
every job concurrently; a second SIGTERM/SIGINT forces (SIGKILL at once), and a deadline derived
from the largest `stopping_wait_time` forces too, so shutdown always ends within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import shutil
import signal
import sys
import time
from collections.abc import Coroutine, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from webjobsd import __version__
from webjobsd.config import AppSettings, ConfigError, DaemonConfig, load_config, parse_listen
from webjobsd.deploy.drops import DropService
from webjobsd.deploy.pipeline import Deployments
from webjobsd.deploy.records import DeploymentStore
from webjobsd.deploy.staging import clean_after_kill
from webjobsd.discovery.catalog import Catalog
from webjobsd.discovery.service import DiscoveryService
from webjobsd.discovery.watcher import Debouncer, JobsWatcher, hint_for_path, queue_shortfall
from webjobsd.http.auth import Credentials, basic_auth_middleware, load_credentials
from webjobsd.http.context import ApiContext
from webjobsd.http.hooks import add_hook_routes
from webjobsd.http.listener import ConnectionLimits
from webjobsd.http.metrics import MetricsSource, add_metrics_route, build_metrics
from webjobsd.http.server import UNAUTHENTICATED_PATHS, HttpServer, build_app
from webjobsd.http.tls import ServerTls, TlsError, load_server_tls
from webjobsd.limits import UploadLimits
from webjobsd.logs import configure_logging
from webjobsd.malloc import release_free_memory, tune_malloc
from webjobsd.model import ContinuousStatus, JobKey, JobKind, JobSpec
from webjobsd.notify import SystemdNotifier, heartbeat_is_recent, watchdog_loop
from webjobsd.records.lockcheck import LockCheck, check_site_locks
from webjobsd.records.lockprobe import is_locked_by_other
from webjobsd.records.logtail import LogWakeups
from webjobsd.records.runstore import RunRecord, RunStore
from webjobsd.records.status import read_status_file, write_continuous_status
from webjobsd.runtime.environment import owner_marker
from webjobsd.runtime.heaprelease import QuietRelease
from webjobsd.runtime.leftovers import end_leftovers
from webjobsd.runtime.locks import FileLock
from webjobsd.runtime.procrecords import ProcessRecords
from webjobsd.runtime.reconciler import Reconciler
from webjobsd.runtime.runas import RunAsError, reclaim_data_folders, resolve_run_as
from webjobsd.runtime.scheduler import MAX_SLEEP_S as SCHEDULER_MAX_SLEEP_S
from webjobsd.runtime.scheduler import Scheduler
from webjobsd.runtime.supervisor import FORCED_STOP_BOUND_S, Supervisor, SupervisorContext
from webjobsd.runtime.triggered import SHUTDOWN_LADDER_MAX_S, TriggeredJobs, first_of
from webjobsd.runtime.workcopy import remove_tree
from webjobsd.site import SiteLayout
from webjobsd.systemd_credentials import PASSWORD_CREDENTIAL, credential_from_systemd
from webjobsd.webhooks import events as hook_events
from webjobsd.webhooks.delivery import WebhookDispatcher, fallback_base
from webjobsd.webhooks.subscriptions import HookStore

log = structlog.get_logger("webjobsd.app")


class StartupError(RuntimeError):
    """The daemon cannot start; the message says why."""


def build_layout(config: DaemonConfig, environ: Mapping[str, str]) -> SiteLayout:
    instance_id = config.resolved_instance_id(environ)
    return SiteLayout.build(
        config.site,
        instance_id=instance_id,
        temp_root=config.resolved_temp_dir(instance_id),
        jobs_root_override=config.jobs_root or environ.get("WEBJOBS_ROOT_PATH"),
        environ=environ,
    )


class Daemon:
    def __init__(
        self,
        config: DaemonConfig,
        *,
        environ: Mapping[str, str],
        config_path: Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        auth_enabled: bool = True,
        release_heap: bool = False,
    ) -> None:
        """`release_heap`: give the heap's free memory back after waves of job starts
        (`runtime.heaprelease`); `serve` asks for it where it tuned the allocator."""
        self.config = config
        self._auth_enabled = auth_enabled
        self._release_heap = release_heap
        self._heap_release: QuietRelease | None = None
        self.credentials: Credentials | None = None
        self._environ = dict(environ)
        self._config_path = config_path
        self._overrides = dict(overrides or {})
        self.layout = build_layout(config, environ)
        self.app_settings = AppSettings(
            environ=environ,
            config_settings=config.settings,
            store_path=self.layout.settings_store_path,
        )
        self._shutdown = asyncio.Event()
        self._force = asyncio.Event()
        self._stopping = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.ready = asyncio.Event()
        self.catalog: Catalog | None = None
        self._context: SupervisorContext | None = None
        self.supervisor: Supervisor | None = None
        self.reconciler: Reconciler | None = None
        self.discovery: DiscoveryService | None = None
        self.watcher: JobsWatcher | None = None
        self.run_store = RunStore(self.layout)
        self.deployment_store = DeploymentStore(self.layout)
        self.upload_limits = UploadLimits(
            max_upload_bytes=config.max_upload_bytes,
            max_extracted_bytes=config.max_extracted_bytes,
            max_entries=config.max_archive_entries,
        )
        # Site deployments (zipdeploy, OneDeploy, git, dropped zips); their extraction folders
        # live in this instance's temp root, never in wwwroot.
        self.deployments = Deployments(
            self.layout,
            self.deployment_store,
            app_settings=self.app_settings.all_for_jobs,
            limits=self.upload_limits,
            temp_dir=self.layout.temp_root / "deployments",
            environ=self._environ,
        )
        self.http: HttpServer | None = None
        self.webhooks = WebhookDispatcher(HookStore(self.layout.hooks_path))
        self._webhooks_task: asyncio.Task[None] | None = None
        self.log_wakeups = LogWakeups()
        self.metrics = build_metrics(
            MetricsSource(
                jobs=self._job_rows,
                restarts=lambda: {
                    key.name: unit.restarts
                    for key, unit in (self.supervisor.units.items() if self.supervisor else ())
                },
                watcher_events=lambda: self.watcher.events_seen if self.watcher else 0,
                rescans=lambda: self.discovery.rescans if self.discovery else 0,
                info=lambda: {
                    "version": __version__,
                    "instance_id": self.layout.instance_id,
                    "site": str(self.layout.site_root),
                },
            )
        )
        self.triggered: TriggeredJobs | None = None
        self.scheduler: Scheduler | None = None
        self.notifier = SystemdNotifier.from_environ(self._environ)
        self.drops: DropService | None = None
        # Whether flock on the site excludes, checked at start-up (`records.lockcheck`).
        self.lock_check: LockCheck | None = None

    # -- signals -----------------------------------------------------------------------------

    def request_shutdown(self, reason: str = "requested") -> None:
        if self._shutdown.is_set():
            log.warning("second stop request: forcing", reason=reason)
            self._force.set()
            return
        log.info("shutting down", reason=reason)
        self._shutdown.set()

    def reload(self) -> None:
        """SIGHUP: re-read the config file, apply what can change live, rescan."""
        self.notifier.reloading()
        try:
            self._reload()
        finally:
            # READY=1 even when the new file is refused, or systemd stays in "reloading".
            self.notifier.ready("configuration reloaded")

    def _reload(self) -> None:
        try:
            new = load_config(self._config_path, self._overrides)
        except ConfigError as error:
            log.error("reload failed; keeping the current configuration", error=str(error))
            return
        for name in (
            "site",
            "jobs_root",
            "instance_id",
            "temp_dir",
            "listen",
            "trusted_proxies",
            "max_upload_bytes",
            "max_extracted_bytes",
            "max_archive_entries",
            "max_connections",
            "header_timeout_s",
            "keepalive_timeout_s",
            "watch",
        ):
            if getattr(new, name) != getattr(self.config, name):
                log.warning("configuration change needs a restart", key=name)
        configure_logging(new.log_format, new.log_level)
        self._reload_tls(new)
        if self._auth_enabled and self.credentials is not None:
            try:
                self._load_credentials(new)
            except StartupError as error:
                log.error("credentials not reloaded; keeping the current ones", error=str(error))
        self.app_settings.replace_config_settings(new.settings)
        if self._context is not None:
            self._context.config = new
        if self.supervisor is not None:
            self.supervisor.config_changed()  # allow_singletons_without_locks may have changed
        if self.catalog is not None:
            self.catalog.settle_s = new.debounce_s
            self.catalog.settle_cap_s = new.debounce_cap_s
        if self.reconciler is not None:
            self.reconciler.tick_s = new.reconcile_tick_s
        for name in ("log_max_bytes", "log_generations"):
            if getattr(new, name) != getattr(self.config, name):
                log.info("configuration change applies to jobs added from now on", key=name)
        if self.discovery is not None:
            self.discovery.debouncer.quiet_s = new.debounce_s
            self.discovery.debouncer.cap_s = new.debounce_cap_s
            self.discovery.rescan_s = new.rescan_s
            if self.discovery.polling:
                self.discovery.poll_s = new.poll_interval_s
            self.discovery.request_rescan()
        if self.drops is not None:
            self.drops.rescan_s = new.scan_period_s
        self.config = new
        log.info(
            "configuration reloaded", file=str(self._config_path) if self._config_path else None
        )
        self.wake()

    def _reload_tls(self, new: DaemonConfig) -> None:
        """The certificate files are read again (a renewed certificate under the same names is
        the usual case); a pair that does not load keeps the one being served."""
        http = self.http
        if http is None or (http.tls is None) != (new.tls_certificate is None):
            if http is not None:
                log.warning("configuration change needs a restart", key="tls_certificate")
            return
        if new.tls_certificate is None or new.tls_key is None:
            return
        try:
            tls = load_server_tls(new.tls_certificate, new.tls_key)
        except TlsError as error:
            log.error("TLS certificate not reloaded; serving the current one", error=str(error))
            return
        http.replace_tls(tls)
        log.info(
            "TLS certificate loaded",
            tls_certificate=str(tls.certificate),
            tls_fingerprint_sha256=tls.fingerprint_sha256,
        )

    def wake(self) -> None:
        """An intent was written (API, settings store): act now instead of at the next tick."""
        if self.reconciler is not None:
            self.reconciler.wake()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self.request_shutdown, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.request_shutdown, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def _remove_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    # -- tasks -------------------------------------------------------------------------------

    def _start_task(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks[name] = task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() and self._stopping:
            return
        error = None if task.cancelled() else task.exception()
        # These tasks never end by themselves: if one does, it is a bug worth a loud line.
        log.error(
            "core task ended unexpectedly", task=task.get_name(), error=repr(error), exc_info=error
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, install_signals: bool = True) -> int:
        loop = asyncio.get_running_loop()
        layout = self.layout
        layout.ensure()
        instance_lock = FileLock(layout.instance_lock_path)
        owner = {"InstanceId": layout.instance_id, "Site": str(layout.site_root)}
        if not instance_lock.try_acquire(owner):
            raise StartupError(
                f"another webjobsd with instance id {layout.instance_id!r} is running on site "
                f"{layout.site_root} (lock {layout.instance_lock_path})"
            )
        if install_signals:
            self._install_signals(loop)
        try:
            await self._start(loop)
            await self._shutdown.wait()
            await self._stop()
        finally:
            if install_signals:
                self._remove_signals(loop)
            instance_lock.release()
        log.info("stopped")
        return 0

    async def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        layout, config = self.layout, self.config
        # Before any job: whether singletons may run depends on it. In a thread of its own,
        # bounded: a hung mount must not hang the start.
        self.lock_check = await check_site_locks(layout.daemon_state_dir)
        self._report_lock_check(self.lock_check)
        records = ProcessRecords(layout.process_records_dir)
        await end_leftovers(records, owner_marker(layout))
        # Before anything opens a data folder: older versions gave them to run_as_user.
        await asyncio.to_thread(reclaim_data_folders, layout)
        await asyncio.to_thread(self._repair_abandoned_runs)
        log.info(
            "starting",
            site=str(layout.site_root),
            jobs_root=str(layout.jobs_root),
            instance=layout.instance_id,
        )
        catalog = Catalog(
            layout.jobs_root, settle_s=config.debounce_s, settle_cap_s=config.debounce_cap_s
        )
        self.catalog = catalog
        try:
            run_as = resolve_run_as(config.run_as_user, config.run_as_group)
        except RunAsError as error:
            raise StartupError(str(error)) from error
        context = SupervisorContext(
            layout=layout,
            config=config,
            app_settings=self.app_settings,
            base_environ=self._environ,
            records=records,
            run_as=run_as,
            on_log_bytes=self._log_written,
            on_exit=self._continuous_exited,
            lock_check=self.lock_check,
            data_device=os.stat(layout.data_jobs_root).st_dev,
        )
        if self._release_heap:
            self._heap_release = QuietRelease(release_free_memory, run_in=context.writes.submit)
            context.after_start = self._heap_release.poke
        self._context = context
        self.supervisor = Supervisor(context)
        triggered = TriggeredJobs(
            context,
            self.run_store,
            specs=lambda: catalog.specs,
            on_run_started=lambda record: self.metrics.run_started(record.job_name),
            on_run_finished=self._run_finished,
        )
        self.triggered = triggered
        scheduler = Scheduler(
            layout=layout, app_settings=self.app_settings, store=self.run_store, triggered=triggered
        )
        self.scheduler = scheduler

        def after_pass(specs: Mapping[JobKey, JobSpec]) -> None:
            triggered.stop_removed(specs)
            scheduler.sync(specs)

        self.reconciler = Reconciler(
            specs=lambda: catalog.specs,
            jobs_stopped=lambda: self.app_settings.jobs_stopped,
            runtime=self.supervisor,
            tick_s=config.reconcile_tick_s,
            on_pass=after_pass,
            on_latency=self.metrics.observe_reconcile,
        )
        self.discovery = DiscoveryService(
            catalog,
            debouncer=Debouncer(config.debounce_s, config.debounce_cap_s),
            rescan_s=config.rescan_s,
            poll_s=config.poll_interval_s if config.polling else None,
            on_changed=lambda _keys: self.wake(),
            # Job changes wait while any daemon of the site deploys (KUDU-DEPLOY.md Part A #4).
            deployment_in_progress=functools.partial(
                is_locked_by_other, layout.deployments_lock_path
            ),
        )
        # Before the API listens (no deploy runs yet) and before the first scan (a job folder
        # a killed deploy had moved aside is back in place for it).
        await asyncio.to_thread(clean_after_kill, layout, layout.temp_root / "uploads")
        await asyncio.to_thread(self.deployments.clean_after_kill)
        await asyncio.to_thread(self._repair_deployments)
        # Listen before anything starts: a port in use stops start-up with nothing to undo.
        await self._start_http()
        # Not in `_tasks`: it outlives them at shutdown, to deliver the last runs' events.
        self._webhooks_task = asyncio.create_task(self.webhooks.run(), name="webhooks")
        self._webhooks_task.add_done_callback(self._task_done)
        if not config.polling:
            # Poll mode makes no inotify watch at all: the poll is discovery's own rescan.
            self.watcher = JobsWatcher(
                layout.jobs_root, loop, self.discovery.hint, on_arrival=self.discovery.arrived
            )
            self.discovery.watcher = self.watcher
            self.watcher.start()
        self.discovery.initial_scan()
        if self.watcher is not None:
            # The jobs the scan found, from its result: no second listing of the tree.
            self._check_inotify_queue(len(catalog.specs) + len(catalog.errors))
        self._mark_vanished_jobs_stopped(catalog)
        await asyncio.to_thread(self._remove_stale_working_copies, catalog)
        self.reconciler.reconcile_once()
        self._start_task("discovery", self.discovery.run())
        self._start_task("reconciler", self.reconciler.run())
        self._start_task("scheduler", scheduler.run())
        # Zip-and-drop, after the initial scan: a zip already there deploys at the first turn.
        self.drops = DropService(
            layout,
            self.upload_limits,
            quiet_s=config.debounce_s,
            rescan_s=config.scan_period_s,
            polling=config.polling,
            deployments=self.deployments,
        )
        self.drops.start()
        self._start_task("drops", self.drops.run())
        if self.notifier.watchdog_interval_s is not None:
            # Pings stop when the reconciler's loop stops passing: systemd then restarts us.
            reconciler = self.reconciler
            self._start_task(
                "watchdog",
                watchdog_loop(
                    self.notifier,
                    heartbeat_is_recent(
                        lambda: reconciler.last_pass_monotonic, lambda: 3 * reconciler.tick_s
                    ),
                ),
            )
        self.ready.set()
        self.notifier.ready(f"watching {len(catalog.specs)} jobs")

    def _report_lock_check(self, check: LockCheck) -> None:
        """One line: which mount holds the site and whether its locks exclude; an error with
        what follows when they do not (every daemon sharing the site would run a singleton)."""
        where = {
            "mount_point": check.mount_point,
            "fs_type": check.fs_type,
            "source": check.source,
            "lock_file": check.lock_file,
            "detail": check.error,
        }
        if check.works:
            log.info("file locks on the site exclude", **where)
        elif self.config.allow_singletons_without_locks:
            log.error(
                "file locks on the site do not exclude: singleton jobs run anyway "
                "(allow_singletons_without_locks: true) and may run on several daemons at once",
                **where,
            )
        else:
            log.error(
                "file locks on the site do not exclude: singleton jobs will not run; "
                "set allow_singletons_without_locks: true to run them anyway",
                **where,
            )

    async def _start_http(self) -> None:
        config = self.config
        assert self.triggered is not None
        context = ApiContext(
            layout=self.layout,
            specs=lambda: self.catalog.specs if self.catalog else {},
            run_store=self.run_store,
            triggered=self.triggered,
            app_settings=self.app_settings,
            refresh=self.refresh_jobs,
            wake=self.wake,
            instance_is_live=self.instance_is_live,
            continuous_port=self.continuous_port,
            wait_stopped=self.wait_stopped,
            on_file_change=self._file_changed,
            readiness=self.readiness,
            limits=self.upload_limits,
            upload_dir=self.layout.temp_root / "uploads",
            trusted_proxies=tuple(ipaddress.ip_network(n) for n in config.trusted_proxies),
            log_wakeups=self.log_wakeups,
            schedules=lambda: self.scheduler.schedules if self.scheduler else {},
            deployment_store=self.deployment_store,
            deployments=self.deployments,
            readiness_notes=self.readiness_notes,
            watch=config.watch,
        )
        middlewares: tuple[Any, ...] = ()
        if self._auth_enabled:
            await asyncio.to_thread(self._load_credentials, config)
            middlewares = (
                basic_auth_middleware(
                    lambda: self.credentials,
                    exempt=lambda request: request.path in UNAUTHENTICATED_PATHS,
                ),
            )
        else:
            log.warning("the HTTP API is not authenticated (--no-auth)")
        host, port = parse_listen(config.listen)
        app = build_app(context, extra_middlewares=middlewares)
        add_metrics_route(app, self.metrics)
        add_hook_routes(app, self.webhooks.store, self.webhooks.base_url.remember)
        tls: ServerTls | None = None
        if config.tls_certificate is not None and config.tls_key is not None:
            try:
                tls = load_server_tls(config.tls_certificate, config.tls_key)
            except TlsError as error:
                raise StartupError(str(error)) from error
        limits = ConnectionLimits(
            max_connections=config.max_connections,
            header_timeout_s=config.header_timeout_s,
            keepalive_timeout_s=config.keepalive_timeout_s,
        )
        self.http = HttpServer(app, limits, tls)
        try:
            await self.http.start(host, port)
        except OSError as error:
            raise StartupError(f"cannot listen on {config.listen}: {error.strerror}") from error
        self.webhooks.base_url.fallback = fallback_base(
            host, self.http.port or port, self._environ, scheme=self.http.scheme
        )

    def _load_credentials(self, config: DaemonConfig) -> None:
        environ = dict(self._environ)
        try:
            # systemd's LoadCredential= hands the password over as a file, never in the
            # environment; it counts like WEBJOBSD_PASSWORD, with the configured user name.
            password = credential_from_systemd(PASSWORD_CREDENTIAL, environ)
            if password and not environ.get("WEBJOBSD_PASSWORD"):
                environ["WEBJOBSD_PASSWORD"] = password
                environ["WEBJOBSD_USERNAME"] = (
                    environ.get("WEBJOBSD_USERNAME") or config.auth_username or "webjobsd"
                )
            credentials, where = load_credentials(
                config_username=config.auth_username,
                config_password_hash=config.auth_password_hash,
                environ=environ,
                state_dir=self.layout.daemon_state_dir,
            )
        except ValueError as error:
            raise StartupError(str(error)) from error
        self.credentials = credentials
        log.info(
            "API credentials", source=credentials.source, username=credentials.username, file=where
        )

    # -- what the API may ask ----------------------------------------------------------------

    def _log_written(self, job: str, count: int) -> None:
        self.metrics.add_log_bytes(job, count)
        self.log_wakeups.written(job)

    async def refresh_jobs(self, keys: set[JobKey]) -> None:
        """An intent was written for `keys`: look at them now (no quiet period) and act."""
        if self.discovery is not None:
            await self.discovery.refresh(keys, settle=False)
        self.wake()

    def _job_rows(self) -> list[tuple[str, str, str]]:
        rows = []
        for key in self.catalog.specs if self.catalog else ():
            if key.kind is JobKind.CONTINUOUS:
                unit = self.supervisor.units.get(key) if self.supervisor else None
                status = unit.status.value if unit and unit.status else "Initializing"
            else:
                running = self.triggered is not None and key.name in self.triggered.active
                status = "Running" if running else "Ready"
            rows.append((key.kind.value, key.name, status))
        return rows

    def readiness(self) -> dict[str, bool]:
        """Each core part alive, and its loop seen recently (a wedged loop is not ready)."""
        now = time.monotonic()

        def alive(name: str) -> bool:
            task = self._tasks.get(name)
            return task is not None and not task.done()

        def recent(stamp: float | None, within_s: float) -> bool:
            return stamp is not None and now - stamp <= within_s

        config = self.config
        reconciler, discovery, scheduler = self.reconciler, self.discovery, self.scheduler
        return {
            # Poll mode has no watcher to die: its poll is discovery's loop, checked below.
            "watcher": config.polling or (self.watcher is not None and self.watcher.is_alive()),
            # A pass that never ends is not a live discovery (its stage is logged).
            "discovery": alive("discovery")
            and discovery is not None
            and recent(discovery.last_pass_monotonic, 2 * config.scan_period_s + 5)
            and discovery.stuck_stage() is None,
            "reconciler": alive("reconciler")
            and reconciler is not None
            and recent(reconciler.last_pass_monotonic, 3 * config.reconcile_tick_s + 5),
            "scheduler": alive("scheduler")
            and scheduler is not None
            and recent(scheduler.last_pass_monotonic, 2 * SCHEDULER_MAX_SLEEP_S + 5),
        }

    def readiness_notes(self) -> list[str]:
        """What /readyz says beside its checks, none a fault of this daemon: a deployment
        holding job changes, singleton jobs refused because the site's locks do not exclude."""
        notes: list[str] = []
        note = self.discovery.hold_note() if self.discovery is not None else None
        if note:
            notes.append(note)
        check = self.lock_check
        if check is not None and not check.works:
            # No mount, no source: /readyz answers without authentication; the log has them.
            if self.config.allow_singletons_without_locks:
                notes.append("file locks on the site do not exclude: singleton jobs run anyway")
            else:
                notes.append("file locks on the site do not exclude: singleton jobs are refused")
        return notes

    def _file_changed(self, path: Path) -> None:
        """A file written through /api/vfs or /api/zip: a hint, like a watcher event."""
        if self.discovery is None:
            return
        hint = hint_for_path(self.layout.jobs_root, str(path))
        if hint is not False:
            self.discovery.hint(hint if isinstance(hint, JobKey) else None)

    def instance_is_live(self, instance_id: str) -> bool:
        if instance_id == self.layout.instance_id:
            return True
        lock = self.layout.daemon_state_dir / "instances" / f"{instance_id}.lock"
        return FileLock.is_locked_by_other(lock)

    def continuous_port(self, key: JobKey) -> int | None:
        unit = self.supervisor.units.get(key) if self.supervisor else None
        return unit.port if unit is not None and unit.process is not None else None

    async def wait_stopped(self, key: JobKey, timeout_s: float) -> bool:
        """True once nothing of job `key` runs on this daemon (bounded by `timeout_s`)."""
        deadline = time.monotonic() + timeout_s

        def running() -> bool:
            if key.kind is JobKind.CONTINUOUS:
                supervisor = self.supervisor
                return supervisor is not None and (
                    key in supervisor.units or supervisor.is_stopping(key)
                )
            return self.triggered is not None and key.name in self.triggered.active

        while running():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def _repair_abandoned_runs(self) -> None:
        """Part A #13: runs left Running by a dead daemon become Aborted, with an end time.

        Done under the job's run lock: holding it proves that no daemon sharing the site is
        running the job, so every unfinished run is abandoned; when another daemon holds it, the
        job is left alone (its runs are that daemon's business).
        """
        now = datetime.now(UTC)
        owner = {"OperationName": "Repairing abandoned runs", "InstanceId": self.layout.instance_id}
        for name in self.run_store.job_names():
            lock = FileLock(self.layout.run_lock_path(JobKey(JobKind.TRIGGERED, name)))
            if not lock.try_acquire(owner):
                continue
            try:
                repaired = self.run_store.repair_abandoned(
                    name, is_live=lambda _record: False, now=now
                )
            finally:
                lock.release()
            for record in repaired:
                log.warning(
                    "run left by a stopped daemon marked Aborted", job=name, run=record.run_id
                )

    def _repair_deployments(self) -> None:
        """Deployment records a killed daemon left unfinished become Failed (Part B §1.6).

        Under the deployment lock, taken for the moment: when another daemon on the site holds
        it, it is deploying and its records are its own, so they are left alone.
        """
        repaired = self.deployment_store.repair_if_lock_free(purge=True)
        if repaired is None:
            log.info("a deployment is in progress on the site; its records are left alone")

    def _run_finished(self, record: RunRecord) -> None:
        """Seam for webhooks and metrics: every run ends here, whatever its trigger."""
        end = record.end_time or datetime.now(UTC)
        self.metrics.run_finished(
            record.job_name, record.status.value, (end - record.start_time).total_seconds()
        )
        layout = self.layout
        self.webhooks.publish(
            hook_events.TRIGGERED_JOB_FINISHED,
            lambda base: hook_events.triggered_job_finished(base, layout, record),
        )

    def _continuous_exited(
        self, name: str, code: int | None, uptime_s: float, delay_s: float, exits: int
    ) -> None:
        """A continuous job went down on its own: its webhook events (enqueued only)."""
        ended = hook_events.ContinuousExit(
            name, self.layout.instance_id, code, uptime_s, delay_s, exits, datetime.now(UTC)
        )

        def body(base: str, event: str) -> dict[str, Any]:
            return hook_events.continuous_exit_body(base, event, ended)

        for event in hook_events.continuous_exit_events(ended):
            self.webhooks.publish(event, functools.partial(body, event=event))

    async def request_run(
        self, name: str, *, arguments: str | None = None, trigger: str = "External - "
    ) -> RunRecord:
        """Start a run of triggered job `name` (the HTTP API and the tests call this)."""
        if self.triggered is None:
            raise RuntimeError("the daemon is not started")
        return await self.triggered.request_run(name, arguments=arguments, trigger=trigger)

    def _remove_stale_working_copies(self, catalog: Catalog) -> None:
        """Working copies and shutdown folders of jobs that no longer exist are removed at
        start-up (the copies of existing jobs are renewed at their first start)."""
        for kind in JobKind:
            folder = self.layout.temp_root / "jobs" / kind.value
            if not folder.is_dir():
                continue
            for copy in folder.iterdir():
                if JobKey(kind, copy.name) not in catalog.specs:
                    remove_tree(copy)  # no recursion: a job's copy may be thousands deep
                    log.info("removed the working copy of a deleted job", folder=str(copy))
        # Shutdown folders likewise: the temp root is this instance's own (see config.py).
        shutdown_root = self.layout.temp_root / "JobsShutdown" / JobKind.CONTINUOUS.value
        with contextlib.suppress(OSError):
            for folder in shutdown_root.iterdir():
                if JobKey(JobKind.CONTINUOUS, folder.name) not in catalog.specs:
                    shutil.rmtree(folder, ignore_errors=True)
                    log.info("removed the shutdown folder of a deleted job", folder=str(folder))

    def _check_inotify_queue(self, job_folders: int) -> None:
        needed = queue_shortfall(job_folders)
        if needed is not None:
            log.warning(
                "the inotify event queue is too small for this many job folders; raise"
                " fs.inotify.max_queued_events (systemd/webjobsd.sysctl)",
                job_folders=job_folders,
                needed=needed,
            )

    def _mark_vanished_jobs_stopped(self, catalog: Catalog) -> None:
        """This instance's status of a job that is gone must not keep saying Running."""
        kind_dir = self.layout.data_jobs_root / JobKind.CONTINUOUS.value
        if not kind_dir.is_dir():
            return
        for data_dir in kind_dir.iterdir():
            key = JobKey(JobKind.CONTINUOUS, data_dir.name)
            if key in catalog.specs:
                continue
            status_path = self.layout.status_path(key)
            status = read_status_file(status_path)
            if status not in (None, ContinuousStatus.STOPPED):
                with contextlib.suppress(OSError):
                    write_continuous_status(self.layout, key, ContinuousStatus.STOPPED)

    def _shutdown_deadline_s(self) -> float:
        waits = [5.0]
        for spec in self.catalog.specs.values() if self.catalog else ():
            wait = spec.settings.stopping_wait_s(spec.key.kind)
            if spec.key.kind is JobKind.TRIGGERED:
                # A run gets its wait to finish, then a short ladder (see runtime/triggered.py).
                wait += min(SHUTDOWN_LADDER_MAX_S, wait)
            waits.append(wait)
        return max(waits) + self.config.shutdown_grace_s

    async def _stop(self) -> None:
        self._stopping = True
        if self._heap_release is not None:
            self._heap_release.close()
        self.notifier.stopping()
        started = time.monotonic()
        if self.triggered is not None:
            # Before anything else, so that no request slips in while the rest shuts down.
            self.triggered.begin_shutdown()
        if self.http is not None:
            await self.http.stop()
        # A deployment in the background gets a bounded time to end before the jobs stop.
        await self.deployments.close()
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop)
        if self.drops is not None:
            await self.drops.close()
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.supervisor is not None and self.triggered is not None:
            deadline = asyncio.get_running_loop().call_later(
                self._shutdown_deadline_s(), self._force.set
            )
            triggered = self.triggered

            async def stop_runs() -> None:
                runs = asyncio.create_task(triggered.shutdown(), name="shutdown-runs")
                if await first_of(asyncio.shield(runs), self._force.wait()) == 1:
                    triggered.force()
                    _, stuck = await asyncio.wait({runs}, timeout=2 * FORCED_STOP_BOUND_S)
                    if stuck:
                        log.error("runs did not end after SIGKILL; exiting anyway")
                        runs.cancel()
                await asyncio.gather(runs, return_exceptions=True)

            try:
                await asyncio.gather(self.supervisor.shutdown(self._force), stop_runs())
            finally:
                deadline.cancel()
        if self.scheduler is not None:
            self.scheduler.close()
        if self._webhooks_task is not None:
            # After the runs: their events get a short grace, then are dropped (logged).
            await self.webhooks.drain()
            self._webhooks_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._webhooks_task
        log.info("all jobs stopped", seconds=round(time.monotonic() - started, 3))
        self.notifier.close()


def serve(
    config: DaemonConfig,
    *,
    environ: Mapping[str, str],
    config_path: Path | None,
    overrides: Mapping[str, Any],
    auth_enabled: bool = True,
) -> int:
    configure_logging(config.log_format, config.log_level)
    tuned = tune_malloc()
    daemon = Daemon(
        config,
        environ=environ,
        config_path=config_path,
        overrides=overrides,
        auth_enabled=auth_enabled,
        release_heap=tuned,
    )

    async def main() -> int:
        _use_pidfd_child_watcher(asyncio.get_running_loop())
        return await daemon.run()

    try:
        return asyncio.run(main())
    except StartupError as error:
        log.error("cannot start", reason=str(error))
        return 1


def _use_pidfd_child_watcher(loop: asyncio.AbstractEventLoop) -> None:
    """Wait for job processes through pidfds in the event loop, not a thread per child.

    Python 3.11's default child watcher keeps one thread blocked in `waitpid` per child: a
    thousand jobs, a thousand threads. A pidfd costs one file descriptor and no thread; Python
    3.12 made it the default where the kernel has it (Linux 5.3+), so only 3.11 needs this. It is
    set for the `serve` process only: it is process-wide, and an embedding program (the tests)
    may run other event loops.
    """
    if sys.version_info >= (3, 12):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(loop)
    asyncio.set_child_watcher(watcher)
