"""Continuous jobs end to end: real files, real inotify, real processes, daemon in-process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import psutil

from tests.helpers import Site, job_pids, leaders, running_daemon, wait_for
from webjobsd.runtime.workcopy import remove_tree

LOOP_SH = {
    "run.sh": """\
        #!/usr/bin/env bash
        echo "started version ${VERSION:-1} pid $$"
        while true; do sleep 0.2; done
    """
}


def loop_job(version: str) -> dict[str, str]:
    return {
        "run.sh": f"""\
            #!/usr/bin/env bash
            echo "started version {version} pid $$"
            while true; do sleep 0.2; done
        """
    }


async def test_dropped_folder_runs_within_debounce_plus_one_second(site: Site) -> None:
    """1. start the daemon on an empty site  2. drop a job folder  3. Running within 1.3 s."""
    async with running_daemon(site):
        dropped = time.monotonic()
        site.write_job("continuous", "hello", loop_job("1"))
        await wait_for(lambda: site.status("hello") == "Running", timeout=5, what="Running")
        await wait_for(lambda: leaders(site, "hello"), timeout=2, what="process")
        assert time.monotonic() - dropped < 0.3 + 1.0 + 0.5
        log = site.job_log("hello")
        assert "SYS INFO] Status changed to Starting" in log
        assert "SYS INFO] Run script 'run.sh' with script host - 'bash'" in log
        await wait_for(lambda: "INFO] started version 1" in site.job_log("hello"), what="output")
    assert site.status("hello") == "Stopped"
    assert not job_pids(site, "hello")


async def test_jobs_that_never_print_still_log_their_start_when_many_start_together(
    site: Site,
) -> None:
    """1. 150 jobs that print nothing start together (their launches overlap on the loop)
    2. each is Running  3. each job's log says how it was started and that it runs: the host's
    lines do not wait for output the job never gives."""
    names = [f"quiet{index:03}" for index in range(150)]
    for name in names:
        site.write_job("continuous", name, {"run.sh": "exec sleep 1000\n"})
    async with running_daemon(site):
        await wait_for(
            lambda: all(site.status(name) == "Running" for name in names),
            timeout=60,
            what="all Running",
        )

        def unlogged() -> list[str]:
            return [
                name
                for name in names
                if "SYS INFO] Status changed to Running" not in site.job_log(name)
                or "SYS INFO] Run script 'run.sh'" not in site.job_log(name)
            ]

        await wait_for(lambda: not unlogged(), timeout=10, what="start lines in every log")


async def test_replaced_files_restart_the_job_with_new_code(site: Site) -> None:
    """1. job v1 running  2. files replaced with v2  3. v1 gone, v2 running, refresh logged."""
    site.write_job("continuous", "app", loop_job("1"))
    async with running_daemon(site):
        first = (await wait_for(lambda: leaders(site, "app"), what="v1"))[0]
        (site.job_dir("continuous", "app") / "run.sh").write_text(
            loop_job("2")["run.sh"].replace("            ", "")
        )
        await wait_for(lambda: "started version 2" in site.job_log("app"), what="v2 output")
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie"
        assert len(leaders(site, "app")) == 1
        assert "Detected WebJob file/s were updated, refreshing WebJob" in site.job_log("app")


async def test_deleting_the_script_stops_the_job(site: Site) -> None:
    site.write_job("continuous", "gone", loop_job("1"))
    async with running_daemon(site):
        await wait_for(lambda: leaders(site, "gone"), what="running")
        (site.job_dir("continuous", "gone") / "run.sh").unlink()
        await wait_for(lambda: not job_pids(site, "gone"), what="process gone")
        await wait_for(lambda: site.status("gone") == "Stopped", what="Stopped")


async def test_removing_the_folder_stops_the_job(site: Site) -> None:
    job_dir = site.write_job("continuous", "folder", loop_job("1"))
    async with running_daemon(site):
        await wait_for(lambda: leaders(site, "folder"), what="running")
        os.rename(job_dir, site.root / "moved-away")
        await wait_for(lambda: not job_pids(site, "folder"), what="process gone")
        await wait_for(lambda: site.status("folder") == "Stopped", what="Stopped")


async def test_disable_job_stops_and_its_removal_starts(site: Site) -> None:
    job_dir = site.write_job("continuous", "toggle", loop_job("1"))
    async with running_daemon(site):
        await wait_for(lambda: leaders(site, "toggle"), what="running")
        (job_dir / "disable.job").write_text("")
        await wait_for(lambda: not job_pids(site, "toggle"), what="process gone")
        await wait_for(lambda: site.status("toggle") == "Stopped", what="Stopped")
        (job_dir / "disable.job").unlink()
        await wait_for(lambda: site.status("toggle") == "Running", what="Running again")
        await wait_for(lambda: leaders(site, "toggle"), what="process back")


async def test_quick_exits_back_off_with_growing_delays(site: Site) -> None:
    """1. a job that exits at once  2. PendingRestart  3. delays 0.2, 0.4, 0.8 logged."""
    site.write_job("continuous", "flaky", {"run.sh": "echo bye; exit 3\n"})
    async with running_daemon(site, restart_backoff_initial_s=0.2):
        started = time.monotonic()
        await wait_for(
            lambda: "waiting for 0.8 seconds" in site.job_log("flaky"), timeout=10, what="3 exits"
        )
        # The third exit can only come after the first two delays were really waited.
        assert time.monotonic() - started >= 0.2 + 0.4
        log = site.job_log("flaky")
        assert log.index("waiting for 0.2 seconds") < log.index("waiting for 0.4 seconds")
        assert "SYS ERR ] Job failed due to exit code 3" in log
        assert "Status changed to PendingRestart" in log


async def test_restart_delay_is_capped_by_webjobs_restart_time(site: Site) -> None:
    site.write_job("continuous", "capped", {"run.sh": "exit 0\n"})
    async with running_daemon(
        site, restart_backoff_initial_s=0.2, environ={"WEBJOBS_RESTART_TIME": "0"}
    ):
        await wait_for(
            lambda: site.job_log("capped").count("waiting for 0 seconds") >= 5, what="5 restarts"
        )
        assert "Status changed to Success" in site.job_log("capped")


async def test_a_start_that_makes_no_process_waits_even_with_restart_time_zero(
    site: Site,
) -> None:
    """A process that ran is paced by its own fork and exit; a start that fails at once (here
    exec's ENOEXEC, under load EMFILE) is not, and with WEBJOBS_RESTART_TIME=0 it spun the loop
    and wrote a warning per millisecond."""
    site.write_unstartable_job("continuous", "noexec")
    async with running_daemon(
        site, restart_backoff_initial_s=0.2, environ={"WEBJOBS_RESTART_TIME": "0"}
    ):
        await wait_for(
            lambda: site.job_log("noexec").count("Failed to start process") >= 2,
            what="two failed starts",
        )
        log = site.job_log("noexec")
        assert "waiting for 0 seconds" not in log
        assert "waiting for 1 seconds" in log


async def test_a_job_ignoring_sigterm_is_killed_after_stopping_wait_time(site: Site) -> None:
    job_dir = site.write_job(
        "continuous",
        "stubborn",
        {
            "run.sh": "trap '' TERM\necho ready\nwhile true; do sleep 0.1; done\n",
            "settings.job": '{"stopping_wait_time": 1}',
        },
    )
    async with running_daemon(site):
        await wait_for(lambda: "INFO] ready" in site.job_log("stubborn"), what="ready")
        (job_dir / "disable.job").write_text("")
        stop_seen = await wait_for(
            lambda: "Status changed to Stopping" in site.job_log("stubborn") and time.monotonic(),
            what="Stopping",
        )
        await wait_for(lambda: not job_pids(site, "stubborn"), timeout=5, what="killed")
        elapsed = time.monotonic() - stop_seen
        assert 0.8 < elapsed < 3.0, elapsed
        await wait_for(lambda: site.status("stubborn") == "Stopped", what="Stopped")
        assert "did not stop within 1 seconds; killed" in site.job_log("stubborn")


async def test_the_shutdown_file_and_sigterm_reach_the_job(site: Site) -> None:
    job_dir = site.write_job(
        "continuous",
        "polite",
        {
            "run.sh": """\
                on_term() {
                    echo "got TERM; file exists: $(test -f "$WEBJOBS_SHUTDOWN_FILE" && echo yes)"
                    exit 0
                }
                trap on_term TERM
                echo "shutdown file is $WEBJOBS_SHUTDOWN_FILE"
                while true; do sleep 0.1; done
            """
        },
    )
    async with running_daemon(site):
        await wait_for(lambda: "shutdown file is" in site.job_log("polite"), what="started")
        (job_dir / "disable.job").write_text("")
        await wait_for(lambda: site.status("polite") == "Stopped", what="Stopped")
        assert "got TERM; file exists: yes" in site.job_log("polite")


async def test_grandchildren_even_setsid_ones_leave_nothing_behind(site: Site) -> None:
    job_dir = site.write_job(
        "continuous",
        "forker",
        {
            "run.sh": """\
                sleep 300 &
                (sleep 301 &)
                setsid sleep 302 &
                echo forked
                while true; do sleep 0.1; done
            """
        },
    )
    async with running_daemon(site):
        await wait_for(lambda: "forked" in site.job_log("forker"), what="children forked")
        session = os.getsid(leaders(site, "forker")[0])

        def escaped() -> list[int]:
            # setsid(1) runs in the job's session until its own setsid() call: wait for it.
            found = []
            for pid in job_pids(site, "forker"):
                try:
                    if os.getsid(pid) != session:
                        found.append(pid)
                except ProcessLookupError:
                    pass
            return found

        await wait_for(lambda: escaped(), what="the setsid child outside the session")
        (job_dir / "disable.job").write_text("")
        await wait_for(lambda: not job_pids(site, "forker"), what="every descendant gone")


async def test_job_environment(site: Site) -> None:
    site.write_job(
        "continuous",
        "envjob",
        {
            "run.sh": """\
                for v in WEBJOBS_NAME WEBJOBS_TYPE WEBJOBS_PATH WEBJOBS_DATA_PATH \\
                         WEBJOBS_SHUTDOWN_FILE WEBJOBS_PORT WEBROOT_PATH MY_SETTING \\
                         NOTIFY_SOCKET WEBJOBSD_PASSWORD; do
                    echo "$v=${!v-<unset>}"
                done
                echo "cwd=$PWD"
                while true; do sleep 0.2; done
            """
        },
    )
    async with running_daemon(
        site,
        settings={"MY_SETTING": "from-config"},
        environ={"NOTIFY_SOCKET": "/run/x", "WEBJOBSD_PASSWORD": "secret"},
    ):
        await wait_for(lambda: "cwd=" in site.job_log("envjob"), what="env printed")
        log = site.job_log("envjob")
        assert "WEBJOBS_NAME=envjob" in log
        assert "WEBJOBS_TYPE=continuous" in log
        assert f"WEBJOBS_DATA_PATH={site.data_dir('continuous', 'envjob')}" in log
        assert f"WEBJOBS_PATH={site.temp}/jobs/continuous/envjob/" in log
        assert f"cwd={site.temp}/jobs/continuous/envjob/" in log
        assert f"WEBJOBS_SHUTDOWN_FILE={site.temp}/JobsShutdown/continuous/envjob/" in log
        assert f"WEBROOT_PATH={site.root}/site/wwwroot" in log
        assert "MY_SETTING=from-config" in log
        assert "NOTIFY_SOCKET=<unset>" in log
        assert "WEBJOBSD_PASSWORD=<unset>" in log
        port = int(log.split("WEBJOBS_PORT=")[1].split()[0])
        assert 0 < port < 65536


async def test_in_place_job_runs_from_its_folder(site: Site) -> None:
    site.write_job(
        "continuous",
        "inplace",
        {
            "run.sh": 'echo "cwd=$PWD"\nwhile true; do sleep 0.2; done\n',
            "settings.job": '{"is_in_place": true}',
        },
    )
    async with running_daemon(site):
        await wait_for(lambda: "cwd=" in site.job_log("inplace"), what="cwd printed")
        assert f"cwd={site.job_dir('continuous', 'inplace')}" in site.job_log("inplace")


async def test_webjobs_stopped_applies_at_once_to_running_jobs(site: Site) -> None:
    site.write_job("continuous", "halt", loop_job("1"))
    store = site.root / "data" / "webjobsd" / "settings.json"
    async with running_daemon(site) as daemon:
        await wait_for(lambda: leaders(site, "halt"), what="running")
        store.write_text('{"WEBJOBS_STOPPED": "1"}')
        daemon.wake()
        await wait_for(lambda: not job_pids(site, "halt"), what="stopped")
        await wait_for(lambda: site.status("halt") == "Stopped", what="Stopped")
        store.write_text('{"WEBJOBS_STOPPED": "0"}')
        daemon.wake()
        await wait_for(lambda: leaders(site, "halt"), what="running again")


async def test_slow_copy_starts_the_job_once_after_it_completes(site: Site) -> None:
    """1. a job folder appears with a partial script  2. pieces arrive over 3 s
    3. the job starts exactly once, with the complete script."""
    job_dir = site.job_dir("continuous", "slow")
    async with running_daemon(site, debounce_s=0.5):
        job_dir.mkdir(parents=True)
        script = job_dir / "run.sh"
        pieces = (
            ["echo part-one\n", "echo part-two\n", "echo part-three\n"]
            + [f"# padding {i}\n" for i in range(9)]
            + ["echo complete\nwhile true; do sleep 0.2; done\n"]
        )
        started = time.monotonic()
        with open(script, "w") as handle:
            for index, piece in enumerate(pieces, start=1):
                handle.write(piece)
                handle.flush()
                pace = started + 0.25 * index
                await wait_for(lambda pace=pace: time.monotonic() > pace, what="pace")
        await wait_for(lambda: "INFO] complete" in site.job_log("slow"), timeout=5, what="run")
        assert site.job_log("slow").count("Status changed to Running") == 1
        assert len(leaders(site, "slow")) == 1


async def test_long_lines_and_floods_are_captured(site: Site) -> None:
    site.write_job(
        "continuous",
        "loud",
        {
            "run.py": """\
                import sys
                sys.stdout.write("x" * 100 * 1024 + "\\n")
                sys.stdout.flush()
                line = "y" * 99 + "\\n"
                for _ in range(500_000):
                    sys.stdout.write(line)
                sys.stdout.write("flood-done\\n")
                sys.stdout.flush()
                import time
                while True:
                    time.sleep(1)
            """
        },
    )
    async with running_daemon(site, log_max_bytes=200 * 1024 * 1024):
        await wait_for(lambda: "flood-done" in site.job_log("loud"), timeout=40, what="flood")
        log = site.job_log("loud")
        assert "INFO] " + "x" * 100 * 1024 + "\n" in log
        assert log.count("y" * 99) == 500_000


async def test_invalid_job_names_are_skipped_with_a_warning(site: Site, capsys: object) -> None:
    site.write_job("continuous", "good", loop_job("1"))
    bad = site.jobs / "continuous" / ".hidden"
    bad.mkdir(parents=True)
    (bad / "run.sh").write_text("while true; do sleep 1; done\n")
    weird = site.jobs / "continuous" / "has space"
    weird.mkdir(parents=True)
    (weird / "run.sh").write_text("while true; do sleep 1; done\n")
    async with running_daemon(site) as daemon:
        await wait_for(lambda: leaders(site, "good"), what="good job")
        assert daemon.catalog is not None
        assert {key.name for key in daemon.catalog.specs} == {"good"}
        assert not job_pids(site, ".hidden") and not job_pids(site, "has space")


async def test_broken_settings_keep_the_last_good_settings(site: Site) -> None:
    job_dir = site.write_job(
        "continuous",
        "settled",
        {**loop_job("1"), "settings.job": '{"stopping_wait_time": 2}'},
    )
    async with running_daemon(site) as daemon:
        first = (await wait_for(lambda: leaders(site, "settled"), what="running"))[0]
        assert daemon.catalog is not None
        generation = daemon.catalog.generation
        (job_dir / "settings.job").write_text('{"stopping_wait_time": ')
        await wait_for(lambda: _settings_error_seen(daemon), what="parse error noticed")
        assert daemon.catalog.generation == generation
        spec = next(iter(daemon.catalog.specs.values()))
        assert spec.settings.stopping_wait_time_s == 2
        assert leaders(site, "settled") == [first]


def _settings_error_seen(daemon: object) -> bool:
    catalog = daemon.catalog  # type: ignore[attr-defined]
    return any("settings.job does not parse" in m for m in catalog._reported.values())


def _unused(path: Path) -> None:  # keep imports honest for linters
    del path


async def test_an_exit_is_seen_while_a_child_still_holds_the_output(site: Site) -> None:
    """1. the job starts a background child that keeps stdout open, then exits 3
    2. the exit is reported at once, the child is ended, the job restarts."""
    site.write_job("continuous", "parent", {"run.sh": "sleep 300 &\necho parent out\nexit 3\n"})
    async with running_daemon(site, restart_backoff_initial_s=5):
        await wait_for(
            lambda: "Job failed due to exit code 3" in site.job_log("parent"),
            timeout=5,
            what="exit reported",
        )
        await wait_for(lambda: site.status("parent") == "PendingRestart", what="PendingRestart")
        await wait_for(lambda: not job_pids(site, "parent"), what="background child ended")


async def test_an_immediate_restart_still_ends_what_the_old_process_left(site: Site) -> None:
    """1. the first process leaves a setsid child with its output closed and exits 3
    2. with no restart delay the replacement starts (leftovers are ended after its spawn)
    3. the old process's child is gone while the replacement runs, and the status says so."""
    site.write_job(
        "continuous",
        "leaver",
        {
            "run.sh": """\
                if [ ! -e "$WEBJOBSD_JOB_DATA_PATH/once" ]; then
                    touch "$WEBJOBSD_JOB_DATA_PATH/once"
                    setsid sleep 303 </dev/null >/dev/null 2>&1 &
                    exit 3
                fi
                echo second run
                while true; do sleep 0.2; done
            """
        },
    )
    async with running_daemon(site, environ={"WEBJOBS_RESTART_TIME": "0"}):
        await wait_for(lambda: "second run" in site.job_log("leaver"), what="the replacement")

        def sleepers() -> list[int]:
            found = []
            for pid in job_pids(site, "leaver"):
                with contextlib.suppress(psutil.Error):
                    if psutil.Process(pid).cmdline()[:2] == ["sleep", "303"]:
                        found.append(pid)
            return found

        await wait_for(lambda: not sleepers(), what="the old process's child ended")
        await wait_for(lambda: site.status("leaver") == "Running", what="Running written")
        assert len(leaders(site, "leaver")) == 1


async def test_a_job_removed_and_added_again_never_runs_twice(site: Site) -> None:
    """1. a job with a slow stop  2. its folder goes away and comes back at once
    3. never two processes; it ends Running with its copy and process record intact."""
    job = {
        "run.sh": "trap 'sleep 1; exit 0' TERM\nwhile true; do sleep 0.1; done\n",
        "settings.job": '{"stopping_wait_time": 4}',
    }
    job_dir = site.write_job("continuous", "phoenix", job)
    async with running_daemon(site) as daemon:
        await wait_for(lambda: leaders(site, "phoenix"), what="running")
        job_dir.rename(site.root / "phoenix-away")
        await wait_for(lambda: site.status("phoenix") == "Stopping", what="Stopping")
        site.write_job("continuous", "phoenix", job)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and site.status("phoenix") != "Running":
            assert len(leaders(site, "phoenix")) <= 1
            await asyncio.sleep(0.05)
        await wait_for(lambda: site.status("phoenix") == "Running", what="Running again")
        assert len(leaders(site, "phoenix")) == 1
        records = site.root / "data" / "webjobsd" / "processes" / "test01"
        await wait_for(lambda: (records / "continuous.phoenix.json").exists(), what="record")
        assert daemon.supervisor is not None and len(daemon.supervisor.units) == 1


async def test_a_replaced_job_folder_is_watched_again(site: Site) -> None:
    """1. a job folder is replaced by another one under the same name
    2. a disable.job dropped in the new folder acts within the debounce, not the rescan."""
    job_dir = site.write_job("continuous", "swap", LOOP_SH)
    async with running_daemon(site, rescan_s=60):
        await wait_for(lambda: leaders(site, "swap"), what="running")
        job_dir.rename(site.root / "swap-old")
        site.write_job("continuous", "swap", loop_job("2"))
        await wait_for(lambda: "started version 2" in site.job_log("swap"), what="v2")
        (job_dir / "disable.job").write_text("")
        await wait_for(lambda: site.status("swap") == "Stopped", timeout=5, what="Stopped")


async def test_a_job_writing_into_its_own_folder_still_obeys_disable(site: Site) -> None:
    """An in-place job that keeps writing a state file never lets its folder settle: the
    debounce cap still lets disable.job through."""
    job_dir = site.write_job(
        "continuous",
        "busy",
        {
            "run.sh": "while true; do date +%s%N > state.json; sleep 0.1; done\n",
            "settings.job": '{"is_in_place": true}',
        },
    )
    async with running_daemon(site, debounce_cap_s=2.0):
        await wait_for(lambda: leaders(site, "busy"), what="running")
        (job_dir / "disable.job").write_text("")
        await wait_for(lambda: site.status("busy") == "Stopped", timeout=6, what="Stopped")


async def test_working_copies_of_deleted_jobs_are_removed_at_start(site: Site) -> None:
    stale = site.temp / "jobs" / "continuous" / "gone-job" / "abc123"
    stale.mkdir(parents=True)
    (stale / "run.sh").write_text("echo old\n")
    # A copy of a job folder 1,500 levels deep (deeper than Python's recursion limit).
    deep = site.temp / "jobs" / "continuous" / "deep-job"
    deep.mkdir()
    fd = os.open(deep, os.O_DIRECTORY)
    for _ in range(1500):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)
    site.write_job("continuous", "kept", LOOP_SH)
    try:
        async with running_daemon(site):
            await wait_for(lambda: leaders(site, "kept"), what="running")
            assert not stale.parent.exists()
            assert not deep.exists()
            assert (site.temp / "jobs" / "continuous" / "kept").is_dir()
    finally:
        remove_tree(deep)  # pytest's own clean-up of its temp folders recurses
