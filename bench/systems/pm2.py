"""PM2 (from npm, in a private prefix), driven through its Node.js API by bench/pm2_client.js.

PM2_HOME is a folder of this instance, so nothing touches ~/.pm2; `close()` runs `pm2 kill`
(through the client, then the CLI if the client is gone) and SIGKILLs what may remain.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import BenchError, is_running, wait_until
from bench.jobs import Job, Kind
from bench.systems.base import Options, System, Tools, write_script

CLIENT = Path(__file__).resolve().parents[1] / "pm2_client.js"
REPLY_PREFIX = b"@@bench "


class Pm2Client:
    """The Node.js helper process and its reply stream (read by a thread into a queue)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            ["node", str(CLIENT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            start_new_session=True,
        )
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(REPLY_PREFIX):
                self._replies.put(json.loads(line[len(REPLY_PREFIX) :]))
            else:
                self._log.write(line)

    def wait_reply(self, timeout: float) -> Any:
        try:
            message = self._replies.get(timeout=timeout)
        except queue.Empty as error:
            raise BenchError(f"no answer from the PM2 client within {timeout:g} s") from error
        if not message["ok"]:
            raise BenchError(f"PM2: {message['error']}")
        return message.get("result")

    def send(self, op: str, **fields: Any) -> None:
        """Send a command without waiting for its answer (read it with `wait_reply`)."""
        assert self.process.stdin is not None
        self._next_id += 1
        line = json.dumps({"id": self._next_id, "op": op, **fields}) + "\n"
        self.process.stdin.write(line.encode())
        self.process.stdin.flush()

    def call(self, op: str, timeout: float = 300, **fields: Any) -> Any:
        self.send(op, **fields)
        return self.wait_reply(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            try:
                self.process.stdin.close()
                self.process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._log.close()


class Pm2(System):
    name = "pm2"

    def __init__(self, tools: Tools, options: Options) -> None:
        super().__init__(tools, options)
        self.home = self.root / "pm2-home"
        self.logs = self.root / "logs"
        self.scripts = self.root / "scripts"
        self.client: Pm2Client | None = None
        self._god_pid: int | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(PM2_HOME=str(self.home), PM2_MODULE=str(self.tools.pm2_module))
        return env

    def app(self, job: Job) -> dict[str, Any]:
        script = write_script(self.scripts, f"{job.name}.sh", job)
        return {
            "name": job.name,
            "script": str(script),
            "interpreter": "bash",
            "exec_mode": "fork",
            "autorestart": job.kind is Kind.CONTINUOUS,
            "restart_delay": 0,
            "max_restarts": 1_000_000,
            "vizion": False,
            "out_file": str(self.logs / f"{job.name}.out"),
            "error_file": str(self.logs / f"{job.name}.err"),
            "env": {"BENCH_MARKER": self.marker},
        }

    def start(self, jobs: Sequence[Job]) -> None:
        for folder in (self.home, self.logs, self.scripts):
            folder.mkdir(parents=True, exist_ok=True)
        # The apps' scripts are written first, as the other systems' files are before their
        # manager starts: `started_at` is then the start of PM2's daemon.
        apps = [self.app(job) for job in jobs]
        self.started_at = time.time()
        self.client = Pm2Client(self.env(), self.root / "client.log")
        self.client.wait_reply(60)
        self._god_pid = int((self.home / "pm2.pid").read_text())
        if apps:
            self.client.call("start", apps=apps)

    def add(self, jobs: Sequence[Job]) -> float:
        assert self.client is not None
        apps = [self.app(job) for job in jobs]
        before = time.time()
        self.client.call("start", apps=apps)
        return before

    def trigger(self, name: str) -> float:
        assert self.client is not None
        before = time.time()
        self.client.call("restart", name=name)
        return before

    def wait_trigger_done(self, name: str, timeout: float) -> None:
        assert self.client is not None
        client = self.client

        def stopped() -> bool:
            listed = {app["name"]: app["status"] for app in client.call("list")}
            return listed.get(name) == "stopped"

        wait_until(stopped, timeout, f"{name} to stop", interval=0.01)

    @property
    def manager_pid(self) -> int:
        assert self._god_pid is not None
        return self._god_pid

    def terminate(self) -> float:
        """`pm2 kill`: stops every app, then the daemon."""
        assert self.client is not None
        before = time.time()
        self.client.send("kill")
        return before

    def log_files(self, name: str) -> list[Path]:
        return [self.logs / f"{name}.out"]

    @property
    def log_prefixed(self) -> bool:
        return False

    def _shutdown(self) -> None:
        try:
            self._kill_daemon()
        finally:
            if self.client is not None:
                self.client.close()
            if self._god_pid is not None and is_running(self._god_pid):
                os.kill(self._god_pid, signal.SIGKILL)

    def _kill_daemon(self) -> None:
        if self._god_pid is None or not is_running(self._god_pid):
            return
        client = self.client
        if client is not None and client.process.poll() is None:
            try:
                client.call("kill", timeout=60)
                return
            except BenchError:
                pass
        pm2 = self.tools.npm_prefix / "node_modules" / ".bin" / "pm2"
        if shutil.which(str(pm2)):
            subprocess.run([str(pm2), "kill"], env=self.env(), capture_output=True, timeout=60)
