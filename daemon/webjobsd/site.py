"""The Kudu site layout: every path the daemon reads or writes is computed here, in one place.

```
SITE/site/wwwroot/App_Data/jobs/{continuous,triggered}/NAME/   job binaries (the jobs root)
SITE/data/jobs/{continuous,triggered}/NAME/                     status, logs, locks, run history
SITE/data/jobs/{continuous,triggered}/NAME/job-data/            the job's own folder (writable)
SITE/data/webjobsd/                                             the daemon's own state
SITE/site/deployments/{id}/                                     deployment records (Kudu's place)
SITE/site/deployments/active                                    the id of the active deployment
SITE/site/deployments/drop/                                     whole-site zips dropped to deploy
SITE/site/deployments/tools/PostDeploymentActions/              scripts run after a deployment
SITE/site/locks/deployments.lock                                the site-wide deployment lock
SITE/site/repository/                                           the git repository pushed to
TEMP/jobs/{type}/NAME/{random}/                                 working copies
TEMP/JobsShutdown/continuous/NAME/{random}                      shutdown notification files
```

A job's data folder (`WEBJOBS_DATA_PATH`, Kudu's) belongs to the daemon's user: the daemon opens
its status, logs and locks there, so a job running as another user (`run_as_user`) may read it
but never write it. What the job keeps for itself goes to `job-data/` (`WEBJOBSD_JOB_DATA_PATH`),
which is the job's; the daemon never opens anything in it. See `runtime.runas`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from webjobsd.model import JobKey, JobKind

JOB_DATA_FOLDER = "job-data"

_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}|%(\w+)%")


def expand_variables(text: str, environ: Mapping[str, str]) -> str:
    """`$NAME`, `${NAME}` and Kudu's Windows-style `%NAME%`; unknown names are left as they are."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        return environ.get(name, match.group(0))

    return _VARIABLE.sub(replace, text)


@dataclass(frozen=True, slots=True)
class SiteLayout:
    site_root: Path
    jobs_root: Path
    temp_root: Path
    instance_id: str

    @classmethod
    def build(
        cls,
        site_root: Path,
        *,
        instance_id: str,
        temp_root: Path,
        jobs_root_override: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> SiteLayout:
        """`jobs_root_override` follows WEBJOBS_ROOT_PATH: variables expanded, relative to
        wwwroot unless absolute."""
        site_root = site_root.absolute()
        wwwroot = site_root / "site" / "wwwroot"
        if jobs_root_override:
            expanded = expand_variables(jobs_root_override, environ or os.environ)
            jobs_root = (wwwroot / expanded).absolute()
        else:
            jobs_root = wwwroot / "App_Data" / "jobs"
        return cls(
            site_root=site_root,
            jobs_root=jobs_root,
            temp_root=temp_root.absolute(),
            instance_id=instance_id,
        )

    @property
    def wwwroot(self) -> Path:
        return self.site_root / "site" / "wwwroot"

    @property
    def data_jobs_root(self) -> Path:
        return self.site_root / "data" / "jobs"

    @property
    def daemon_state_dir(self) -> Path:
        return self.site_root / "data" / "webjobsd"

    @property
    def process_records_dir(self) -> Path:
        return self.daemon_state_dir / "processes" / self.instance_id

    @property
    def instance_lock_path(self) -> Path:
        return self.daemon_state_dir / "instances" / f"{self.instance_id}.lock"

    @property
    def settings_store_path(self) -> Path:
        return self.daemon_state_dir / "settings.json"

    @property
    def hooks_path(self) -> Path:
        return self.daemon_state_dir / "hooks.json"

    @property
    def deployments_dir(self) -> Path:
        return self.site_root / "site" / "deployments"

    @property
    def active_deployment_path(self) -> Path:
        return self.deployments_dir / "active"

    @property
    def deployments_drop_dir(self) -> Path:
        return self.deployments_dir / "drop"

    @property
    def post_deployment_actions_dir(self) -> Path:
        return self.deployments_dir / "tools" / "PostDeploymentActions"

    @property
    def deployments_lock_path(self) -> Path:
        """Held (flock) for as long as a deployment runs, by whichever daemon runs it: the jobs
        side reads it as "deployment in progress" and holds its decisions (Part A #4)."""
        return self.site_root / "site" / "locks" / "deployments.lock"

    @property
    def repository_dir(self) -> Path:
        return self.site_root / "site" / "repository"

    @property
    def scripts_dir(self) -> Path:
        return self.site_root / "site" / "scripts"

    @property
    def libs_dir(self) -> Path:
        return self.site_root / "site" / "libs"

    def kind_dir(self, kind: JobKind) -> Path:
        return self.jobs_root / kind.value

    def job_dir(self, key: JobKey) -> Path:
        return self.jobs_root / key.kind.value / key.name

    def data_dir(self, key: JobKey) -> Path:
        return self.data_jobs_root / key.kind.value / key.name

    def job_data_dir(self, key: JobKey) -> Path:
        """The job's own writable folder, inside its data folder."""
        return self.data_dir(key) / JOB_DATA_FOLDER

    def status_path(self, key: JobKey, instance_id: str | None = None) -> Path:
        return self.data_dir(key) / f"status_{instance_id or self.instance_id}"

    def job_log_path(self, key: JobKey) -> Path:
        return self.data_dir(key) / "job_log.txt"

    def singleton_lock_path(self, key: JobKey) -> Path:
        return self.data_dir(key) / "singleton.job.lock"

    def run_lock_path(self, key: JobKey) -> Path:
        return self.data_dir(key) / "triggeredJob.lock"

    def working_copies_dir(self, key: JobKey) -> Path:
        return self.temp_root / "jobs" / key.kind.value / key.name

    def shutdown_dir(self, key: JobKey) -> Path:
        return self.temp_root / "JobsShutdown" / key.kind.value / key.name

    def ensure(self) -> None:
        """Create the daemon's own folders if missing (idempotent; never touches existing content).

        Nothing is created inside wwwroot, not even the jobs root: `git clone REPO site/wwwroot`
        needs the folder absent or empty, and the watcher waits for the jobs root to appear.
        """
        for kind in JobKind:
            (self.data_jobs_root / kind.value).mkdir(parents=True, exist_ok=True)
        self.process_records_dir.mkdir(parents=True, exist_ok=True)
        self.instance_lock_path.parent.mkdir(parents=True, exist_ok=True)
        self.temp_root.mkdir(parents=True, exist_ok=True)
