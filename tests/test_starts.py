"""`GET /api/continuouswebjobs/{name}/starts`: every start of a job's process and how it ended.

1. A job that prints far more than a log window between crashes keeps every start on record,
   each exit with its code, each start after a crash marked as a restart.
2. Stop and Start through the API are starts but not restarts; a process killed by a signal is an
   exit with the signal; a daemon killed while the job ran leaves that start `lost`, and the next
   daemon's start goes on the same record.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from typing import Any

from tests.helpers import DaemonProcess, Site, leaders, wait_for, wait_for_sync
from tests.test_api_jobs import api, get_json, poll
from tests.test_faults import ready
from webjobsd.runtime.jobprocess import free_loopback_port

LOOP = {"run.sh": "echo up\nexec sleep 1000\n"}


async def test_crashes_of_a_chatty_job_are_all_on_record(site: Site) -> None:
    # Each life prints about 100 KiB, more than the dashboard's log window, then exits 3.
    site.write_job(
        "continuous", "chatty", {"run.sh": "yes 0123456789abcdef | head -c 100000\nexit 3\n"}
    )
    site.write_job("triggered", "report", {"run.sh": "exit 0\n"})
    async with api(site, restart_backoff_initial_s=0.05) as (_daemon, session, base):
        url = f"{base}/api/continuouswebjobs/chatty/starts"
        body = await poll(
            lambda: get_json(session, url),
            lambda body: sum(entry["ended"] == "exited" for entry in body["starts"]) >= 3,
            what="three exits",
        )
        exited = [entry for entry in body["starts"] if entry["ended"] == "exited"]
        assert all(entry["exit_code"] == 3 for entry in exited)
        assert all(entry["instance_id"] == "test01" for entry in body["starts"])
        assert [entry["restart"] for entry in body["starts"]][:3] == [False, True, True]
        assert body["restarts"] == sum(entry["restart"] for entry in body["starts"])
        for entry in exited:
            assert entry["end_time"] >= entry["start_time"]
            assert isinstance(entry["pid"], int)
        assert len(site.job_log("chatty")) > 3 * 64 * 1024

        # The same under Kudu's older route forms; refusals are JSON messages.
        aliased = await get_json(session, f"{base}/api/continuousjobs/chatty/starts")
        assert aliased["starts"][0] == body["starts"][0]
        for path, status in [
            ("/api/continuouswebjobs/missing/starts", 404),
            ("/api/continuouswebjobs/report/starts", 404),
            ("/api/continuouswebjobs/.hidden/starts", 400),
        ]:
            refusal = await get_json(session, base + path, status=status)
            assert refusal["message"]


def get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return json.load(response)


def post(port: int, path: str) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def wait_running(site: Site, port: int, what: str) -> int:
    def running() -> list[int]:
        job = get(port, "/api/continuouswebjobs/loop")
        return leaders(site, "loop") if job["status"] == "Running" else []

    wait_for_sync(lambda: len(running()) == 1, timeout=20, what=what)
    (pid,) = leaders(site, "loop")
    return pid


def test_stops_kills_and_a_killed_daemon_in_the_record(site: Site) -> None:
    site.write_job("continuous", "loop", LOOP)
    port = free_loopback_port()
    config = {"listen": f"127.0.0.1:{port}", "restart_backoff_initial_s": 0.05}
    daemon = DaemonProcess(site, **config).start()
    successor = DaemonProcess(site, **config)
    starts = "/api/continuouswebjobs/loop/starts"
    try:
        wait_for_sync(lambda: ready(port), timeout=20, what="daemon ready")
        first = wait_running(site, port, "first start")
        post(port, "/api/continuouswebjobs/loop/stop")
        wait_for_sync(lambda: not leaders(site, "loop"), timeout=20, what="stopped")
        post(port, "/api/continuouswebjobs/loop/start")
        second = wait_running(site, port, "started again")
        os.kill(second, signal.SIGKILL)
        wait_for_sync(
            lambda: len(get(port, starts)["starts"]) == 3 and leaders(site, "loop") != [second],
            timeout=20,
            what="restart after the kill",
        )
        third = wait_running(site, port, "restarted")
        daemon.kill()
        successor.start()
        wait_for_sync(lambda: ready(port), timeout=20, what="successor ready")
        fourth = wait_running(site, port, "started by the successor")
        body = get(port, starts)
        assert [entry["pid"] for entry in body["starts"]] == [first, second, third, fourth]
        assert [(e["ended"], e["exit_code"], e["restart"]) for e in body["starts"]] == [
            ("stopped", -signal.SIGTERM, False),
            ("exited", -signal.SIGKILL, False),
            ("lost", None, True),
            (None, None, False),
        ]
        assert body["restarts"] == 1
        assert successor.stop() == 0
    finally:
        daemon.kill_if_running()
        successor.kill_if_running()


async def test_the_record_is_written_once_a_start_settles(site: Site) -> None:
    """The file itself, as another instance or a backup would read it."""
    site.write_job("continuous", "loop", LOOP)
    async with api(site):
        path = site.data_dir("continuous", "loop") / "starts_test01.json"
        await wait_for(
            lambda: path.exists() and len(json.loads(path.read_text())["starts"]) == 1,
            what="the start written",
        )
        (entry,) = json.loads(path.read_text())["starts"]
        assert entry["ended"] is None
    (entry,) = json.loads(path.read_text())["starts"]
    assert entry["ended"] == "stopped"
