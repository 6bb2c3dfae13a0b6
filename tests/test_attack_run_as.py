"""A job running as `run_as_user` attacks the root daemon through its data folder.

Every attack is what a job could do when the folder was handed to its user: put a link (to a
root-only file, or to a file that does not exist yet) or a FIFO where the daemon opens its own
files by name. The job reports what it managed into an outbox the test gave it; the test then
checks that the root-only files are untouched, that nothing was created where a link pointed,
and that the daemon kept answering and stopped on SIGTERM. The last tests put a FIFO there as
root (anyone could), and start a daemon on a site whose folders an older version handed over.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    DaemonProcess,
    Site,
    running_daemon,
    site_for_job_user,
    wait_for,
    wait_for_sync,
)
from tests.test_triggered import finished, output_of
from webjobsd.runtime.jobprocess import free_loopback_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

NOBODY = 65534
SECRET = b"root-only content, never to be changed\n"

# Each attack: run the command as the job's user, report OK or REFUSED to the outbox.
ATTACK_HELPERS = """\
D="$WEBJOBS_DATA_PATH"
report() { echo "$*" >> "$OUTBOX/$WEBJOBS_NAME"; }
attempt() { if "$@" 2>/dev/null; then report "OK $*"; else report "REFUSED $*"; fi; }
"""


@pytest.fixture
def site() -> Iterator[Site]:
    with site_for_job_user() as reachable:
        yield reachable


@pytest.fixture
def outside(site: Site) -> Path:
    """Root-only files outside the site, and a folder where nothing may appear."""
    folder = site.root.parent / "outside"
    folder.mkdir(mode=0o755)
    for name in ("log", "lock", "singleton", "status", "starts", "run-status", "run-output"):
        secret = folder / name
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
    return folder


@pytest.fixture
def outbox(site: Site) -> Path:
    folder = site.root.parent / "outbox"
    folder.mkdir()
    folder.chmod(0o777)
    return folder


def assert_untouched(outside: Path) -> None:
    changed = [
        secret.name
        for secret in sorted(outside.iterdir())
        if secret.read_bytes() != SECRET
        or stat.S_IMODE(secret.stat().st_mode) != 0o600
        or secret.stat().st_uid != 0
    ]
    assert not changed, f"changed or created by the daemon in {outside}: {changed}"


def reports(outbox: Path, name: str) -> str:
    try:
        return (outbox / name).read_text()
    except OSError:
        return ""


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def keeps_answering(port: int, seconds: float) -> None:
    """/healthz answers within 2 s, every time, for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        assert healthy(port), "/healthz did not answer"
        assert time.monotonic() - started < 2.0
        time.sleep(0.1)  # pacing between probes, not synchronisation


async def test_links_in_the_data_folder_never_make_the_daemon_write_elsewhere(
    site: Site, outside: Path, outbox: Path
) -> None:
    site.write_job(
        "continuous",
        "linker",
        {
            "run.sh": ATTACK_HELPERS
            + 'attempt ln -sfn "$SECRETS/log" "$D/job_log.txt"\n'
            + 'for i in $(seq 1 20); do echo "linker line $i"; done\n'
            + "report done\nwhile true; do sleep 1; done\n"
        },
    )
    site.write_job(
        "continuous",
        "creator",
        {
            "run.sh": ATTACK_HELPERS
            + 'attempt ln -sfn "$SECRETS/created-by-daemon" "$D/job_log.txt"\n'
            + 'for i in $(seq 1 20); do echo "creator line $i"; done\n'
            + "report done\nwhile true; do sleep 1; done\n"
        },
    )
    # Links its lock, status and start history, then exits: the restart takes the singleton
    # lock again and rewrites both files.
    site.write_job(
        "continuous",
        "singleton",
        {
            "settings.job": '{"is_singleton": true}',
            "run.sh": ATTACK_HELPERS
            + 'attempt ln -sfn "$SECRETS/singleton" "$D/singleton.job.lock"\n'
            + 'attempt ln -sfn "$SECRETS/status" "$D/status_test01"\n'
            + 'attempt ln -sfn "$SECRETS/starts" "$D/starts_test01.json"\n'
            + "report started\nexit 1\n",
        },
    )
    # Links the run lock, and swaps its run folder for one with linked status and output.
    site.write_job(
        "triggered",
        "runner",
        {
            "run.sh": ATTACK_HELPERS
            + 'attempt ln -sfn "$SECRETS/lock" "$D/triggeredJob.lock"\n'
            + 'R="$D/$WEBJOBS_RUN_ID"\n'
            + 'attempt mv "$R" "$R.moved"\n'
            + 'attempt mkdir "$R"\n'
            + 'attempt ln -s "$SECRETS/run-status" "$R/status"\n'
            + 'attempt ln -s "$SECRETS/run-output" "$R/output_log.txt"\n'
            + 'for i in $(seq 1 20); do echo "runner line $i"; done\n'
            + "report done\n"
        },
    )
    environ = {"SECRETS": str(outside), "OUTBOX": str(outbox)}
    async with running_daemon(site, run_as_user="nobody", environ=environ) as daemon:
        for name in ("linker", "creator"):
            await wait_for(lambda name=name: "done" in reports(outbox, name), what=name)
            await wait_for(lambda name=name: f"{name} line 20" in site.job_log(name), what=name)
        await wait_for(lambda: reports(outbox, "singleton").count("started") >= 2, what="a restart")
        for _ in range(2):  # the second run takes the lock the first one linked
            record = await daemon.request_run("runner")
            status = await finished(site, "runner", record.run_id)
            assert status["Status"] == "Success", output_of(site, "runner", record.run_id)
            assert "runner line 20" in output_of(site, "runner", record.run_id)
        await wait_for(lambda: site.status("singleton") is not None, what="singleton status")

    assert_untouched(outside)
    assert not (outside / "created-by-daemon").exists()
    everything = "".join(reports(outbox, name) for name in ("linker", "creator", "singleton"))
    everything += reports(outbox, "runner")
    assert "OK" not in everything, everything
    for data in site.data.glob("*/*"):
        assert data.stat().st_uid == 0, f"{data} was handed to the job's user"
        for entry in data.rglob("*"):
            if entry.name != "job-data" and "job-data" not in entry.parts:
                assert not entry.is_symlink(), f"{entry} is a link"


def test_a_fifo_made_by_the_job_does_not_freeze_the_daemon(
    site: Site, outbox: Path, outside: Path
) -> None:
    site.write_job(
        "continuous",
        "freezer",
        {
            "run.sh": ATTACK_HELPERS
            + 'attempt rm -f "$D/job_log.txt"\n'
            + 'attempt mkfifo "$D/job_log.txt"\n'
            + "report done\n"
            + 'while true; do echo "freezer output"; sleep 0.05; done\n'
        },
    )
    port = free_loopback_port()
    daemon = DaemonProcess(site, listen=f"127.0.0.1:{port}", run_as_user="nobody")
    try:
        daemon.start(env={"OUTBOX": str(outbox), "SECRETS": str(outside)})
        wait_for_sync(lambda: healthy(port), timeout=20, what="daemon up")
        wait_for_sync(lambda: "done" in reports(outbox, "freezer"), timeout=20, what="attack")
        keeps_answering(port, 3.0)
        assert "OK" not in reports(outbox, "freezer"), reports(outbox, "freezer")
        log = site.data_dir("continuous", "freezer") / "job_log.txt"
        assert stat.S_ISREG(log.lstat().st_mode)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        daemon.kill_if_running()


def test_a_fifo_put_at_the_log_by_anyone_is_replaced_without_blocking(site: Site) -> None:
    site.write_job(
        "continuous",
        "chatty",
        {"run.sh": 'while true; do echo "chatty output $(date +%s%N)"; sleep 0.05; done\n'},
    )
    port = free_loopback_port()
    daemon = DaemonProcess(site, listen=f"127.0.0.1:{port}")
    log = site.data_dir("continuous", "chatty") / "job_log.txt"
    try:
        daemon.start()
        wait_for_sync(lambda: "chatty output" in site.job_log("chatty"), timeout=20, what="log")
        log.unlink()
        os.mkfifo(log)
        keeps_answering(port, 3.0)
        wait_for_sync(
            lambda: stat.S_ISREG(log.lstat().st_mode) and "chatty output" in log.read_text(),
            what="a fresh log",
        )
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        refusals = [
            line for line in daemon.log().splitlines() if "unsafe file" in line and str(log) in line
        ]
        assert len(refusals) == 1, daemon.log()
        assert "FIFO" in refusals[0]
    finally:
        daemon.kill_if_running()


async def test_the_job_writes_its_own_folder_and_only_reads_its_data_folder(
    site: Site, outbox: Path
) -> None:
    site.write_job(
        "triggered",
        "keeper",
        {
            "run.sh": ATTACK_HELPERS
            + 'attempt touch "$WEBJOBSD_JOB_DATA_PATH/state"\n'
            + 'attempt touch "$D/state"\n'
            + 'attempt test -r "$D/$WEBJOBS_RUN_ID/status"\n'
            + 'case "$WEBJOBSD_JOB_DATA_PATH" in "$D"/*) report inside;; esac\n'
        },
    )
    async with running_daemon(site, run_as_user="nobody", environ={"OUTBOX": str(outbox)}) as d:
        record = await d.request_run("keeper")
        await finished(site, "keeper", record.run_id)
    said = reports(outbox, "keeper")
    assert "OK touch" in said and "/job-data/state" in said, said
    assert "REFUSED touch" in said and f"{site.data_dir('triggered', 'keeper')}/state" in said
    assert "OK test -r" in said and "inside" in said
    own = site.data_dir("triggered", "keeper") / "job-data"
    assert own.stat().st_uid == NOBODY and (own / "state").stat().st_uid == NOBODY
    assert site.data_dir("triggered", "keeper").stat().st_uid == 0


async def test_data_folders_handed_over_by_an_older_version_are_taken_back(
    site: Site, outside: Path, outbox: Path
) -> None:
    # What an older version left: the folder given to the job's user, and what the job put in
    # it then: a link at the log, a hard link at the lock, a folder of its own.
    data = site.data_dir("continuous", "legacy")
    data.mkdir(parents=True)
    (data / "job_log.txt").symlink_to(outside / "log")
    os.link(outside / "singleton", data / "singleton.job.lock")
    (data / "mine").mkdir()
    (data / "mine" / "state").write_text("kept")
    (data / "job-data").mkdir()
    (data / "job-data" / "state").write_text("the job's")
    for path in (data, *data.rglob("*")):
        if path.name != "singleton.job.lock":  # a link to a root-only file: stays root's
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    site.write_job(
        "continuous",
        "legacy",
        {
            "settings.job": '{"is_singleton": true}',
            "run.sh": ATTACK_HELPERS
            + 'attempt touch "$D/planted"\n'
            + 'attempt ln -sfn "$SECRETS/status" "$D/status_test01"\n'
            + 'attempt cat "$D/mine/state"\n'
            + 'echo "legacy output"\nreport done\nwhile true; do sleep 1; done\n',
        },
    )
    environ = {"SECRETS": str(outside), "OUTBOX": str(outbox)}
    async with running_daemon(site, run_as_user="nobody", environ=environ):
        await wait_for(lambda: "done" in reports(outbox, "legacy"), what="the job")
        await wait_for(lambda: "legacy output" in site.job_log("legacy"), what="its output")
    assert_untouched(outside)
    said = reports(outbox, "legacy")
    assert "REFUSED touch" in said and "REFUSED ln" in said and "OK cat" in said, said
    assert data.stat().st_uid == 0
    assert (data / "mine").stat().st_uid == 0
    # The job's own folder stays the job's.
    assert (data / "job-data" / "state").stat().st_uid == NOBODY
    assert (data / "job-data").stat().st_uid == NOBODY
    assert not (data / "job_log.txt").is_symlink()
    lock = data / "singleton.job.lock"
    assert lock.stat().st_nlink == 1 and json.loads(lock.read_text())["InstanceId"] == "test01"
