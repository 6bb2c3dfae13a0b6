"""Test helpers: a site on disk, a daemon in-process or as a real process, and waiting with a
deadline (never a bare sleep)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import yaml

from webjobsd.app import Daemon
from webjobsd.config import config_from_mapping

REPO_ROOT = Path(__file__).resolve().parents[1]


def processes_with_marker(marker: bytes) -> list[int]:
    found = []
    for pid in psutil.pids():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if marker in handle.read():
                    found.append(pid)
        except OSError:
            continue
    return found


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def wait_for_sync(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


# Defines `use_up_descriptors()` for a child's script: the file limit lowered and every
# descriptor taken (returned, for the script to close), so that the next one the code under
# test asks for fails with EMFILE.
_USE_UP_DESCRIPTORS = """
import os, resource

def use_up_descriptors():
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    fillers = []
    while True:
        try:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            return fillers
"""


def run_short_of_descriptors(script: str, *args: str) -> str:
    """Run `script` in a child Python that may call `use_up_descriptors()`; it must exit 0
    with "ok" as its last output. Returns everything it printed (logs included)."""
    done = subprocess.run(
        [sys.executable, "-c", _USE_UP_DESCRIPTORS + script, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok"), done.stdout
    return done.stdout + done.stderr


def json_log_records(text: str) -> list[dict[str, Any]]:
    """The records of a daemon log written with `log_format: json` (other lines skipped)."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


FAST_CONFIG: dict[str, Any] = {
    "debounce_s": 0.3,
    "debounce_cap_s": 10.0,
    "rescan_s": 30.0,
    "reconcile_tick_s": 1.0,
    "restart_backoff_initial_s": 0.2,
    "shutdown_grace_s": 3.0,
    "log_format": "json",
    "log_level": "warning",
    "listen": "127.0.0.1:0",
}


class Site:
    def __init__(self, root: Path) -> None:
        self.root = root / "site-root"
        self.temp = root / "temp"
        self.jobs = self.root / "site" / "wwwroot" / "App_Data" / "jobs"
        self.data = self.root / "data" / "jobs"

    def config(self, **extra: Any) -> dict[str, Any]:
        values = dict(FAST_CONFIG)
        values.update({"site": str(self.root), "temp_dir": str(self.temp)})
        values.update(extra)
        return values

    def job_dir(self, kind: str, name: str) -> Path:
        return self.jobs / kind / name

    def write_unstartable_job(self, kind: str, name: str) -> Path:
        """A job whose start makes no process: ELF magic with the exec bit but no valid
        program, so exec fails with ENOEXEC. Aged like `write_job`'s files."""
        folder = self.job_dir(kind, name)
        folder.mkdir(parents=True)
        (folder / "run").write_bytes(b"\x7fELF garbage")
        (folder / "run").chmod(0o755)
        old = time.time() - 60
        os.utime(folder / "run", (old, old))
        return folder

    def write_job(
        self,
        kind: str,
        name: str,
        files: dict[str, str],
        *,
        executable: bool = True,
        age_s: float = 60.0,
    ) -> Path:
        """Write a job the way a deployment would: in a staging folder, then renamed in.

        The files carry a modification time `age_s` in the past, as a deployment's do (zip and
        `rsync -a` keep the build's times): a job written just before the daemon starts is then
        not one still being copied, and does not wait a quiet period at start-up (that wait,
        once per daemon start, cost the suite more than a minute). `age_s=0` gives files
        written this instant (tests/test_drops.py checks that such a job waits at start).
        """
        staging = self.root / ".staging" / f"{kind}-{name}-{time.monotonic_ns()}"
        for rel, content in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(content))
            if executable and rel.endswith(".sh"):
                path.chmod(0o755)
        if age_s:
            written = time.time() - age_s
            for path in [staging, *staging.rglob("*")]:
                os.utime(path, (written, written), follow_symlinks=False)
        target = self.job_dir(kind, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, target)
        return target

    def data_dir(self, kind: str, name: str) -> Path:
        return self.data / kind / name

    def status(self, name: str, instance: str = "test01") -> str | None:
        path = self.data_dir("continuous", name) / f"status_{instance}"
        try:
            return str(json.loads(path.read_text())["Status"])
        except (OSError, ValueError, KeyError):
            return None

    def job_log(self, name: str) -> str:
        try:
            return (self.data_dir("continuous", name) / "job_log.txt").read_text(errors="replace")
        except OSError:
            return ""

    def pid_file_pids(self, path: Path) -> list[int]:
        try:
            return [int(line) for line in path.read_text().split()]
        except (OSError, ValueError):
            return []


def live_pids(marker: str) -> list[int]:
    """Job processes alive (not zombies) whose environment carries `marker`."""
    result = []
    for pid in processes_with_marker(marker.encode()):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                result.append(pid)
        except psutil.Error:
            continue
    return result


@contextlib.asynccontextmanager
async def running_daemon(site: Site, **config: Any) -> AsyncIterator[Daemon]:
    """The daemon in this test's event loop, stopped (with its ladder) at the end."""
    settings = config.pop("environ", {})
    config.setdefault("instance_id", "test01")
    auth = config.pop("auth", False)
    daemon = Daemon(
        config_from_mapping(site.config(**config), "test"),
        environ={**os.environ, **settings},
        auth_enabled=auth,
    )
    task = asyncio.create_task(daemon.run(install_signals=False), name="daemon-under-test")
    try:
        ready = asyncio.create_task(daemon.ready.wait())
        await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            await task  # raises the start-up error
        assert daemon.ready.is_set(), "daemon did not become ready"
        # Jobs written just before the start are still settling: wait until discovery has
        # looked at them again, so that tests can use them at once.
        discovery, catalog = daemon.discovery, daemon.catalog
        assert discovery is not None and catalog is not None

        def settled() -> bool:
            # Nothing pending, and every folder on disk applied: the debouncer can be empty
            # while a refresh it handed over is still reading files in its thread.
            known = set(catalog.specs) | set(catalog.errors)
            return discovery.debouncer.next_due() is None and catalog.present_keys() <= known

        await wait_for(settled, what="jobs settled")
        yield daemon
    finally:
        daemon.request_shutdown("test finished")
        # Not `asyncio.wait_for`: the daemon awaits its own tasks under suppress(CancelledError),
        # so a shutdown stuck there and cancelled by wait_for could end as if nothing happened,
        # and the test pass after 40 s of nothing.
        done, _ = await asyncio.wait({task}, timeout=40)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=10)
            raise AssertionError("the daemon did not stop within 40 s of the end of the test")
        await task  # its error, if it ended with one


class DaemonProcess:
    """The real `webjobsd serve` as a child process (for signal and crash tests)."""

    def __init__(
        self,
        site: Site,
        instance_id: str = "test01",
        *,
        auth: bool = False,
        preamble: str = "",
        **config: Any,
    ) -> None:
        """`preamble`: Python run in the daemon's process before the CLI (e.g. a prctl)."""
        self.site = site
        self.auth = auth
        self.preamble = preamble
        self.instance_id = instance_id
        config.setdefault("instance_id", instance_id)
        cfg = site.config(**config)
        self.config_path = site.root.parent / f"config-{instance_id}.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = site.root.parent / f"daemon-{instance_id}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> DaemonProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        arguments = ["serve", "--config", str(self.config_path)]
        if not self.auth:
            arguments.append("--no-auth")
        if self.preamble:
            launcher = [
                "-c",
                f"{self.preamble}\nimport runpy, sys\nsys.argv = ['webjobsd', *{arguments!r}]\n"
                "runpy.run_module('webjobsd', run_name='__main__', alter_sys=True)",
            ]
        else:
            launcher = ["-m", "webjobsd", *arguments]
        self.process = subprocess.Popen(
            [sys.executable, *launcher],
            stdout=log,
            stderr=log,
            env={**os.environ, **(env or {})},
            cwd=REPO_ROOT,
        )
        self._log_handle = log
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        finally:
            self._log_handle.close()

    def stop(self, timeout: float = 30) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is not None:
            return self.wait()  # ended by itself: its log handle is closed all the same
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait()

    def kill_if_running(self) -> None:
        """For a test's `finally`: a daemon the test did not stop is not left behind."""
        if self.process is not None and self.process.poll() is None:
            self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def job_pids(site: Site, name: str, instance: str | None = None) -> list[int]:
    """Live processes of job `name` on `site` (any depth, even outside the process group)."""
    owner = f"WEBJOBSD_OWNER={instance + '@' if instance else ''}"
    site_marker = f"@{site.root}\0".encode()
    name_marker = f"\0WEBJOBS_NAME={name}\0".encode()
    result = []
    for pid in psutil.pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                environ = b"\0" + handle.read()
        except OSError:
            continue
        if site_marker in environ and name_marker in environ and owner.encode() in environ:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    result.append(pid)
            except psutil.Error:
                continue
    return result


def leaders(site: Site, name: str, instance: str | None = None) -> list[int]:
    """The processes the daemon started for `name`: session leaders whose parent is not itself a
    process of the job (a descendant that called setsid leads a session too)."""
    members = set(job_pids(site, name, instance))
    result = []
    for pid in members:
        try:
            if os.getsid(pid) == pid and psutil.Process(pid).ppid() not in members:
                result.append(pid)
        except (OSError, psutil.Error):
            continue
    return result


def kill_jobs(site: Site, *names: str) -> None:
    """For a test's `finally` after its daemon was killed: SIGKILL the jobs' process groups and
    wait until they are gone (a killed process stays visible while the kernel tears it down)."""
    for name in names:
        for pid in leaders(site, name):
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
    wait_for_sync(
        lambda: not any(job_pids(site, name) for name in names),
        timeout=10,
        what=f"the processes of {', '.join(names)} gone",
    )


@contextlib.contextmanager
def site_for_job_user() -> Iterator[Site]:
    """A site that a job running as another user (`run_as_user`) can reach.

    Not under pytest's tmp folder: every pytest session sets `/tmp/pytest-of-root` back to 0700,
    so a chmod there does not hold while other sessions start.
    """
    base = Path(tempfile.mkdtemp(prefix="webjobsd-run-as-"))
    base.chmod(0o755)
    try:
        yield Site(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
