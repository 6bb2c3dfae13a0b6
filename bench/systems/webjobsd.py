"""webjobsd as a real process (`python3 -m webjobsd serve`), jobs dropped as folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.common import BenchError, free_port, wait_until
from bench.jobs import Job, Kind
from bench.systems.base import Options, System, Tools, age, check_alive, spawn, stop_child

INSTANCE_ID = "bench0"
FINISHED_RUN = {"Success", "Failed", "Aborted", "Stopped"}


class Webjobsd(System):
    name = "webjobsd"

    def __init__(self, tools: Tools, options: Options) -> None:
        super().__init__(tools, options)
        self.site = self.root / "site"
        self.jobs_root = self.site / "site" / "wwwroot" / "App_Data" / "jobs"
        self.data_root = self.site / "data" / "jobs"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._staged = 0

    def config(self) -> dict[str, Any]:
        return {
            "site": str(self.site),
            "temp_dir": str(self.root / "temp"),
            "instance_id": INSTANCE_ID,
            "listen": f"127.0.0.1:{self.port}",
            "debounce_s": self.options.debounce_s,
            "log_max_bytes": self.options.log_rotate_bytes,
            "log_generations": self.options.log_generations,
            "log_format": "json",
            "log_level": "warning",
            # App settings: every job gets them as environment variables.
            "settings": {"WEBJOBS_RESTART_TIME": "0", "BENCH_MARKER": self.marker},
        }

    # -- jobs on disk --------------------------------------------------------------------------

    def _folder(self, job: Job) -> str:
        return "continuous" if job.kind is Kind.CONTINUOUS else "triggered"

    def _stage(self, job: Job) -> Path:
        self._staged += 1
        staging = self.root / "stage" / f"{self._staged}-{job.name}"
        staging.mkdir(parents=True)
        script = staging / "run.sh"
        script.write_text(job.script)
        script.chmod(0o755)
        age(script)
        age(staging)
        return staging

    def _drop(self, staged: list[tuple[Job, Path]]) -> float:
        """Each staged folder renamed into place in whole (a deployment, zip-and-drop)."""
        self._kind_folders()
        before = time.time()
        for job, staging in staged:
            os.rename(staging, self.jobs_root / self._folder(job) / job.name)
        return before

    def _copy(self, staged: list[tuple[Job, Path]]) -> float:
        """Each staged folder built in place by `cp -r` (new files, written where they run)."""
        self._kind_folders()
        before = time.time()
        for job, staging in staged:
            target = self.jobs_root / self._folder(job) / job.name
            subprocess.run(["cp", "-r", str(staging), str(target)], check=True)
        return before

    def _kind_folders(self) -> None:
        for kind in ("continuous", "triggered"):
            (self.jobs_root / kind).mkdir(parents=True, exist_ok=True)

    # -- System --------------------------------------------------------------------------------

    def start(self, jobs: Sequence[Job]) -> None:
        self._drop([(job, self._stage(job)) for job in jobs])
        config_path = self.root / "webjobsd.yaml"
        config_path.write_text(yaml.safe_dump(self.config()))
        env = dict(os.environ)
        daemon_path = str(self.tools.repo / "daemon")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [daemon_path, env.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", "webjobsd", "serve", "--config", str(config_path)]
        self.started_at = time.time()
        self.process = spawn([*argv, "--no-auth"], self.log, env, self.root)
        # Ready comes after the first scan and reconcile: thousands of jobs (scenario scale) take
        # longer than 60 s on a loaded 2-core machine.
        ready_s = 60 + 0.2 * len(jobs)
        wait_until(self._ready, ready_s, "webjobsd to be ready", interval=0.02)

    def _ready(self) -> bool:
        assert self.process is not None
        check_alive(self.process, "webjobsd", self.log)
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=5) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def add(self, jobs: Sequence[Job]) -> float:
        return self._drop([(job, self._stage(job)) for job in jobs])

    def add_copied(self, jobs: Sequence[Job]) -> float:
        return self._copy([(job, self._stage(job)) for job in jobs])

    def trigger(self, name: str) -> float:
        request = urllib.request.Request(
            f"{self.url}/api/triggeredwebjobs/{name}/run", method="POST", data=b""
        )
        before = time.time()
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 202:
                raise BenchError(f"run request answered {response.status}")
        return before

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return json.loads(response.read())

    def wait_trigger_done(self, name: str, timeout: float) -> None:
        def finished() -> bool:
            latest = self.get_json(f"/api/triggeredwebjobs/{name}").get("latest_run") or {}
            return latest.get("status") in FINISHED_RUN

        wait_until(finished, timeout, f"run of {name} to finish", interval=0.01)

    def wait_known(self, names: Sequence[str], timeout: float) -> None:
        """Until the catalog lists every triggered job in `names` (the API answers 404 before)."""

        def known() -> bool:
            listed = {job["name"] for job in self.get_json("/api/triggeredwebjobs")}
            return set(names) <= listed

        wait_until(known, timeout, "triggered jobs in the catalog", interval=0.02)

    @property
    def manager_pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def terminate(self) -> float:
        assert self.process is not None
        before = time.time()
        self.process.send_signal(signal.SIGTERM)
        return before

    def manager_gone(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def log_files(self, name: str) -> list[Path]:
        folder = self.data_root / "continuous" / name
        rotated = [folder / "job_prev_log.txt"]
        rotated += [folder / f"job_prev_log.{n}.txt" for n in range(2, 100)]
        return [folder / "job_log.txt", *(path for path in rotated if path.exists())]

    @property
    def log_prefixed(self) -> bool:
        return True

    def _shutdown(self) -> None:
        stop_child(self.process, grace_s=30)
