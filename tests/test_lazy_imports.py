"""The serve path leaves what only some requests need unimported (http/lazy.py's rule).

A real daemon (`webjobsd serve`, flags only, no config file) runs in a subprocess whose driver
thread waits for /readyz, records `sys.modules`, asks one lazily routed URL, records again and
ends the daemon with SIGTERM. A top-level import of one of the modules below, anywhere on the
serve path, fails the first check; the second shows the route still works and loads its module.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import webjobsd

# Imported on first use only: the routes of http/lazy.py, what they alone need, the CLI client,
# YAML (no config file is given here), psutil (stopping a job needs it, see runtime/proctree.py),
# zoneinfo (only a WEBSITE_TIME_ZONE needs it, see runtime/cron.py).
LAZY = (
    "webjobsd.http.files",
    "webjobsd.http.zipdeploy",
    "webjobsd.http.deployments",
    "webjobsd.http.git",
    "webjobsd.http.schedules",
    "webjobsd.deploy.archive",
    "webjobsd.deploy.git",
    "webjobsd.runtime.cronwords",
    "webjobsd.client",
    "zipfile",
    "yaml",
    "psutil",
    "zoneinfo",
)

DRIVER = r"""
import json, os, signal, socket, sys, threading, time

port, out = int(sys.argv[1]), sys.argv[2]
# What the interpreter's start-up imported (site hooks of this machine) is not the serve path's.
before = set(sys.modules)

def get(path):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer.split(b" ", 2)[1].decode()

def drive():
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if get("/readyz") == "200":
                break
        except OSError:
            pass
        time.sleep(0.02)
    at_ready = sorted(set(sys.modules) - before)
    status = get("/api/vfs/")
    after = sorted(set(sys.modules) - before)
    with open(out, "w") as file:
        json.dump({"ready": at_ready, "status": status, "after": after}, file)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=drive, daemon=True).start()
from webjobsd.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_serve_path_imports_heavy_modules_on_first_use(tmp_path: Path) -> None:
    port = _free_port()
    out = tmp_path / "modules.json"
    package_root = Path(webjobsd.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    argv = [sys.executable, "-c", DRIVER, str(port), str(out), "serve", "--no-auth"]
    argv += ["--site", str(tmp_path / "site"), "--listen", f"127.0.0.1:{port}"]
    argv += ["--instance-id", "lazy", "--log-level", "warning"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(out.read_text())

    def loaded(modules: list[str], name: str) -> bool:
        return any(module == name or module.startswith(name + ".") for module in modules)

    assert [name for name in LAZY if loaded(found["ready"], name)] == []
    assert found["status"] == "200"
    assert loaded(found["after"], "webjobsd.http.files")
