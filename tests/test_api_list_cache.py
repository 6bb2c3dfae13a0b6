"""Job lists served from a cached body: fresh for this daemon's changes, bounded for others'.

A real daemon on a loopback port and a real HTTP client. "Another instance" is either a lock
and a status file written the way another daemon writes them, or a real second daemon process
sharing the site.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import aiohttp

from tests.helpers import DaemonProcess, Site, leaders, wait_for
from tests.test_api_jobs import LOOP, api, get_json, poll
from webjobsd.http.readmodel import DISK_FRESH_S
from webjobsd.runtime.locks import FileLock

# What "within the bound" may add to DISK_FRESH_S: one build plus a loaded test machine.
SLACK_S = 1.0


async def get_list(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    async with session.get(url, headers=headers or {}) as response:
        return response.status, response.headers["ETag"], await response.read()


def jobs_of(body: bytes) -> dict[str, dict[str, Any]]:
    return {job["name"]: job for job in json.loads(body)}


def write_status_as(site: Site, name: str, instance: str, status: str) -> None:
    """A status file written the way another daemon writes it: a whole file, renamed in."""
    folder = site.data_dir("continuous", name)
    temporary = folder / f".status_{instance}.tmp"
    temporary.write_text(json.dumps({"Status": status}, separators=(",", ":")))
    os.rename(temporary, folder / f"status_{instance}")


def hold_instance_lock(site: Site, instance: str) -> FileLock:
    lock = FileLock(site.root / "data" / "webjobsd" / "instances" / f"{instance}.lock")
    assert lock.try_acquire({"InstanceId": instance})
    return lock


async def seconds_until(condition: Any, timeout: float) -> float:
    started = time.monotonic()
    await poll(condition, lambda done: bool(done), "the list to change", timeout=timeout)
    return time.monotonic() - started


async def test_the_body_is_what_json_response_made(site: Site) -> None:
    site.write_job("continuous", "worker", LOOP)
    site.write_job("triggered", "report", {"run.sh": "exit 0\n"})
    site.write_job("triggered", "odd", {"run.sh": "exit 0\n", "settings.job": '{"x": "é\\u0000"}'})
    async with api(site) as (_daemon, session, base):
        await wait_for(lambda: site.status("worker") == "Running", what="worker running")
        for path in ("/api/webjobs", "/api/continuouswebjobs", "/api/triggeredwebjobs"):
            async with session.get(base + path) as response:
                assert response.headers["Content-Type"] == "application/json; charset=utf-8"
                body = await response.read()
            assert body == json.dumps(json.loads(body)).encode()
        _, _, body = await get_list(session, f"{base}/api/webjobs")
        assert [job["name"] for job in json.loads(body)] == ["odd", "report", "worker"]
        assert jobs_of(body)["odd"]["settings"] == {"x": "é\u0000"}


async def test_own_status_changes_show_at_once(site: Site) -> None:
    site.write_job("continuous", "toggle", LOOP)
    async with api(site) as (_daemon, session, base):
        url = f"{base}/api/continuouswebjobs"
        await wait_for(lambda: site.status("toggle") == "Running", what="running")
        _, running_tag, body = await get_list(session, url)
        assert jobs_of(body)["toggle"]["status"] == "Running"
        # A second read is the cached body: same bytes, same tag.
        assert await get_list(session, url) == (200, running_tag, body)

        async with session.post(f"{base}/api/continuouswebjobs/toggle/stop") as response:
            assert response.status == 200
        await wait_for(lambda: site.status("toggle") == "Stopped", timeout=5, what="stopped")
        # No polling: the first read after the file changed must show it.
        _, stopped_tag, body = await get_list(session, url)
        assert jobs_of(body)["toggle"]["status"] == "Stopped"
        assert jobs_of(body)["toggle"]["detailed_status"] == "test01 - Stopped\r\n"
        assert stopped_tag != running_tag

        async with session.post(f"{base}/api/continuouswebjobs/toggle/start") as response:
            assert response.status == 200
        await wait_for(lambda: site.status("toggle") == "Running", timeout=5, what="running")
        _, _, body = await get_list(session, f"{base}/api/webjobs")
        assert jobs_of(body)["toggle"]["status"] == "Running"


async def test_a_transition_without_any_catalog_change_shows_at_once(site: Site) -> None:
    site.write_job("continuous", "crashy", LOOP)
    # A long backoff keeps the job in PendingRestart after its process dies.
    async with api(site, restart_backoff_initial_s=60.0) as (_daemon, session, base):
        url = f"{base}/api/continuouswebjobs"
        await wait_for(lambda: site.status("crashy") == "Running", what="running")
        pids = await wait_for(lambda: leaders(site, "crashy"), what="the job's process")
        _, _, body = await get_list(session, url)
        assert jobs_of(body)["crashy"]["status"] == "Running"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: site.status("crashy") == "PendingRestart", what="PendingRestart")
        _, _, body = await get_list(session, url)
        assert jobs_of(body)["crashy"]["status"] == "PendingRestart"


async def test_own_runs_and_catalog_changes_show_at_once(site: Site) -> None:
    site.write_job("triggered", "report", {"run.sh": "echo done\n"})
    async with api(site, debounce_s=5.0) as (_daemon, session, base):
        url = f"{base}/api/triggeredwebjobs"
        _, _, body = await get_list(session, url)
        assert jobs_of(body)["report"]["latest_run"] is None

        async with session.post(f"{base}/api/triggeredwebjobs/report/run") as response:
            assert response.status == 202
            location = response.headers["Location"]
        _, _, body = await get_list(session, url)
        latest = jobs_of(body)["report"]["latest_run"]
        assert latest is not None and location.endswith(f"/history/{latest['id']}")

        await poll(lambda: get_json(session, location), lambda r: r["status"] == "Success", "done")
        _, _, body = await get_list(session, url)
        finished = jobs_of(body)["report"]["latest_run"]
        assert finished["status"] == "Success"
        assert finished["output_url"].endswith(f"/{latest['id']}/output_log.txt")

        settings_url = f"{base}/api/triggeredwebjobs/report/settings"
        async with session.put(settings_url, json={"schedule_note": "kept"}) as response:
            assert response.status == 200
        _, _, body = await get_list(session, url)
        assert jobs_of(body)["report"]["settings"] == {"schedule_note": "kept"}

        async with session.delete(f"{base}/api/triggeredwebjobs/report") as response:
            assert response.status == 200
        status, _, body = await get_list(session, url)
        assert (status, body) == (200, b"[]")


async def test_etag_answers_304_until_something_changes(site: Site) -> None:
    site.write_job("continuous", "worker", LOOP)
    async with api(site) as (_daemon, session, base):
        url = f"{base}/api/webjobs"
        await wait_for(lambda: site.status("worker") == "Running", what="running")
        _, tag, _ = await get_list(session, url)
        for _ in range(3):
            async with session.get(url, headers={"If-None-Match": tag}) as response:
                assert response.status == 304
                assert response.headers["ETag"] == tag
                assert await response.read() == b""

        async with session.post(f"{base}/api/continuouswebjobs/worker/stop") as response:
            assert response.status == 200
        await wait_for(lambda: site.status("worker") == "Stopped", timeout=5, what="stopped")
        status, new_tag, body = await get_list(session, url, {"If-None-Match": tag})
        assert status == 200 and new_tag != tag
        assert jobs_of(body)["worker"]["status"] == "Stopped"
        async with session.get(url, headers={"If-None-Match": new_tag}) as response:
            assert response.status == 304


async def test_a_cached_body_is_never_served_to_another_base(site: Site) -> None:
    site.write_job("continuous", "worker", LOOP)
    site.write_job("triggered", "report", {"run.sh": "exit 0\n"})
    async with api(site, trusted_proxies=["127.0.0.1/32"]) as (_daemon, session, base):
        url = f"{base}/api/webjobs"
        proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "jobs.example.org"}
        other = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "other.example.org"}
        _, plain_tag, plain = await get_list(session, url)
        _, proxied_tag, forwarded = await get_list(session, url, proxied)
        _, other_tag, third = await get_list(session, url, other)
        for body, expected in (
            (plain, base),
            (forwarded, "https://jobs.example.org"),
            (third, "https://other.example.org"),
        ):
            jobs = jobs_of(body)
            assert jobs["worker"]["url"] == f"{expected}/api/continuouswebjobs/worker"
            assert jobs["worker"]["log_url"].startswith(f"{expected}/vfs/")
            assert jobs["report"]["history_url"].startswith(f"{expected}/api/")
        assert len({plain_tag, proxied_tag, other_tag}) == 3
        # A tag of one base is no match for another: a 200 with that base's own body.
        status, tag, body = await get_list(session, url, {**proxied, "If-None-Match": plain_tag})
        assert (status, tag, body) == (200, proxied_tag, forwarded)
        assert await get_list(session, url) == (200, plain_tag, plain)


async def test_forwarded_headers_from_an_untrusted_peer_share_the_plain_body(site: Site) -> None:
    site.write_job("continuous", "worker", LOOP)
    async with api(site) as (_daemon, session, base):
        url = f"{base}/api/continuouswebjobs"
        proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "jobs.example.org"}
        plain = await get_list(session, url)
        assert await get_list(session, url, proxied) == plain
        assert jobs_of(plain[2])["worker"]["url"] == f"{base}/api/continuouswebjobs/worker"


async def test_another_instances_status_shows_within_the_bound(site: Site) -> None:
    site.write_job("continuous", "shared", LOOP)
    async with api(site) as (_daemon, session, base):
        url = f"{base}/api/continuouswebjobs"
        await wait_for(lambda: site.status("shared") == "Running", what="running")
        _, _, body = await get_list(session, url)
        assert jobs_of(body)["shared"]["detailed_status"] == "test01 - Running\r\n"

        other = hold_instance_lock(site, "zz0001")
        try:
            write_status_as(site, "shared", "zz0001", "PendingRestart")

            async def shows_other() -> bool:
                job = jobs_of((await get_list(session, url))[2])["shared"]
                return bool(
                    job["detailed_status"] == "test01 - Running\r\nzz0001 - PendingRestart\r\n"
                    # Kudu's rule: the status of the last file read (by name) wins.
                    and job["status"] == "PendingRestart"
                )

            assert await seconds_until(shows_other, 10) <= DISK_FRESH_S + SLACK_S
            # Single-job GETs read the disk at every request.
            write_status_as(site, "shared", "zz0001", "Running")
            job = await get_json(session, f"{base}/api/continuouswebjobs/shared")
            assert job["detailed_status"] == "test01 - Running\r\nzz0001 - Running\r\n"
        finally:
            other.release()

        # The other instance is gone: its file is stale, deleted, and its line goes.
        async def other_gone() -> bool:
            job = jobs_of((await get_list(session, url))[2])["shared"]
            return bool(job["detailed_status"] == "test01 - Running\r\n")

        assert await seconds_until(other_gone, 10) <= DISK_FRESH_S + SLACK_S
        assert not (site.data_dir("continuous", "shared") / "status_zz0001").exists()


async def test_sdk_marker_written_by_a_job_shows_within_the_bound(site: Site) -> None:
    site.write_job("continuous", "sdk", LOOP)
    async with api(site) as (_daemon, session, base):
        url = f"{base}/api/continuouswebjobs"
        await wait_for(lambda: site.status("sdk") == "Running", what="running")
        _, _, body = await get_list(session, url)
        assert jobs_of(body)["sdk"]["using_sdk"] is False
        (site.data_dir("continuous", "sdk") / "webjobssdk.marker").write_text("")

        async def marked() -> bool:
            return bool(jobs_of((await get_list(session, url))[2])["sdk"]["using_sdk"])

        assert await seconds_until(marked, 10) <= DISK_FRESH_S + SLACK_S


async def test_a_second_daemon_on_the_site_shows_in_the_list(site: Site) -> None:
    site.write_job("continuous", "shared", LOOP)
    async with api(site) as (_daemon, session, base):
        url = f"{base}/api/continuouswebjobs"
        await wait_for(lambda: site.status("shared") == "Running", what="running here")
        _, _, body = await get_list(session, url)
        assert jobs_of(body)["shared"]["detailed_status"] == "test01 - Running\r\n"

        second = DaemonProcess(site, "zz0002").start()
        try:
            await wait_for(
                lambda: site.status("shared", "zz0002") == "Running",
                timeout=20,
                what="running on the second daemon",
            )

            async def both() -> bool:
                job = jobs_of((await get_list(session, url))[2])["shared"]
                return bool(job["detailed_status"] == "test01 - Running\r\nzz0002 - Running\r\n")

            assert await seconds_until(both, 10) <= DISK_FRESH_S + SLACK_S
        finally:
            assert second.stop() == 0

        async def only_here() -> bool:
            job = jobs_of((await get_list(session, url))[2])["shared"]
            return bool(job["detailed_status"] == "test01 - Running\r\n")

        assert await seconds_until(only_here, 10) <= DISK_FRESH_S + SLACK_S
