"""The environment of a job process (Part B §4.4), built in one place.

Starts from the daemon's own environment, drops what belongs to the daemon's supervisor (systemd's
notify and socket-activation variables) or is a secret of the daemon (its API credentials), adds the
app settings and Kudu's WEBJOBS_* variables, and the owner marker that lets a restarted daemon find
what its previous life left behind.

`WEBJOBS_DATA_PATH` is Kudu's data folder, as on Kudu: the job reads its logs and history there,
but it is the daemon's folder and a job running as `run_as_user` cannot write it (see
`runtime.runas`). `WEBJOBSD_JOB_DATA_PATH` is the job's own folder inside it, writable by the
job whatever user it runs as, and kept across runs and restarts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from webjobsd.model import JobKey, JobKind
from webjobsd.site import SiteLayout

OWNER_VARIABLE = "WEBJOBSD_OWNER"
JOB_DATA_VARIABLE = "WEBJOBSD_JOB_DATA_PATH"
_SCRUBBED_EXACT = {
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "WEBJOBSD_USERNAME",
    "WEBJOBSD_PASSWORD",
    "WEBJOBSD_PROCESS_TOKEN",
}
_SCRUBBED_PREFIXES = ("WATCHDOG_", "LISTEN_")


def owner_marker(layout: SiteLayout) -> str:
    """Unique per (instance, site): the instance lock guarantees one live daemon per marker."""
    return f"{layout.instance_id}@{layout.site_root}"


@dataclass(frozen=True, slots=True)
class JobLaunch:
    key: JobKey
    working_root: Path
    run_id: str = ""
    arguments: str | None = None
    shutdown_file: Path | None = None
    port: int | None = None


def without_daemon_secrets(base: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment without its supervisor's variables and its API credentials:
    what any process the daemon starts for the site (a job, a post-deployment action) gets."""
    return {
        name: value
        for name, value in base.items()
        if name not in _SCRUBBED_EXACT and not name.startswith(_SCRUBBED_PREFIXES)
    }


def job_environment(
    base: Mapping[str, str],
    app_settings: Mapping[str, str],
    layout: SiteLayout,
    launch: JobLaunch,
) -> dict[str, str]:
    env = without_daemon_secrets(base)
    env.update(app_settings)
    env.setdefault("WEBROOT_PATH", str(layout.wwwroot))
    key = launch.key
    env.update(
        {
            "WEBJOBS_PATH": str(launch.working_root),
            "WEBJOBS_NAME": key.name,
            "WEBJOBS_TYPE": key.kind.value,
            "WEBJOBS_DATA_PATH": str(layout.data_dir(key)),
            "WEBJOBS_RUN_ID": launch.run_id,
            JOB_DATA_VARIABLE: str(layout.job_data_dir(key)),
            OWNER_VARIABLE: owner_marker(layout),
        }
    )
    if launch.arguments is not None:
        env["WEBJOBS_COMMAND_ARGUMENTS"] = launch.arguments
    if key.kind is JobKind.CONTINUOUS:
        env[f"WEBSITE_ALWAYS_ON_JOB_RUNNING_{key.name}"] = "true"
        if launch.shutdown_file is not None:
            env["WEBJOBS_SHUTDOWN_FILE"] = str(launch.shutdown_file)
        if launch.port is not None:
            env["WEBJOBS_PORT"] = str(launch.port)
    else:
        env[f"WEBSITE_TRIGGERED_JOB_RUNNING_{key.name}"] = "true"
    return env
