"""Small helpers shared by the systems and the scenarios: waiting, stamps, /proc readings."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class BenchError(RuntimeError):
    """A measurement could not be taken (a system did not do what was asked in time)."""


def wait_until(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.002
) -> T:
    """Poll `predicate` until it returns something truthy; raise BenchError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- stamps ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stamp:
    """One line a managed program wrote as its first instruction: `EPOCHREALTIME NAME PID`."""

    at: float
    name: str
    pid: int


def stamp_line(path: Path, name: str) -> str:
    """The bash line that appends a stamp (one short O_APPEND write: lines never interleave)."""
    return f'echo "$EPOCHREALTIME {name} $$" >> "{path}"\n'


class Stamps:
    """Reads a stamp file incrementally; every stamp ever read stays available."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.all: list[Stamp] = []
        self._offset = 0
        self._partial = b""

    def refresh(self) -> list[Stamp]:
        """Read what was appended since the last call; returns the new stamps."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        new = [_parse_stamp(line) for line in lines if line.strip()]
        self.all.extend(new)
        return new

    def first_by_name(self) -> dict[str, Stamp]:
        self.refresh()
        first: dict[str, Stamp] = {}
        for stamp in self.all:
            first.setdefault(stamp.name, stamp)
        return first

    def latest(self, name: str) -> Stamp | None:
        self.refresh()
        for stamp in reversed(self.all):
            if stamp.name == name:
                return stamp
        return None

    def count(self, name: str) -> int:
        self.refresh()
        return sum(1 for stamp in self.all if stamp.name == name)

    def wait_all_started(self, names: Iterable[str], timeout: float) -> dict[str, Stamp]:
        wanted = set(names)

        def started() -> dict[str, Stamp] | None:
            first = self.first_by_name()
            return first if wanted <= first.keys() else None

        first = wait_until(started, timeout, f"{len(wanted)} job(s) to start", interval=0.01)
        return {name: first[name] for name in wanted}

    def wait_new(self, name: str, seen: int, timeout: float) -> Stamp:
        """The first stamp of `name` after the `seen` ones already counted."""

        def arrived() -> Stamp | None:
            self.refresh()
            mine = [stamp for stamp in self.all if stamp.name == name]
            return mine[seen] if len(mine) > seen else None

        return wait_until(arrived, timeout, f"a new start of {name}")


def _parse_stamp(line: bytes) -> Stamp:
    at, name, pid = line.decode().split()
    return Stamp(float(at), name, int(pid))


# -- /proc -------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie has ended; only its entry is left)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process itself (all its threads, not its children)."""
    fields = _stat_fields(pid)
    if fields is None:
        raise BenchError(f"process {pid} is gone")
    # Fields 14 and 15 of stat(5); the list starts at field 3 (state).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# A manager counts as settled (done starting its jobs) once a 1 s window of its CPU shows less
# than this share of a core.
SETTLED_CPU_PERCENT = 10.0


def settle_quiet(pid: int, minimum_s: float, maximum_s: float) -> float:
    """Seconds until process `pid` is quiet, from now: at least `minimum_s`, then until a 1 s
    window shows less than SETTLED_CPU_PERCENT of a core, at most `maximum_s` in all."""
    began = time.monotonic()
    time.sleep(minimum_s)
    while time.monotonic() - began < maximum_s:
        before, clock = cpu_seconds(pid), time.monotonic()
        time.sleep(1.0)
        used = 100.0 * (cpu_seconds(pid) - before) / (time.monotonic() - clock)
        if used < SETTLED_CPU_PERCENT:
            break
    return time.monotonic() - began


def rss_bytes(pid: int) -> int:
    """Resident set size of the process alone (VmRSS)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError as error:
        raise BenchError(f"process {pid} is gone") from error
    raise BenchError(f"no VmRSS for process {pid}")


def marker_pids(marker: str) -> set[int]:
    """Running processes whose environment holds `BENCH_MARKER=<marker>`."""
    needle = f"BENCH_MARKER={marker}\0".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:
            continue
        if needle in environ and is_running(int(entry)):
            found.add(int(entry))
    return found


def kill_marked(marker: str, sig: int) -> int:
    """Send `sig` to every process carrying the marker; returns how many were signalled."""
    count = 0
    for pid in marker_pids(marker):
        try:
            os.kill(pid, sig)
            count += 1
        except OSError:
            continue
    return count
