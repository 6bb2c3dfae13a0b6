"""What a scenario may ask of a process manager; one subclass per system under test."""

from __future__ import annotations

import abc
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import BenchError, Stamps, is_running, kill_marked, wait_until
from bench.jobs import Job, Kind


@dataclass(frozen=True, slots=True)
class Tools:
    """Where the private installs are (set up by bench/run)."""

    repo: Path
    supervisor_venv: Path
    npm_prefix: Path

    @property
    def supervisord(self) -> Path:
        return self.supervisor_venv / "bin" / "supervisord"

    @property
    def pm2_module(self) -> Path:
        return self.npm_prefix / "node_modules" / "pm2"


DEFAULT_ROTATE_BYTES = 10 * 1024 * 1024  # webjobsd's default log_max_bytes


@dataclass(frozen=True, slots=True)
class Options:
    """Knobs a scenario may turn for one instance."""

    debounce_s: float = 1.0
    log_rotate_bytes: int = DEFAULT_ROTATE_BYTES  # rotate a job's stdout log past this size
    log_generations: int = 3


class System(abc.ABC):
    """One running instance of a process manager, in a private folder removed by `close()`."""

    name: str = ""

    def __init__(self, tools: Tools, options: Options) -> None:
        self.tools = tools
        self.options = options
        self.root = Path(tempfile.mkdtemp(prefix=f"wjbench-{self.name}-"))
        self.marker = self.root.name  # unique; put in every job's environment
        self.stamps_path = self.root / "stamps"
        self.stamps = Stamps(self.stamps_path)
        # When the manager was started with its jobs already configured (set by `start`, just
        # before the process that starts them is spawned): the start figures count from here,
        # not from the harness writing the jobs' files, which differs between systems.
        self.started_at: float | None = None
        self._closed = False

    # -- what scenarios call -------------------------------------------------------------------

    @abc.abstractmethod
    def start(self, jobs: Sequence[Job]) -> None:
        """Start the manager with `jobs` configured; returns once it answers its API."""

    @abc.abstractmethod
    def add(self, jobs: Sequence[Job]) -> float:
        """Hand new continuous jobs to the running manager; returns the time just before."""

    def add_copied(self, jobs: Sequence[Job]) -> float:
        """Like `add`, the files copied into place one by one (`cp -r` into the jobs folder)
        instead of a folder renamed in whole; returns the time just before. A system without
        folder watching has no such difference: `add` is its equivalent."""
        return self.add(jobs)

    @abc.abstractmethod
    def trigger(self, name: str) -> float:
        """Start on-demand job `name` once through the manager's API; returns the time before."""

    @abc.abstractmethod
    def wait_trigger_done(self, name: str, timeout: float) -> None:
        """Until the last start of `name` is over and a new one may be asked for."""

    @property
    @abc.abstractmethod
    def manager_pid(self) -> int:
        """The manager process itself (RSS and CPU are read from it alone)."""

    @abc.abstractmethod
    def terminate(self) -> float:
        """Ask the manager to stop with all its jobs (no wait); returns the time just before."""

    @abc.abstractmethod
    def log_files(self, name: str) -> list[Path]:
        """Where job `name`'s stdout goes, the current file first, then rotated ones."""

    @property
    @abc.abstractmethod
    def log_prefixed(self) -> bool:
        """Whether each captured line carries a prefix of the manager's (time, level...)."""

    def manager_gone(self) -> bool:
        return not is_running(self.manager_pid)

    def wait_started(self, jobs: Sequence[Job], timeout: float) -> None:
        names = [job.name for job in jobs if job.kind is Kind.CONTINUOUS]
        if names:
            self.stamps.wait_all_started(names, timeout)

    def start_seconds(self) -> float:
        """From the manager's start to the last first instruction of the jobs it was started
        with (call after `wait_started`): the jobs' own stamps, not when the harness saw them."""
        first = self.stamps.first_by_name()
        if self.started_at is None or not first:
            raise BenchError(f"{self.name} was not started with jobs")
        return max(stamp.at for stamp in first.values()) - self.started_at

    # -- clean-up ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything this instance started (forcing if needed) and remove its folder."""
        if self._closed:
            return
        self._closed = True
        try:
            self._shutdown()
        finally:
            kill_marked(self.marker, signal.SIGKILL)
            shutil.rmtree(self.root, ignore_errors=True)

    @abc.abstractmethod
    def _shutdown(self) -> None:
        """Stop the manager, gracefully first, forcing after a bound."""


def stop_child(process: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL; always reaped."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def spawn(
    argv: Sequence[str], log: Path, env: dict[str, str], cwd: Path
) -> subprocess.Popen[bytes]:
    """A manager as our child, in its own session (a Ctrl-C reaches only the harness, which then
    stops everything in order)."""
    with open(log, "ab") as handle:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def check_alive(process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    if process.poll() is not None:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise BenchError(f"{what} exited with {process.returncode}:\n{tail}")


def write_script(folder: Path, filename: str, job: Job) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(job.script)
    path.chmod(0o755)
    return path


def age(path: Path, seconds: float = 60.0) -> None:
    """Set a file's times in the past (a deployment's files were written before the drop)."""
    old = time.time() - seconds
    os.utime(path, (old, old))


def wait_for_exit(pid: int, timeout: float) -> None:
    wait_until(lambda: not is_running(pid), timeout, f"process {pid} to exit", interval=0.01)
