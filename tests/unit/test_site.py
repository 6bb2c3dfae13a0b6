"""Kudu's names for the instance id and the jobs root override."""

from __future__ import annotations

from pathlib import Path

from webjobsd.app import build_layout
from webjobsd.config import load_config
from webjobsd.model import JobKey, JobKind

APP = JobKey(JobKind.CONTINUOUS, "app")


def test_instance_id_is_the_first_six_characters_of_website_instance_id() -> None:
    config = load_config(None, {"site": "/srv/site"})
    layout = build_layout(config, {"WEBSITE_INSTANCE_ID": "abcdef0123456789"})
    assert layout.instance_id == "abcdef"
    assert layout.status_path(APP).name == "status_abcdef"


def test_jobs_root_override_is_relative_to_wwwroot_and_expands_variables() -> None:
    config = load_config(None, {"site": "/srv/site"})
    for value in ("jobs/$KIND", "jobs/${KIND}", "jobs/%KIND%"):
        layout = build_layout(config, {"WEBJOBS_ROOT_PATH": value, "KIND": "x"})
        assert layout.jobs_root == Path("/srv/site/site/wwwroot/jobs/x")
    absolute = build_layout(config, {"WEBJOBS_ROOT_PATH": "/opt/jobs"})
    assert absolute.jobs_root == Path("/opt/jobs")


def test_the_config_key_wins_over_the_environment() -> None:
    config = load_config(None, {"site": "/srv/site", "jobs_root": "/a"})
    assert build_layout(config, {"WEBJOBS_ROOT_PATH": "/b"}).jobs_root == Path("/a")


def test_default_layout_matches_kudu() -> None:
    config = load_config(None, {"site": "/srv/site", "instance_id": "inst01"})
    layout = build_layout(config, {})
    assert layout.jobs_root == Path("/srv/site/site/wwwroot/App_Data/jobs")
    assert layout.job_log_path(APP) == Path("/srv/site/data/jobs/continuous/app/job_log.txt")
    assert layout.singleton_lock_path(APP).name == "singleton.job.lock"
    assert layout.run_lock_path(JobKey(JobKind.TRIGGERED, "t")).name == "triggeredJob.lock"
