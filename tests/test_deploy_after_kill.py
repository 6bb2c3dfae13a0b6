"""A daemon killed (SIGKILL) during a deploy: the next start removes what the deploy left
(staging folders, partial uploads) and puts back a job folder that was moved aside, leaving
other instances' deploys alone, and the job is there and runs.

Real daemon processes on a loopback port, real HTTP uploads, real SIGKILLs.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import time
import zipfile

import aiohttp
import pytest

from tests.helpers import DaemonProcess, Site, wait_for, wait_for_sync
from tests.test_faults import ready
from webjobsd.deploy.staging import LEGACY_AGE_S, Staging
from webjobsd.runtime.jobprocess import free_loopback_port
from webjobsd.site import SiteLayout

STAGING = ".webjobsd-staging"
ZIP_HEADERS = {
    "Content-Type": "application/zip",
    "Content-Disposition": "attachment; filename=job.zip",
}


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def start_daemon(site: Site, port: int) -> DaemonProcess:
    daemon = DaemonProcess(site, listen=f"127.0.0.1:{port}").start()
    wait_for_sync(lambda: ready(port), timeout=30, what="daemon ready")
    return daemon


async def run_and_wait(session: aiohttp.ClientSession, base: str, name: str) -> str:
    async with session.post(f"{base}/api/triggeredwebjobs/{name}/run") as response:
        assert response.status == 202, await response.text()
    last: dict[str, str] = {}

    async def finished() -> bool:
        async with session.get(f"{base}/api/triggeredwebjobs/{name}") as response:
            latest = (await response.json())["latest_run"]
        last.update(latest or {})
        return bool(latest) and latest["status"] in ("Success", "Failed")

    deadline = time.monotonic() + 20
    while not await finished():
        assert time.monotonic() < deadline, f"run of {name} did not finish: {last}"
        await asyncio.sleep(0.05)
    return last["status"]


def leftovers(site: Site) -> list[str]:
    staging = site.jobs / STAGING
    found = [str(p.relative_to(site.jobs)) for p in staging.rglob("*")] if staging.exists() else []
    uploads = site.temp / "uploads"
    found += [str(p) for p in uploads.iterdir()] if uploads.is_dir() else []
    return found


async def deploy_forever(
    session: aiohttp.ClientSession, url: str, padding: bytes, first: int, done: list[int]
) -> None:
    """PUT new versions of the job until cancelled; `done[0]` counts the ones that went in."""
    while True:
        body = zip_of({"run.sh": b"echo v%d\n" % (first + done[0]), "pad.bin": padding})
        async with session.put(url, data=io.BytesIO(body), headers=ZIP_HEADERS) as response:
            assert response.status == 200, await response.text()
        done[0] += 1


async def test_a_start_after_a_kill_cleans_up_and_restores_a_moved_job(site: Site) -> None:
    """What a killed deploy leaves, laid out as the daemon lays it out, then one start."""
    site.write_job("triggered", "kept", {"run.sh": "echo kept\n"})
    ours = site.jobs / STAGING / "test01"
    ours.mkdir(parents=True)
    # Killed while extracting: a partial new folder.
    (ours / "new.0123456789ab").mkdir()
    (ours / "new.0123456789ab" / "big.bin").write_bytes(b"\0" * 1_000_000)
    # Killed between the two renames of a swap where the file system cannot exchange: the
    # job folder is parked and the job is missing.
    parked = ours / "old.triggered.aaaaaaaaaaaa.moved"
    parked.mkdir()
    (parked / "run.sh").write_text("echo restored\n")
    # Killed after a swap, before the old content went: the job is in place, this goes.
    (ours / "old.triggered.bbbbbbbbbbbb.kept").mkdir()
    # Another instance's deploy in progress, and older versions' folders.
    theirs = site.jobs / STAGING / "test02" / "new.cccccccccccc"
    theirs.mkdir(parents=True)
    legacy_old_new = site.jobs / STAGING / "new-continuous-x-dddddddddddd"
    legacy_old_new.mkdir()
    stale = time.time() - LEGACY_AGE_S - 60
    os.utime(legacy_old_new, (stale, stale))
    legacy_young_new = site.jobs / STAGING / "new-continuous-y-eeeeeeeeeeee"
    legacy_young_new.mkdir()
    legacy_old = site.jobs / STAGING / "old-ffffffffffff"
    legacy_old.mkdir()
    # Partial uploads: a body being received, a zip PUT's scratch folder.
    uploads = site.temp / "uploads"
    (uploads / "zip-abc" / "content").mkdir(parents=True)
    (uploads / "moved-0123456789abcdef").write_bytes(b"PK partial")

    port = free_loopback_port()
    daemon = start_daemon(site, port)
    try:
        base = f"http://127.0.0.1:{port}"
        assert not ours.exists()
        assert theirs.is_dir() and legacy_young_new.is_dir() and legacy_old.is_dir()
        assert not legacy_old_new.exists()
        assert not uploads.exists() or list(uploads.iterdir()) == []
        assert (site.job_dir("triggered", "moved") / "run.sh").read_text() == "echo restored\n"
        assert "old-ffffffffffff" in daemon.log()  # named for a person to look at
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/api/triggeredwebjobs/moved") as response:
                assert response.status == 200, await response.text()
            assert await run_and_wait(session, base, "moved") == "Success"
            assert await run_and_wait(session, base, "kept") == "Success"
        assert daemon.stop() == 0
    finally:
        daemon.kill_if_running()


async def test_sigkill_at_random_moments_of_repeated_deploys(site: Site) -> None:
    """Uploads of a job over and over, the daemon killed at a random moment of one; after each
    restart nothing is left over, the job exists, and it runs one of the versions sent."""
    rng = random.Random(1234)
    port = free_loopback_port()
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/api/triggeredwebjobs/deployed"
    padding = os.urandom(4_000_000)  # so that a kill can land while extracting
    site.write_job("triggered", "deployed", {"run.sh": "echo v0\n"})
    for round_number in range(1, 7):
        daemon = start_daemon(site, port)
        try:
            assert leftovers(site) == [], round_number
            async with aiohttp.ClientSession() as session:
                async with session.get(url) as response:
                    assert response.status == 200, (round_number, await response.text())
                assert await run_and_wait(session, base, "deployed") == "Success"

                done = [0]
                deploys = asyncio.create_task(
                    deploy_forever(session, url, padding, round_number * 1000, done)
                )
                # At least one deploy through, then a kill at some moment of a later one.
                await wait_for(lambda done=done: done[0] >= 1, timeout=30, what="a deploy done")
                await asyncio.sleep(rng.uniform(0.0, 0.4))  # the random moment, not a wait
                daemon.kill()
                deploys.cancel()
                with pytest.raises((asyncio.CancelledError, aiohttp.ClientError)):
                    await deploys
        finally:
            daemon.kill_if_running()
    daemon = start_daemon(site, port)
    try:
        assert leftovers(site) == []
        assert not (site.jobs / STAGING).exists()
        assert daemon.stop() == 0
    finally:
        daemon.kill_if_running()


def test_an_empty_staging_folder_left_by_a_kill_is_removed_at_start(site: Site) -> None:
    """A kill between the two removals of `release` leaves the staging root without this
    instance's folder: the next start removes it, so an emptied wwwroot can be cloned into."""
    (site.jobs / STAGING).mkdir(parents=True)
    layout = SiteLayout.build(site.root, instance_id="test01", temp_root=site.temp)
    Staging.of(layout).clean_at_start()
    assert not (site.jobs / STAGING).exists()
