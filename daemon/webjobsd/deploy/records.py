"""Deployment records: `SITE/site/deployments/<id>/` (Part A #2, #14; Part B §3.1, §3.4).

Owns, for each deployment, its status (`status.json`), its structured log (`log.jsonl`) and the
path of its KuduSync manifest (`manifest`, written by the sync), plus `deployments/active` (the
id of the active deployment), the retention of old records and the repair of records left
unfinished by a daemon that died. It does not deploy, and it does not hold the deployment lock
(`deploy.lock`) except for a moment in `repair_if_lock_free`.

Formats:

* **`status.json`**: one compact JSON object with Part B §3.1's field names (`id`, `status`,
  `status_text`, `author_email`, `author`, `deployer`, `message`, `progress`, `received_time`,
  `start_time`, `end_time`, `last_success_end_time`, `complete`, `is_temp`, `is_readonly`) and
  ours (`changed_jobs`, `removed_jobs`). `url`, `log_url`, `active`, `site_name` and
  `provisioningState` depend on the request or on other files, so only `to_json` adds them.
  `status` is the number (0 Pending, 1 Building, 2 Deploying, 3 Failed, 4 Success), as
  Newtonsoft writes Kudu's enum and as every client compares it.
* **Dates** are ISO-8601 UTC with seven fraction digits and `Z` (`2026-12-02T07:05:34.1234560Z`),
  Kudu's `DateTime` precision written out in full; the seventh digit is 0 (Python keeps
  microseconds). Reading accepts what `records.runstore.parse_kudu_datetime` accepts.
* **`log.jsonl`**: one JSON object a line, `{"id", "parent", "log_time", "message", "type"}`,
  appended with a single `write` on an `O_APPEND` descriptor, so concurrent writers never
  interleave inside a line and a live reader sees whole entries. A line cut by a crash is
  skipped on read. Kudu's `StructuredTextLogger` has the same two levels: top-level entries (a
  GUID id each) and their children; a parent's `type` is raised to the highest type among its
  descendants when read, so a warning inside "Running deployment command..." shows on the line.
* **`active`**: the id alone, no newline, as Kudu writes it.

Decisions:

* **Whole-file atomic writes** (`records.atomic`) for `status.json` and `active`: a reader
  (another daemon, the dashboard) sees the old status or the new one, never half of one.
* **Ids are validated** before any path is built from them (`is_valid_deployment_id`): letters,
  digits, `.`, `_`, `-`, starting with a letter or digit, at most 128 characters, and none of
  the names Kudu keeps in that folder (`active`, `drop`, `tools`, `pending`, ...). That covers
  commit shas, GUIDs with or without dashes, `temp-xxxxxxxx` and the ids CI tools choose, and no
  id reaches outside `deployments/` or onto one of its other files.
* **Reading is tolerant and read-only**: a folder without a readable `status.json`, a link, an
  oversized or malformed file, is not a record (skipped by `all`, None from `get`).
* **Deleting renames first** (`.deleted-<id>-<random>`, which is no valid id), then removes:
  a record disappears at once, whole, even if the removal of its files is interrupted.
* **Retention (Part A #14)**, `purge`: keep every unfinished record, the active one, the 10
  newest that ever succeeded (`status` 4, or a `last_success_end_time`), and the newest failed
  one that never succeeded; delete the rest. Kudu's rules (`DeploymentManager.PurgeDeployments`).
  Callers purge while they hold the deployment lock (at the end of a deployment, after a `PUT`,
  at start-up), so no deployment can begin or end in the middle of the decision.
* **Repair (Part B §1.6)**: a record that is not complete while nobody holds the lock was left
  by a daemon that died mid-deployment: it becomes Failed with an end time, and its log gets
  Kudu's "An unknown error has occurred..." as an error. Kudu does this whenever it reads such a
  record; we do it at start-up, and on read in `repair_if_lock_free` (used by `latest`, so that a
  poll never answers 202 forever for a deployment whose daemon died while this one ran). The
  lock is *taken* for the repair, not merely probed: probing then writing would race a
  deployment that begins in between.
* **All methods block** (file I/O, fsync): call them through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import structlog

from webjobsd.deploy.lock import DeploymentLock
from webjobsd.records import safeopen
from webjobsd.records.atomic import write_bytes_atomic, write_json_atomic
from webjobsd.records.runstore import parse_kudu_datetime
from webjobsd.site import SiteLayout

log = structlog.get_logger("webjobsd.deploy.records")

STATUS_FILE: Final = "status.json"
LOG_FILE: Final = "log.jsonl"
MANIFEST_FILE: Final = "manifest"

# Kudu's Resources.Log_UnexpectedError, written when it finds a record left unfinished.
UNKNOWN_ERROR: Final = "An unknown error has occurred. Check the diagnostic log for details."

# Part A #14 (Kudu's numbers).
KEEP_SUCCEEDED: Final = 10
KEEP_FAILED: Final = 1

_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Names Kudu (and we) keep beside the records; never a record id, in any case.
_RESERVED_NAMES: Final = frozenset(
    {"active", "drop", "tools", "pending", "latest", "settings.xml", "log", "manifest"}
)
_DELETED_PREFIX: Final = ".deleted-"
# A status file is well under 4 KiB; a log may hold a long git push or sync.
_MAX_STATUS_BYTES: Final = 256 * 1024
_MAX_LOG_BYTES: Final = 64 * 1024 * 1024
_MAX_ACTIVE_BYTES: Final = 1024


class DeployStatus(IntEnum):
    """Kudu's `DeployStatus`; 2 is defined but neither Kudu nor KuduLite ever assigns it."""

    PENDING = 0
    BUILDING = 1
    DEPLOYING = 2
    FAILED = 3
    SUCCESS = 4


class LogType(IntEnum):
    """Kudu's `LogEntryType`."""

    MESSAGE = 0
    WARNING = 1
    ERROR = 2


def is_valid_deployment_id(value: str) -> bool:
    """Safe to use as a folder name under `deployments/` (module docstring)."""
    return bool(_ID.fullmatch(value)) and value.lower() not in _RESERVED_NAMES


def format_deploy_time(dt: datetime) -> str:
    """`2026-12-02T07:05:34.1234560Z`: UTC, seven fraction digits, `Z`."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"a timezone-aware datetime is required, got {dt!r}")
    utc = dt.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + f".{utc.microsecond * 10:07d}Z"


def parse_deploy_time(value: object) -> datetime | None:
    """The aware UTC datetime of an ISO text; None for null; ValueError for anything else."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"not a date: {value!r}")
    return parse_kudu_datetime(value)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class DeploymentRecord:
    id: str
    status: DeployStatus
    status_text: str
    author: str
    author_email: str
    deployer: str
    message: str
    progress: str
    received_time: datetime
    start_time: datetime
    end_time: datetime | None
    last_success_end_time: datetime | None
    complete: bool
    is_temp: bool
    is_readonly: bool
    # "continuous/name" of each job folder this deployment replaced, and of each it removed.
    changed_jobs: list[str] = field(default_factory=list)
    removed_jobs: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Terminal (Failed or Success); `latest` answers 202 for any record that is not."""
        return self.status in (DeployStatus.FAILED, DeployStatus.SUCCESS)

    @property
    def ever_succeeded(self) -> bool:
        return self.status == DeployStatus.SUCCESS or self.last_success_end_time is not None

    def mark_building(self, status_text: str | None = None, now: datetime | None = None) -> None:
        """Status 1 with Kudu's text; the start time restarts (§3.1)."""
        self.status = DeployStatus.BUILDING
        self.status_text = status_text or f"Building and Deploying '{self.id}'."
        self.start_time = now or _now()

    def mark_failed(self, now: datetime | None = None) -> None:
        """Kudu's `MarkFailed`: complete, status 3, an end time, no status text or progress."""
        self.status = DeployStatus.FAILED
        self._complete(now or _now())

    def mark_success(self, now: datetime | None = None) -> None:
        """Kudu's `MarkSuccess`: as `mark_failed`, with status 4 and `last_success_end_time`."""
        self.status = DeployStatus.SUCCESS
        self._complete(now or _now())
        self.last_success_end_time = self.end_time

    def _complete(self, now: datetime) -> None:
        self.complete = True
        self.status_text = ""
        self.progress = ""
        self.end_time = now

    def to_document(self) -> dict[str, Any]:
        """What `status.json` holds."""
        return {
            "id": self.id,
            "status": int(self.status),
            "status_text": self.status_text,
            "author_email": self.author_email,
            "author": self.author,
            "deployer": self.deployer,
            "message": self.message,
            "progress": self.progress,
            "received_time": format_deploy_time(self.received_time),
            "start_time": format_deploy_time(self.start_time),
            "end_time": _optional_time(self.end_time),
            "last_success_end_time": _optional_time(self.last_success_end_time),
            "complete": self.complete,
            "is_temp": self.is_temp,
            "is_readonly": self.is_readonly,
            "changed_jobs": list(self.changed_jobs),
            "removed_jobs": list(self.removed_jobs),
        }

    @classmethod
    def from_document(cls, doc: object) -> DeploymentRecord:
        """The record in a `status.json`; ValueError when it is not one."""
        if not isinstance(doc, Mapping):
            raise ValueError("not a JSON object")
        record_id = doc.get("id")
        if not isinstance(record_id, str) or not is_valid_deployment_id(record_id):
            raise ValueError(f"bad id: {record_id!r}")
        status = doc.get("status")
        if not isinstance(status, int) or isinstance(status, bool):
            raise ValueError(f"bad status: {status!r}")
        received = parse_deploy_time(doc.get("received_time"))
        if received is None:
            raise ValueError("no received_time")
        return cls(
            id=record_id,
            status=DeployStatus(status),
            status_text=_text(doc, "status_text"),
            author=_text(doc, "author", "N/A"),
            author_email=_text(doc, "author_email", "N/A"),
            deployer=_text(doc, "deployer"),
            message=_text(doc, "message"),
            progress=_text(doc, "progress"),
            received_time=received,
            start_time=parse_deploy_time(doc.get("start_time")) or received,
            end_time=parse_deploy_time(doc.get("end_time")),
            last_success_end_time=parse_deploy_time(doc.get("last_success_end_time")),
            complete=doc.get("complete") is True,
            is_temp=doc.get("is_temp") is True,
            is_readonly=doc.get("is_readonly", True) is True,
            changed_jobs=_texts(doc, "changed_jobs"),
            removed_jobs=_texts(doc, "removed_jobs"),
        )

    def url(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/api/deployments/{quote(self.id, safe='')}"

    def to_json(self, base_url: str, *, active: bool, site_name: str) -> dict[str, Any]:
        """The API's object (Part B §3.1), in Kudu's field order, then ours.

        `base_url` is `scheme://host` (`http.context.base_url`); `url` is always the `/api`
        form, whichever route was asked, so a record has one address.
        """
        doc = self.to_document()
        url = self.url(base_url)
        return {
            "id": doc["id"],
            "status": doc["status"],
            "status_text": doc["status_text"],
            "author_email": doc["author_email"],
            "author": doc["author"],
            "deployer": doc["deployer"],
            "message": doc["message"],
            "progress": doc["progress"],
            "received_time": doc["received_time"],
            "start_time": doc["start_time"],
            "end_time": doc["end_time"],
            "last_success_end_time": doc["last_success_end_time"],
            "complete": doc["complete"],
            "active": active,
            "is_temp": doc["is_temp"],
            "is_readonly": doc["is_readonly"],
            "url": url,
            "log_url": f"{url}/log",
            "site_name": site_name,
            "provisioningState": _provisioning_state(self.status),
            "changed_jobs": doc["changed_jobs"],
            "removed_jobs": doc["removed_jobs"],
        }


def _optional_time(dt: datetime | None) -> str | None:
    return None if dt is None else format_deploy_time(dt)


def _provisioning_state(status: DeployStatus) -> str:
    if status == DeployStatus.SUCCESS:
        return "Succeeded"
    if status == DeployStatus.FAILED:
        return "Failed"
    return "InProgress"


def _text(doc: Mapping[str, Any], name: str, default: str = "") -> str:
    value = doc.get(name)
    return value if isinstance(value, str) else default


def _texts(doc: Mapping[str, Any], name: str) -> list[str]:
    value = doc.get(name)
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, str)]


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One line of a deployment's log. `type` of a parent is already raised to its children's."""

    id: str
    log_time: datetime
    message: str
    type: LogType
    parent: str | None
    has_children: bool


class DeploymentLog:
    """The structured log of one deployment (`log.jsonl`); see the module docstring.

    `add` is safe from several threads and processes at once (one append a line).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def add(self, message: str, type: LogType = LogType.MESSAGE, parent: str | None = None) -> str:
        """Append an entry; returns its id (a GUID), to pass as `parent` of its details.

        A top-level entry (no `parent`) is what Kudu shows as the record's `progress`: the
        caller sets `record.progress = message` and saves the record when it wants that shown.
        """
        entry_id = str(uuid.uuid4())
        line = {
            "id": entry_id,
            "parent": parent,
            "log_time": format_deploy_time(_now()),
            "message": message,
            "type": int(type),
        }
        data = (json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = safeopen.open_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            # One write: with O_APPEND the kernel places it whole at the end (no interleaving).
            os.write(fd, data)
        finally:
            os.close(fd)
        return entry_id

    def entries(self) -> list[LogEntry]:
        """Top-level entries, oldest first."""
        return [entry for entry in self._read() if entry.parent is None]

    def children(self, entry_id: str) -> list[LogEntry]:
        """The entries whose parent is `entry_id`, oldest first (empty when none or unknown)."""
        return [entry for entry in self._read() if entry.parent == entry_id]

    def last_error(self) -> str | None:
        """The message of the newest Error entry at any level (what a failed deploy says)."""
        errors = [entry.message for entry in self._read_raw() if entry.type == LogType.ERROR]
        return errors[-1] if errors else None

    def _read(self) -> list[LogEntry]:
        raw = self._read_raw()
        children: dict[str, list[LogEntry]] = {}
        for entry in raw:
            if entry.parent is not None:
                children.setdefault(entry.parent, []).append(entry)
        raised: dict[str, LogType] = {}

        def highest(entry: LogEntry, depth: int = 0) -> LogType:
            if entry.id in raised:
                return raised[entry.id]
            level = entry.type
            if depth < 32:  # a hand-edited log could loop; real ones are two levels deep
                for child in children.get(entry.id, ()):
                    level = max(level, highest(child, depth + 1))
            raised[entry.id] = level
            return level

        return [
            LogEntry(
                id=entry.id,
                log_time=entry.log_time,
                message=entry.message,
                type=highest(entry),
                parent=entry.parent,
                has_children=entry.id in children,
            )
            for entry in raw
        ]

    def _read_raw(self) -> list[LogEntry]:
        try:
            data = safeopen.read_bytes(self.path, _MAX_LOG_BYTES)
        except (FileNotFoundError, NotADirectoryError, safeopen.UnsafeFileError):
            return []
        entries: list[LogEntry] = []
        for line in data.splitlines():
            entry = _parse_log_line(line)
            if entry is not None:
                entries.append(entry)
        return entries


def _parse_log_line(line: bytes) -> LogEntry | None:
    try:
        doc = json.loads(line)
        if not isinstance(doc, dict):
            return None
        entry_id, parent, message = doc.get("id"), doc.get("parent"), doc.get("message")
        if not isinstance(entry_id, str) or not isinstance(message, str):
            return None
        if parent is not None and not isinstance(parent, str):
            return None
        log_time = parse_deploy_time(doc.get("log_time"))
        if log_time is None:
            return None
        return LogEntry(
            id=entry_id,
            log_time=log_time,
            message=message,
            type=LogType(doc.get("type", 0)),
            parent=parent,
            has_children=False,
        )
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, a bad date or type
        return None


class DeploymentStore:
    """The records of one site. Every method blocks: call through `asyncio.to_thread`."""

    def __init__(self, layout: SiteLayout) -> None:
        self.layout = layout
        self.root = layout.deployments_dir

    # -- ids and paths ------------------------------------------------------------------------

    def new_id(self) -> str:
        """32 hex digits, a GUID in .NET's "N" form (Kudu's id for a zip deployment)."""
        return uuid.uuid4().hex

    def new_temp_id(self) -> str:
        """`temp-` and 8 characters of Kudu's alphabet: the placeholder before the real id."""
        return "temp-" + "".join(secrets.choice("0123456789abcdfe") for _ in range(8))

    def _dir(self, record_id: str) -> Path:
        if not is_valid_deployment_id(record_id):
            raise ValueError(f"not a deployment id: {record_id!r}")
        return self.root / record_id

    def manifest_path(self, id: str) -> Path:
        return self._dir(id) / MANIFEST_FILE

    def log(self, id: str) -> DeploymentLog:
        return DeploymentLog(self._dir(id) / LOG_FILE)

    # -- records ------------------------------------------------------------------------------

    def create(
        self,
        *,
        id: str,
        deployer: str,
        message: str,
        author: str = "N/A",
        author_email: str = "N/A",
        is_temp: bool = False,
        is_readonly: bool = True,
        status_text: str = "Receiving changes.",
    ) -> DeploymentRecord:
        """A new Pending record, written; FileExistsError when `id` already has one."""
        if self.get(id) is not None:
            raise FileExistsError(f"deployment {id!r} exists")
        now = _now()
        record = DeploymentRecord(
            id=id,
            status=DeployStatus.PENDING,
            status_text=status_text,
            author=author or "N/A",
            author_email=author_email or "N/A",
            deployer=deployer,
            message=message,
            progress="",
            received_time=now,
            start_time=now,
            end_time=None,
            last_success_end_time=None,
            complete=False,
            is_temp=is_temp,
            is_readonly=is_readonly,
        )
        self.save(record)
        return record

    def save(self, record: DeploymentRecord) -> None:
        write_json_atomic(self._dir(record.id) / STATUS_FILE, record.to_document())

    def get(self, id: str) -> DeploymentRecord | None:
        if not is_valid_deployment_id(id):
            return None
        return self._read(self.root / id / STATUS_FILE)

    def exists(self, id: str) -> bool:
        return self.get(id) is not None

    def delete(self, id: str) -> None:
        """Remove the record's folder (FileNotFoundError when there is none)."""
        folder = self._dir(id)
        doomed = self.root / f"{_DELETED_PREFIX}{id}-{secrets.token_hex(4)}"
        os.rename(folder, doomed)  # the record is gone for readers from here on
        shutil.rmtree(doomed, ignore_errors=True)
        log.info("deployment record removed", deployment=id)

    def all(self) -> list[DeploymentRecord]:
        """Every readable record, newest `received_time` first."""
        records = [
            record
            for name in self._names()
            if (record := self._read(self.root / name / STATUS_FILE)) is not None
        ]
        records.sort(key=lambda record: (record.received_time, record.id), reverse=True)
        return records

    def latest(self) -> tuple[DeploymentRecord, bool] | None:
        """What `GET /api/deployments/latest` shows (Part B §3.3): `(record, True)` for the
        newest unfinished record, else `(record, False)` for the finished one with the greatest
        end time; None when there is neither."""
        records = self.all()
        for record in records:
            if not record.finished:
                return record, True
        ended = [record for record in records if record.end_time is not None]
        if not ended:
            return None
        return max(ended, key=lambda record: record.end_time or record.received_time), False

    def _names(self) -> Iterator[str]:
        try:
            entries = list(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if is_valid_deployment_id(entry.name) and entry.is_dir(follow_symlinks=False):
                yield entry.name

    def _read(self, path: Path) -> DeploymentRecord | None:
        try:
            data = safeopen.read_bytes(path, _MAX_STATUS_BYTES)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:  # a link, a FIFO, unreadable: not a record
            log.warning("deployment status unreadable", path=str(path), error=str(error))
            return None
        try:
            record = DeploymentRecord.from_document(json.loads(data))
        except ValueError as error:
            log.warning("deployment status malformed", path=str(path), error=str(error))
            return None
        if record.id != path.parent.name:
            log.warning("deployment status names another id", path=str(path), id=record.id)
            return None
        return record

    # -- the active deployment ----------------------------------------------------------------

    def active_id(self) -> str | None:
        try:
            data = safeopen.read_bytes(self.layout.active_deployment_path, _MAX_ACTIVE_BYTES)
        except OSError:
            return None
        try:
            value = data.decode().strip()
        except UnicodeDecodeError:
            return None
        return value if is_valid_deployment_id(value) else None

    def set_active(self, id: str) -> None:
        self._dir(id)  # validates
        write_bytes_atomic(self.layout.active_deployment_path, id.encode())

    # -- retention and repair -----------------------------------------------------------------

    def purge(self) -> list[str]:
        """Retention (Part A #14); returns the ids removed. Call while holding the lock."""
        records = self.all()
        active = self.active_id()
        keep = {record.id for record in records if not record.complete or record.id == active}
        succeeded = [record for record in records if record.complete and record.ever_succeeded]
        failed = [record for record in records if record.complete and not record.ever_succeeded]
        keep.update(record.id for record in succeeded[:KEEP_SUCCEEDED])
        keep.update(record.id for record in failed[:KEEP_FAILED])
        removed: list[str] = []
        for record in records:
            if record.id in keep:
                continue
            with contextlib.suppress(FileNotFoundError):  # another daemon's purge was first
                self.delete(record.id)
                removed.append(record.id)
        self._remove_deleted_leftovers()
        return removed

    def _remove_deleted_leftovers(self) -> None:
        # Folders whose removal a crash interrupted (`delete` renames first).
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(_DELETED_PREFIX) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)

    def repair_unfinished(self) -> list[str]:
        """Every unfinished record becomes Failed, its log saying so; returns their ids.

        Only correct while no deployment runs: call it holding the deployment lock (or use
        `repair_if_lock_free`), as start-up does.
        """
        repaired: list[str] = []
        for record in self.all():
            if record.complete and record.finished:
                continue
            self.log(record.id).add(UNKNOWN_ERROR, LogType.ERROR)
            record.mark_failed()
            self.save(record)
            repaired.append(record.id)
            log.warning(
                "deployment left unfinished marked failed",
                deployment=record.id,
                deployer=record.deployer,
                received_time=format_deploy_time(record.received_time),
            )
        return repaired

    def repair_if_lock_free(self, *, purge: bool = False) -> list[str] | None:
        """Take the deployment lock for a moment and `repair_unfinished` (and `purge`) under
        it; None, touching nothing, when a deployment holds the lock."""
        lock = DeploymentLock(self.layout)
        if not lock.try_acquire({"Operation": "repair deployment records", "Pid": os.getpid()}):
            return None
        try:
            repaired = self.repair_unfinished()
            if purge:
                self.purge()
            return repaired
        finally:
            lock.release()
