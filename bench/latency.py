"""Latency figures of the core paths, timed from inside the managed programs.

    python3 bench/latency.py [--rounds N]

Prints medians with min/max (milliseconds) for:
* drop: a job folder renamed into the jobs root -> the script's first instruction
  (includes the debounce quiet period, printed separately);
* restart: a continuous process killed -> its replacement's first instruction
  (WEBJOBS_RESTART_TIME=0);
* run: `request_run` returns -> the triggered script's first instruction.
Timestamps come from the scripts themselves (bash's $EPOCHREALTIME), not from status polling.
The daemon runs in this process; everything lives in a temporary site that is removed after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from webjobsd.app import Daemon
from webjobsd.config import config_from_mapping
from webjobsd.logs import configure_logging

STAMP = 'echo "$EPOCHREALTIME" >> "$WEBJOBS_DATA_PATH/stamps"\n'


def stamps(path: Path) -> list[float]:
    try:
        return [float(line) for line in path.read_text().split()]
    except (OSError, ValueError):
        return []


async def until(predicate, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.001)
    return value


def summary(name: str, values_ms: list[float]) -> str:
    return (
        f"{name:<10} median {statistics.median(values_ms):8.2f} ms   "
        f"min {min(values_ms):8.2f}   max {max(values_ms):8.2f}   n={len(values_ms)}"
    )


async def main(rounds: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="webjobsd-bench-"))
    site = root / "site"
    jobs = site / "site" / "wwwroot" / "App_Data" / "jobs"
    data = site / "data" / "jobs"
    debounce_s = 0.2
    for kind in ("continuous", "triggered"):  # a site has them; the daemon never makes them
        (jobs / kind).mkdir(parents=True)
    config = config_from_mapping(
        {
            "site": str(site),
            "temp_dir": str(root / "temp"),
            "instance_id": "bench",
            "debounce_s": debounce_s,
            "log_level": "error",
            "log_format": "json",
        },
        "bench",
    )
    configure_logging("json", "error")
    daemon = Daemon(config, environ={**os.environ, "WEBJOBS_RESTART_TIME": "0"})
    task = asyncio.create_task(daemon.run(install_signals=False))
    await until(daemon.ready.is_set)
    try:
        drop_ms: list[float] = []
        for index in range(rounds):
            staging = root / f"stage{index}"
            staging.mkdir()
            (staging / "run.sh").write_text(STAMP + "exec sleep 300\n")
            old = time.time() - 60
            os.utime(staging / "run.sh", (old, old))
            dropped = time.time()
            staging.rename(jobs / "continuous" / f"drop{index}")
            first = await until(lambda i=index: stamps(data / "continuous" / f"drop{i}" / "stamps"))
            drop_ms.append((first[0] - dropped) * 1000)

        restart_ms: list[float] = []
        loop_file = data / "continuous" / "drop0" / "stamps"
        assert daemon.supervisor is not None
        unit = next(u for k, u in daemon.supervisor.units.items() if k.name == "drop0")
        for _ in range(rounds):
            before = len(stamps(loop_file))
            assert unit.process is not None
            killed = time.time()
            os.killpg(unit.process.identity.pgid, signal.SIGKILL)
            after = await until(lambda b=before: len(stamps(loop_file)) > b and stamps(loop_file))
            restart_ms.append((after[-1] - killed) * 1000)
            await until(lambda: unit.process is not None and unit.status is not None)

        staging = root / "trig"
        staging.mkdir()
        (staging / "run.sh").write_text(STAMP)
        old = time.time() - 60
        os.utime(staging / "run.sh", (old, old))
        staging.rename(jobs / "triggered" / "trig")
        await until(lambda: any(k.name == "trig" for k in daemon.catalog.specs))  # type: ignore[union-attr]
        run_file = data / "triggered" / "trig" / "stamps"
        run_ms: list[float] = []
        for _ in range(rounds):
            before = len(stamps(run_file))
            requested = time.time()
            await daemon.request_run("trig")
            after = await until(lambda b=before: len(stamps(run_file)) > b and stamps(run_file))
            run_ms.append((after[-1] - requested) * 1000)
            await until(lambda: "trig" not in daemon.triggered.active)  # type: ignore[union-attr]
    finally:
        daemon.request_shutdown("bench done")
        await task
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    print(f"debounce quiet period: {debounce_s * 1000:.0f} ms")
    print(summary("drop", drop_ms))
    print(summary("restart", restart_ms))
    print(summary("run", run_ms))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    asyncio.run(main(parser.parse_args().rounds))
