"""`JobsShutdown/continuous/NAME/` (Kudu's shutdown notification folder) lives as long as its
job: removed when the job is deleted, and at start for jobs deleted while the daemon was down."""

from __future__ import annotations

import shutil

from tests.helpers import Site, leaders, running_daemon, wait_for
from webjobsd.model import JobKey, JobKind

LOOP = {"run.sh": "while true; do sleep 0.2; done\n"}


async def test_shutdown_folders_of_deleted_jobs_are_removed(site: Site) -> None:
    """1. two jobs run, then stop (their shutdown files are written)  2. one is deleted while the
    daemon runs: its folder goes with it  3. the other is deleted while the daemon is down: its
    folder goes at the next start, and so does a stale one of a job never seen; a job that still
    exists keeps its folder."""
    shutdown = site.temp / "JobsShutdown" / "continuous"
    for name in ("live", "offline", "kept"):
        site.write_job("continuous", name, LOOP)
    async with running_daemon(site):
        await wait_for(lambda: leaders(site, "live") and leaders(site, "offline"), what="running")
    # The shutdown of the daemon wrote each job's shutdown file.
    assert {p.name for p in shutdown.iterdir()} == {"live", "offline", "kept"}
    async with running_daemon(site) as daemon:
        await wait_for(lambda: leaders(site, "live"), what="live running")
        shutil.rmtree(site.job_dir("continuous", "live"))
        await wait_for(lambda: not leaders(site, "live"), what="live stopped")
        supervisor = daemon.supervisor
        assert supervisor is not None
        await wait_for(
            lambda: not supervisor.is_stopping(JobKey(JobKind.CONTINUOUS, "live")),
            what="unit retired",
        )
        assert not (shutdown / "live").exists()
    shutil.rmtree(site.job_dir("continuous", "offline"))
    (shutdown / "never-seen").mkdir()
    (shutdown / "never-seen" / "0123456789ab").write_text("2026-01-01T00:00:00Z")
    async with running_daemon(site):
        assert sorted(p.name for p in shutdown.iterdir()) == ["kept"]
