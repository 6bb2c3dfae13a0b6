"""Scenario 10: a site deployment of N continuous jobs of which one changed.

webjobsd only (supervisord and PM2 have no deployment API). The site zip holds N jobs, each a
stamping `run.sh` and a `version.txt`; it is deployed once (synchronously) and every job runs.
Then each sample posts the same site where only one job's `version.txt` was rebuilt (new content,
a later time in the zip, as a build makes it) to `POST /api/zipdeploy?isAsync=true`, as the GitHub
action's library does, and measures:

- request -> the changed job's first instruction (its stamp);
- request -> the record seen as Success by a client polling the 202's Location every 10 ms;
- how many jobs started because of this deployment (all stamps, any job), counted after the
  record is Success and a quiet period plus the settle time has passed: must be 1.

Baseline, in the same run on the same daemon: the changed job alone, deployed by the one-job
route `PUT /api/continuouswebjobs/NAME` with a zip (request -> its first instruction), which
shows what the other N-1 jobs of a whole-site deployment cost.

The zips are built before the clock starts; the request carries the whole site each time.
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import BenchError, Stamp, stamp_line
from bench.harness import Harness
from bench.report import Result, Target
from bench.systems import Webjobsd

BASELINE = "one-job PUT"
JOBS = "App_Data/jobs/continuous"
TERMINAL = {3, 4}  # Failed, Success
SUCCESS = 4
OCTET_STREAM = {"Content-Type": "application/octet-stream"}  # as the action's library sends


def _names(count: int) -> list[str]:
    return [f"d{i:03d}" for i in range(count)]


ZipTime = tuple[int, int, int, int, int, int]
BUILT: ZipTime = (2026, 1, 1, 12, 0, 0)
Entry = tuple[str, str, ZipTime, int]  # name in the zip, content, zip time, mode


def _job_files(name: str, stamps: Path, version: str, when: ZipTime) -> list[Entry]:
    """A job that stamps and sleeps; only its version.txt differs between builds."""
    script = "#!/bin/bash\n" + stamp_line(stamps, name) + "exec sleep infinity\n"
    return [("run.sh", script, BUILT, 0o755), ("version.txt", version, when, 0o644)]


def _zip(entries: Sequence[Entry]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data, when, mode in entries:
            info = zipfile.ZipInfo(name, date_time=when)
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return buffer.getvalue()


def _rebuilt(sample: int) -> ZipTime:
    """A later zip time for each sample (DOS times have a 2 s resolution: minutes apart)."""
    hour, minute = divmod(sample + 1, 60)
    return (2026, 1, 2, hour, minute, 0)


def site_zip(names: Sequence[str], stamps: Path, changed: str | None, sample: int) -> bytes:
    """The site: a page and the jobs; `changed`'s version.txt rebuilt for this sample."""
    entries: list[Entry] = [("index.html", "<h1>bench</h1>\n", BUILT, 0o644)]
    for name in names:
        version, when = ("v0", BUILT) if name != changed else (f"v{sample + 1}", _rebuilt(sample))
        for filename, data, entry_when, mode in _job_files(name, stamps, version, when):
            entries.append((f"{JOBS}/{name}/{filename}", data, entry_when, mode))
    return _zip(entries)


def job_zip(name: str, stamps: Path, sample: int) -> bytes:
    """The job alone, with a version.txt of its own for each sample."""
    return _zip(_job_files(name, stamps, f"p{sample + 1}", _rebuilt(sample)))


def _request(method: str, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any, str]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None, response.headers["Location"]
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        raise BenchError(f"{method} {url} answered {error.code}: {text}") from error


def _timestamp(text: str) -> float:
    """A record's time ("2026-01-01T12:00:00.1234567Z"), as seconds since the epoch."""
    return datetime.fromisoformat(text).timestamp()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


class DeployBench:
    """One daemon, its N jobs, and the samples taken from it."""

    def __init__(self, h: Harness, daemon: Webjobsd, count: int) -> None:
        self.h = h
        self.daemon = daemon
        self.names = _names(count)
        self.changed = self.names[len(self.names) // 2]
        self.stamps = daemon.stamps_path
        self.samples = 0
        self.puts = 0
        self.starts: list[float] = []
        self.success: list[float] = []
        self.work: list[float] = []  # the record's received_time -> end_time
        self.end_to_start: list[float] = []  # the record's end_time -> the changed job's stamp

    def seed(self) -> None:
        body = site_zip(self.names, self.stamps, None, 0)
        url = f"{self.daemon.url}/api/zipdeploy?deployer=bench"
        status, _, _ = _request("POST", url, body, OCTET_STREAM)
        if status != 200:
            raise BenchError(f"the first deployment answered {status}")
        self.daemon.stamps.wait_all_started(self.names, 300)

    def _quiet(self) -> None:
        """Past the quiet period and the settle time: a late start would have happened."""
        time.sleep(self.h.debounce_s + self.h.sizes.settle_s)

    def deployment(self) -> float:
        sample, self.samples = self.samples, self.samples + 1
        body = site_zip(self.names, self.stamps, self.changed, sample)
        stamps = self.daemon.stamps
        stamps.refresh()
        known, seen = len(stamps.all), stamps.count(self.changed)
        url = f"{self.daemon.url}/api/zipdeploy?isAsync=true&deployer=bench"
        before = time.time()
        status, _, location = _request("POST", url, body, OCTET_STREAM)
        if status != 202 or not location:
            raise BenchError(f"zipdeploy answered {status}, Location {location!r}")
        stamp, record, done = self._watch(location, seen, before)
        if record["status"] != SUCCESS:
            raise BenchError(f"the deployment failed: {record}")
        received, end = (_timestamp(record[key]) for key in ("received_time", "end_time"))
        self._quiet()
        stamps.refresh()
        self.starts.append(float(len(stamps.all) - known))
        self.success.append(done * 1000.0)
        self.work.append((end - received) * 1000.0)
        self.end_to_start.append((stamp.at - end) * 1000.0)
        return (stamp.at - before) * 1000.0

    def _watch(self, location: str, seen: int, before: float) -> tuple[Stamp, Any, float]:
        """Both at once, every 5 ms: the changed job's next stamp, and the record polled at the
        202's Location until it is finished (and when it was first seen so)."""
        stamps = self.daemon.stamps
        stamp: Stamp | None = None
        record: Any = None
        done = 0.0
        deadline = time.monotonic() + 120
        while stamp is None or record is None:
            if stamp is None:
                stamps.refresh()
                mine = [one for one in stamps.all if one.name == self.changed]
                stamp = mine[seen] if len(mine) > seen else None
            if record is None:
                polled = _get(location)
                if polled["status"] in TERMINAL:
                    record, done = polled, time.time() - before
            if time.monotonic() > deadline:
                raise BenchError(f"after 120 s: stamp {stamp}, record {record}")
            time.sleep(0.005)
        return stamp, record, done

    def job_put(self) -> float:
        # Its own count: each PUT brings content the job has not had yet (an identical job
        # restarts nothing).
        sample, self.puts = self.puts, self.puts + 1
        body = job_zip(self.changed, self.stamps, sample)
        stamps = self.daemon.stamps
        seen = stamps.count(self.changed)
        url = f"{self.daemon.url}/api/continuouswebjobs/{self.changed}"
        before = time.time()
        headers = {
            "Content-Type": "application/zip",
            "Content-Disposition": f"attachment; filename={self.changed}.zip",
        }
        status, _, _ = _request("PUT", url, body, headers)
        if status != 200:
            raise BenchError(f"PUT of the job answered {status}")
        started = stamps.wait_new(self.changed, seen, 60).at - before
        self._quiet()
        return started * 1000.0


def _every_sample_is_one(values: list[float]) -> float:
    """The sample farthest from 1 (so one 0 or 2 among many 1s is what gets judged)."""
    return max(values, key=lambda value: abs(value - 1))


def deploy(h: Harness) -> list[Result]:
    count = h.sizes.bulk_jobs
    daemon = h.open("webjobsd")
    assert isinstance(daemon, Webjobsd)
    bench = DeployBench(h, daemon, count)
    try:
        bench.seed()

        def sample(name: str, _index: int) -> list[float]:
            take = bench.deployment if name == "webjobsd" else bench.job_put
            return [take() for _ in range(h.sizes.samples_per_round)]

        latency = h.alternate(sample, systems=["webjobsd", BASELINE])
    finally:
        h.close(daemon)
    notes = [
        f"a site zip of {count} continuous jobs (run.sh + version.txt) deployed once; each sample "
        "posts it again with one job's version.txt rebuilt (new content, later zip time) to "
        "POST /api/zipdeploy?isAsync=true; the zips are built before the clock starts",
        "baseline: that job alone by PUT /api/continuouswebjobs/NAME (a zip), same daemon, "
        "alternating with the deployments",
        "jobs started: every job's stamps counted after the record is Success and "
        f"debounce + {h.sizes.settle_s:g} s more; 1 = only the changed job, once",
        "Success: seen by a client polling the 202's Location every 5 ms (while it watches the "
        "stamps)",
        "record received -> end: the daemon's own times in the record (the pending record is "
        "made when the request arrives; extraction, sync, PostDeploymentActions, the record's "
        "end); end -> changed instr: from there to the changed job's first instruction (the "
        "held job change applied once the deployment lock is released)",
    ]
    return [
        Result(
            f"10 deploy {count} jobs -> changed instr",
            "ms",
            latency,
            reference=BASELINE,
            notes=notes,
        ),
        Result(
            "10 jobs started per deploy",
            "starts",
            {"webjobsd": bench.starts},
            target=Target("= 1 every sample", lambda value, _ref: value == 1),
            judged_on=_every_sample_is_one,
            digits=0,
        ),
        Result("10 deploy request -> Success", "ms", {"webjobsd": bench.success}),
        Result("10 record received -> end", "ms", {"webjobsd": bench.work}),
        Result("10 record end -> changed instr", "ms", {"webjobsd": bench.end_to_start}),
    ]
