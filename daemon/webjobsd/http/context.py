"""What the HTTP layer may see and ask of the daemon: snapshots to read, intents to write.

The API never reaches into the supervisor to mutate it (ARCHITECTURE.md): it writes intent at the
front of the flow (`disable.job`, `settings.job`, a job folder, the settings store) and asks
discovery to look at those jobs again at once (`refresh`), which wakes the reconciler; runs are
requested from the triggered-jobs owner. Everything here is built by the composition root.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from webjobsd.config import AppSettings
from webjobsd.limits import UploadLimits
from webjobsd.model import JobKey, JobSpec
from webjobsd.records.logtail import LogWakeups
from webjobsd.records.runstore import RunStore
from webjobsd.runtime.scheduler import JobSchedule
from webjobsd.runtime.triggered import TriggeredJobs
from webjobsd.site import SiteLayout

if TYPE_CHECKING:
    from webjobsd.deploy.pipeline import Deployments
    from webjobsd.deploy.records import DeploymentStore


@dataclass(slots=True)
class ApiContext:
    layout: SiteLayout
    specs: Callable[[], Mapping[JobKey, JobSpec]]
    run_store: RunStore
    triggered: TriggeredJobs
    app_settings: AppSettings
    refresh: Callable[[set[JobKey]], Awaitable[None]]
    wake: Callable[[], None]
    instance_is_live: Callable[[str], bool]
    continuous_port: Callable[[JobKey], int | None]
    wait_stopped: Callable[[JobKey, float], Awaitable[bool]]
    on_file_change: Callable[[Path], None] | None = None
    readiness: Callable[[], dict[str, bool]] | None = None
    limits: UploadLimits = field(default_factory=UploadLimits)
    upload_dir: Path | None = None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Woken by this daemon's log writers, so that log streams need not wait for their poll.
    log_wakeups: LogWakeups | None = None
    # This daemon's scheduler timers by job name, for `GET /api/schedules`.
    schedules: Callable[[], Mapping[str, JobSchedule]] | None = None
    # The site's deployment records (`deploy.records`), for the deployment history API.
    deployment_store: DeploymentStore | None = None
    # Starts site deployments (`deploy.pipeline`): zipdeploy, OneDeploy, git push.
    deployments: Deployments | None = None
    # What /readyz says beside its checks ("deployment in progress, 3 job changes held").
    readiness_notes: Callable[[], list[str]] | None = None
    # How file changes are found (config `watch`): /readyz says it, since its `watcher` check
    # is true in poll mode, where there is no watcher to fail.
    watch: str = "inotify"


CONTEXT = web.AppKey("webjobsd_context", ApiContext)


def base_url(request: web.Request) -> str:
    """scheme://host of the request; X-Forwarded-* only from configured trusted proxies."""
    ctx = request.app[CONTEXT]
    scheme, host = request.scheme, request.host
    remote = request.remote
    if remote and ctx.trusted_proxies:
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:
            address = None
        if address is not None and any(address in net for net in ctx.trusted_proxies):
            forwarded_proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip()
            forwarded_host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
            if forwarded_proto in ("http", "https"):
                scheme = forwarded_proto
            if forwarded_host:
                host = forwarded_host
    return f"{scheme}://{host}"
