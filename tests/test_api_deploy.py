"""Deploying jobs through the API: zip and single-file uploads, refused uploads leave nothing."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import Site, job_pids, leaders, wait_for
from tests.test_api_jobs import api, get_json, poll
from webjobsd.model import JobKey, JobKind


def zip_of(files: dict[str, str | bytes], *, modes: dict[str, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 2, 3, 4, 6))
            info.external_attr = ((modes or {}).get(name, 0o644) & 0xFFFF) << 16
            archive.writestr(info, content)
    return buffer.getvalue()


ZIP_HEADERS = {
    "Content-Type": "application/zip",
    "Content-Disposition": "attachment; filename=job.zip",
}


async def test_full_lifecycle_of_both_kinds_through_the_api_only(site: Site) -> None:
    """1. upload a continuous job as a zip  2. it runs; stop/start  3. upload a triggered job
    as one file  4. run it with arguments, poll history, read its output  5. delete both."""
    async with api(site) as (_daemon, session, base):
        body = zip_of({"run.sh": "echo deployed $WEBJOBS_NAME\nwhile true; do sleep 0.2; done\n"})
        async with session.put(
            f"{base}/api/continuouswebjobs/svc", data=body, headers=ZIP_HEADERS
        ) as response:
            assert response.status == 200, await response.text()
            job = await response.json()
        assert job["name"] == "svc" and job["type"] == "continuous"
        await wait_for(lambda: leaders(site, "svc"), what="deployed job running")
        job = await poll(
            lambda: get_json(session, f"{base}/api/continuouswebjobs/svc"),
            lambda j: j["status"] == "Running",
            "Running",
        )
        async with session.post(f"{base}/api/continuouswebjobs/svc/stop") as response:
            assert response.status == 200
        await wait_for(lambda: not job_pids(site, "svc"), what="stopped")
        async with session.post(f"{base}/api/continuouswebjobs/svc/start") as response:
            assert response.status == 200
        await wait_for(lambda: leaders(site, "svc"), what="back")

        script = b'echo "args: $#"; for a in "$@"; do echo "<$a>"; done\n'
        async with session.put(
            f"{base}/api/triggeredwebjobs/task",
            data=script,
            headers={"Content-Disposition": 'attachment; filename="run.sh"'},
        ) as response:
            assert response.status == 200, await response.text()
        async with session.post(
            f"{base}/api/triggeredwebjobs/task/run", params={"arguments": '"a b" c'}
        ) as response:
            assert response.status == 202
            location = response.headers["Location"]
        run = await poll(
            lambda: get_json(session, location), lambda r: r["status"] == "Success", "run"
        )
        history = await get_json(session, f"{base}/api/triggeredwebjobs/task/history")
        assert [r["id"] for r in history["runs"]] == [run["id"]]
        async with session.get(run["output_url"]) as response:
            assert response.status == 200
            text = await response.text()
        assert "INFO] args: 2" in text and "INFO] <a b>" in text

        for url in (f"{base}/api/continuouswebjobs/svc", f"{base}/api/triggeredwebjobs/task"):
            async with session.delete(url) as response:
                assert response.status == 200
            await get_json(session, url, status=404)
        assert not job_pids(site, "svc")


async def test_a_new_upload_replaces_the_old_job(site: Site) -> None:
    async with api(site) as (_daemon, session, base):
        url = f"{base}/api/continuouswebjobs/app"
        for version in ("1", "2"):
            body = zip_of(
                {
                    "run.sh": f"echo v{version}\nwhile true; do sleep 0.2; done\n",
                    "settings.job": "{}",
                }
            )
            async with session.put(url, data=body, headers=ZIP_HEADERS) as response:
                assert response.status == 200
            await wait_for(
                lambda v=version: f"INFO] v{v}" in site.job_log("app"), what=f"v{version}"
            )
        assert len(leaders(site, "app")) == 1


async def test_refused_uploads_write_nothing(site: Site) -> None:
    site.write_job(
        "continuous", "keep", {"run.sh": "echo original\nwhile true; do sleep 1; done\n"}
    )
    async with api(site, max_upload_bytes=64 * 1024) as (_daemon, session, base):
        url = f"{base}/api/continuouswebjobs/keep"
        before = sorted(p.name for p in site.job_dir("continuous", "keep").iterdir())
        cases = [
            (zip_of({"../../escape.sh": "echo x\n", "run.sh": "echo\n"}), 400),
            (zip_of({"/abs/path.sh": "echo x\n", "run.sh": "echo\n"}), 400),
            (zip_of({"link": "/etc/passwd", "run.sh": "echo\n"}, modes={"link": 0o120777}), 400),
            (zip_of({"readme.txt": "no script here"}), 400),
            (b"this is not a zip", 400),
        ]
        for body, status in cases:
            async with session.put(url, data=body, headers=ZIP_HEADERS) as response:
                assert response.status == status, await response.text()
                assert "message" in await response.json()
        async with session.put(url, data=b"echo\n") as response:
            assert response.status == 400
            assert (await response.json())["message"] == "Missing Content-Disposition header."

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield b"\0" * 4096

        async with session.put(url, data=chunks(), headers=ZIP_HEADERS) as response:
            assert response.status == 413
        assert sorted(p.name for p in site.job_dir("continuous", "keep").iterdir()) == before
        assert not (site.root / "escape.sh").exists()
        assert not (site.jobs / "escape.sh").exists()
        staging = site.jobs / ".webjobsd-staging"
        assert not staging.exists() or not any(staging.iterdir())
        async with session.put(
            f"{base}/api/continuouswebjobs/bad%20name", data=b"x", headers=ZIP_HEADERS
        ) as response:
            assert response.status == 400


async def test_single_file_upload_with_temp_on_another_file_system(site: Site) -> None:
    """The upload folder (temp) on tmpfs, the jobs on disk: moving across file systems works."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(site.root.parent).st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    temp = Path(tempfile.mkdtemp(dir=shm, prefix="webjobsd-test-"))
    try:
        async with (
            api(site, temp_dir=str(temp)) as (_daemon, session, base),
            session.put(
                f"{base}/api/triggeredwebjobs/moved",
                data=b"echo moved\n",
                headers={"Content-Disposition": "attachment; filename=run.sh"},
            ) as response,
        ):
            assert response.status == 200, await response.text()
    finally:
        shutil.rmtree(temp, ignore_errors=True)


async def test_concurrent_uploads_of_one_job_all_succeed_and_one_wins(site: Site) -> None:
    async with api(site) as (_daemon, session, base):
        url = f"{base}/api/continuouswebjobs/busy"

        async def upload(version: int) -> int:
            body = zip_of({"run.sh": f"echo v{version}\nwhile true; do sleep 0.2; done\n"})
            async with session.put(url, data=body, headers=ZIP_HEADERS) as response:
                return response.status

        statuses = await asyncio.gather(*(upload(v) for v in range(8)))
        assert statuses == [200] * 8
        # The folder holds the winner; restarts for versions that lost may still be under way
        # (each applied upload is a change), so wait for the winner's own process.
        winner = (site.job_dir("continuous", "busy") / "run.sh").read_bytes()

        def winner_alone() -> bool:
            running = leaders(site, "busy")
            return len(running) == 1 and _runs_file(running[0], "run.sh") == winner

        await wait_for(winner_alone, what="the winning version's process alone")
        await wait_for(lambda: site.status("busy") == "Running", what="Running")
        assert winner_alone()


def _runs_file(pid: int, name: str) -> bytes | None:
    """The file `name` in the folder process `pid` runs from (its working copy)."""
    try:
        return (Path(f"/proc/{pid}/cwd") / name).read_bytes()
    except OSError:
        return None




async def test_an_upload_is_taken_at_once_while_its_own_write_events_lag(site: Site) -> None:
    """1. the watcher has handed over the write events of the daemon's own extraction but not
    yet their close (under load its thread lags)  2. the upload is still taken at once: a new
    job answers 200, a new version is in the catalog when the PUT answers. The daemon completed
    that folder itself, so no file in it is open for writing."""
    async with api(site) as (daemon, session, base):
        assert daemon.discovery is not None and daemon.discovery.watcher is not None
        assert daemon.catalog is not None
        watcher, key = daemon.discovery.watcher, JobKey(JobKind.CONTINUOUS, "lagging")
        job_file = site.job_dir("continuous", "lagging") / "run.sh"
        fingerprints = []
        for version in ("1", "2"):
            watcher._event("modified", str(job_file), "", False)  # its close still on the way
            body = zip_of({"run.sh": f"echo v{version}\nwhile true; do sleep 0.2; done\n"})
            url = f"{base}/api/continuouswebjobs/lagging"
            async with session.put(url, data=body, headers=ZIP_HEADERS) as response:
                assert response.status == 200, await response.text()
            fingerprints.append(daemon.catalog.specs[key].fingerprint)
        assert fingerprints[0] != fingerprints[1], "the PUT answered with the old version"
