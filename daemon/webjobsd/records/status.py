"""Continuous job status files: `status_{instanceId}` in the job's data folder (Part B §2.3, §5.1).

This module owns the format of those files and Kudu's aggregation of them into the `status` and
`detailed_status` fields of a continuous job. It does not decide whether an instance is alive:
that is the caller's `is_instance_live` callback (Part A #18: the instance's lock, which is not a
lock on the status file, so rewriting the file by rename does not disturb it).

Decisions:

* Files are written compact, `{"Status":"Running"}`, by write-then-rename, so a reader on any
  instance sees a whole file or none.
* Reading is tolerant like Kudu's: a missing, unreadable or malformed file, a link, a FIFO
  (opened through `records.safeopen`, never followed nor waited for), or an unknown status
  string, reads as "no status"; the `Status` key is matched case-insensitively as Newtonsoft does.
* Aggregation follows `ContinuousJobsManager.UpdateDetailedStatus`: the status files of other
  instances that are not live are stale and deleted; each remaining file gives a line
  `{instanceId} - {status}` terminated by LF (Part A #15); `status` is the last one read that is
  not `InactiveInstance`, or the first one when all are. Files are visited sorted by name.
  When no file is left to read (none existed, or all were stale) the result is
  `("Initializing", "{this instance} - Initializing")`, without a newline (Kudu returns a null
  status in the second case, which no client can use).
* A status may carry the reason the job is held in it (`{"Status":"PendingRestart","Reason":
  "Failed to copy job files: ..."}`): Kudu's readers ignore the extra key, and the API shows it
  as the job's `error`, so "why is it not running" is answered where the status is read, not
  only in the job log.
* Every write bumps a process-wide count (`status_writes`), so that a reader caching what the
  files say (the HTTP API's job lists) knows without touching the disk that this process changed
  a status since it looked. It counts writes for any site: several daemons in one process only
  cost each other a needless re-read.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from webjobsd.model import ContinuousStatus, JobKey
from webjobsd.records import safeopen
from webjobsd.records.atomic import write_json_atomic
from webjobsd.site import SiteLayout

__all__ = [
    "StatusEntry",
    "aggregate_status",
    "aggregate_status_files",
    "read_status_entry",
    "read_status_file",
    "status_writes",
    "write_continuous_status",
]

STATUS_FILE_PREFIX: Final = "status_"
# A status file is a few bytes; anything much larger is not ours and is not worth reading.
_MAX_STATUS_BYTES: Final = 64 * 1024

StatusPath = str | os.PathLike[str]
# A reason is one line of text for people; a longer one is cut.
_MAX_REASON_CHARS: Final = 1000


@dataclass(frozen=True, slots=True)
class StatusEntry:
    status: ContinuousStatus
    reason: str | None = None


class _WriteCount:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def bump(self) -> None:
        with self._lock:
            self.value += 1


_WRITES: Final = _WriteCount()


def status_writes() -> int:
    """How many status files this process has written (or tried to) so far."""
    return _WRITES.value


def write_continuous_status(
    layout: SiteLayout, key: JobKey, status: ContinuousStatus, reason: str | None = None
) -> None:
    """Persist this instance's status of a continuous job (raises OSError on failure), with the
    reason it is held there when there is one.

    No fsync: the rename already makes the write atomic against a crash of the daemon, the status
    is rewritten at every transition and every start, and an fsync per transition on the event
    loop costs more than a stale status after a power cut is worth.
    """
    try:
        document = {"Status": status.value}
        if reason:
            document["Reason"] = reason[:_MAX_REASON_CHARS]
        write_json_atomic(layout.status_path(key), document, fsync=False)
    finally:
        # After the rename: a reader that sees the new count also sees the new file.
        _WRITES.bump()


def read_status_file(path: StatusPath) -> ContinuousStatus | None:
    """The status stored in `path`, or None when there is no usable one."""
    entry = read_status_entry(path)
    return None if entry is None else entry.status


def read_status_entry(path: StatusPath) -> StatusEntry | None:
    """The status stored in `path` with its reason, or None when there is no usable status."""
    try:
        raw = safeopen.read_bytes(Path(path), _MAX_STATUS_BYTES + 1)
        if len(raw) > _MAX_STATUS_BYTES:
            return None
        document = json.loads(raw.decode("utf-8-sig").strip())
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    status = _status_from_document(document)
    if status is None:
        return None
    assert isinstance(document, dict)
    reason = document.get("Reason")
    return StatusEntry(status, reason[:_MAX_REASON_CHARS] if isinstance(reason, str) else None)


def _status_from_document(document: object) -> ContinuousStatus | None:
    if not isinstance(document, dict):
        return None
    value = document.get("Status")
    if value is None:
        value = next((v for k, v in document.items() if str(k).lower() == "status"), None)
    if not isinstance(value, str):
        return None
    try:
        return ContinuousStatus(value)
    except ValueError:
        return None


def aggregate_status(
    layout: SiteLayout, key: JobKey, is_instance_live: Callable[[str], bool]
) -> tuple[str, str]:
    """Kudu's `(status, detailed_status)` of a continuous job across instances.

    Deletes the status files of instances that `is_instance_live` says are gone. This
    instance's own file is always read without asking the callback.
    """
    return aggregate_status_files(
        layout.instance_id, _status_files(layout.data_dir(key)), is_instance_live
    )


def aggregate_status_files(
    this_instance: str,
    files: Iterable[tuple[str, StatusPath]],
    is_instance_live: Callable[[str], bool],
    read: Callable[[StatusPath], ContinuousStatus | None] = read_status_file,
) -> tuple[str, str]:
    """`aggregate_status` over `(instance id, path)` pairs the caller listed, sorted by name;
    `read` is how a file is read (a caller may cache reads by file identity)."""
    lines: list[str] = []
    chosen: ContinuousStatus | None = None
    for instance_id, path in files:
        is_other = instance_id != this_instance
        if is_other and not is_instance_live(instance_id) and _delete_stale(path):
            continue
        status = read(path)
        if status is None:
            status = ContinuousStatus.INITIALIZING
        lines.append(f"{instance_id} - {status.value}\n")
        if chosen is None or status is not ContinuousStatus.INACTIVE_INSTANCE:
            chosen = status
    if chosen is None:
        initializing = ContinuousStatus.INITIALIZING.value
        return initializing, f"{this_instance} - {initializing}"
    return chosen.value, "".join(lines)


def _status_files(data_dir: Path) -> list[tuple[str, Path]]:
    """`(instance id, path)` of every `status_*` file, sorted by name; none if no folder."""
    try:
        with os.scandir(data_dir) as entries:
            names = sorted(
                entry.name
                for entry in entries
                if entry.name.startswith(STATUS_FILE_PREFIX)
                and len(entry.name) > len(STATUS_FILE_PREFIX)
                and entry.is_file()
            )
    except OSError:
        return []
    return [(name[len(STATUS_FILE_PREFIX) :], data_dir / name) for name in names]


def _delete_stale(path: StatusPath) -> bool:
    """True when the stale file is gone; False when it could not be deleted.

    Kudu reads a status file it cannot delete (it was locked, hence live); keep that rule for
    whatever else stops a delete, so that a permission problem does not hide an instance.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        return True  # another instance cleaned it up first
    except OSError:
        return False
    return True
