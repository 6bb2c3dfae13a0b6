"""Several isolated hosts sharing one site folder, for the tests and for `bench/`.

Each host is a set of Linux namespaces made with `unshare`: its own PID namespace, whose init is
tests/hostinit.py; its own UTS namespace, whose host name is the host's name (and so the daemon's
instance id); its own mount namespace, with a private tmpfs on /tmp. The shared folders (the site,
the test's own files) are bound back into it at their own paths, as an NFS mount would show the
same folder on every host (and so is whatever of this Python and this checkout lives under
/tmp: a fresh clone there must still run). The network namespace is shared: each daemon
listens on its own loopback port, which stands for the load balancer's view of the host.

`Host.kill()` is a power cut: SIGKILL to the namespace's init, whereupon the kernel kills every
process of the host at once; nothing of the daemon's shutdown runs, and the file locks its
processes held are released by the kernel, as an NFS server releases a dead client's locks once
its lease runs out. `Host.start()` brings the host back, with the same name.

`Host.partition()` is a network partition as the host sees it: its view of the shared folders is
unmounted (lazily, in its own mount namespace), so every path on the share fails with ENOENT
while the files its processes hold open stay open, and the locks on them stay held, as an NFS
client's descriptors of a share it cannot reach do until the server's lease runs out (which
never happens here: the holder must let go itself). The other hosts keep their view.

`JobSampler` tells which hosts run a job at one instant from /proc: the init's PID namespace
(`/proc/PID/ns/pid`) names the host of every process, and the job's working copy path in its
command line names the job. Both reads are a few microseconds per process, so a sample every
50 ms costs little.

Needs root (or CAP_SYS_ADMIN) and `unshare` from util-linux: `namespaces_unavailable()` says why
not, for a skip with a reason.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST_INIT = Path(__file__).with_name("hostinit.py")
UNSHARE = ["unshare", "--pid", "--fork", "--mount", "--uts", "--mount-proc"]
# Working copies and shutdown files in the host's own /tmp, as on a separate machine.
HOST_TEMP = "/tmp/webjobsd-host"


@functools.cache
def namespaces_unavailable() -> str | None:
    """None when hosts can be made here; otherwise why not (for pytest.skip)."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    try:
        probe = subprocess.run(
            [*UNSHARE, "--", "true"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as error:
        return f"unshare cannot run: {error}"
    if probe.returncode != 0:
        return f"Linux namespaces are not permitted here: {probe.stderr.strip()}"
    return None


def code_folders(shared: Sequence[Path]) -> list[Path]:
    """What the host must still see of this Python and this checkout once its /tmp is its own:
    those of them that live under /tmp (a CI's fresh clone, an editable install of it, a venv),
    outermost folders only, besides `shared` (bound already)."""
    import webjobsd

    wanted = [
        REPO_ROOT,
        Path(webjobsd.__file__).resolve().parents[1],
        Path(sys.prefix),
        Path(sys.base_prefix),
        *(Path(entry) for entry in sys.path if entry),
    ]
    tmp = Path("/tmp")
    under_tmp = {
        path.resolve()
        for path in wanted
        if path.resolve().is_relative_to(tmp) and path.resolve() != tmp and path.is_dir()
    }
    outermost: list[Path] = [path.resolve() for path in shared]
    for path in sorted(under_tmp, key=lambda path: len(path.parts)):
        if not any(path.is_relative_to(kept) for kept in outermost):
            outermost.append(path)
    return outermost[len(shared) :]


def free_port() -> int:
    from webjobsd.runtime.jobprocess import free_loopback_port

    return free_loopback_port()


@dataclass
class Host:
    """One host: `unshare` → hostinit.py (PID 1) → `webjobsd serve`."""

    name: str
    config_path: Path
    log_path: Path
    shared: Sequence[Path]
    port: int
    environ: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    init_pid: int | None = None
    pid_namespace: str | None = None
    started_at: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> Host:
        assert not self.alive, f"host {self.name} is already running"
        command = [
            sys.executable,
            "-m",
            "webjobsd",
            "serve",
            "--config",
            str(self.config_path),
            "--no-auth",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    *UNSHARE,
                    "--",
                    sys.executable,
                    str(HOST_INIT),
                    self.name,
                    *(str(path) for path in [*self.shared, *code_folders(self.shared)]),
                    "--",
                    *command,
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                env={**os.environ, **self.environ},
            )
        self.started_at = time.monotonic()
        self.init_pid = self._find_init()
        self.pid_namespace = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        return self

    def _find_init(self) -> int:
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with _suppress_os_error():
                found = children.read_text().split()
                if found:
                    return int(found[0])
            if self.process.poll() is not None:
                raise RuntimeError(f"host {self.name} ended at once:\n{self.log()}")
            time.sleep(0.005)
        raise RuntimeError(f"host {self.name}: no init process within 10 s")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=5) as response:
                return bool(json.loads(response.read()).get("ready"))
        except (OSError, ValueError):
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.alive:
                raise RuntimeError(f"host {self.name} ended before it was ready:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"host {self.name} not ready within {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def kill(self) -> float:
        """Power cut. Returns the monotonic time of the kill; when this returns, every process
        of the host is gone (the kernel reaps the namespace before its init's parent sees it
        end)."""
        assert self.process is not None and self.init_pid is not None
        killed_at = time.monotonic()
        with _suppress_os_error():
            os.kill(self.init_pid, signal.SIGKILL)
        self.process.wait(30)
        return killed_at

    def partition(self) -> float:
        """The host loses the shared folders (see the module docstring); returns the monotonic
        time of the loss."""
        assert self.alive and self.init_pid is not None
        # --pid too: umount reads /proc/self/mountinfo, and the host's /proc is its PID
        # namespace's, where only a process of that namespace has a /proc/self.
        enter = ["nsenter", "--target", str(self.init_pid), "--mount", "--pid"]
        for path in self.shared:
            subprocess.run(
                [*enter, "umount", "-l", str(path)],
                check=True,
                capture_output=True,
                timeout=30,
            )
        return time.monotonic()

    def stop(self, timeout: float = 60) -> int | None:
        """The daemon's own shutdown (SIGTERM passed on by the init), then the host ends."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        assert self.init_pid is not None
        with _suppress_os_error():
            os.kill(self.init_pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    # -- HTTP, with the standard library's client ------------------------------------------

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 30
    ) -> tuple[int, Any]:
        """(status, decoded JSON or text); (0, error text) when the host does not answer."""
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as error:
            return error.code, _decode(error.read())
        except OSError as error:
            return 0, str(error)

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path} on {self.name}: {status} {body}")
        return body


def _decode(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode(errors="replace")


class _suppress_os_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, traceback: object) -> bool:
        return isinstance(value, OSError)


@dataclass
class Cluster:
    """Hosts sharing `site_root`. `shared` holds the site (its parent is bound into each host,
    with the hosts' config files and whatever files the test shares with its jobs)."""

    shared_dir: Path
    site_root: Path
    hosts: list[Host]

    @classmethod
    def create(
        cls,
        shared_dir: Path,
        names: Iterable[str],
        config: dict[str, Any],
        *,
        environ: dict[str, str] | None = None,
    ) -> Cluster:
        site_root = shared_dir / "site-root"
        hosts = []
        for name in names:
            port = free_port()
            values = {
                **config,
                "site": str(site_root),
                "temp_dir": HOST_TEMP,
                "listen": f"127.0.0.1:{port}",
            }
            config_path = shared_dir / f"config-{name}.yaml"
            config_path.write_text(yaml.safe_dump(values))
            hosts.append(
                Host(
                    name=name,
                    config_path=config_path,
                    log_path=shared_dir / f"host-{name}.log",
                    shared=[shared_dir],
                    port=port,
                    environ=dict(environ or {}),
                )
            )
        return cls(shared_dir, site_root, hosts)

    def host(self, name: str) -> Host:
        return next(host for host in self.hosts if host.name == name)

    def start(self, timeout: float = 60) -> None:
        for host in self.hosts:
            host.start()
        for host in self.hosts:
            host.wait_ready(timeout)

    def close(self) -> None:
        """Every host ended, gracefully where it still answers; none is left behind."""
        for host in self.hosts:
            if host.alive:
                with _suppress_os_error():
                    assert host.init_pid is not None
                    os.kill(host.init_pid, signal.SIGTERM)
        for host in self.hosts:
            if host.process is not None:
                try:
                    host.process.wait(60)
                except subprocess.TimeoutExpired:
                    host.kill()

    def print_logs(self, tail: int = 4000) -> None:
        """For a failing test's output: the end of every host's daemon log."""
        for host in self.hosts:
            print(f"--- host {host.name} log (tail)\n{host.log()[-tail:]}")

    def sampler(self) -> JobSampler:
        return JobSampler({host.pid_namespace: host.name for host in self.hosts if host.alive})


@dataclass
class JobSampler:
    """Which hosts run which continuous job's process, now, read from /proc."""

    namespaces: dict[str | None, str]

    def refresh(self, hosts: Iterable[Host]) -> None:
        self.namespaces = {host.pid_namespace: host.name for host in hosts if host.alive}

    def sample(self, names: Iterable[str]) -> dict[str, list[str]]:
        """{job name: [host name per running instance of that continuous job]}. An instance is
        the job's session leader (the daemon starts each job in a session of its own) whose
        working folder is in the job's working copy; its children do not count again."""
        markers = {name: f"/jobs/continuous/{name}/" for name in names}
        found: dict[str, list[str]] = {name: [] for name in markers}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as handle:
                    stat = handle.read()
                # pid (comm) state ppid pgrp session ...: comm may hold spaces and parentheses.
                fields = stat[stat.rindex(b")") + 2 :].split()
                if fields[0] in (b"Z", b"X") or int(fields[3]) != int(entry.name):
                    continue  # dead, or not a session leader
                folder = os.readlink(f"/proc/{entry.name}/cwd") + "/"
                matching = [name for name, marker in markers.items() if marker in folder]
                if not matching:
                    continue
                namespace = os.readlink(f"/proc/{entry.name}/ns/pid")
            except (OSError, ValueError, IndexError):
                continue
            host = self.namespaces.get(namespace)
            if host is not None:
                for name in matching:
                    found[name].append(host)
        return found
