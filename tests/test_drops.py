"""Deploying by dropping files, with the tools users drop them with: a real FTP server (pyftpdlib)
and clients (ftplib, curl), and git. A job never starts from a half-uploaded folder, starts once
when the upload is complete, and the daemon never creates anything inside wwwroot."""

from __future__ import annotations

import asyncio
import contextlib
import ftplib
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

with warnings.catch_warnings():
    # pyftpdlib is built on asynchat/asyncore, deprecated (not yet removed) in Python 3.11.
    warnings.simplefilter("ignore", DeprecationWarning)
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

from tests.helpers import (
    FAST_CONFIG,
    DaemonProcess,
    Site,
    running_daemon,
    wait_for,
    wait_for_sync,
)
from webjobsd.app import Daemon
from webjobsd.model import JobKey, JobKind
from webjobsd.runtime.jobprocess import free_loopback_port

QUIET_S = float(FAST_CONFIG["debounce_s"])
# FTP clients open a new data connection (curl: a new process) per file: the gap between two files
# must stay within the quiet period even on a loaded machine (see the README on FTP sites).
FTP_QUIET_S = 0.6
USER, PASSWORD = "deploy", "s3cret-deploy"
JOBS = "App_Data/jobs"
BIG = 3 * 1024 * 1024
REPORTER = (
    'echo "start big=$(wc -c < big.bin) lib=$(cat lib.txt 2>/dev/null) code=$(cat code.txt)"\n'
    "while true; do sleep 0.2; done\n"
)


def starts(site: Site, name: str) -> int:
    return site.job_log(name).count("Status changed to Running")


def start_lines(site: Site, name: str) -> list[str]:
    lines = site.job_log(name).splitlines()
    return [line[line.index("start big=") :] for line in lines if "start big=" in line]


@contextlib.contextmanager
def ftp_server(root: Path) -> Iterator[int]:
    """pyftpdlib serving `root` (a site's wwwroot) on a loopback port, in a thread."""
    authorizer = DummyAuthorizer()
    authorizer.add_user(USER, PASSWORD, str(root), perm="elradfmwMT")
    handler = type("DeployHandler", (FTPHandler,), {"authorizer": authorizer})
    server = FTPServer(("127.0.0.1", 0), handler)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            server.serve_forever(timeout=0.05, blocking=False)
        server.close_all()

    thread = threading.Thread(target=serve, name="ftp-server", daemon=True)
    thread.start()
    try:
        yield int(server.address[1])
    finally:
        stop.set()
        thread.join(10)


def stall_past_the_quiet_period(daemon: Daemon, started: Callable[[], bool]) -> None:
    """The transfer stalls inside a file: until discovery has looked at the folder again well
    after a quiet period (or, when the bug is there, until the job started from the half file)."""
    discovery = daemon.discovery
    assert discovery is not None
    begin = time.monotonic()

    def long_enough() -> bool:
        if started():
            return True
        last = discovery.last_pass_monotonic or 0.0
        return time.monotonic() - begin > 3 * FTP_QUIET_S and last > begin + 2.5 * FTP_QUIET_S

    wait_for_sync(long_enough, timeout=30, what="a stall past the quiet period")


def halves(size: int, fill: bytes) -> tuple[bytes, bytes]:
    data = fill * size
    return data[: size // 2], data[size // 2 :]


def ftplib_upload(
    port: int, path: str, parts: tuple[bytes, bytes], stall: Callable[[], None]
) -> None:
    with ftplib.FTP() as ftp:
        ftp.connect("127.0.0.1", port, timeout=30)
        ftp.login(USER, PASSWORD)
        with ftp.transfercmd(f"STOR {path}") as connection:
            connection.sendall(parts[0])
            stall()
            connection.sendall(parts[1])
        ftp.voidresp()


def curl_upload(
    port: int, path: str, parts: tuple[bytes, bytes], stall: Callable[[], None]
) -> None:
    curl = subprocess.Popen(
        [
            "curl", "--silent", "--show-error", "--fail", "--ftp-create-dirs", "-T", "-",
            f"ftp://{USER}:{PASSWORD}@127.0.0.1:{port}/{path}",
        ],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    assert curl.stdin is not None
    curl.stdin.write(parts[0])
    curl.stdin.flush()
    stall()
    curl.stdin.write(parts[1])
    curl.stdin.close()
    assert curl.wait(30) == 0


def ftp_put_small(port: int, files: dict[str, bytes], mkdirs: tuple[str, ...] = ()) -> None:
    with ftplib.FTP() as ftp:
        ftp.connect("127.0.0.1", port, timeout=30)
        ftp.login(USER, PASSWORD)
        for folder in mkdirs:
            with contextlib.suppress(ftplib.error_perm):  # exists already
                ftp.mkd(folder)
        for path, content in files.items():
            ftp.storbinary(f"STOR {path}", _Reader(content))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, size: int = -1) -> bytes:
        chunk, self._data = self._data[:size], self._data[size:]
        return chunk


Uploader = Callable[[int, str, tuple[bytes, bytes], Callable[[], None]], None]
CLIENTS: dict[str, Uploader] = {"ftplib": ftplib_upload, "curl": curl_upload}


@pytest.mark.parametrize("client", sorted(CLIENTS))
async def test_an_ftp_upload_that_stalls_inside_files_starts_the_job_once_complete(
    site: Site, client: str
) -> None:
    """1. a new job over FTP: run.sh, then big.bin stalling mid-file for several quiet periods,
    then lib.txt stalling too  2. the job starts exactly once, with both files whole."""
    if client == "curl" and shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    wwwroot = site.root / "site" / "wwwroot"
    wwwroot.mkdir(parents=True)
    upload = CLIENTS[client]
    job = f"{JOBS}/continuous/ftpjob"
    async with running_daemon(site, debounce_s=FTP_QUIET_S) as daemon:
        with ftp_server(wwwroot) as port:

            def started() -> bool:
                return starts(site, "ftpjob") > 0

            def stall() -> None:
                stall_past_the_quiet_period(daemon, started)

            def deploy() -> None:
                folders = ("App_Data", JOBS, f"{JOBS}/continuous", job)
                ftp_put_small(
                    port, {f"{job}/run.sh": REPORTER.encode(), f"{job}/code.txt": b"v1"}, folders
                )
                upload(port, f"{job}/big.bin", halves(BIG, b"b"), stall)
                upload(port, f"{job}/lib.txt", (b"li", b"b-complete"), stall)

            await asyncio.to_thread(deploy)
            await wait_for(lambda: start_lines(site, "ftpjob"), timeout=20, what="job started")
            await settled(daemon, JobKey(JobKind.CONTINUOUS, "ftpjob"))
    assert start_lines(site, "ftpjob") == [f"start big={BIG} lib=lib-complete code=v1"]
    assert starts(site, "ftpjob") == 1


async def test_an_ftp_overwrite_that_stalls_restarts_the_job_once_with_the_new_files(
    site: Site,
) -> None:
    """1. a running job  2. an FTP client overwrites code.txt, then big.bin stalling mid-file
    3. the job restarts exactly once, from the complete new files."""
    site.write_job("continuous", "ftpjob", {"run.sh": REPORTER, "code.txt": "v1", "big.bin": "old"})
    wwwroot = site.root / "site" / "wwwroot"
    async with running_daemon(site, debounce_s=FTP_QUIET_S) as daemon:
        await wait_for(lambda: start_lines(site, "ftpjob"), what="v1 running")
        with ftp_server(wwwroot) as port:
            job = f"{JOBS}/continuous/ftpjob"

            def restarted() -> bool:
                return starts(site, "ftpjob") > 1

            def deploy() -> None:
                ftp_put_small(port, {f"{job}/code.txt": b"v2"})
                ftplib_upload(
                    port,
                    f"{job}/big.bin",
                    halves(BIG, b"n"),
                    lambda: stall_past_the_quiet_period(daemon, restarted),
                )

            await asyncio.to_thread(deploy)
            await wait_for(lambda: len(start_lines(site, "ftpjob")) == 2, what="restart")
            await settled(daemon, JobKey(JobKind.CONTINUOUS, "ftpjob"))
    assert start_lines(site, "ftpjob") == [
        "start big=3 lib= code=v1",
        f"start big={BIG} lib= code=v2",
    ]
    assert starts(site, "ftpjob") == 2


async def settled(daemon: Daemon, key: JobKey) -> None:
    """Discovery has nothing left to look at and the job's unit runs what the catalog holds."""
    discovery, catalog, supervisor = daemon.discovery, daemon.catalog, daemon.supervisor
    assert discovery is not None and catalog is not None and supervisor is not None

    def done() -> bool:
        unit = supervisor.units.get(key)
        spec = catalog.specs.get(key)
        return (
            discovery.debouncer.next_due() is None
            and spec is not None
            and unit is not None
            and unit.process is not None
            and unit.target.spec.fingerprint == spec.fingerprint
        )

    await wait_for(done, timeout=20, what="discovery settled and the job running its spec")


def git(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["git", "-c", "user.name=Deployer", "-c", "user.email=deploy@example.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(cwd)},
    )


def commit(repo: Path, files: dict[str, str], message: str) -> None:
    for rel, content in files.items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", message, cwd=repo)


GIT_JOB = "App_Data/jobs/continuous/gitjob/run.sh"
GIT_SECOND = "App_Data/jobs/continuous/second/code.txt"
GIT_OTHER = "App_Data/jobs/triggered/other/run.sh"


def git_job(version: str) -> str:
    return f'echo "gitjob {version}"\nwhile true; do sleep 0.2; done\n'


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
async def test_git_clone_into_wwwroot_and_pulls_while_the_daemon_runs(site: Site) -> None:
    """1. a daemon on an empty site creates nothing in wwwroot  2. `git clone REPO wwwroot`
    succeeds and the jobs start  3. a pull changing two jobs restarts each once with the new
    code  4. a pull that does not touch them restarts nothing  5. `rm -rf wwwroot` and a new
    clone: the job is removed, then back."""
    repo = site.root.parent / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    second_run = "App_Data/jobs/continuous/second/run.sh"
    second = {second_run: 'echo "second $(cat code.txt)"\nexec sleep 600\n', GIT_SECOND: "v1"}
    commit(repo, {GIT_JOB: git_job("v1"), GIT_OTHER: "echo other 1\n", **second}, "first")
    wwwroot = site.root / "site" / "wwwroot"
    key = JobKey(JobKind.CONTINUOUS, "gitjob")
    other = JobKey(JobKind.TRIGGERED, "other")
    async with running_daemon(site) as daemon:
        catalog = daemon.catalog
        assert catalog is not None
        assert not wwwroot.exists(), "the daemon created folders inside wwwroot"
        await asyncio.to_thread(git, "clone", "-q", str(repo), str(wwwroot), cwd=site.root)
        await wait_for(lambda: "gitjob v1" in site.job_log("gitjob"), timeout=20, what="v1")
        await wait_for(lambda: "second v1" in site.job_log("second"), timeout=20, what="2nd")
        await settled(daemon, key)
        assert starts(site, "gitjob") == 1

        commit(repo, {GIT_JOB: git_job("v2"), GIT_SECOND: "v2"}, "change both jobs")
        await asyncio.to_thread(git, "pull", "-q", "--ff-only", cwd=wwwroot)
        await wait_for(lambda: "gitjob v2" in site.job_log("gitjob"), timeout=20, what="v2")
        await wait_for(lambda: "second v2" in site.job_log("second"), timeout=20, what="2nd v2")
        await settled(daemon, key)
        await settled(daemon, JobKey(JobKind.CONTINUOUS, "second"))
        assert starts(site, "gitjob") == 2
        assert starts(site, "second") == 2

        before = catalog.specs[other].fingerprint
        commit(repo, {GIT_OTHER: "echo other 2 changed\n", "README.md": "docs\n"}, "not the job")
        await asyncio.to_thread(git, "pull", "-q", "--ff-only", cwd=wwwroot)
        await wait_for(lambda: catalog.specs[other].fingerprint != before, what="other changed")
        await settled(daemon, key)
        assert starts(site, "gitjob") == 2
        assert starts(site, "second") == 2

        await asyncio.to_thread(shutil.rmtree, wwwroot)
        await wait_for(lambda: key not in catalog.specs, what="job removed with wwwroot")
        await asyncio.to_thread(git, "clone", "-q", str(repo), str(wwwroot), cwd=site.root)
        await wait_for(lambda: starts(site, "gitjob") == 3, timeout=20, what="job back")
        await settled(daemon, key)
    assert site.job_log("gitjob").count("gitjob v2") == 2


def stage(site: Site, name: str, script: str) -> Path:
    """A job folder written outside the jobs tree, to be renamed in."""
    staging = site.root / f"staging-{name}"
    staging.mkdir()
    (staging / "run.sh").write_text(script)
    return staging


async def test_job_folders_renamed_in_whole_start_without_waiting_for_the_quiet_period(
    site: Site,
) -> None:
    """Quiet period 30 s, so that waiting for it shows. 1. five continuous job folders renamed in
    one after the other, a process still writing a file in one of them: the other four start
    well within the quiet period (one look into /proc answers for all five); the one being
    written is not taken  2. a job folder built in place (its files written where they run), then
    one more renamed in: the renamed one starts, the one built in place still waits for its
    quiet period."""
    quiet_s = 30.0
    script = "exec sleep 600\n"
    continuous = site.jobs / "continuous"
    continuous.mkdir(parents=True)
    async with running_daemon(site, debounce_s=quiet_s, debounce_cap_s=60.0) as daemon:
        catalog = daemon.catalog
        assert catalog is not None
        names = [f"whole{i}" for i in range(4)]
        staged = [stage(site, name, script) for name in [*names, "written"]]
        with open(staged[-1] / "data.bin", "wb") as writer:
            writer.write(b"half")
            writer.flush()
            for folder in staged:
                os.rename(folder, continuous / folder.name.removeprefix("staging-"))
            await wait_for(
                lambda: all(starts(site, name) == 1 for name in names),
                timeout=quiet_s / 2,
                what="the complete folders started",
            )
            assert JobKey(JobKind.CONTINUOUS, "written") not in catalog.specs

            built = continuous / "built"
            built.mkdir()
            (built / "run.sh").write_text(script)
            os.rename(stage(site, "late", script), continuous / "late")
            await wait_for(
                lambda: starts(site, "late") == 1, timeout=quiet_s / 2, what="late started"
            )
            assert JobKey(JobKind.CONTINUOUS, "built") not in catalog.specs
            assert JobKey(JobKind.CONTINUOUS, "written") not in catalog.specs
            writer.write(b" and the rest")
    assert starts(site, "built") == 0


async def test_a_folder_renamed_in_while_a_process_writes_into_it_waits_for_the_file(
    site: Site,
) -> None:
    """Quiet period 6 s: a folder renamed in while a process still writes a file in it is not
    taken at once (/proc shows the writer); once the file is closed, the job is discovered."""
    (site.jobs / "triggered").mkdir(parents=True)
    async with running_daemon(site, debounce_s=6.0, debounce_cap_s=30.0) as daemon:
        catalog, discovery = daemon.catalog, daemon.discovery
        assert catalog is not None and discovery is not None
        staging = stage(site, "held", "echo\n")
        held = JobKey(JobKind.TRIGGERED, "held")
        with open(staging / "data.bin", "wb") as writer:
            writer.write(b"half")
            writer.flush()
            renamed = time.monotonic()
            os.rename(staging, site.job_dir("triggered", "held"))
            await wait_for(
                lambda: (discovery.last_pass_monotonic or 0) > renamed, what="arrival looked at"
            )
            assert held not in catalog.specs
            writer.write(b" and the rest")
        await wait_for(lambda: held in catalog.specs, timeout=20, what="taken once closed")


def test_a_file_still_being_written_when_the_daemon_starts_holds_its_job(site: Site) -> None:
    """1. a job folder whose big.bin a process still writes (an upload under way across a daemon
    restart), its files quiet for a minute  2. the daemon starts: no event says the file is open,
    /proc does; the job does not start  3. the writer finishes: the job starts once, whole."""
    job = site.write_job("continuous", "midway", {"run.sh": REPORTER, "code.txt": "v1"})
    port = free_loopback_port()
    daemon = DaemonProcess(site, listen=f"127.0.0.1:{port}")
    try:
        with open(job / "big.bin", "wb") as writer:
            writer.write(b"m" * 1000)
            writer.flush()
            old = time.time() - 60
            for path in job.iterdir():
                os.utime(path, (old, old))
            daemon.start()
            wait_for_sync(lambda: http_ready(port), timeout=20, what="daemon ready")
            # Absence cannot be awaited: several quiet periods after start, still not started.
            held_until = time.monotonic() + 6 * QUIET_S
            wait_for_sync(lambda: time.monotonic() > held_until, what="a few quiet periods")
            assert starts(site, "midway") == 0
            writer.write(b"m" * 2000)
        wait_for_sync(lambda: start_lines(site, "midway"), timeout=20, what="job started")
        assert start_lines(site, "midway") == ["start big=3000 lib= code=v1"]
        assert daemon.stop() == 0
        assert starts(site, "midway") == 1
    finally:
        daemon.kill_if_running()


async def test_a_job_written_just_before_the_daemon_starts_waits_its_quiet_period(
    site: Site, tmp_path: Path
) -> None:
    """1. a job whose files were written this instant (a copy may still be going on; no event
    will say when it ends, the daemon was not running)  2. the daemon starts: the job starts
    once, and not before its newest file is a quiet period old."""
    quiet_s = 1.0
    started = tmp_path / "started.txt"
    job = site.write_job(
        "continuous",
        "fresh",
        {"run.sh": f"date +%s.%N >> {started}\nwhile true; do sleep 0.2; done\n"},
        age_s=0,
    )
    newest = max(path.stat().st_mtime for path in job.iterdir())
    async with running_daemon(site, debounce_s=quiet_s):
        await wait_for(lambda: records_of(started), what="job started")
        assert float(records_of(started)[0]) >= newest + quiet_s
    assert len(records_of(started)) == 1


def records_of(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def http_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


SYNC_REPORTER = (
    'echo "start big=$(wc -c < zbig.bin) code=$(cat code.txt) old=$(cat old.txt 2>/dev/null)"\n'
    "exec sleep 600\n"
)


def rsync_temp_file(job: Path, name: str) -> bool:
    """rsync is writing `name` under its temp name (`.NAME.XXXXXX`), some bytes in already."""
    try:
        return any(
            entry.name.startswith(f".{name}.") and entry.stat().st_size > 0
            for entry in job.iterdir()
        )
    except OSError:  # renamed between the listing and the stat
        return False


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
async def test_rsync_delete_that_stalls_inside_a_temp_file_restarts_the_job_once(
    site: Site,
) -> None:
    """1. a running job  2. `rsync -a --delete` from a folder where code.txt changed, old.txt is
    gone and zbig.bin is new and big (last in rsync's order): rsync deletes old.txt, writes each
    file under a temp name and renames it into place; it is stopped (SIGSTOP) inside zbig.bin's
    temp file for longer than the quiet period, code.txt already renamed in  3. the job restarts
    exactly once, from the complete new files."""
    files = {"run.sh": SYNC_REPORTER, "code.txt": "v1", "old.txt": "old", "zbig.bin": "small"}
    job = site.write_job("continuous", "synced", files)
    source = site.root.parent / "source"
    source.mkdir()
    (source / "run.sh").write_text(SYNC_REPORTER)
    (source / "run.sh").chmod(0o755)
    # Another size: rsync's quick check skips a file of the same size and mtime second.
    (source / "code.txt").write_text("v2-new")
    (source / "zbig.bin").write_bytes(b"z" * BIG)
    key = JobKey(JobKind.CONTINUOUS, "synced")
    async with running_daemon(site, debounce_s=FTP_QUIET_S) as daemon:
        await wait_for(lambda: start_lines_of(site, "synced"), what="v1 running")
        # --bwlimit: slow enough (about 1.5 s for the big file) to be stopped inside it.
        rsync = await asyncio.create_subprocess_exec(
            *("rsync", "-a", "--delete", "--bwlimit=2000", f"{source}/", f"{job}/"),
            start_new_session=True,
        )
        try:
            await wait_for(lambda: rsync_temp_file(job, "zbig.bin"), what="rsync in zbig.bin")
            os.killpg(rsync.pid, signal.SIGSTOP)
            try:
                assert (job / "code.txt").read_text() == "v2-new", "code.txt not renamed in"
                await asyncio.to_thread(
                    stall_past_the_quiet_period,
                    daemon,
                    lambda: starts(site, "synced") > 1,
                )
            finally:
                os.killpg(rsync.pid, signal.SIGCONT)
            assert await asyncio.wait_for(rsync.wait(), 30) == 0
        finally:
            if rsync.returncode is None:
                rsync.kill()
                await rsync.wait()
        await wait_for(lambda: len(start_lines_of(site, "synced")) == 2, what="restart")
        await settled(daemon, key)
    assert start_lines_of(site, "synced") == [
        "start big=5 code=v1 old=old",
        f"start big={BIG} code=v2-new old=",
    ]
    assert starts(site, "synced") == 2


def start_lines_of(site: Site, name: str) -> list[str]:
    lines = site.job_log(name).splitlines()
    return [line[line.index("start ") :] for line in lines if "] start " in line]


@pytest.mark.skipif(shutil.which("unzip") is None, reason="unzip is not installed")
async def test_unzip_over_a_job_with_old_mtimes_runs_the_new_code_after_one_restart(
    site: Site,
) -> None:
    """1. a running job  2. `unzip -o` over its folder of a zip whose entries are dated 2001
    (older than every file of the job: the mtimes say nothing changed): a new code.txt, a new
    lib.txt, a big big.bin  3. the job restarts exactly once and runs the new code."""
    job = site.write_job("continuous", "unzipped", {"run.sh": REPORTER, "code.txt": "v1"})
    archive = site.root.parent / "job.zip"
    dated = (2001, 1, 1, 0, 0, 0)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as package:
        for name, content in (
            ("run.sh", REPORTER.encode()),
            ("big.bin", b"u" * BIG),
            ("code.txt", b"v2"),
            ("lib.txt", b"lib-new"),
        ):
            entry = zipfile.ZipInfo(name, date_time=dated)
            entry.external_attr = 0o100755 << 16
            package.writestr(entry, content)
    key = JobKey(JobKind.CONTINUOUS, "unzipped")
    async with running_daemon(site) as daemon:
        await wait_for(lambda: start_lines(site, "unzipped"), what="v1 running")
        await asyncio.to_thread(
            subprocess.run,
            ["unzip", "-o", "-q", str(archive), "-d", str(job)],
            check=True,
        )
        assert (job / "code.txt").stat().st_mtime < time.time() - 20 * 365 * 86400
        await wait_for(lambda: len(start_lines(site, "unzipped")) == 2, what="restart")
        await settled(daemon, key)
    assert start_lines(site, "unzipped") == [
        "start big= lib= code=v1",
        f"start big={BIG} lib=lib-new code=v2",
    ]
    assert starts(site, "unzipped") == 2


@pytest.mark.skipif(shutil.which("lftp") is None, reason="lftp is not installed")
async def test_lftp_upload_under_temp_names_that_stalls_restarts_the_job_once(
    site: Site, tmp_path: Path
) -> None:
    """1. a running job  2. lftp (`xfer:use-temp-file`: each file is written as `.in.NAME` and
    renamed when complete) uploads code.txt, then big.bin rate-limited, and is stopped (SIGSTOP)
    inside big.bin's temp file for longer than the quiet period  3. the job restarts exactly
    once, from the complete new files."""
    job = site.write_job("continuous", "lftpjob", {"run.sh": REPORTER, "code.txt": "v1"})
    build = tmp_path / "build"
    build.mkdir()
    (build / "code.txt").write_text("v2")
    (build / "big.bin").write_bytes(b"l" * BIG)
    key = JobKey(JobKind.CONTINUOUS, "lftpjob")
    commands = "; ".join(
        [
            "set ftp:ssl-allow no",
            "set xfer:use-temp-file yes",
            "set net:limit-rate 0:2000000",  # download:upload, bytes/s
            f"cd {JOBS}/continuous/lftpjob",
            f"put {build / 'code.txt'}",
            f"put {build / 'big.bin'}",
            "bye",
        ]
    )
    async with running_daemon(site, debounce_s=FTP_QUIET_S) as daemon:
        await wait_for(lambda: start_lines(site, "lftpjob"), what="v1 running")
        with ftp_server(site.root / "site" / "wwwroot") as port:
            lftp = await asyncio.create_subprocess_exec(
                *("lftp", "-u", f"{USER},{PASSWORD}", "-p", str(port), "-e", commands),
                "127.0.0.1",
                start_new_session=True,
                env={**os.environ, "HOME": str(tmp_path)},  # no ~/.lftprc of the machine
            )
            try:
                temp = job / ".in.big.bin"
                await wait_for(
                    lambda: temp.exists() and temp.stat().st_size > 0, what="lftp in big.bin"
                )
                os.killpg(lftp.pid, signal.SIGSTOP)
                try:
                    assert (job / "code.txt").read_text() == "v2"
                    await asyncio.to_thread(
                        stall_past_the_quiet_period, daemon, lambda: starts(site, "lftpjob") > 1
                    )
                finally:
                    os.killpg(lftp.pid, signal.SIGCONT)
                assert await asyncio.wait_for(lftp.wait(), 30) == 0
            finally:
                if lftp.returncode is None:
                    lftp.kill()
                    await lftp.wait()
        await wait_for(lambda: len(start_lines(site, "lftpjob")) == 2, what="restart")
        await settled(daemon, key)
    assert start_lines(site, "lftpjob") == [
        "start big= lib= code=v1",
        f"start big={BIG} lib= code=v2",
    ]
    assert starts(site, "lftpjob") == 2
