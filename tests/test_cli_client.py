"""The real `webjobsd` client verbs, as a user types them, against a real daemon process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, DaemonProcess, Site, leaders, wait_for_sync
from tests.test_faults import ready
from webjobsd import __version__
from webjobsd.runtime.jobprocess import free_loopback_port

USER, PASSWORD = "operator", "cli-pass-1"


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "webjobsd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def served(site: Site) -> Iterator[tuple[DaemonProcess, dict[str, str]]]:
    port = free_loopback_port()
    daemon = DaemonProcess(site, auth=True, listen=f"127.0.0.1:{port}")
    daemon.start(env={"WEBJOBSD_USERNAME": USER, "WEBJOBSD_PASSWORD": PASSWORD})
    env = {
        "WEBJOBSD_URL": f"http://127.0.0.1:{port}",
        "WEBJOBSD_USERNAME": USER,
        "WEBJOBSD_PASSWORD": PASSWORD,
    }
    try:
        wait_for_sync(lambda: ready(port), timeout=20, what="daemon ready")
        yield daemon, env
        assert daemon.stop() == 0
    finally:
        daemon.kill_if_running()


def folder(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    root = tmp_path / "src" / name
    root.mkdir(parents=True)
    for rel, content in files.items():
        (root / rel).write_text(content)
    return root


def test_a_continuous_job_from_deploy_to_delete(
    served: tuple[DaemonProcess, dict[str, str]], site: Site, tmp_path: Path
) -> None:
    _daemon, env = served
    source = folder(tmp_path, "ticker", {"run.sh": "echo tick-$$\nexec sleep 1000\n"})
    deployed = cli("deploy", str(source), "--type", "continuous", env=env)
    assert deployed.returncode == 0, deployed.stderr
    assert "ticker: deployed as a continuous job" in deployed.stdout
    wait_for_sync(lambda: leaders(site, "ticker"), timeout=20, what="running")

    listed = cli("jobs", env=env)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "TYPE", "STATUS"]
    assert any(row.split()[:2] == ["ticker", "continuous"] for row in rows)

    shown = cli("show", "ticker", env=env)
    assert "run_command: run.sh" in shown.stdout
    assert "starts: 1, restarts after an exit: 0" in shown.stdout
    assert f"(pid {leaders(site, 'ticker')[0]})" in shown.stdout
    wait_for_sync(lambda: "tick-" in cli("logs", "ticker", env=env).stdout, what="log line")

    assert cli("stop", "ticker", env=env).returncode == 0
    wait_for_sync(lambda: not leaders(site, "ticker"), timeout=20, what="stopped")
    assert cli("start", "ticker", env=env).returncode == 0
    wait_for_sync(lambda: leaders(site, "ticker"), timeout=20, what="started again")

    changed = cli("settings", "ticker", "stopping_wait_time=2", "note=hello", env=env)
    assert changed.returncode == 0, changed.stderr
    assert '"stopping_wait_time": 2' in changed.stdout and '"note": "hello"' in changed.stdout
    assert '"note": "hello"' in cli("settings", "ticker", env=env).stdout

    assert cli("delete", "ticker", env=env).returncode == 0
    wait_for_sync(lambda: not leaders(site, "ticker"), timeout=20, what="deleted")
    missing = cli("show", "ticker", env=env)
    assert missing.returncode == 5 and "no job named 'ticker'" in missing.stderr


def test_run_follow_and_wait_exit_with_the_runs_result(
    served: tuple[DaemonProcess, dict[str, str]], tmp_path: Path
) -> None:
    _daemon, env = served
    script = tmp_path / "greet.sh"
    script.write_text('echo "args: $*"\nfor i in 1 2 3; do echo "line $i"; done\n')
    assert (
        cli("deploy", str(script), "--type", "triggered", "--name", "greet", env=env).returncode
        == 0
    )
    failing = folder(tmp_path, "broken", {"run.sh": "echo about to fail\nexit 3\n"})
    assert cli("deploy", str(failing), "--type", "triggered", env=env).returncode == 0

    followed = cli("run", "greet", "--follow", "--", "a", "b c", env=env)
    assert followed.returncode == 0, followed.stderr
    assert "args: a b c" in followed.stdout
    assert "line 3" in followed.stdout
    assert "Success" in followed.stderr

    failed = cli("run", "broken", "--wait", env=env)
    assert failed.returncode == 1
    assert "Failed" in failed.stderr

    nightly = folder(
        tmp_path,
        "nightly",
        {"run.sh": "exit 0\n", "settings.job": '{"schedule": "0 30 2 * * 1-5"}'},
    )
    assert cli("deploy", str(nightly), "--type", "triggered", env=env).returncode == 0
    wait_for_sync(
        lambda: "next run: 20" in cli("show", "nightly", env=env).stdout, what="scheduled"
    )
    assert (
        "schedule in words: At 02:30, Monday to Friday (UTC)"
        in cli("show", "nightly", env=env).stdout
    )

    history = cli("history", "greet", env=env)
    assert history.returncode == 0
    assert history.stdout.splitlines()[0].split() == [
        "ID",
        "STATUS",
        "START",
        "DURATION",
        "TRIGGER",
    ]
    assert "Success" in history.stdout


def test_runs_it_starts_say_so_in_the_history(
    served: tuple[DaemonProcess, dict[str, str]], tmp_path: Path
) -> None:
    """The daemon records `External - <User-Agent>` as a run's trigger: the client's name."""
    _daemon, env = served
    job = folder(tmp_path, "greet", {"run.sh": "echo hello\n"})
    assert cli("deploy", str(job), "--type", "triggered", env=env).returncode == 0
    assert cli("run", "greet", "--wait", env=env).returncode == 0

    history = cli("history", "greet", env=env)
    assert history.returncode == 0, history.stderr
    (row,) = history.stdout.splitlines()[1:]
    assert row.endswith(f"External - webjobsd/{__version__}"), row
    assert f"  trigger: External - webjobsd/{__version__}\n" in cli("show", "greet", env=env).stdout


def test_show_prints_fields_as_a_person_reads_them(
    served: tuple[DaemonProcess, dict[str, str]], site: Site, tmp_path: Path
) -> None:
    """No `None` values, no raw CRLF: Kudu's `detailed_status` (a line per daemon sharing the
    site) on its own indented lines, nested objects as indented blocks, JSON's true/false."""
    _daemon, env = served
    job = folder(
        tmp_path,
        "shared",
        {"run.sh": "echo up\nexec sleep 1000\n", "settings.job": '{"is_singleton": false}'},
    )
    assert cli("deploy", str(job), "--type", "continuous", env=env).returncode == 0
    second = DaemonProcess(site, "zz0002").start()
    try:
        wait_for_sync(
            lambda: site.status("shared") == site.status("shared", "zz0002") == "Running",
            timeout=20,
            what="running on both daemons",
        )
        both = "detailed_status:\n  test01 - Running\n  zz0002 - Running\n"
        shown = wait_for_sync(
            lambda: (result := cli("show", "shared", env=env)).stdout.count(both) and result,
            timeout=20,
            what="both daemons in detailed_status",
        )
    finally:
        # Stopped, not killed: a killed daemon leaves its job's process behind.
        assert second.stop() == 0
    assert shown.returncode == 0, shown.stderr
    assert "\r" not in shown.stdout
    assert "None" not in shown.stdout
    assert "error:" not in shown.stdout  # the API's `"error": null`
    assert "using_sdk: false\n" in shown.stdout
    assert "settings:\n  is_singleton: false\n" in shown.stdout
    assert "status: Running\n" in shown.stdout

    alone = wait_for_sync(
        lambda: (
            (result := cli("show", "shared", env=env)).stdout.count(
                "detailed_status: test01 - Running\n"
            )
            and result
        ),
        timeout=20,
        what="one daemon left",
    )
    assert "\r" not in alone.stdout


def test_errors_have_clear_messages_and_exit_codes(
    served: tuple[DaemonProcess, dict[str, str]], tmp_path: Path
) -> None:
    _daemon, env = served
    long_job = folder(
        tmp_path, "long", {"run.sh": "sleep 30\n", "settings.job": '{"stopping_wait_time": 1}'}
    )
    assert cli("deploy", str(long_job), "--type", "triggered", env=env).returncode == 0

    unreachable = cli(
        "jobs", env={**env, "WEBJOBSD_URL": f"http://127.0.0.1:{free_loopback_port()}"}
    )
    assert unreachable.returncode == 3
    assert "cannot reach the daemon" in unreachable.stderr

    wrong = cli("jobs", "--password", "nope", env=env)
    assert wrong.returncode == 4 and "refused the credentials" in wrong.stderr

    unknown = cli("history", "ghost", env=env)
    assert unknown.returncode == 5

    assert cli("run", "long", env=env).returncode == 0
    conflict = cli("run", "long", env=env)
    assert conflict.returncode == 6
    assert "already running" in conflict.stderr
    for result in (unreachable, wrong, unknown, conflict):
        assert "Traceback" not in result.stderr


def test_the_config_file_is_enough_on_the_daemons_host(site: Site) -> None:
    """No flags, no environment: the URL from `listen`, the pair the daemon generated."""
    port = free_loopback_port()
    daemon = DaemonProcess(site, auth=True, listen=f"127.0.0.1:{port}").start()
    try:
        wait_for_sync(lambda: ready(port), timeout=20, what="daemon ready")
        clean = {"WEBJOBSD_URL": "", "WEBJOBSD_USERNAME": "", "WEBJOBSD_PASSWORD": ""}
        listed = cli("jobs", "--config", str(daemon.config_path), env=clean)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout == "no jobs\n"
        assert daemon.stop() == 0
    finally:
        daemon.kill_if_running()


def test_logs_follow_prints_lines_written_after_it_started(
    served: tuple[DaemonProcess, dict[str, str]], site: Site, tmp_path: Path
) -> None:
    _daemon, env = served
    gate = tmp_path / "gate"
    source = folder(
        tmp_path,
        "chatty",
        {
            "run.sh": (
                f"echo first\nwhile [ ! -e {gate} ]; do sleep 0.1; done\n"
                "echo second\nexec sleep 1000\n"
            )
        },
    )
    assert cli("deploy", str(source), "--type", "continuous", env=env).returncode == 0
    follower = subprocess.Popen(
        [sys.executable, "-m", "webjobsd", "logs", "chatty", "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, **env},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(follower.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        wait_for_sync(
            lambda: any("INFO] first" in line for line in lines), timeout=20, what="first"
        )
        gate.write_text("")
        wait_for_sync(
            lambda: any("INFO] second" in line for line in lines), timeout=20, what="second"
        )
    finally:
        follower.terminate()
        follower.wait(timeout=10)
        reader.join(timeout=10)
        follower.stdout.close()  # type: ignore[union-attr]
        follower.stderr.close()  # type: ignore[union-attr]


def test_progress_bar_counts_to_the_end() -> None:
    import io

    from webjobsd.client.commands import ProgressReader

    terminal = io.StringIO()
    payload = bytes(3 * 1024 * 1024)
    reader = ProgressReader(io.BytesIO(payload), len(payload), terminal)
    received = b"".join(iter(lambda: reader.read(65536), b""))
    assert received == payload
    assert terminal.getvalue().rstrip().endswith("100% 3.0/3.0 MiB")
    assert terminal.getvalue().count("\r") > 10, "the bar moves as the upload goes"


def site_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        if rel.endswith(".sh"):
            path.chmod(0o755)
    return root


# A post-deployment action (run after the sync, its output in the deployment's log as it comes):
# it holds the deployment until a gate file exists when the site carries `hold-me`, and fails
# it when the site carries `fail-me`.
POST_ACTION = """#!/bin/sh
if [ -e "$WEBROOT_PATH/hold-me" ]; then
  echo "holding for the gate"
  while [ ! -e "{gate}" ]; do sleep 0.05; done
  echo "gate open"
fi
if [ -e "$WEBROOT_PATH/fail-me" ]; then echo "refusing this site" >&2; exit 3; fi
"""
TICKER = "App_Data/jobs/continuous/ticker/run.sh"


def ticker(version: str) -> str:
    return f"echo tick {version}\nexec sleep 1000\n"


def test_deploy_site_prints_the_log_as_it_comes_and_exits_as_runs_do(
    served: tuple[DaemonProcess, dict[str, str]], site: Site, tmp_path: Path
) -> None:
    """1. `deploy-site FOLDER --wait` prints the log while the deployment runs (a line of the
       post-deployment action, which then waits on a gate), and exits 0 once it has succeeded;
       the site's job runs.
    2. `deploy-site ZIP --wait` of a changed job: 0, the job's new code runs, the job named.
    3. Without --wait it prints the record's id, which `deployments ID` shows; --clean.
    4. A deployment that fails (its post-deployment action exits 3): exit 1, Failed.
    5. `deployments`: a table, newest first, the active one marked; `deployments latest --log`:
       the failed one's log, children indented."""
    _daemon, env = served
    gate = tmp_path / "gate"
    site_tree(
        site.root / "site" / "deployments" / "tools" / "PostDeploymentActions",
        {"10-check.sh": POST_ACTION.replace("{gate}", str(gate))},
    )
    first = site_tree(
        tmp_path / "site-v1", {"index.html": "v1\n", "hold-me": "", TICKER: ticker("v1")}
    )
    waiting = subprocess.Popen(
        [sys.executable, "-m", "webjobsd", "deploy-site", str(first), "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, **env},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(waiting.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        wait_for_sync(
            lambda: any("holding for the gate" in line for line in lines),
            timeout=20,
            what="the action's line printed while it runs",
        )
        assert waiting.poll() is None, "deploy-site --wait returned before the deployment ended"
        gate.write_text("")
        assert waiting.wait(timeout=30) == 0, waiting.stderr.read()  # type: ignore[union-attr]
    finally:
        if waiting.poll() is None:
            waiting.kill()
        reader.join(timeout=10)
        waiting.stdout.close()  # type: ignore[union-attr]
        stderr = waiting.stderr.read()  # type: ignore[union-attr]
        waiting.stderr.close()  # type: ignore[union-attr]
    assert any("gate open" in line for line in lines), lines
    assert "Success" in stderr and "changed jobs: continuous/ticker" in stderr, stderr
    assert (site.root / "site" / "wwwroot" / "index.html").read_text() == "v1\n"
    wait_for_sync(lambda: "tick v1" in site.job_log("ticker"), timeout=20, what="ticker v1")

    # 2. A zip of the next version: the changed job is named and its new code runs.
    second = site_tree(tmp_path / "site-v2", {"index.html": "v2\n", TICKER: ticker("v2")})
    package = tmp_path / "site-v2.zip"
    subprocess.run(["zip", "-qr", str(package), "."], cwd=second, check=True)
    zipped = cli("deploy-site", str(package), "--wait", env=env)
    assert zipped.returncode == 0, zipped.stderr
    assert "changed jobs: continuous/ticker" in zipped.stderr
    assert not (site.root / "site" / "wwwroot" / "hold-me").exists()  # the manifest's work
    wait_for_sync(lambda: "tick v2" in site.job_log("ticker"), timeout=20, what="ticker v2")

    # 3. Not waiting, and clean: the id, which names a record that ends in Success; a file
    # the deployments never wrote is gone.
    wwwroot = site.root / "site" / "wwwroot"
    (wwwroot / "written-at-run-time.txt").write_text("")
    third = site_tree(tmp_path / "site-v3", {"index.html": "v3\n", TICKER: ticker("v2")})
    started = cli("deploy-site", str(third), "--clean", "--message", "third of three", env=env)
    assert started.returncode == 0, started.stderr
    record_id = started.stdout.strip()
    assert len(record_id) == 32, started.stdout
    shown = wait_for_sync(
        lambda: (
            (r := cli("deployments", record_id, env=env)).stdout.count("status: Success (4)") and r
        ),
        timeout=20,
        what="the third deployment done",
    )
    assert f"id: {record_id}\n" in shown.stdout and "message: third of three\n" in shown.stdout
    assert "active: true\n" in shown.stdout
    assert not (wwwroot / "written-at-run-time.txt").exists()

    # 4. A failed deployment: RUN_FAILED, as a failed run.
    broken = site_tree(tmp_path / "site-v4", {"index.html": "v4\n", "fail-me": ""})
    failed = cli("deploy-site", str(broken), "--wait", env=env)
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    assert "Failed" in failed.stderr and "refusing this site" in failed.stdout

    # 5. The history and the failed one's log.
    listed = cli("deployments", env=env)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:4] == ["ID", "STATUS", "ACTIVE", "RECEIVED"]
    assert [row.split()[1] for row in rows] == ["Failed", "Success", "Success", "Success"]
    assert rows[1].split()[:3] == [record_id, "Success", "*"]
    log = cli("deployments", "latest", "--log", env=env)
    assert log.returncode == 0, log.stderr
    assert "refusing this site" in log.stdout
    child = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ    \S", re.MULTILINE)
    assert child.search(log.stdout), log.stdout
    for result in (zipped, started, failed, listed, log):
        assert "Traceback" not in result.stderr
