"""Stress: the jobs folder edited concurrently, the way deployments and people do, for 20 s.

A thread creates, replaces, edits, disables and deletes 50 jobs at random (fixed seed), by
atomic renames and by plain in-place writes and removals, while the real daemon watches and
reconciles. When the edits stop, the daemon must converge on what the files say: every
continuous job present and enabled runs exactly once, from its final script; every other job
has no process; the API lists exactly the jobs on disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import (
    DaemonProcess,
    Site,
    job_pids,
    leaders,
    processes_with_marker,
    wait_for,
)
from tests.test_faults import ready
from webjobsd.runtime.jobprocess import free_loopback_port

SEED = 28112026
DURATION_S = 20.0
CONTINUOUS = [f"c{i:02d}" for i in range(40)]
TRIGGERED = [f"t{i:02d}" for i in range(10)]


def kind_of(name: str) -> str:
    return "continuous" if name.startswith("c") else "triggered"


@dataclass
class Editor:
    """Random edits of job folders; remembers nothing the files do not say themselves."""

    site: Site
    rng: random.Random
    version: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def script(self) -> str:
        self.version += 1
        return f"# version {self.version}\nwhile true; do sleep 1; done\n"

    def folder(self, name: str) -> Path:
        return self.site.job_dir(kind_of(name), name)

    def staged(self, name: str) -> Path:
        staging = self.site.root / ".staging" / f"{name}-{self.version}-{time.monotonic_ns()}"
        staging.mkdir(parents=True)
        run = staging / "run.sh"
        run.write_text(self.script())
        run.chmod(0o755)
        return staging

    def create_atomically(self, name: str) -> None:
        os.rename(self.staged(name), self.folder(name))

    def create_in_place(self, name: str) -> None:
        folder = self.folder(name)
        folder.mkdir()
        run = folder / "run.sh"
        run.write_text(self.script())
        run.chmod(0o755)

    def replace_atomically(self, name: str) -> None:
        new = self.staged(name)
        trash = self.site.root / ".trash" / f"{name}-{time.monotonic_ns()}"
        trash.parent.mkdir(exist_ok=True)
        os.rename(self.folder(name), trash)
        os.rename(new, self.folder(name))
        shutil.rmtree(trash)

    def rewrite_script(self, name: str) -> None:
        (self.folder(name) / "run.sh").write_text(self.script())

    def toggle_disabled(self, name: str) -> None:
        marker = self.folder(name) / "disable.job"
        if marker.exists():
            marker.unlink()
        else:
            marker.write_text("")

    def edit_settings(self, name: str) -> None:
        settings = {"stopping_wait_time": self.rng.randint(1, 3), "note": self.version}
        (self.folder(name) / "settings.job").write_text(json.dumps(settings))

    def delete(self, name: str) -> None:
        if self.rng.random() < 0.5:
            shutil.rmtree(self.folder(name))
        else:
            trash = self.site.root / ".trash" / f"{name}-{time.monotonic_ns()}"
            trash.parent.mkdir(exist_ok=True)
            os.rename(self.folder(name), trash)
            shutil.rmtree(trash)

    def step(self) -> None:
        name = self.rng.choice(CONTINUOUS + TRIGGERED)
        if not self.folder(name).exists():
            action = self.rng.choice([self.create_atomically, self.create_in_place])
        else:
            action = self.rng.choices(
                [
                    self.replace_atomically,
                    self.rewrite_script,
                    self.toggle_disabled,
                    self.edit_settings,
                    self.delete,
                ],
                weights=[3, 3, 2, 2, 2],
            )[0]
        action(name)
        self.counts[action.__name__] = self.counts.get(action.__name__, 0) + 1

    def run_for(self, seconds: float) -> dict[str, int]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.step()
            # Bursts and pauses: some edits land inside one debounce window, some outside it.
            if self.rng.random() < 0.1:
                time.sleep(self.rng.uniform(0.0, 0.4))  # pacing of the load, not synchronisation
        return self.counts


def running_script(pid: int) -> str | None:
    try:
        return (Path(f"/proc/{pid}/cwd") / "run.sh").read_text()
    except OSError:
        return None


def mismatches(site: Site) -> list[str]:
    """What differs between the files and the processes; empty once the daemon has converged."""
    problems = []
    for name in CONTINUOUS:
        folder = site.job_dir("continuous", name)
        wanted = folder.exists() and not (folder / "disable.job").exists()
        running = leaders(site, name)
        if not wanted:
            if job_pids(site, name):
                problems.append(f"{name}: runs but should not")
            continue
        if len(running) != 1:
            problems.append(f"{name}: {len(running)} instances")
            continue
        try:
            final = (folder / "run.sh").read_text()
        except OSError:
            final = None
        if running_script(running[0]) != final:
            problems.append(f"{name}: runs an old script")
    for name in TRIGGERED:
        if job_pids(site, name):
            problems.append(f"{name}: a triggered job runs without a request")
    return problems


async def listed(session: aiohttp.ClientSession, base: str, kind: str) -> set[str]:
    async with session.get(f"{base}/api/{kind}webjobs") as response:
        assert response.status == 200
        return {job["name"] for job in await response.json()}


@pytest.mark.timeout(150)
async def test_concurrent_edits_converge_on_the_final_files(site: Site) -> None:
    for kind in ("continuous", "triggered"):
        site.job_dir(kind, "x").parent.mkdir(parents=True, exist_ok=True)
    port = free_loopback_port()
    daemon = DaemonProcess(site, listen=f"127.0.0.1:{port}", shutdown_grace_s=1.0).start()
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_for(lambda: ready(port), timeout=20, what="daemon ready")
        editor = Editor(site, random.Random(SEED))
        counts = await asyncio.to_thread(editor.run_for, DURATION_S)
        assert sum(counts.values()) > 500, counts  # the load really was a stress
        assert daemon.process is not None and daemon.process.poll() is None, daemon.log()
        await wait_for(lambda: not mismatches(site), timeout=60, interval=0.2, what="convergence")
        async with aiohttp.ClientSession() as session:
            for kind, names in (("continuous", CONTINUOUS), ("triggered", TRIGGERED)):
                on_disk = {n for n in names if site.job_dir(kind, n).exists()}
                assert await listed(session, base, kind) == on_disk
        assert daemon.stop() == 0
        assert not processes_with_marker(f"@{site.root}".encode())
    finally:
        daemon.kill_if_running()
