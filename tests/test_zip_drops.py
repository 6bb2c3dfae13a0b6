"""Zip-and-drop (KUDU-DEPLOY.md Part A #11) with the tools people drop zips with: `cp`, an FTP
server and client, `PUT /api/vfs`. A dropped `NAME.zip` deploys job NAME once its writer is done,
a bad one becomes `NAME.zip.failed` + `.failed.txt` and the old job keeps running."""

from __future__ import annotations

import asyncio
import ftplib
import io
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.helpers import Site, run_short_of_descriptors, running_daemon, wait_for, wait_for_sync
from tests.test_api_deploy import zip_of
from tests.test_api_jobs import api, get_json
from tests.test_drops import PASSWORD, USER, ftp_server, starts
from webjobsd.app import Daemon
from webjobsd.deploy.drops import DropService
from webjobsd.deploy.pipeline import DeployRequest
from webjobsd.model import INVALID_JOB_NAME, JobKey, JobKind


def looping(text: str) -> str:
    return f'echo "{text}"\nwhile true; do sleep 0.2; done\n'


def drops_of(daemon: Daemon) -> DropService:
    assert daemon.drops is not None
    return daemon.drops


def cp(source: Path, destination: Path) -> None:
    subprocess.run(["cp", str(source), str(destination)], check=True)


def mv(source: Path, destination: Path) -> None:
    subprocess.run(["mv", str(source), str(destination)], check=True)


def failed_reason(folder: Path, name: str) -> str:
    try:
        return (folder / f"{name}.zip.failed.txt").read_text()
    except OSError:
        return ""


async def test_zips_copied_with_cp_deploy_their_jobs_and_are_consumed(site: Site) -> None:
    """1. `cp` to a temp name then `mv` to `a.zip`  2. a plain `cp` writing `b.zip` in place
    3. `rsync` (its own temp name, renamed)  4. the jobs run and the zips are gone; the catalog
    never took a zip for a job."""
    kind_dir = site.jobs / "continuous"
    kind_dir.mkdir(parents=True)
    sources = site.root.parent / "sources"
    sources.mkdir()
    (sources / "a.zip").write_bytes(zip_of({"run.sh": looping("a from mv")}))
    (sources / "b.zip").write_bytes(zip_of({"run.sh": looping("b from cp")}))
    (sources / "c.zip").write_bytes(zip_of({"run.sh": looping("c from rsync")}))
    async with running_daemon(site) as daemon:
        catalog = daemon.catalog
        assert catalog is not None
        await asyncio.to_thread(cp, sources / "a.zip", kind_dir / "a.zip.partial")
        await asyncio.to_thread(mv, kind_dir / "a.zip.partial", kind_dir / "a.zip")
        await asyncio.to_thread(cp, sources / "b.zip", kind_dir / "b.zip")
        await asyncio.to_thread(
            subprocess.run, ["rsync", str(sources / "c.zip"), f"{kind_dir}/"], check=True
        )
        await wait_for(lambda: "a from mv" in site.job_log("a"), timeout=15, what="a running")
        await wait_for(lambda: "b from cp" in site.job_log("b"), timeout=15, what="b running")
        await wait_for(lambda: "c from rsync" in site.job_log("c"), timeout=15, what="c running")
        await wait_for(lambda: not list(kind_dir.glob("*.zip*")), what="zips consumed")
        assert {key.name for key in catalog.specs} == {"a", "b", "c"}
        assert not catalog.errors
        assert [starts(site, name) for name in "abc"] == [1, 1, 1]


async def test_bad_zips_fail_beside_a_running_job_and_a_good_one_replaces_it_once(
    site: Site,
) -> None:
    """1. job `keep` runs  2. `keep.zip` that is no zip, one with `../` (zip-slip), one without
    a script, and `bad name.zip`: each becomes `.zip.failed` + `.failed.txt` saying why; the job
    keeps its process; the catalog takes none of those files for a job  3. a good `keep.zip`
    restarts the job once with the new code and removes the failed pair."""
    site.write_job("continuous", "keep", {"run.sh": looping("keep v1")})
    kind_dir = site.jobs / "continuous"
    async with running_daemon(site) as daemon:
        catalog = daemon.catalog
        assert catalog is not None
        await wait_for(lambda: "keep v1" in site.job_log("keep"), what="v1 running")
        bad = {
            "not a zip": (b"PK but not really a zip", "Not a valid zip archive"),
            "zip-slip": (
                zip_of({"../../escape.sh": "echo escaped\n", "run.sh": looping("slip")}),
                "'..' component",
            ),
            "no script": (zip_of({"readme.txt": "nothing to run"}), "No runnable script"),
        }
        failed = kind_dir / "keep.zip.failed"
        for case, (content, reason) in bad.items():
            staged = site.root.parent / f"{case}.zip"
            staged.write_bytes(content)
            await asyncio.to_thread(cp, staged, kind_dir / "keep.zip")

            def failed_as(reason: str = reason, content: bytes = content) -> bool:
                # The reason is written first, then the zip renamed.
                return (
                    failed.is_file()
                    and failed.read_bytes() == content
                    and (reason in failed_reason(kind_dir, "keep"))
                )

            await wait_for(failed_as, timeout=15, what=case)
            assert not (kind_dir / "keep.zip").exists()
        (kind_dir / "bad name.zip").write_bytes(zip_of({"run.sh": "echo\n"}))
        await wait_for(
            lambda: INVALID_JOB_NAME in failed_reason(kind_dir, "bad name"), what="bad name"
        )
        assert not (site.root / "escape.sh").exists() and not (site.jobs / "escape.sh").exists()
        assert set(catalog.specs) == {JobKey(JobKind.CONTINUOUS, "keep")}
        assert not catalog.errors
        assert starts(site, "keep") == 1
        assert "slip" not in site.job_log("keep")

        (site.root.parent / "good.zip").write_bytes(zip_of({"run.sh": looping("keep v2")}))
        await asyncio.to_thread(cp, site.root.parent / "good.zip", kind_dir / "keep.zip")
        await wait_for(lambda: "keep v2" in site.job_log("keep"), timeout=15, what="v2 running")
        await wait_for(
            lambda: (
                sorted(p.name for p in kind_dir.glob("*.zip*"))
                == ["bad name.zip.failed", "bad name.zip.failed.txt"]
            ),
            what="keep.zip and its failed pair consumed",
        )
    assert starts(site, "keep") == 2


def two_zips_in_one_file(partial: bytes, whole: bytes) -> tuple[bytes, bytes]:
    """A file whose first part alone reads as a complete zip (`partial`, its end record's comment
    as padding), while the whole file reads as `whole` (a zip may carry data before it). An
    upload stalled after the first part leaves a zip that deploys, just not the right one."""
    padded = io.BytesIO(partial)
    with zipfile.ZipFile(padded, "a") as archive:
        # The FTP server's write buffer (8 KiB) may hold back the tail: the comment absorbs it.
        archive.comment = b"p" * 32 * 1024
    first = padded.getvalue()
    return first, whole


async def test_an_ftp_upload_of_a_zip_that_stalls_is_deployed_only_once_complete(
    site: Site,
) -> None:
    """1. an FTP client uploads `ftpjob.zip` and stalls after a part that is itself a complete
    zip, for several quiet periods while the drop service looks at it  2. nothing is deployed
    from the partial file  3. the upload completes: the whole zip's job starts, once."""
    wwwroot = site.root / "site" / "wwwroot"
    (wwwroot / "App_Data" / "jobs" / "continuous").mkdir(parents=True)
    first, second = two_zips_in_one_file(
        zip_of({"run.sh": looping("from the partial upload")}),
        zip_of({"run.sh": looping("from the whole upload")}),
    )
    async with running_daemon(site) as daemon:
        drops = drops_of(daemon)
        quiet_s = drops.quiet_s
        loop = asyncio.get_running_loop()

        def stall() -> None:
            begin, looks_before_sweep = time.monotonic(), []

            def long_enough() -> bool:
                if site.job_dir("continuous", "ftpjob").exists():
                    return True  # deployed from the partial file: the assertion below says so
                elapsed = time.monotonic() - begin
                if elapsed > 2 * quiet_s and not looks_before_sweep:
                    # A sweep, as the periodic rescan makes one: the file is looked at again
                    # after it has been quiet for two quiet periods.
                    looks_before_sweep.append(drops.looked)
                    loop.call_soon_threadsafe(drops.sweep)
                return (
                    elapsed > 4 * quiet_s
                    and bool(looks_before_sweep)
                    and drops.looked > looks_before_sweep[0]
                )

            wait_for_sync(long_enough, timeout=20, what="a stall past the quiet period")
            assert not site.job_dir("continuous", "ftpjob").exists(), "deployed a partial zip"

        def upload() -> None:
            with ftplib.FTP() as ftp:
                ftp.connect("127.0.0.1", port, timeout=30)
                ftp.login(USER, PASSWORD)
                path = "App_Data/jobs/continuous/ftpjob.zip"
                with ftp.transfercmd(f"STOR {path}") as connection:
                    connection.sendall(first)
                    stall()
                    connection.sendall(second)
                ftp.voidresp()

        with ftp_server(wwwroot) as port:
            await asyncio.to_thread(upload)
        await wait_for(
            lambda: "from the whole upload" in site.job_log("ftpjob"), timeout=15, what="started"
        )
        await wait_for(lambda: not (wwwroot / "App_Data/jobs/continuous/ftpjob.zip").exists())
    assert "from the partial upload" not in site.job_log("ftpjob")
    assert starts(site, "ftpjob") == 1


async def test_a_drop_folder_made_later_is_watched_and_folders_renamed_in_leave_watches_alone(
    site: Site,
) -> None:
    """1. `site/deployments/drop` and both kind folders are missing at start: made later, a
    zip copied into each deploys (the watches follow the folders down from their nearest
    existing ancestor)  2. twenty job folders renamed into the continuous folder: the drop
    watches are not made again for each (the folder's own timestamp changing with every entry
    says nothing about which folders to watch)."""
    drop_dir = site.root / "site" / "deployments" / "drop"
    kind_dir = site.jobs / "continuous"
    sources = site.root.parent / "sources"
    staged = site.root.parent / "staged"
    sources.mkdir()
    staged.mkdir()
    job = "App_Data/jobs/continuous/sitejob/run.sh"
    (sources / "site.zip").write_bytes(zip_of({"index.html": "<p>hi</p>", job: looping("s1")}))
    (sources / "k.zip").write_bytes(zip_of({"run.sh": looping("k from a later folder")}))
    (sources / "t.zip").write_bytes(zip_of({"run.sh": "echo t\n"}))
    (sources / "last.zip").write_bytes(zip_of({"run.sh": looping("last one")}))
    names = [f"moved{i}" for i in range(20)]
    for name in names:
        (staged / name).mkdir()
        (staged / name / "run.sh").write_text(looping(name))
        (staged / name / "run.sh").chmod(0o755)
    assert not drop_dir.exists() and not site.jobs.exists()
    async with running_daemon(site) as daemon:
        drops = drops_of(daemon)
        await asyncio.to_thread(drop_dir.mkdir, parents=True)
        await asyncio.to_thread(cp, sources / "site.zip", drop_dir / "site.zip")
        await wait_for(lambda: "s1" in site.job_log("sitejob"), timeout=20, what="site zip")
        await asyncio.to_thread(cp, sources / "k.zip", kind_dir / "k.zip")
        await wait_for(
            lambda: "k from a later folder" in site.job_log("k"), timeout=20, what="k.zip"
        )
        triggered = site.jobs / "triggered"
        await asyncio.to_thread(triggered.mkdir)
        await asyncio.to_thread(cp, sources / "t.zip", triggered / "t.zip")
        await wait_for(lambda: (triggered / "t" / "run.sh").exists(), timeout=20, what="t.zip")
        # Both kind folders and the drop folder exist: no ancestor is watched any more.
        before = drops.resyncs
        for name in names:
            await asyncio.to_thread(os.rename, staged / name, kind_dir / name)
        # Events reach the drop service in order: once a zip dropped after the renames is
        # deployed, the renames' events have all been handled.
        await asyncio.to_thread(cp, sources / "last.zip", kind_dir / "last.zip")
        await wait_for(lambda: "last one" in site.job_log("last"), timeout=20, what="last.zip")
        for name in names:
            await wait_for(lambda name=name: name in site.job_log(name), what=f"{name} running")
        assert drops.resyncs == before


async def test_a_zip_put_through_the_vfs_api_deploys_a_triggered_job(site: Site) -> None:
    """`PUT /api/vfs/site/wwwroot/App_Data/jobs/triggered/report.zip`: the job is deployed, runs
    on request, and the zip is gone."""
    async with api(site) as (daemon, session, base):
        catalog = daemon.catalog
        assert catalog is not None
        url = f"{base}/api/vfs/site/wwwroot/App_Data/jobs/triggered/report.zip"
        body = zip_of({"run.sh": "echo report ran\n"})
        async with session.put(url, data=body) as response:
            assert response.status in (201, 204), await response.text()
        key = JobKey(JobKind.TRIGGERED, "report")
        await wait_for(lambda: key in catalog.specs, timeout=15, what="report deployed")
        kind_dir = site.jobs / "triggered"
        await wait_for(lambda: not list(kind_dir.glob("*.zip*")), what="zip consumed")
        record = await daemon.request_run("report")
        output = daemon.run_store.output_log_path("report", record.run_id)
        await wait_for(
            lambda: output.is_file() and "report ran" in output.read_text(), what="run output"
        )


async def test_a_zip_present_at_start_is_deployed(site: Site) -> None:
    kind_dir = site.jobs / "continuous"
    kind_dir.mkdir(parents=True)
    (kind_dir / "early.zip").write_bytes(zip_of({"run.sh": looping("early bird")}))
    async with running_daemon(site):
        await wait_for(lambda: "early bird" in site.job_log("early"), timeout=15, what="early")
        await wait_for(lambda: not (kind_dir / "early.zip").exists(), what="zip consumed")
    assert starts(site, "early") == 1


def chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


async def test_a_zip_the_daemon_may_not_remove_is_deployed_once_and_named_in_the_log(
    site: Site,
) -> None:
    """The daemon's user may not own a dropped zip. As root, an immutable file stands for one
    the daemon may read but not remove or rename (both there at start): 1. a good one deploys
    its job once; the log names the file it could not remove, and a sweep does not deploy it
    again  2. a bad one cannot be renamed `.failed`: the log names it, it is left as it is."""
    kind_dir = site.jobs / "continuous"
    kind_dir.mkdir(parents=True)
    stuck, broken = kind_dir / "stuck.zip", kind_dir / "broken.zip"
    stuck.write_bytes(zip_of({"run.sh": looping("stuck but deployed")}))
    broken.write_bytes(b"not a zip")
    if shutil.which("chattr") is None or not chattr("+i", stuck):
        pytest.skip("needs chattr +i (ext4 and the like, as root)")
    try:
        # Present at start (an immutable file cannot be renamed into place).
        assert chattr("+i", broken)
        with capture_logs() as daemon_log:
            async with running_daemon(site) as daemon:
                drops = drops_of(daemon)
                await wait_for(
                    lambda: "stuck but deployed" in site.job_log("stuck"), timeout=15, what="run"
                )

                def named(problem: str, path: Path) -> bool:
                    return any(
                        entry.get("file") == str(path) and problem in entry["event"]
                        for entry in daemon_log
                    )

                await wait_for(lambda: named("cannot remove", stuck), what="stuck.zip logged")
                await wait_for(lambda: named("cannot rename", broken), what="broken logged")
                looks = drops.looked
                drops.sweep()
                await wait_for(
                    lambda: drops.looked >= looks + 2 and drops.idle(), what="a sweep looked again"
                )
                assert drops.deployed == 1
                assert broken.read_bytes() == b"not a zip"
                assert not (kind_dir / "broken.zip.failed.txt").exists()
    finally:
        for path in (stuck, broken):
            chattr("-i", path)
    assert starts(site, "stuck") == 1


async def test_a_site_zip_dropped_in_deployments_drop_is_a_zipdeploy_with_a_record(
    site: Site,
) -> None:
    """1. `site.zip` copied into `site/deployments/drop/`: a deployment by `drop` (its record in
    `GET /api/deployments`), the zip's job runs, the zip is gone  2. while another deployment
    holds the lock, `later.zip` waits (no error) and deploys once the lock is free  3. a zip
    that is no zip fails with a record and is kept as `.failed` + `.failed.txt`."""
    drop_dir = site.root / "site" / "deployments" / "drop"
    drop_dir.mkdir(parents=True)
    sources = site.root.parent / "sources"
    sources.mkdir()
    job = "App_Data/jobs/continuous/sitejob/run.sh"
    (sources / "site.zip").write_bytes(
        zip_of({"index.html": "<p>hello</p>", job: looping("sitejob v1")})
    )
    (sources / "later.zip").write_bytes(
        # KuduSync copies a file whose size or mtime differ (zip_of's entries share one mtime).
        zip_of({"index.html": "<p>later</p>", job: looping("sitejob, second version")})
    )
    (sources / "broken.zip").write_bytes(b"no zip at all")

    async with api(site) as (daemon, session, base):
        drops = drops_of(daemon)

        async def records() -> list[dict[str, object]]:
            return list(await get_json(session, f"{base}/api/deployments"))

        await asyncio.to_thread(cp, sources / "site.zip", drop_dir / "site.zip")
        await wait_for(lambda: "sitejob v1" in site.job_log("sitejob"), timeout=20, what="v1")
        await wait_for(lambda: not (drop_dir / "site.zip").exists(), what="site.zip consumed")
        [first] = await records()
        assert (first["deployer"], first["message"], first["status"]) == (
            "drop",
            "Dropped site.zip",
            4,
        )
        assert (site.root / "site" / "wwwroot" / "index.html").read_text() == "<p>hello</p>"

        holder = await daemon.deployments.begin(DeployRequest(deployer="test", message="held"))
        looks = drops.looked
        await asyncio.to_thread(cp, sources / "later.zip", drop_dir / "later.zip")
        await wait_for(lambda: drops.looked >= looks + 3, what="later.zip tried while locked")
        assert (drop_dir / "later.zip").exists() and not (drop_dir / "later.zip.failed").exists()
        await holder.finish()
        await wait_for(lambda: "second version" in site.job_log("sitejob"), timeout=20, what="v2")
        await wait_for(lambda: not (drop_dir / "later.zip").exists(), what="later.zip consumed")

        await asyncio.to_thread(cp, sources / "broken.zip", drop_dir / "broken.zip")
        await wait_for(
            lambda: (
                (drop_dir / "broken.zip.failed").exists()
                and "Not a valid zip archive" in failed_reason(drop_dir, "broken")
            ),
            timeout=20,
            what="broken.zip failed",
        )
        newest = (await records())[0]
        assert (newest["deployer"], newest["message"], newest["status"]) == (
            "drop",
            "Dropped broken.zip",
            3,
        )
        assert str(newest["id"]) in failed_reason(drop_dir, "broken")
        assert [r["message"] for r in await records()][1:] == [
            "Dropped later.zip",
            "held",
            "Dropped site.zip",
        ]
    assert starts(site, "sitejob") == 2


WATCH_WITHOUT_DESCRIPTORS = """
import os, sys
from pathlib import Path
from webjobsd.deploy.drops import _Handler, _Watches

folder = Path(sys.argv[1])
fillers = use_up_descriptors()
watches = _Watches([folder], _Handler(lambda *event: None))
assert watches.start() is False
assert watches.sync() == set()
for fd in fillers:
    os.close(fd)
assert watches.sync() == {folder}, "no watch once descriptors were free again"
watches.stop()
print("ok")
"""


def test_drop_folders_are_watched_once_descriptors_are_free_again(tmp_path: Path) -> None:
    """Out of descriptors when the drop watch is made (a flood of connections while the daemon
    starts): no crash of the daemon's start, and the next sweep makes the watch."""
    folder = tmp_path / "drops"
    folder.mkdir()
    assert "cannot watch the drop folders yet" in run_short_of_descriptors(
        WATCH_WITHOUT_DESCRIPTORS, str(folder)
    )
