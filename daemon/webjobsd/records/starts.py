"""Start history of continuous jobs: when each process started, and when and how it ended.

File: `starts_{instanceId}.json` in the job's data folder, one per daemon instance (like the
status files), `{"starts": [entry, ...]}` oldest first, at most `MAX_STARTS` entries. An entry:

    {"pid": 4242, "start_time": "...Z", "end_time": "...Z" | null,
     "ended": "exited" | "stopped" | "failed to start" | "lost" | null, "exit_code": 1 | null}

`exit_code` follows `JobProcess.returncode`: negative for a signal. `ended` is null while the
process runs. "lost" marks a process whose end this instance never saw: the daemon was killed
while it ran, and the next daemon of the same instance found the entry open.

Why a file of its own rather than the `Status changed to` lines of `job_log.txt`: a chatty job
rotates its log within seconds, and the restart history went with it; the dashboard's "restarts
over time" and "uptime" need the starts, whatever the job prints. Kudu keeps nothing of the kind.

Decisions:

* Written by rename without fsync (as the status files), latest state only. A start is
  written on the loop's next turn, which comes after its spawn. An end waits `SAVE_DELAY_S`
  (or the next start's write), because the turn after an exit falls between the exit and the
  restart's spawn: writing there added 0.3 ms to the restart (bench/run `restart`, 4.5 ->
  4.8 ms). A daemon killed within that delay leaves the end unwritten; the next daemon of the
  instance then reads the entry as `lost`.
* The write itself goes to the supervisor's records thread (`submit`, `runtime.writes`), as the
  status files' do: on the loop, a start's write cost 0.1-0.26 ms on the development VM's disk
  (a temp file made, written, renamed over), i.e. up to a quarter of a second of loop time in a
  start of 1000 jobs, taken from the spawns. The history is taken as it is when the write is
  asked, and that thread writes in the order asked, so the file never goes back to an older
  state; the supervisor's shutdown waits for it. What waits in that thread's queue is the
  encoded file, not the history's objects: at a start of 1000 jobs the queue holds a write per
  job for a while, and queued dicts left the daemon 2.5 MB larger afterwards.
* Bounded to `MAX_STARTS` entries, dropped oldest first: a job crash-looping for a week keeps a
  file of some 30 KiB, not an ever-growing one.
* A missing or malformed file reads as an empty history, with a log line naming the file; the
  next write replaces it. History is information, never a reason to keep a job from running.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, cast

import structlog

from webjobsd.records import safeopen
from webjobsd.records.atomic import json_bytes, write_bytes_atomic
from webjobsd.records.runstore import format_kudu_datetime, parse_kudu_datetime

__all__ = [
    "MAX_STARTS",
    "InstanceStart",
    "ProcessStart",
    "StartHistory",
    "read_start_history",
    "starts_path",
]

log = structlog.get_logger("webjobsd.starts")

MAX_STARTS: Final = 200
SAVE_DELAY_S: Final = 0.1
STARTS_FILE_PREFIX: Final = "starts_"
_MAX_FILE_BYTES: Final = 1024 * 1024

Ending = Literal["exited", "stopped", "failed to start", "lost"]
# Runs `write(*args)` later, after every write asked before it (`OrderedWrites.submit`).
Submit = Callable[..., None]
_ENDINGS: Final = frozenset({"exited", "stopped", "failed to start", "lost"})


def starts_path(data_dir: Path, instance_id: str) -> Path:
    return data_dir / f"{STARTS_FILE_PREFIX}{instance_id}.json"


@dataclass(frozen=True, slots=True)
class ProcessStart:
    pid: int | None
    start_time: datetime
    end_time: datetime | None = None
    ended: Ending | None = None
    exit_code: int | None = None

    @property
    def unexpected_end(self) -> bool:
        """It ended without being asked to: the next start on its instance is a restart."""
        return self.ended in ("exited", "failed to start")

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "start_time": format_kudu_datetime(self.start_time),
            "end_time": format_kudu_datetime(self.end_time) if self.end_time else None,
            "ended": self.ended,
            "exit_code": self.exit_code,
        }

    @classmethod
    def from_json(cls, value: Any) -> ProcessStart:
        """Raise ValueError for anything that is not an entry."""
        if not isinstance(value, dict):
            raise ValueError("an entry is not an object")
        pid, code, ended = value.get("pid"), value.get("exit_code"), value.get("ended")
        start_text, end_text = value.get("start_time"), value.get("end_time")
        if not isinstance(start_text, str) or not isinstance(end_text, str | None):
            raise ValueError("start_time or end_time is not a date")
        if pid is not None and not isinstance(pid, int):
            raise ValueError("pid is not a number")
        if code is not None and not isinstance(code, int):
            raise ValueError("exit_code is not a number")
        if ended is not None and (not isinstance(ended, str) or ended not in _ENDINGS):
            raise ValueError(f"unknown ending {ended!r}")
        return cls(
            pid=pid,
            start_time=parse_kudu_datetime(start_text),
            end_time=parse_kudu_datetime(end_text) if end_text is not None else None,
            ended=cast(Ending | None, ended),
            exit_code=code,
        )


def _load(path: Path) -> list[ProcessStart]:
    try:
        data = safeopen.read_bytes(path, _MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as error:
        log.warning("cannot read start history", file=str(path), error=str(error))
        return []
    try:
        if len(data) > _MAX_FILE_BYTES:
            raise ValueError("larger than 1 MiB")
        document = json.loads(data)
        if not isinstance(document, dict) or not isinstance(document.get("starts"), list):
            raise ValueError('no "starts" list')
        return [ProcessStart.from_json(entry) for entry in document["starts"]]
    except (ValueError, RecursionError) as error:
        log.warning("start history is malformed; starting afresh", file=str(path), error=str(error))
        return []


@dataclass(frozen=True, slots=True)
class InstanceStart:
    instance_id: str
    start: ProcessStart
    # It followed an end its job was not asked for (`unexpected_end`) on the same instance.
    restart: bool


def read_start_history(
    data_dir: Path, is_live: Callable[[str], bool] | None = None
) -> list[InstanceStart]:
    """Every instance's starts of one job, oldest first (blocking).

    `restart` is decided per instance in the order of its file, before the instances are merged
    by start time: a clock stepped back must not pair a start with another's end. With
    `is_live`, a start still open on an instance that is gone reads as `lost`: no daemon of
    that instance is left to close it.
    """
    try:
        names = os.listdir(data_dir)
    except OSError:
        return []
    merged: list[InstanceStart] = []
    for name in sorted(names):
        if not (name.startswith(STARTS_FILE_PREFIX) and name.endswith(".json")):
            continue
        instance = name[len(STARTS_FILE_PREFIX) : -len(".json")]
        entries = _load(data_dir / name)
        if is_live is not None and entries and entries[-1].ended is None and not is_live(instance):
            entries[-1] = replace(entries[-1], ended="lost")
        previous_unexpected = False
        for entry in entries:
            merged.append(InstanceStart(instance, entry, previous_unexpected))
            previous_unexpected = entry.unexpected_end
    merged.sort(key=lambda item: item.start.start_time)
    return merged


class StartHistory:
    """This instance's start history of one continuous job, kept in memory and in its file."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        limit: int = MAX_STARTS,
        submit: Submit | None = None,
    ) -> None:
        """`submit`: where the file writes go (see the module docstring); without it they are
        made on the caller's thread."""
        self._path = path
        self._submit = submit
        self._clock = clock
        self._limit = limit
        self._entries = _load(path)
        self._pending = False
        # An entry still open was a process of this instance's previous daemon; whatever
        # happened to it (the new daemon ends leftovers at start-up), this daemon did not see it.
        if any(entry.ended is None for entry in self._entries):
            self._entries = [
                replace(entry, ended="lost") if entry.ended is None else entry
                for entry in self._entries
            ]
            self.save()

    @property
    def entries(self) -> tuple[ProcessStart, ...]:
        return tuple(self._entries)

    def started(self, pid: int | None) -> None:
        self._entries.append(ProcessStart(pid=pid, start_time=self._clock()))
        del self._entries[: -self._limit]
        self._schedule_save(0.0)  # after the spawn: the new process is already on its way

    def ended(self, how: Ending, exit_code: int | None = None) -> None:
        """Close the newest entry; nothing to do when it is closed already."""
        if not self._entries or self._entries[-1].ended is not None:
            return
        self._entries[-1] = replace(
            self._entries[-1], end_time=self._clock(), ended=how, exit_code=exit_code
        )
        # Between the exit and the restart's spawn: keep the write out of that path. The next
        # start's save (or the delay) writes it.
        self._schedule_save(SAVE_DELAY_S)

    def _schedule_save(self, delay_s: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.save()
            return
        self._pending = True
        # `flush` writes only what is still pending: an earlier or later timer finds nothing.
        if delay_s > 0:
            loop.call_later(delay_s, self.flush)
        else:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the file if a change has not been written yet."""
        if self._pending:
            self.save()

    def save(self) -> None:
        """Write the file with the history as it is now (through `submit` when given); errors
        are logged, the history stays in memory."""
        self._pending = False
        data = json_bytes({"starts": [entry.to_json() for entry in self._entries]})
        if self._submit is not None:
            self._submit(self._write, data)
        else:
            self._write(data)

    def _write(self, data: bytes) -> None:
        try:
            write_bytes_atomic(self._path, data, fsync=False)
        except OSError as error:
            log.error("cannot write start history", file=str(self._path), error=str(error))
