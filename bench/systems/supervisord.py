"""supervisord (from PyPI, in a private venv), driven over its XML-RPC interface.

`add` is what `supervisorctl update` does (reloadConfig, then addProcessGroup for each new
group), and `trigger` is `supervisorctl start` (startProcess), both sent straight to the
daemon's HTTP endpoint so that no client start-up is counted.
"""

from __future__ import annotations

import os
import subprocess
import time
import xmlrpc.client
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import free_port, wait_until
from bench.jobs import Job, Kind
from bench.systems.base import Options, System, Tools, check_alive, spawn, stop_child, write_script

SETTLED_STATES = {"EXITED", "STOPPED", "FATAL"}

MAIN_CONF = """\
[inet_http_server]
port=127.0.0.1:{port}

[supervisord]
logfile={root}/supervisord.log
pidfile={root}/supervisord.pid
childlogdir={root}/logs
loglevel=warn
nodaemon=true
silent=true
minfds=16384

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[include]
files = {root}/conf.d/*.conf
"""

PROGRAM = """\
[program:{name}]
command=bash {script}
autostart={autostart}
autorestart={autorestart}
startsecs=0
startretries=1000000
stopsignal=TERM
stopwaitsecs=5
stopasgroup=true
killasgroup=true
environment=BENCH_MARKER="{marker}"
stdout_logfile={logs}/{name}.out
stdout_logfile_maxbytes={rotate}
stdout_logfile_backups={generations}
stderr_logfile={logs}/{name}.err

"""


class Supervisord(System):
    name = "supervisord"

    def __init__(self, tools: Tools, options: Options) -> None:
        super().__init__(tools, options)
        self.port = free_port()
        self.confd = self.root / "conf.d"
        self.logs = self.root / "logs"
        self.scripts = self.root / "scripts"
        self.log = self.root / "supervisord.out"
        self.process: subprocess.Popen[bytes] | None = None
        self.rpc: Any = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{self.port}/RPC2")
        self._batches = 0

    def _program(self, job: Job) -> str:
        script = write_script(self.scripts, f"{job.name}.sh", job)
        continuous = job.kind is Kind.CONTINUOUS
        return PROGRAM.format(
            name=job.name,
            script=script,
            autostart=str(continuous).lower(),
            autorestart=str(continuous).lower(),
            marker=self.marker,
            logs=self.logs,
            rotate=self.options.log_rotate_bytes,
            generations=self.options.log_generations,
        )

    def _write_batch(self, jobs: Sequence[Job]) -> None:
        self._batches += 1
        text = "".join(self._program(job) for job in jobs)
        (self.confd / f"batch{self._batches}.conf").write_text(text)

    def start(self, jobs: Sequence[Job]) -> None:
        for folder in (self.confd, self.logs, self.scripts):
            folder.mkdir(parents=True, exist_ok=True)
        if jobs:
            self._write_batch(jobs)
        conf = self.root / "supervisord.conf"
        conf.write_text(MAIN_CONF.format(port=self.port, root=self.root))
        argv = [str(self.tools.supervisord), "-n", "-c", str(conf)]
        self.started_at = time.time()
        self.process = spawn(argv, self.log, dict(os.environ), self.root)
        wait_until(self._ready, 60, "supervisord to answer", interval=0.02)

    def _ready(self) -> bool:
        assert self.process is not None
        check_alive(self.process, "supervisord", self.log)
        try:
            return bool(self.rpc.supervisor.getState()["statename"] == "RUNNING")
        except OSError:
            return False

    def add(self, jobs: Sequence[Job]) -> float:
        before = time.time()
        self._write_batch(jobs)
        added, _changed, _removed = self.rpc.supervisor.reloadConfig()[0]
        for group in added:
            self.rpc.supervisor.addProcessGroup(group)
        return before

    def trigger(self, name: str) -> float:
        before = time.time()
        self.rpc.supervisor.startProcess(name, False)
        return before

    def wait_trigger_done(self, name: str, timeout: float) -> None:
        def settled() -> bool:
            return bool(self.rpc.supervisor.getProcessInfo(name)["statename"] in SETTLED_STATES)

        wait_until(settled, timeout, f"{name} to exit", interval=0.01)

    @property
    def manager_pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def terminate(self) -> float:
        assert self.process is not None
        before = time.time()
        self.process.terminate()
        return before

    def manager_gone(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def log_files(self, name: str) -> list[Path]:
        current = self.logs / f"{name}.out"
        rotated = [self.logs / f"{name}.out.{n}" for n in range(1, 100)]
        return [current, *(path for path in rotated if path.exists())]

    @property
    def log_prefixed(self) -> bool:
        return False

    def _shutdown(self) -> None:
        stop_child(self.process, grace_s=30)
