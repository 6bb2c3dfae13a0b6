"""Triggered runs end to end: real processes, real run folders, daemon in-process."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.helpers import DaemonProcess, Site, job_pids, running_daemon, wait_for, wait_for_sync
from webjobsd.app import Daemon
from webjobsd.runtime.triggered import (
    ALREADY_RUNNING,
    JOBS_STOPPED,
    InvalidArguments,
    JobNotFound,
    RunConflict,
)

ARGS_SH = {
    "run.sh": """\
        echo "count=$#"
        for a in "$@"; do echo "arg=<$a>"; done
        echo "run id=$WEBJOBS_RUN_ID raw=$WEBJOBS_COMMAND_ARGUMENTS type=$WEBJOBS_TYPE"
        echo "to stderr" >&2
    """
}


def run_dir(site: Site, name: str, run_id: str) -> Path:
    return site.data_dir("triggered", name) / run_id


def status_of(site: Site, name: str, run_id: str) -> dict[str, str]:
    try:
        return dict(json.loads((run_dir(site, name, run_id) / "status").read_text()))
    except (OSError, ValueError):
        return {}


def output_of(site: Site, name: str, run_id: str) -> str:
    try:
        return (run_dir(site, name, run_id) / "output_log.txt").read_text()
    except OSError:
        return ""


def run_ids(site: Site, name: str) -> list[str]:
    folder = site.data_dir("triggered", name)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


async def finished(site: Site, name: str, run_id: str, timeout: float = 10) -> dict[str, str]:
    return dict(
        await wait_for(
            lambda: (s := status_of(site, name, run_id)).get("EndTime") and s,
            timeout=timeout,
            what=f"run {run_id} finished",
        )
    )


async def test_arguments_environment_and_the_kudu_trail(site: Site) -> None:
    """1. run with `"first arg" "second arg"`  2. two arguments arrive  3. status and output
    follow Kudu's formats."""
    site.write_job("triggered", "args", ARGS_SH)
    async with running_daemon(site) as daemon:
        record = await daemon.request_run(
            "args", arguments='"first arg" "second arg"', trigger="External - curl/8.5.0"
        )
        assert re.fullmatch(r"\d{18}", record.run_id)
        status = await finished(site, "args", record.run_id)
        assert status["Status"] == "Success"
        assert status["Trigger"] == "External - curl/8.5.0"
        assert list(status) == ["Trigger", "Status", "StartTime", "EndTime"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,7})?Z", status["EndTime"])
        output = output_of(site, "args", record.run_id)
        assert "INFO] count=2\n" in output
        assert "INFO] arg=<first arg>\n" in output
        assert "INFO] arg=<second arg>\n" in output
        assert f'run id={record.run_id} raw="first arg" "second arg" type=triggered' in output
        assert "ERR ] to stderr\n" in output
        lines = [line.split("] ", 1)[1] for line in output.splitlines() if "SYS INFO]" in line]
        assert lines[0] == "Status changed to Initializing"
        assert lines[1] == "Run script 'run.sh' with script host - 'bash'"
        assert lines[2] == "Status changed to Running"
        assert lines[-1] == "Status changed to Success"


async def test_bad_requests_are_refused_with_clear_messages(site: Site) -> None:
    site.write_job("triggered", "args", ARGS_SH)
    async with running_daemon(site) as daemon:
        with pytest.raises(InvalidArguments, match="Invalid arguments"):
            await daemon.request_run("args", arguments='"unbalanced')
        with pytest.raises(JobNotFound):
            await daemon.request_run("nope")
        assert run_ids(site, "args") == []


async def test_exit_codes_give_success_and_failed(site: Site) -> None:
    site.write_job("triggered", "ok", {"run.sh": "exit 0\n"})
    site.write_job("triggered", "bad", {"run.sh": "echo failing; exit 3\n"})
    async with running_daemon(site) as daemon:
        good = await daemon.request_run("ok")
        bad = await daemon.request_run("bad")
        assert (await finished(site, "ok", good.run_id))["Status"] == "Success"
        assert (await finished(site, "bad", bad.run_id))["Status"] == "Failed"
        assert "SYS ERR ] Job failed due to exit code 3" in output_of(site, "bad", bad.run_id)


async def test_one_run_at_a_time(site: Site) -> None:
    site.write_job(
        "triggered",
        "long",
        {"run.sh": "echo started\nsleep 30\n", "settings.job": '{"stopping_wait_time": 1}'},
    )
    async with running_daemon(site) as daemon:
        first = await daemon.request_run("long")
        with pytest.raises(RunConflict) as conflict:
            await daemon.request_run("long")
        assert conflict.value.message == ALREADY_RUNNING
        assert run_ids(site, "long") == [first.run_id]


async def test_a_second_daemon_on_the_site_gets_the_conflict_too(site: Site) -> None:
    site.write_job(
        "triggered", "long", {"run.sh": "sleep 30\n", "settings.job": '{"stopping_wait_time": 1}'}
    )
    async with running_daemon(site) as one, running_daemon(site, instance_id="two") as two:
        await one.request_run("long")
        with pytest.raises(RunConflict, match=re.escape(ALREADY_RUNNING)):
            await two.request_run("long")


async def test_webjobs_stopped_refuses_runs(site: Site) -> None:
    site.write_job("triggered", "t", {"run.sh": "exit 0\n"})
    async with running_daemon(site, environ={"WEBJOBS_STOPPED": "true"}) as daemon:
        with pytest.raises(RunConflict) as conflict:
            await daemon.request_run("t")
        assert conflict.value.message == JOBS_STOPPED


async def test_retention_keeps_history_size_runs(site: Site) -> None:
    site.write_job("triggered", "kept", {"run.sh": "exit 0\n"})
    counts = []
    async with running_daemon(site, environ={"WEBJOBS_HISTORY_SIZE": "5"}) as daemon:
        for _ in range(7):
            record = await daemon.request_run("kept")
            await finished(site, "kept", record.run_id)
            await wait_for(lambda: "kept" not in _active(daemon), what="run released")
            counts.append(len(run_ids(site, "kept")))
    assert counts == [1, 2, 3, 4, 5, 5, 5]


def _active(daemon: Daemon) -> object:
    assert daemon.triggered is not None
    return daemon.triggered.active


async def test_idle_timeout_kills_a_silent_run(site: Site) -> None:
    site.write_job("triggered", "silent", {"run.sh": "echo going quiet\nsleep 60\n"})
    async with running_daemon(site, environ={"WEBJOBS_IDLE_TIMEOUT": "2"}) as daemon:
        record = await daemon.request_run("silent")
        status = await finished(site, "silent", record.run_id, timeout=15)
        assert status["Status"] == "Failed"
        output = output_of(site, "silent", record.run_id)
        assert "ERR ] Command '" in output
        assert (
            "was aborted due to no output nor CPU activity for 2 seconds. You can increase the "
            "SCM_COMMAND_IDLE_TIMEOUT app setting (or WEBJOBS_IDLE_TIMEOUT if this is a WebJob)"
            " if needed." in output
        )
        assert not job_pids(site, "silent")


async def test_deleting_a_running_job_stops_its_run(site: Site) -> None:
    job_dir = site.write_job(
        "triggered",
        "doomed",
        {
            "run.sh": "trap 'echo got TERM; exit 0' TERM\n"
            "echo started\nwhile true; do sleep 0.1; done\n"
        },
    )
    async with running_daemon(site) as daemon:
        record = await daemon.request_run("doomed")
        await wait_for(lambda: "started" in output_of(site, "doomed", record.run_id), what="run")
        job_dir.rename(site.root / "doomed-gone")
        status = await finished(site, "doomed", record.run_id)
        assert status["Status"] == "Stopped"
        assert "INFO] got TERM" in output_of(site, "doomed", record.run_id)
        assert not job_pids(site, "doomed")


async def test_daemon_shutdown_waits_then_stops_a_run(site: Site) -> None:
    """1. a run ignoring SIGTERM  2. the daemon stops  3. the run had stopping_wait_time to
    finish, then the ladder; it ends Stopped with an end time and nothing left."""
    site.write_job(
        "triggered",
        "busy",
        {
            "run.sh": "trap '' TERM\necho started\nwhile true; do sleep 0.1; done\n",
            "settings.job": '{"stopping_wait_time": 1}',
        },
    )
    async with running_daemon(site) as daemon:
        record = await daemon.request_run("busy")
        await wait_for(lambda: "started" in output_of(site, "busy", record.run_id), what="run")
        stopping = time.monotonic()
    elapsed = time.monotonic() - stopping
    status = status_of(site, "busy", record.run_id)
    assert status["Status"] == "Stopped"
    assert "EndTime" in status
    output = output_of(site, "busy", record.run_id)
    assert "WebJob is stopping due to website shutting down" in output
    assert "did not stop within 1 seconds; killed" in output
    assert elapsed >= 2.0  # 1 s to finish by itself, then 1 s of SIGTERM before SIGKILL
    assert not job_pids(site, "busy")


async def test_a_run_finishing_by_itself_during_shutdown_keeps_its_result(site: Site) -> None:
    site.write_job(
        "triggered",
        "finisher",
        {"run.sh": "echo started\nsleep 1\nexit 3\n", "settings.job": '{"stopping_wait_time": 10}'},
    )
    async with running_daemon(site) as daemon:
        record = await daemon.request_run("finisher")
        await wait_for(lambda: "started" in output_of(site, "finisher", record.run_id), what="run")
    status = status_of(site, "finisher", record.run_id)
    assert status["Status"] == "Failed"
    assert "Job failed due to exit code 3" in output_of(site, "finisher", record.run_id)


async def test_output_resets_the_idle_clock(site: Site) -> None:
    """Kudu kills only after no output *and* no CPU: a heartbeat every 1.5 s with a 1 s
    timeout never gives two idle samples in a row."""
    site.write_job(
        "triggered", "beats", {"run.sh": "for i in 1 2 3 4; do echo beat; sleep 1.5; done\n"}
    )
    async with running_daemon(site, environ={"WEBJOBS_IDLE_TIMEOUT": "1"}) as daemon:
        record = await daemon.request_run("beats")
        status = await finished(site, "beats", record.run_id, timeout=15)
        assert status["Status"] == "Success", output_of(site, "beats", record.run_id)


async def test_a_caller_that_goes_away_does_not_strand_the_run(site: Site) -> None:
    site.write_job("triggered", "orphaned", {"run.sh": "echo done\n"})
    async with running_daemon(site) as daemon:
        caller = asyncio.create_task(daemon.request_run("orphaned"))
        await asyncio.sleep(0)  # the request is under way
        caller.cancel()
        await asyncio.gather(caller, return_exceptions=True)
        await wait_for(lambda: run_ids(site, "orphaned"), what="the run was recorded")
        first = run_ids(site, "orphaned")[0]
        assert (await finished(site, "orphaned", first))["Status"] == "Success"
        await wait_for(lambda: "orphaned" not in _active(daemon), what="released")
        again = await daemon.request_run("orphaned")
        assert (await finished(site, "orphaned", again.run_id))["Status"] == "Success"


async def test_a_request_racing_the_shutdown_leaves_nothing_running(site: Site) -> None:
    site.write_job("triggered", "racer", {"run.sh": "sleep 30\n"})
    async with running_daemon(site) as daemon:
        caller = asyncio.create_task(daemon.request_run("racer"))
        await asyncio.sleep(0)
        daemon.request_shutdown("race")
        await asyncio.gather(caller, return_exceptions=True)
    for run_id in run_ids(site, "racer"):
        assert "EndTime" in status_of(site, "racer", run_id)
    assert not job_pids(site, "racer")


async def test_start_up_repair_leaves_another_daemons_live_run_alone(site: Site) -> None:
    site.write_job(
        "triggered",
        "shared",
        {"run.sh": "echo started\nsleep 30\n", "settings.job": '{"stopping_wait_time": 1}'},
    )
    async with running_daemon(site) as one:
        record = await one.request_run("shared")
        await wait_for(lambda: "started" in output_of(site, "shared", record.run_id), what="run")
        async with running_daemon(site, instance_id="two"):
            assert status_of(site, "shared", record.run_id)["Status"] == "Running"


def test_sigkill_during_a_run_leaves_it_aborted_after_restart(site: Site) -> None:
    """1. a scheduled run starts in a real daemon  2. SIGKILL the daemon  3. start it again
    4. the run is Aborted with an end time, and its process is gone."""
    site.write_job(
        "triggered",
        "victim",
        {"run.sh": "echo started\nsleep 300\n", "settings.job": '{"schedule": "* * * * * *"}'},
    )
    first = DaemonProcess(site).start()
    second: DaemonProcess | None = None
    try:
        run_id = wait_for_sync(lambda: run_ids(site, "victim") and run_ids(site, "victim")[0])
        wait_for_sync(lambda: "started" in output_of(site, "victim", run_id), what="running")
        old = job_pids(site, "victim")
        assert old
        first.kill()
        assert status_of(site, "victim", run_id)["Status"] == "Running"
        second = DaemonProcess(site).start(env={"WEBJOBS_DISABLE_SCHEDULE": "1"})
        status = wait_for_sync(
            lambda: (s := status_of(site, "victim", run_id)).get("Status") == "Aborted" and s,
            what="Aborted",
        )
        assert "EndTime" in status
        wait_for_sync(lambda: not any(psutil.pid_exists(p) for p in old), what="old run gone")
    finally:
        if second is not None:
            second.stop()
        first.stop()


async def test_a_run_ends_when_its_script_exits_even_if_a_child_holds_the_output(
    site: Site,
) -> None:
    site.write_job("triggered", "bg", {"run.sh": "sleep 300 &\necho main done\n"})
    async with running_daemon(site) as daemon:
        record = await daemon.request_run("bg")
        status = await finished(site, "bg", record.run_id, timeout=5)
        assert status["Status"] == "Success"
        assert not job_pids(site, "bg")


def test_a_run_asked_for_as_soon_as_the_last_one_reads_finished_is_never_409(site: Site) -> None:
    """A script's loop: run, poll until the run reads finished, run again at once. The final
    status reaches the disk before the daemon's bookkeeping of the run ends; a request in
    between used to be refused with 409 ("already running")."""
    from webjobsd.runtime.jobprocess import free_loopback_port

    site.write_job("triggered", "quick", {"run.sh": "#!/bin/sh\necho quick\n"})
    port = free_loopback_port()
    daemon = DaemonProcess(site, listen=f"127.0.0.1:{port}").start()
    base = f"http://127.0.0.1:{port}/api/triggeredwebjobs/quick"

    def call(method: str, url: str) -> tuple[int, dict[str, object]]:
        request = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body = response.read()
                return response.status, json.loads(body) if body else {}
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")
        except OSError:
            return 0, {}

    try:
        wait_for_sync(lambda: call("GET", base)[0] == 200, timeout=30, what="the job listed")
        answers = []
        for _ in range(100):
            status, _ = call("POST", f"{base}/run")
            answers.append(status)
            if status != 202:
                break

            def finished() -> bool:
                _, job = call("GET", base)
                latest = job.get("latest_run")
                return isinstance(latest, dict) and latest.get("status") == "Success"

            wait_for_sync(finished, timeout=10, interval=0.001, what="the run finished")
        assert answers == [202] * 100, answers
    finally:
        daemon.stop()
