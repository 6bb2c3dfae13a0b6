"""The real `webjobsd serve` process: signals, crashes, restarts, two daemons on one site."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time

import psutil

from tests.helpers import DaemonProcess, Site, job_pids, leaders, wait_for_sync

LOOP = {"run.sh": "echo up $$\nwhile true; do sleep 0.2; done\n"}


def test_sigterm_stops_every_job_and_exits_zero_within_the_bound(site: Site) -> None:
    """1. three jobs, one ignoring SIGTERM with stopping_wait_time 2  2. SIGTERM the daemon
    3. exit 0 within 2 s + grace, nothing left, statuses Stopped."""
    site.write_job("continuous", "a", LOOP)
    site.write_job("continuous", "b", LOOP)
    site.write_job(
        "continuous",
        "deaf",
        {
            "run.sh": "trap '' TERM\nwhile true; do sleep 0.1; done\n",
            "settings.job": '{"stopping_wait_time": 2}',
        },
    )
    daemon = DaemonProcess(site).start()
    try:
        for name in ("a", "b", "deaf"):
            wait_for_sync(lambda name=name: leaders(site, name), what=f"{name} running")
        sent = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(15) == 0
        elapsed = time.monotonic() - sent
        assert elapsed < 2 + 3, elapsed
        for name in ("a", "b", "deaf"):
            assert not job_pids(site, name)
            assert site.status(name) == "Stopped"
        assert "WebJob is stopping due to website shutting down" in site.job_log("a")
    finally:
        daemon.stop()


def test_a_second_signal_forces_the_shutdown(site: Site) -> None:
    site.write_job(
        "continuous",
        "deaf",
        {
            "run.sh": "trap '' TERM\nwhile true; do sleep 0.1; done\n",
            "settings.job": '{"stopping_wait_time": 30}',
        },
    )
    daemon = DaemonProcess(site).start()
    try:
        wait_for_sync(lambda: leaders(site, "deaf"), what="running")
        daemon.signal(signal.SIGTERM)
        wait_for_sync(lambda: site.status("deaf") == "Stopping", what="Stopping")
        sent = time.monotonic()
        daemon.signal(signal.SIGINT)
        assert daemon.wait(10) == 0
        assert time.monotonic() - sent < 3
        assert not job_pids(site, "deaf")
    finally:
        daemon.stop()


def test_sigkill_then_restart_leaves_exactly_one_process_per_job(site: Site) -> None:
    """1. two jobs running, one with a setsid grandchild  2. SIGKILL the daemon
    3. start it again  4. exactly one leader per job, the old trees gone, statuses Running."""
    site.write_job("continuous", "plain", LOOP)
    site.write_job(
        "continuous",
        "tree",
        {"run.sh": "setsid sleep 300 &\nwhile true; do sleep 0.2; done\n"},
    )
    first = DaemonProcess(site).start()
    second: DaemonProcess | None = None
    try:
        old_plain = wait_for_sync(lambda: leaders(site, "plain"), what="plain")[0]
        wait_for_sync(lambda: len(job_pids(site, "tree")) >= 3, what="tree with grandchild")
        old_tree = set(job_pids(site, "tree"))
        first.kill()
        assert psutil.pid_exists(old_plain), "job processes outlive a SIGKILLed daemon"
        second = DaemonProcess(site).start()
        wait_for_sync(
            lambda: leaders(site, "plain") and leaders(site, "plain") != [old_plain],
            what="plain restarted",
        )
        wait_for_sync(lambda: not (set(job_pids(site, "tree")) & old_tree), what="old tree gone")
        wait_for_sync(lambda: len(leaders(site, "tree")) == 1, what="tree restarted")
        assert not psutil.pid_exists(old_plain) or psutil.Process(old_plain).status() == "zombie"
        assert len(leaders(site, "plain")) == 1
        assert site.status("plain") == "Running"
        assert site.status("tree") == "Running"
    finally:
        if second is not None:
            second.stop()
        first.stop()


def test_two_daemons_run_a_singleton_once_and_fail_over(site: Site) -> None:
    """1. two daemons (instances one, two) on one site, a singleton job
    2. exactly one process, the other instance InactiveInstance
    3. SIGKILL the holder daemon  4. the other takes over; still exactly one process."""
    site.write_job("continuous", "single", {**LOOP, "settings.job": '{"is_singleton": true}'})
    one = DaemonProcess(site, instance_id="one").start()
    two = DaemonProcess(site, instance_id="two").start()
    try:
        wait_for_sync(
            lambda: (
                {site.status("single", "one"), site.status("single", "two")}
                == {"Running", "InactiveInstance"}
            ),
            what="one Running, one InactiveInstance",
        )
        assert len(leaders(site, "single")) == 1
        holder, standby = (one, two) if site.status("single", "one") == "Running" else (two, one)
        old = leaders(site, "single")[0]
        holder.kill()
        wait_for_sync(
            lambda: site.status("single", standby.instance_id) == "Running",
            timeout=15,
            what="failover",
        )
        wait_for_sync(
            lambda: (
                leaders(site, "single", standby.instance_id)
                and not leaders(site, "single", holder.instance_id)
            ),
            what="only the standby's process",
        )
        assert len(leaders(site, "single")) == 1
        assert old not in leaders(site, "single")
        owner = json.loads(
            (site.data_dir("continuous", "single") / "singleton.job.lock").read_text()
        )
        assert owner["InstanceId"] == standby.instance_id
    finally:
        two.stop()
        one.stop()
        # The killed holder left its job behind until its own restart; end it for the test.
        for pid in job_pids(site, "single"):
            psutil.Process(pid).kill()


def test_sighup_reloads_the_configuration(site: Site) -> None:
    daemon = DaemonProcess(site, log_level="info").start()
    try:
        wait_for_sync(lambda: "starting" in daemon.log(), what="started")
        text = daemon.config_path.read_text().replace("debounce_s: 0.3", "debounce_s: 0.4")
        daemon.config_path.write_text(text)
        daemon.signal(signal.SIGHUP)
        wait_for_sync(lambda: "configuration reloaded" in daemon.log(), what="reloaded")
        daemon.config_path.write_text(text + "bogus_key: 1\n")
        daemon.signal(signal.SIGHUP)
        wait_for_sync(lambda: "reload failed" in daemon.log(), what="bad reload refused")
        assert "bogus_key" in daemon.log()
        assert daemon.process is not None and daemon.process.poll() is None
    finally:
        assert daemon.stop() == 0


def test_a_second_daemon_with_the_same_instance_id_refuses_to_start(site: Site) -> None:
    first = DaemonProcess(site, log_level="info").start()
    try:
        wait_for_sync(lambda: "starting" in first.log(), what="started")
        second = DaemonProcess(site).start()
        assert second.wait(15) == 1
        assert "another webjobsd with instance id 'test01'" in second.log()
    finally:
        first.stop()


def test_sighup_swaps_credentials_without_touching_jobs(site: Site) -> None:
    """1. a daemon with password one and a running job  2. the config gets password two
    3. SIGHUP  4. one is refused, two accepted, the job's process is the same."""
    from webjobsd.http.auth import hash_password
    from webjobsd.runtime.jobprocess import free_loopback_port

    port = free_loopback_port()
    site.write_job("continuous", "steady", LOOP)
    daemon = DaemonProcess(
        site,
        auth=True,
        log_level="info",
        listen=f"127.0.0.1:{port}",
        auth_username="ops",
        auth_password_hash=hash_password("one"),
    ).start(env={"WEBJOBSD_USERNAME": "", "WEBJOBSD_PASSWORD": ""})
    try:
        pid = wait_for_sync(lambda: leaders(site, "steady"), what="job running")[0]
        url = f"http://127.0.0.1:{port}/api/webjobs"
        wait_for_sync(lambda: status_with(url, "ops", "one") == 200, what="password one works")
        text = daemon.config_path.read_text()
        old_hash = text.split("auth_password_hash: ")[1].split("\n")[0]
        daemon.config_path.write_text(text.replace(old_hash, hash_password("two")))
        daemon.signal(signal.SIGHUP)
        wait_for_sync(lambda: status_with(url, "ops", "two") == 200, what="password two works")
        assert status_with(url, "ops", "one") == 401
        assert leaders(site, "steady") == [pid]
    finally:
        assert daemon.stop() == 0


def status_with(url: str, username: str, password: str) -> int:
    import base64
    import urllib.error
    import urllib.request

    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


SUBREAPER = "import ctypes\nctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER"


def test_a_stop_does_not_wait_for_someone_else_to_reap_a_zombie(site: Site) -> None:
    """An orphaned child that died with the job stays a zombie in the job's group until its new
    parent reaps it; init may take a second. Here the daemon itself is that parent (a subreaper
    that never reaps strangers), so the zombie stays: the stop must still end at once, not after
    the whole stopping wait with a SIGKILL."""
    site.write_job(
        "continuous",
        "parent",
        {
            "run.sh": (
                "sleep 1000 &\n"
                # python never reaps the sleep: killed with the group, it stays a zombie and is
                # handed to the subreaper when python exits.
                'exec python3 -c "import signal, sys, time\n'
                "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
                'print(\\"up\\", flush=True)\n'
                'time.sleep(1000)"\n'
            ),
            "settings.job": '{"stopping_wait_time": 30}',
        },
    )
    daemon = DaemonProcess(site, preamble=SUBREAPER).start()
    try:
        wait_for_sync(lambda: "INFO] up" in site.job_log("parent"), timeout=20, what="job up")
        (site.job_dir("continuous", "parent") / "disable.job").write_text("")
        wait_for_sync(
            lambda: site.status("parent") == "Stopped", timeout=20, what="stopped at once"
        )
        assert "did not stop within" not in site.job_log("parent")
        zombies = [
            child.pid
            for child in psutil.Process(daemon.pid).children()
            if child.status() == psutil.STATUS_ZOMBIE
        ]
        assert zombies, "the scenario needs a zombie left in the job's group"
        assert daemon.stop() == 0
    finally:
        daemon.kill_if_running()


def test_threads_do_not_grow_with_the_number_of_jobs(site: Site) -> None:
    """No thread per job: not to wait for its process, not to watch its folder."""
    count = 40
    for index in range(count):
        site.write_job("continuous", f"job{index:02d}", {"run.sh": "exec sleep 1000\n"})
    daemon = DaemonProcess(site).start()
    try:
        wait_for_sync(
            lambda: all(leaders(site, f"job{i:02d}") for i in range(count)),
            timeout=30,
            what="every job running",
        )
        threads = psutil.Process(daemon.pid).num_threads()
        assert threads < count / 2, threads
        assert daemon.stop() == 0
    finally:
        daemon.kill_if_running()


# The daemon's worker threads all busy from the first stop on, as on a host too loaded to run
# them in time: the threads the daemon uses from then on are one, held until the daemon shuts
# it down at exit. Keyed on the daemon's own log line, so that the stops are the first to wait.
STARVED_AT_STOP = textwrap.dedent(
    """
    import asyncio, concurrent.futures, sys, threading

    class _StarveAtStop:
        def __init__(self, stream):
            self._stream, self._armed = stream, True

        def write(self, text):
            if self._armed and '"status": "Stopping"' in text:
                self._armed = False
                pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

                def busy():
                    while not pool._shutdown:
                        threading.Event().wait(0.01)

                pool.submit(busy)
                asyncio.get_running_loop().set_default_executor(pool)
            return self._stream.write(text)

        def __getattr__(self, name):
            return getattr(self._stream, name)

    sys.stderr = _StarveAtStop(sys.stderr)
    """
)


def test_a_stop_that_gets_no_thread_still_leaves_no_job_behind(site: Site) -> None:
    """1. a job running  2. SIGTERM the daemon; from its first stop on, no worker thread runs
    for it (a busy host)  3. the forced bound passes  4. when the daemon has exited, the job's
    process is gone: its SIGKILL is not one of the thread calls cancelled at exit."""
    site.write_job("continuous", "sleeper", {"run.sh": "exec sleep 1000\n"})
    daemon = DaemonProcess(
        site, preamble=STARVED_AT_STOP, log_level="info", shutdown_grace_s=0.5
    ).start()
    try:
        wait_for_sync(lambda: leaders(site, "sleeper"), what="running")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
        assert '"status": "Stopping"' in daemon.log()
        assert not job_pids(site, "sleeper"), "a job process outlived the daemon"
    finally:
        daemon.kill_if_running()
        for pid in job_pids(site, "sleeper"):
            os.kill(pid, signal.SIGKILL)


def test_the_heap_is_given_back_once_the_starts_are_quiet(site: Site) -> None:
    """`serve` on glibc: after its jobs started, and once more after a restart, the daemon
    hands its free heap back (runtime.heaprelease)."""
    for name in ("a", "b", "c"):
        site.write_job("continuous", name, LOOP)
    daemon = DaemonProcess(site, log_level="debug").start()
    try:
        wait_for_sync(lambda: "heap released" in daemon.log(), timeout=20, what="a release")
        for name in ("a", "b", "c"):
            assert leaders(site, name)
        [pid] = leaders(site, "a")
        os.kill(pid, signal.SIGKILL)
        wait_for_sync(
            lambda: daemon.log().count("heap released") == 2, timeout=20, what="after restart"
        )
        assert leaders(site, "a") and leaders(site, "a") != [pid]
    finally:
        assert daemon.stop() == 0
