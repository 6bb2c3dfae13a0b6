"""Scenario 9: GET /api/continuouswebjobs with M running jobs, against a bare aiohttp handler."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench import httpload, jobs
from bench.common import BenchError, free_port, wait_until
from bench.harness import Harness
from bench.report import Result, at_most, ratio_at_least
from bench.systems import System, Webjobsd

BARE = "bare aiohttp"
PATH = "/api/continuouswebjobs"
BARE_SERVER = Path(__file__).resolve().parents[1] / "bare_server.py"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def start_bare(body: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, str(BARE_SERVER), "--port", str(port), "--body", str(body)]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}{PATH}"
    try:
        wait_until(lambda: process.poll() is None and _answers(url), 30, "the bare server", 0.05)
    except BenchError:
        process.kill()
        process.wait()
        raise
    return process, url


def list_api(h: Harness) -> list[Result]:
    count = h.sizes.big_jobs
    sizes = h.sizes

    def sleepers(system: System) -> list[jobs.Job]:
        return [jobs.sleeper(f"s{i:04d}", system.stamps_path) for i in range(count)]

    daemon = h.open("webjobsd", sleepers, start_timeout=600)
    assert isinstance(daemon, Webjobsd)
    bare: subprocess.Popen[bytes] | None = None
    try:
        time.sleep(sizes.settle_s)
        body = daemon.root / "list.json"
        with urllib.request.urlopen(daemon.url + PATH, timeout=60) as response:
            body.write_bytes(response.read())
        bare, bare_url = start_bare(body)
        urls = {"webjobsd": daemon.url + PATH, BARE: bare_url}
        latency = h.alternate(
            lambda name, _i: httpload.latencies(urls[name], sizes.list_requests),
            rounds=min(h.rounds, sizes.heavy_rounds),
            systems=list(urls),
        )
        rate = h.alternate(
            lambda name, _i: [
                httpload.throughput(urls[name], sizes.list_connections, sizes.list_seconds)
            ],
            rounds=min(h.rounds, sizes.heavy_rounds),
            systems=list(urls),
        )
        size_kib = body.stat().st_size / 1024
    finally:
        if bare is not None:
            bare.terminate()
            bare.wait(10)
        h.close(daemon)
    notes = [
        f"{count} running continuous jobs; body {size_kib:.0f} KiB; the bare handler returns "
        "web.json_response() of the daemon's own answer; same aiohttp client for both",
        f"latency: one keep-alive connection, {sizes.list_requests} sequential requests per "
        f"round; throughput: {sizes.list_connections} connections for {sizes.list_seconds:g} s",
    ]
    return [
        Result(
            f"9 GET list, {count} jobs",
            "ms",
            latency,
            reference=BARE,
            target=at_most(20, "ms"),
            notes=notes,
            digits=2,
        ),
        Result(
            f"9 list req/s, {sizes.list_connections} conn",
            "req/s",
            rate,
            reference=BARE,
            target=ratio_at_least(0.5, BARE),
            digits=0,
        ),
    ]
