"""The floor (`bench/floor_supervisor.py`) behind the System interface, for scenarios 2 and 7.

It is a baseline measured in the same run, not a system under test: it has no API, so it can
only be started with its jobs, have one killed, be measured and be stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import BenchError
from bench.jobs import Job, Kind
from bench.systems.base import (
    Options,
    System,
    Tools,
    check_alive,
    spawn,
    stop_child,
    write_script,
)

PROGRAM = Path(__file__).resolve().parents[1] / "floor_supervisor.py"
NOTE = (
    "floor: bench/floor_supervisor.py, a Python process on webjobsd's stack (it imports "
    "aiohttp.web, watchdog, PyYAML and structlog) that spawns the jobs one after the other (pipes, "
    "a session each), spawns one again the moment it exits (pidfd) and does nothing else: no "
    "folder read or copied, no log, status or API; no manager on this stack does less per job here"
)


class Floor(System):
    name = "floor"

    def __init__(self, tools: Tools, options: Options) -> None:
        super().__init__(tools, options)
        self.log = self.root / "floor.out"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, jobs: Sequence[Job]) -> None:
        if any(job.kind is not Kind.CONTINUOUS for job in jobs):
            raise BenchError("the floor keeps continuous jobs only")
        scripts = [write_script(self.root / "jobs" / job.name, "run.sh", job) for job in jobs]
        env = dict(os.environ, BENCH_MARKER=self.marker)
        self.started_at = time.time()
        argv = [sys.executable, str(PROGRAM), *map(str, scripts)]
        self.process = spawn(argv, self.log, env, self.root)

    def wait_started(self, jobs: Sequence[Job], timeout: float) -> None:
        super().wait_started(jobs, timeout)
        assert self.process is not None
        check_alive(self.process, "the floor", self.log)

    @property
    def manager_pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def add(self, jobs: Sequence[Job]) -> float:
        raise BenchError("the floor takes its jobs at start only")

    def trigger(self, name: str) -> float:
        raise BenchError("the floor has no on-demand jobs")

    def wait_trigger_done(self, name: str, timeout: float) -> None:
        raise BenchError("the floor has no on-demand jobs")

    def terminate(self) -> float:
        raise BenchError("the floor is stopped by the harness only (close)")

    def log_files(self, name: str) -> list[Path]:
        raise BenchError("the floor keeps no logs")

    @property
    def log_prefixed(self) -> bool:
        return False

    def _shutdown(self) -> None:
        stop_child(self.process, grace_s=30)
