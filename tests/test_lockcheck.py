"""The start-up lock check against the real daemon: where `flock` does not exclude, one error in
the daemon log, singleton continuous jobs refused (unless allowed), the rest running.

A mount whose locks do not exclude (some FUSE and SMB mounts) cannot be made here without a
server, so the daemon's own `flock` is made to succeed always: a shared library built at test
time with the C compiler, loaded with LD_PRELOAD. Python's `fcntl.flock` calls libc's `flock`,
which the preloaded one shadows; the fixture checks that it does before any test relies on it.
Every other lock of the daemon (instance, deployment, run locks) then "succeeds" too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import DaemonProcess, Site, json_log_records, leaders, wait_for_sync

# No libc headers and -nostdlib: Debian's gcc only recommends libc6-dev; getenv and pause are
# found in the libc already loaded into the process.
FLOCK_SOURCE = r"""
char *getenv(const char *name);
int pause(void);

/* flock that excludes nothing; with WEBJOBSD_TEST_FLOCK=hang, one that never returns
   (a mount that does not answer). */
int flock(int fd, int operation) {
    (void)fd;
    (void)operation;
    const char *mode = getenv("WEBJOBSD_TEST_FLOCK");
    if (mode != 0 && mode[0] == 'h') {
        for (;;) pause();
    }
    return 0;
}
"""

# Two opens of one file, both exclusive locks asked for: prints whether the second was granted.
SECOND_LOCK_PROBE = """
import fcntl, sys
first, second = open(sys.argv[1], "a"), open(sys.argv[1], "a")
fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
try:
    fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("granted")
except BlockingIOError:
    print("refused")
"""

LOOP = {"run.sh": "echo up $$\nwhile true; do sleep 0.2; done\n"}
SINGLETON = {**LOOP, "settings.job": '{"is_singleton": true}'}
NOT_EXCLUDING = "file locks on the site do not exclude"
REFUSED = "WebJob singleton refused: the site's file locks do not exclude"


@pytest.fixture(scope="module")
def no_exclusion(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment that makes a process's `flock` exclude nothing."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip(
            "no C compiler (cc or gcc) on PATH to build the LD_PRELOAD library that makes flock "
            "not exclude; tests/tools/ensure installs gcc"
        )
    folder = tmp_path_factory.mktemp("preload")
    source = folder / "flock.c"
    source.write_text(FLOCK_SOURCE)
    library = folder / "libnoflock.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-nostdlib", "-o", str(library), str(source)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    env = {"LD_PRELOAD": str(library)}
    # The premise of every test here: with the library, a second open's lock is granted.
    assert probe_second_lock(folder / "probe.lock", {}) == "refused"
    assert probe_second_lock(folder / "probe.lock", env) == "granted"
    return env


def probe_second_lock(path: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SECOND_LOCK_PROBE, str(path)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


def mount_point_of(path: Path) -> str:
    """Found without mountinfo: the first folder upwards that is a mount point."""
    current = path.resolve()
    while not os.path.ismount(current):
        current = current.parent
    return str(current)


def records(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return json_log_records(daemon.log())


def events(daemon: DaemonProcess, prefix: str) -> list[dict[str, Any]]:
    return [r for r in records(daemon) if str(r.get("event", "")).startswith(prefix)]


def base_url(daemon: DaemonProcess) -> str:
    def port() -> int | None:
        for record in events(daemon, "listening"):
            return int(str(record["url"]).rsplit(":", 1)[1])
        return None

    return f"http://127.0.0.1:{wait_for_sync(port, timeout=20, what='the daemon to listen')}"


def get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        return json.load(error)


def start(site: Site, env: dict[str, str], **config: Any) -> DaemonProcess:
    return DaemonProcess(site, log_level="debug", **config).start(env=env)


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Every daemon a test starts is stopped, and must exit 0."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        assert daemon.stop() == 0, daemon.log()[-3000:]


def test_without_exclusion_singletons_are_refused_once_and_the_rest_runs(
    site: Site, no_exclusion: dict[str, str], daemons: list[DaemonProcess]
) -> None:
    """1. a singleton and a plain continuous job, the daemon's flock excluding nothing
    2. one error naming the site's mount; the plain job runs, the singleton does not, its
    status InactiveInstance with the reason through the API, said once in its job log
    3. woken again (SIGHUP): still refused, not said again  4. allowed by a reload: it runs."""
    site.write_job("continuous", "solo", SINGLETON)
    site.write_job("continuous", "plain", LOOP)
    daemon = start(site, no_exclusion)
    daemons.append(daemon)
    url = base_url(daemon)

    wait_for_sync(lambda: leaders(site, "plain"), what="the plain job running")
    job = wait_for_sync(
        lambda: (
            (found := get_json(f"{url}/api/continuouswebjobs/solo"))["status"] == "InactiveInstance"
            and found
        ),
        what="the singleton refused",
    )
    mount = mount_point_of(site.root)
    assert job["error"].startswith(f"test01: {REFUSED} (mount {mount} (fs ")
    assert job["error"].endswith("set allow_singletons_without_locks: true to run it anyway")
    assert job["detailed_status"] == "test01 - InactiveInstance\r\n"
    assert not leaders(site, "solo")
    assert "Run script" not in site.job_log("solo")
    assert site.job_log("solo").count(REFUSED) == 1

    [error] = events(daemon, NOT_EXCLUDING)
    assert error["level"] == "error"
    assert error["event"] == (
        "file locks on the site do not exclude: singleton jobs will not run; "
        "set allow_singletons_without_locks: true to run them anyway"
    )
    assert error["mount_point"] == mount
    assert error["fs_type"] and error["source"] is not None
    assert error["lock_file"] == str(site.root / "data" / "webjobsd" / "lockcheck.lock")
    assert error["fs_type"] in job["error"] and f"source {error['source']})" in job["error"]
    ready = get_json(f"{url}/readyz")
    assert "file locks on the site do not exclude: singleton jobs are refused" in ready["notes"]

    # Woken by a reload that changes nothing: it looks again, and says nothing new.
    refusals = len(events(daemon, "singleton job refused"))
    daemon.signal(signal.SIGHUP)
    wait_for_sync(
        lambda: len(events(daemon, "singleton job refused")) > refusals, what="refused again"
    )
    assert site.job_log("solo").count(REFUSED) == 1
    assert not leaders(site, "solo")
    assert len(events(daemon, NOT_EXCLUDING)) == 1

    # Allowed by a reload: it runs, and its job log says it runs without exclusion.
    config = yaml.safe_load(daemon.config_path.read_text())
    daemon.config_path.write_text(
        yaml.safe_dump({**config, "allow_singletons_without_locks": True})
    )
    daemon.signal(signal.SIGHUP)
    wait_for_sync(lambda: leaders(site, "solo"), what="the singleton running once allowed")
    assert "WebJob singleton runs although the site's file locks do not exclude" in site.job_log(
        "solo"
    )
    assert site.job_log("solo").count(REFUSED) == 1
    notes = get_json(f"{url}/readyz")["notes"]
    assert "file locks on the site do not exclude: singleton jobs run anyway" in notes


def test_allowed_from_the_start_a_singleton_runs_without_exclusion(
    site: Site, no_exclusion: dict[str, str], daemons: list[DaemonProcess]
) -> None:
    site.write_job("continuous", "solo", SINGLETON)
    daemon = start(site, no_exclusion, allow_singletons_without_locks=True)
    daemons.append(daemon)
    wait_for_sync(lambda: leaders(site, "solo"), what="the singleton running")
    assert REFUSED not in site.job_log("solo")
    [error] = events(daemon, NOT_EXCLUDING)
    assert error["level"] == "error"
    assert "singleton jobs run anyway" in error["event"]
    assert error["mount_point"] == mount_point_of(site.root)


def test_where_locks_exclude_nothing_is_said_and_singletons_run(
    site: Site, daemons: list[DaemonProcess]
) -> None:
    site.write_job("continuous", "solo", SINGLETON)
    daemon = start(site, {})
    daemons.append(daemon)
    url = base_url(daemon)
    wait_for_sync(lambda: leaders(site, "solo"), what="the singleton running")
    assert "WebJob singleton lock is acquired" in site.job_log("solo")
    assert not events(daemon, NOT_EXCLUDING)
    assert not [r for r in records(daemon) if r.get("level") == "error"]
    [fine] = events(daemon, "file locks on the site exclude")
    assert fine["mount_point"] == mount_point_of(site.root)
    assert "notes" not in get_json(f"{url}/readyz")


HUNG_CHECK = """
import asyncio, sys
from pathlib import Path
from webjobsd.records.lockcheck import check_site_locks

result = asyncio.run(check_site_locks(Path(sys.argv[1]), timeout_s=0.5))
print(result.works, result.mount_point, result.error, sep="\\n")
"""


def test_a_check_that_hangs_is_a_failed_check_within_its_bound(
    tmp_path: Path, no_exclusion: dict[str, str]
) -> None:
    """flock that never returns (a mount that does not answer): the check gives up on time,
    and the process still exits (the stuck thread does not hold it)."""
    done = subprocess.run(
        [sys.executable, "-c", HUNG_CHECK, str(tmp_path / "data")],
        env={**os.environ, **no_exclusion, "WEBJOBSD_TEST_FLOCK": "hang"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    works, mount, error = done.stdout.splitlines()
    assert works == "False"
    assert mount == mount_point_of(tmp_path)
    assert error == "the check did not finish within 0.5 s: the storage does not answer"
