"""A disk that fills up: the daemon stays up, status files stay whole, lost lines are counted
and reported once space returns. The site lives on a small tmpfs mounted for the test."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import Site, running_daemon, wait_for

LOUD = {"run.sh": 'i=0\nwhile true; do i=$((i+1)); echo "line $i"; sleep 0.02; done\n'}


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "2m") -> Iterator[Path]:
    where.mkdir(parents=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(path: Path) -> None:
    """Write zeros until the file system says it is full."""
    chunk = b"\0" * 65536
    with open(path, "wb") as handle:
        try:
            while True:
                handle.write(chunk)
                handle.flush()
        except OSError:
            pass
    # Take the last crumbs too, so that even a short log line cannot fit.
    for index in range(1000):
        try:
            with open(path.with_name(f"{path.name}.{index}"), "wb") as crumb:
                crumb.write(b"\0" * 512)
        except OSError:
            break


async def test_a_full_disk_costs_log_lines_not_the_daemon(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk") as disk:
        site = Site(disk)
        site.temp = tmp_path / "temp"  # working copies elsewhere: only the site fills up
        site.write_job("continuous", "loud", LOUD)
        async with running_daemon(site) as daemon, aiohttp.ClientSession() as session:
            await wait_for(lambda: "INFO] line 5" in site.job_log("loud"), what="output")
            fill(disk / "filler")
            # Lines keep coming and cannot be written: they are counted...
            await wait_for(
                lambda: _unit_dropped(daemon) > 20, timeout=10, what="lines being dropped"
            )
            # ... while the daemon answers and the status file is still whole.
            assert daemon.http is not None
            async with session.get(f"http://127.0.0.1:{daemon.http.port}/healthz") as response:
                assert response.status == 200
            status = json.loads((site.data_dir("continuous", "loud") / "status_test01").read_text())
            assert status == {"Status": "Running"}
            for leftover in disk.glob("filler*"):
                os.unlink(leftover)
            await wait_for(
                lambda: (
                    "log line(s) were dropped because the log could not be written"
                    in site.job_log("loud")
                ),
                timeout=10,
                what="the drop reported once space returned",
            )


def _unit_dropped(daemon: object) -> int:
    supervisor = daemon.supervisor  # type: ignore[attr-defined]
    unit = next(iter(supervisor.units.values()))
    return int(unit._log.dropped_lines)
