"""Time the catalog's look at one big job folder, and the making of its working copy.

    PYTHONPATH=daemon python3 bench/scan.py [--files 10000] [--size 2048]

Builds a job of FILES files (100 per folder, SIZE bytes each) in a temp folder, then prints:
the first look (every file read and hashed), later looks (stat only, hashes from the cache),
a look after `touch` of every file (all read again, fingerprint unchanged), and the time to
make a working copy. Run it with another tree on PYTHONPATH to compare versions.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from webjobsd.discovery.catalog import Catalog
from webjobsd.model import JobKey, JobKind
from webjobsd.runtime.workcopy import WorkingCopy


def build(root: Path, files: int, size: int) -> Path:
    job = root / "jobs" / "continuous" / "big"
    payload = os.urandom(size)
    for index in range(files):
        folder = job / f"pkg{index // 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"mod{index % 100:02d}.py").write_bytes(payload + index.to_bytes(4, "big"))
    (job / "run.sh").write_text("echo hi\n")
    old = time.time() - 3600
    for path in job.rglob("*"):
        os.utime(path, (old, old))
    return job


def timed(action: object) -> float:
    started = time.perf_counter()
    action()  # type: ignore[operator]
    return time.perf_counter() - started


def cache_figure(catalog: Catalog) -> str:
    hashes = getattr(catalog, "hashes", None)
    if hashes is None:
        return "none (this version fingerprints sizes and mtimes)"
    tables = hashes._folders.values()  # a figure, not an interface
    size = sum(
        sys.getsizeof(table) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in table.items())
        for table in tables
    )
    return f"{len(hashes)} files, {size / 1024:.0f} KiB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    key = JobKey(JobKind.CONTINUOUS, "big")
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        job = build(root, args.files, args.size)
        catalog = Catalog(root / "jobs", settle_s=0.0, which=lambda name: f"/usr/bin/{name}")
        # Files written seconds ago are "racy" (see contents.py) and read again: look as an
        # hour later would, by waiting out the racy window once.
        time.sleep(2.1)
        first = timed(lambda: catalog.apply(catalog.observe([key])))
        later = [timed(lambda: catalog.observe([key])) for _ in range(args.rounds)]
        fingerprint = catalog.specs[key].fingerprint
        cache = cache_figure(catalog)
        for path in job.rglob("*"):
            os.utime(path)
        touched = timed(lambda: catalog.observe([key]))
        spec = catalog.specs[key]
        copy = WorkingCopy(job, root / "copies")
        prepare: Any = copy.prepare  # its signature differs between versions
        if "spec" in inspect.signature(prepare).parameters:
            made = timed(lambda: prepare(spec, lambda _: None))
        else:  # the version before content fingerprints
            made = timed(lambda: prepare(lambda _: None))
    print(f"webjobsd from {sys.modules['webjobsd'].__file__}")
    print(f"job folder: {args.files} files of {args.size} bytes")
    print(f"first look:            {first * 1000:8.1f} ms")
    print(f"later looks (median):  {statistics.median(later) * 1000:8.1f} ms")
    print(f"look after touch:      {touched * 1000:8.1f} ms  (fingerprint {fingerprint})")
    print(f"working copy:          {made * 1000:8.1f} ms")
    print(f"hash cache:            {cache}")


if __name__ == "__main__":
    main()
