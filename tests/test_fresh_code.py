"""Drops always run the new code and never a half-copy (issue 12, §1, §2, §5): real rsync, zip,
unzip and touch against a real daemon, jobs that record what they saw."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.helpers import Site, leaders, running_daemon, wait_for
from tests.test_api_deploy import ZIP_HEADERS, zip_of
from tests.test_api_jobs import api
from webjobsd.app import Daemon
from webjobsd.model import JobKey, JobKind

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("rsync", "zip", "unzip", "touch")),
    reason="needs rsync, zip, unzip and touch",
)

FIXED_DATE = "@1700000000"  # a reproducible build's timestamps
BIG = 20 * 1024 * 1024
RSYNC_TEMP = re.compile(r"^\..+\.[A-Za-z0-9]{6}$")
LOOP_PRINT = {"run.sh": "echo up\nwhile true; do sleep 0.2; done\n"}
PRINT_VERSION = 'echo "version: $(cat version.txt)"\nwhile true; do sleep 0.2; done\n'


def write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        if rel.endswith(".sh"):
            path.chmod(0o755)
    return root


def run(*argv: str | Path, cwd: Path | None = None) -> None:
    subprocess.run([str(arg) for arg in argv], check=True, cwd=cwd, capture_output=True)


def touch_all(root: Path, date: str | None = None) -> None:
    """`touch` (or `touch -d DATE`) every file below root, as a build tool would."""
    files = [str(path) for path in root.rglob("*") if path.is_file()]
    run("touch", *(["-d", date] if date else []), *files)


def runs_of(site: Site, name: str) -> int:
    return site.job_log(name).count("Status changed to Running")


def records(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


async def settled_after_canary(site: Site, daemon: Daemon) -> None:
    """Every event so far has been looked at: a change made now to a canary job is seen last."""
    canary = site.job_dir("continuous", "canary")
    before = runs_of(site, "canary")
    (canary / "marker.txt").write_text(f"{time.monotonic_ns()}\n")
    await wait_for(lambda: runs_of(site, "canary") > before, timeout=15, what="canary restart")
    assert daemon.discovery is not None
    await wait_for(lambda: daemon.discovery.debouncer.next_due() is None, what="quiet debouncer")


class SlowWriter:
    """An in-place overwrite of a big file in chunks, pausing less than the quiet period between
    them (a slow FTP or SMB client writing over the old file)."""

    def __init__(self, path: Path, fill: bytes, *, chunk: int = 512 * 1024, pause: float = 0.1):
        self.path, self.fill, self.chunk, self.pause = path, fill, chunk, pause
        self.written = 0
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._write, name="slow-writer", daemon=True)

    def start(self) -> SlowWriter:
        self._thread.start()
        return self

    def _write(self) -> None:
        try:
            with open(self.path, "wb") as handle:
                while self.written < BIG:
                    handle.write(self.fill * self.chunk)
                    handle.flush()
                    self.written += self.chunk
                    time.sleep(self.pause)  # the client's pace, not a synchronisation
        finally:
            self.done.set()

    def join(self) -> None:
        self._thread.join(30)


SEE_BIG = """\
    size=$(wc -c < big.bin); first=$(head -c 1 big.bin); last=$(tail -c 1 big.bin)
    echo "$size $first $last" >> {record}
"""


def complete(line: str) -> bool:
    size, first, last = [*line.split(), "", "", ""][:3]
    return int(size or 0) == BIG and first == last and first in ("a", "b")


# -- §1 the new code always runs -------------------------------------------------------------


async def test_rsync_a_of_a_version_with_the_same_mtimes_runs_the_new_code(
    site: Site, tmp_path: Path
) -> None:
    """1. v1 and v2 built with the same timestamps (touch -d), different sizes  2. rsync -a v1,
    then v2, over the job folder  3. the restarted process prints v2."""
    v1 = write_tree(tmp_path / "v1", {"run.sh": PRINT_VERSION, "version.txt": "one\n"})
    v2 = write_tree(tmp_path / "v2", {"run.sh": PRINT_VERSION, "version.txt": "two, longer\n"})
    touch_all(v1, FIXED_DATE)
    touch_all(v2, FIXED_DATE)
    job_dir = site.job_dir("continuous", "stale")
    job_dir.parent.mkdir(parents=True)
    run("rsync", "-a", f"{v1}/", f"{job_dir}/")
    async with running_daemon(site):
        await wait_for(lambda: "version: one" in site.job_log("stale"), what="v1 running")
        run("rsync", "-a", f"{v2}/", f"{job_dir}/")
        await wait_for(
            lambda: "version: two, longer" in site.job_log("stale"), timeout=15, what="v2 running"
        )
        assert runs_of(site, "stale") == 2


def same_size_same_date_zips(tmp_path: Path, script: str) -> tuple[Path, Path]:
    """Two zips built with `zip -X` from files of the same sizes and dates, other bytes."""
    zips = []
    for version in ("AAAA", "BBBB"):
        source = write_tree(tmp_path / version, {"run.sh": script, "version.txt": f"{version}\n"})
        touch_all(source, FIXED_DATE)
        archive = tmp_path / f"{version}.zip"
        run("zip", "-X", "-q", "-r", archive, ".", cwd=source)
        zips.append(archive)
    assert zips[0].stat().st_size == zips[1].stat().st_size
    return zips[0], zips[1]


def unzip_over(archive: Path, job_dir: Path) -> None:
    job_dir.parent.mkdir(parents=True, exist_ok=True)
    run("unzip", "-o", "-q", archive, "-d", job_dir)


async def test_unzip_of_same_size_same_date_new_content_restarts_with_the_new_code(
    site: Site, tmp_path: Path
) -> None:
    """1. unzip -o of zip A over a continuous job  2. unzip -o of zip B (same sizes and dates,
    other bytes)  3. the job restarts and prints B."""
    first, second = same_size_same_date_zips(tmp_path, PRINT_VERSION)
    job_dir = site.job_dir("continuous", "same")
    unzip_over(first, job_dir)
    async with running_daemon(site):
        await wait_for(lambda: "version: AAAA" in site.job_log("same"), what="A running")
        unzip_over(second, job_dir)
        await wait_for(
            lambda: "version: BBBB" in site.job_log("same"), timeout=15, what="restart with B"
        )
        assert site.job_log("same").count("version: AAAA") == 1


async def test_stop_unzip_start_runs_the_new_code(site: Site, tmp_path: Path) -> None:
    """1. a continuous job from zip A, stopped through the API  2. unzip -o of zip B (same
    sizes and dates)  3. started through the API, it prints B."""
    first, second = same_size_same_date_zips(tmp_path, PRINT_VERSION)
    job_dir = site.job_dir("continuous", "same")
    unzip_over(first, job_dir)
    site.write_job("continuous", "canary", LOOP_PRINT)
    async with api(site) as (daemon, session, base):
        await wait_for(lambda: "version: AAAA" in site.job_log("same"), what="A running")
        async with session.post(f"{base}/api/continuouswebjobs/same/stop") as response:
            assert response.status == 200
        await wait_for(lambda: site.status("same") == "Stopped", what="stopped")
        unzip_over(second, job_dir)
        await settled_after_canary(site, daemon)
        async with session.post(f"{base}/api/continuouswebjobs/same/start") as response:
            assert response.status == 200
        await wait_for(
            lambda: "version: BBBB" in site.job_log("same"), timeout=15, what="start runs B"
        )
        assert site.job_log("same").count("version: AAAA") == 1


async def test_a_run_after_unzip_of_same_size_same_date_content_runs_the_new_code(
    site: Site, tmp_path: Path
) -> None:
    """1. a triggered job from zip A ran  2. unzip -o of zip B (same sizes and dates)  3. the
    next run through the API prints B."""
    first, second = same_size_same_date_zips(tmp_path, 'echo "version: $(cat version.txt)"\n')
    job_dir = site.job_dir("triggered", "sametrig")
    unzip_over(first, job_dir)
    site.write_job("continuous", "canary", LOOP_PRINT)
    async with api(site) as (daemon, session, base):
        run_url = f"{base}/api/triggeredwebjobs/sametrig/run"
        async with session.post(run_url) as response:
            assert response.status == 202, await response.text()
        await wait_for(lambda: "version: AAAA" in output_of_latest(site, "sametrig"), what="A")
        await wait_for_run_finished(site, "sametrig")
        first_run = latest_run_dir(site, "sametrig")
        unzip_over(second, job_dir)
        await settled_after_canary(site, daemon)
        async with session.post(run_url) as response:
            assert response.status == 202, await response.text()
        await wait_for(lambda: latest_run_dir(site, "sametrig") != first_run, what="second run")
        await wait_for_run_finished(site, "sametrig")
        assert "version: BBBB" in output_of_latest(site, "sametrig")


def latest_run_dir(site: Site, name: str) -> Path | None:
    folder = site.data_dir("triggered", name)
    if not folder.is_dir():
        return None
    runs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    return runs[-1] if runs else None


def output_of_latest(site: Site, name: str) -> str:
    folder = latest_run_dir(site, name)
    try:
        return (folder / "output_log.txt").read_text() if folder else ""
    except OSError:
        return ""


async def wait_for_run_finished(site: Site, name: str) -> None:
    def ended() -> bool:
        folder = latest_run_dir(site, name)
        try:
            return folder is not None and '"EndTime"' in (folder / "status").read_text()
        except OSError:
            return False

    await wait_for(ended, timeout=15, what=f"the run of {name} ended")


@pytest.mark.parametrize("redeploy", ["rsync -a", "rsync -a --checksum", "touch", "zip PUT"])
async def test_an_identical_redeploy_restarts_nothing(
    site: Site, tmp_path: Path, redeploy: str
) -> None:
    """1. three jobs deployed with rsync -a, one with a zip PUT  2. the same content deployed
    again: a rebuild (same bytes, new times) with rsync -a (new files) or rsync -a --checksum
    (new times), a `touch` of the job files, the same zip PUT again (a swapped folder)
    3. no job restarts: every pid is the same."""
    source = tmp_path / "build"
    names = ("alpha", "beta", "gamma")
    for name in names:
        write_tree(
            source / "continuous" / name,
            {"run.sh": "while true; do sleep 0.2; done\n", "lib/data.txt": f"{name}\n"},
        )
    site.jobs.mkdir(parents=True)
    run("rsync", "-a", f"{source}/", f"{site.jobs}/")
    site.write_job("continuous", "canary", LOOP_PRINT)
    body = zip_of({"run.sh": "while true; do sleep 0.2; done\n"})
    zip_url = "/api/continuouswebjobs/zipped"
    async with api(site) as (daemon, session, base):
        async with session.put(base + zip_url, data=body, headers=ZIP_HEADERS) as response:
            assert response.status == 200, await response.text()
        for name in (*names, "zipped"):
            await wait_for(lambda name=name: leaders(site, name), what=f"{name} running")
        pids = {name: leaders(site, name) for name in (*names, "zipped")}
        assert daemon.catalog is not None and daemon.supervisor is not None
        keys = [JobKey(JobKind.CONTINUOUS, name) for name in pids]
        fingerprints = {key: daemon.catalog.specs[key].fingerprint for key in keys}
        if redeploy == "zip PUT":
            async with session.put(base + zip_url, data=body, headers=ZIP_HEADERS) as response:
                assert response.status == 200, await response.text()
        elif redeploy == "touch":
            touch_all(site.jobs / "continuous")
        else:
            touch_all(source)  # a rebuild: same bytes, new timestamps
            run(*redeploy.split(), f"{source}/", f"{site.jobs}/")
        await settled_after_canary(site, daemon)
        # What decides a restart, then what a restart would show.
        assert {key: daemon.catalog.specs[key].fingerprint for key in keys} == fingerprints
        targets = daemon.supervisor.targets()
        assert {key: targets[key].fingerprint for key in keys} == fingerprints
        assert {name: leaders(site, name) for name in pids} == pids, f"restarted by {redeploy}"
        for name in pids:
            assert runs_of(site, name) == 1, site.job_log(name)


# -- §2 never a half-copy --------------------------------------------------------------------


async def test_a_crash_looping_job_never_starts_from_a_file_being_overwritten(
    site: Site, tmp_path: Path
) -> None:
    """1. a job that records what it sees of big.bin and exits, restarted every second
    2. big.bin overwritten in place in chunks, pauses shorter than the quiet period
    3. every start saw a whole file: the old one while it was written, the new one after."""
    record = tmp_path / "seen.txt"
    job_dir = site.write_job(
        "continuous", "crashy", {"run.sh": SEE_BIG.format(record=record) + "exit 1\n"}
    )
    (job_dir / "big.bin").write_bytes(b"a" * BIG)
    old = time.time() - 60
    os.utime(job_dir / "big.bin", (old, old))
    async with running_daemon(
        site, debounce_s=1.0, environ={"WEBJOBS_RESTART_TIME": "1"}
    ) as daemon:
        await wait_for(lambda: records(record), what="first start")
        writer = SlowWriter(job_dir / "big.bin", b"b").start()
        during = len(records(record))
        await wait_for(writer.done.is_set, timeout=60, what="overwrite finished")
        writer.join()
        starts_during = len(records(record)) - during
        await wait_for(
            lambda: records(record)[-1].endswith("b b"), timeout=20, what="new file runs"
        )
        assert daemon.catalog is not None
    seen = records(record)
    assert starts_during >= 2, f"the job did not restart during the overwrite: {seen}"
    assert all(complete(line) for line in seen), f"a start saw a partial file: {seen}"


async def test_an_in_place_job_waits_for_its_folder_to_settle(site: Site, tmp_path: Path) -> None:
    """1. an in-place job (no copy to fall back on) that records what it sees and exits
    2. big.bin overwritten in place slowly  3. no start saw a partial file; the job log says it
    waits for the folder; the new file runs in the end."""
    record = tmp_path / "seen.txt"
    job_dir = site.write_job(
        "continuous",
        "inplace",
        {
            "run.sh": SEE_BIG.format(record=record) + "exit 1\n",
            "settings.job": '{"is_in_place": true}',
        },
    )
    (job_dir / "big.bin").write_bytes(b"a" * BIG)
    old = time.time() - 60
    for path in job_dir.iterdir():
        os.utime(path, (old, old))
    async with running_daemon(site, debounce_s=1.0, environ={"WEBJOBS_RESTART_TIME": "1"}):
        await wait_for(lambda: records(record), what="first start")
        writer = SlowWriter(job_dir / "big.bin", b"b").start()
        await wait_for(writer.done.is_set, timeout=60, what="overwrite finished")
        writer.join()
        await wait_for(
            lambda: records(record)[-1].endswith("b b"), timeout=20, what="new file runs"
        )
    seen = records(record)
    assert all(complete(line) for line in seen), f"a start saw a partial file: {seen}"
    assert "Waiting for the job folder" in site.job_log("inplace")


async def test_a_run_requested_mid_upload_runs_the_last_settled_copy(
    site: Site, tmp_path: Path
) -> None:
    """1. a triggered job ran once  2. its big.bin is overwritten slowly  3. a run requested
    mid-upload sees the whole old file  4. once settled, a run sees the whole new file."""
    record = tmp_path / "seen.txt"
    job_dir = site.write_job("triggered", "report", {"run.sh": SEE_BIG.format(record=record)})
    (job_dir / "big.bin").write_bytes(b"a" * BIG)
    old = time.time() - 60
    os.utime(job_dir / "big.bin", (old, old))
    async with running_daemon(site, debounce_s=1.0) as daemon:
        assert daemon.catalog is not None
        key = JobKey(JobKind.TRIGGERED, "report")
        settled = daemon.catalog.specs[key].fingerprint
        await daemon.request_run("report")
        await wait_for(lambda: len(records(record)) == 1, what="first run")
        writer = SlowWriter(job_dir / "big.bin", b"b").start()
        await wait_for(lambda: writer.written >= 4 * writer.chunk, what="upload under way")
        await daemon.request_run("report")
        await wait_for(lambda: len(records(record)) == 2, timeout=15, what="mid-upload run")
        assert not writer.done.is_set(), "the upload ended before the run: nothing was tested"
        await wait_for(writer.done.is_set, timeout=60, what="upload finished")
        writer.join()
        await wait_for(
            lambda: daemon.catalog.specs[key].fingerprint != settled,  # type: ignore[union-attr]
            timeout=20,
            what="new version settled",
        )
        await wait_for(lambda: not daemon.triggered.active, what="run ended")  # type: ignore[union-attr]
        await daemon.request_run("report")
        await wait_for(lambda: len(records(record)) == 3, timeout=15, what="run after upload")
    seen = records(record)
    assert seen[:2] == [f"{BIG} a a", f"{BIG} a a"], seen
    assert seen[2] == f"{BIG} b b", seen


async def test_a_first_run_requested_mid_upload_waits_for_the_folder_to_settle(
    site: Site, tmp_path: Path
) -> None:
    """1. a triggered job that never ran (no copy to fall back on)  2. a run requested while its
    big.bin is overwritten slowly  3. the run says it waits, then runs the whole new file."""
    record = tmp_path / "seen.txt"
    job_dir = site.write_job("triggered", "first", {"run.sh": SEE_BIG.format(record=record)})
    (job_dir / "big.bin").write_bytes(b"a" * BIG)
    old = time.time() - 60
    os.utime(job_dir / "big.bin", (old, old))
    async with running_daemon(site, debounce_s=1.0) as daemon:
        writer = SlowWriter(job_dir / "big.bin", b"b").start()
        await wait_for(lambda: writer.written >= 4 * writer.chunk, what="upload under way")
        await daemon.request_run("first")
        await wait_for(lambda: records(record), timeout=60, what="the run ran")
        writer.join()
        await wait_for(lambda: not daemon.triggered.active, what="run ended")  # type: ignore[union-attr]
    assert records(record) == [f"{BIG} b b"]
    assert "Waiting for the job folder" in output_of_latest(site, "first")


async def test_rsync_temp_files_never_reach_a_working_copy(site: Site, tmp_path: Path) -> None:
    """1. a crash-looping job that lists its files at each start  2. rsync -a --bwlimit of a new
    version with a big file (its `.zz.bin.XXXXXX` lives for seconds)  3. no start ever saw an
    rsync temp file, and the new version runs in the end."""
    record = tmp_path / "seen.txt"
    script = f'echo "start $(cat a.txt)" >> {record}\nfind . -type f >> {record}\nexit 1\n'
    v1 = write_tree(tmp_path / "v1", {"run.sh": script, "a.txt": "v1\n", "zz.bin": b"1" * 1024})
    v2 = write_tree(
        tmp_path / "v2", {"run.sh": script, "a.txt": "v2\n", "zz.bin": os.urandom(3 * 1024 * 1024)}
    )
    touch_all(v1, FIXED_DATE)
    job_dir = site.job_dir("continuous", "names")
    job_dir.parent.mkdir(parents=True)
    run("rsync", "-a", f"{v1}/", f"{job_dir}/")
    async with running_daemon(site, debounce_s=1.0, environ={"WEBJOBS_RESTART_TIME": "1"}):
        await wait_for(lambda: records(record), what="first start")
        rsync = await asyncio.create_subprocess_exec(
            "rsync", "-a", "--bwlimit=600", f"{v2}/", f"{job_dir}/"
        )
        before = len(records(record))
        assert await asyncio.wait_for(rsync.wait(), 60) == 0
        assert len(records(record)) > before + 2, "no start happened during the transfer"
        await wait_for(lambda: "start v2" in records(record), timeout=20, what="v2 runs")
    names = [line.rsplit("/", 1)[-1] for line in records(record) if line.startswith("./")]
    temps = [name for name in names if RSYNC_TEMP.match(name)]
    assert not temps, f"rsync temp files were copied: {temps}"


# -- §5 odd folders --------------------------------------------------------------------------


async def test_a_job_folder_500_levels_deep_runs(site: Site) -> None:
    """1. a job with a file 500 folders down  2. it runs from its copy and finds that file."""
    job_dir = site.write_job(
        "continuous",
        "deep",
        {"run.sh": 'echo "found $(find . -name deep.txt | wc -l)"\nwhile true; do sleep 1; done\n'},
    )
    bottom = job_dir / Path(*["d"] * 500)
    bottom.mkdir(parents=True)
    (bottom / "deep.txt").write_text("down here\n")
    async with running_daemon(site):
        await wait_for(lambda: "found 1" in site.job_log("deep"), timeout=20, what="deep job ran")
        assert site.status("deep") == "Running"
        assert "Traceback" not in site.job_log("deep")


async def test_fifos_and_sockets_in_a_job_folder_are_skipped_with_a_warning(site: Site) -> None:
    """1. a job folder holding a FIFO and a unix socket  2. the job runs  3. the job log names
    both as skipped; the daemon log warns once per file, however often the folder is read."""
    job_dir = site.write_job(
        "continuous", "odd", {"run.sh": "ls -A; echo listed\nwhile true; do sleep 0.2; done\n"}
    )
    os.mkfifo(job_dir / "pipe")
    short = Path(tempfile.mkdtemp(dir="/tmp"))  # AF_UNIX paths are short: bind, then move
    try:
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(short / "sock"))
        os.rename(short / "sock", job_dir / "sock")
    finally:
        shutil.rmtree(short)
    with capture_logs() as daemon_log:
        await run_odd_job(site, job_dir)
    problems = [str(entry.get("problem", "")) for entry in daemon_log]
    for special in ("pipe (FIFO)", "sock (socket)"):
        said = [problem for problem in problems if problem.startswith(f"special file {special}")]
        assert len(said) == 1, problems


async def run_odd_job(site: Site, job_dir: Path) -> None:
    async with running_daemon(site):
        await wait_for(lambda: "listed" in site.job_log("odd"), timeout=15, what="job ran")
        log = site.job_log("odd")
        assert "Skipped 'pipe': a FIFO is not a job file" in log
        assert "Skipped 'sock': a socket is not a job file" in log
        # The status file follows the spawn by up to LAUNCH_STATUS_DELAY_S.
        await wait_for(lambda: site.status("odd") == "Running", what="status Running")
        for version in ("2", "3"):  # two more looks at the folder, each restarting the job
            (job_dir / "version.txt").write_text(version)
            await wait_for(
                lambda version=version: site.job_log("odd").count("listed") == int(version),
                timeout=15,
                what=f"restart {version}",
            )


async def test_a_copy_that_fails_is_said_once_and_retried_when_the_files_change(
    site: Site,
) -> None:
    """1. the working copies' folder cannot be created  2. the job says why once and waits
    (PendingRestart), and the API's `error` of the job says why  3. once the folder can be made,
    a change of the job files starts it, and `error` is null again."""
    job_dir = site.write_job("continuous", "nocopy", LOOP_PRINT)
    blocker = site.temp / "jobs" / "continuous"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")

    async def job_error(session: aiohttp.ClientSession, base: str) -> object:
        async with session.get(f"{base}/api/continuouswebjobs/nocopy") as response:
            return (await response.json())["error"]

    async with api(site) as (daemon, session, base):
        await wait_for(
            lambda: site.status("nocopy") == "PendingRestart", timeout=15, what="says it waits"
        )
        error = await job_error(session, base)
        assert isinstance(error, str), error
        assert error.startswith("test01: Failed to copy job files:"), error
        assert daemon.reconciler is not None
        passes = daemon.reconciler.passes
        await wait_for(lambda: daemon.reconciler.passes >= passes + 3, what="three passes")  # type: ignore[union-attr]
        log = site.job_log("nocopy")
        assert log.count("Failed to copy job files") == 1, log
        assert "Traceback" not in log
        blocker.unlink()
        (job_dir / "run.sh").write_text(LOOP_PRINT["run.sh"].replace("up", "up again"))
        await wait_for(lambda: "up again" in site.job_log("nocopy"), timeout=15, what="started")
        assert site.status("nocopy") == "Running"
        assert await job_error(session, base) is None
