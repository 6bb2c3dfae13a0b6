"""Run history of triggered jobs: `data/jobs/triggered/{name}/{runId}/` (Part B §1.3, §2.4, §2.6).

This module owns the run folders of triggered jobs and the `status` file inside each: creating a
run, rewriting its status, listing and reading the history, trimming it to `WEBJOBS_HISTORY_SIZE`,
and turning runs abandoned by a dead daemon into `Aborted` ones. It does not run anything, hold
the run lock (`triggeredJob.lock`) nor decide liveness: callers pass callbacks for that. It never
writes `output_log.txt` (that is `records.joblog`); it only names its path.

Formats, byte for byte as Kudu writes them:

* **Run id**: the UTC start time as `yyyyMMddHHmmssffff`, 18 digits, the last 4 being 100 µs
  ticks (truncated, as .NET's `f` specifiers do). Sorting ids as strings sorts runs by time.
* **`{runId}/status`**: compact JSON with PascalCase keys in Kudu's property order and default
  values omitted (Newtonsoft `DefaultValueHandling.Ignore`)::

      {"Trigger":"External - curl/8.5.0","Status":"Running",
       "StartTime":"2024-09-04T17:33:18.1234567Z"}

  (one line in the file). `EndTime` appears when the run ends. An empty trigger is omitted
  too (Kudu's is null then).
* **Dates**: Newtonsoft's ISO form for a UTC `DateTime`, `yyyy-MM-ddTHH:mm:ss.FFFFFFFZ`: up to 7
  fraction digits with trailing zeros trimmed, no `.` at all when the fraction is zero. Python
  keeps microseconds, so the 7th digit is always 0 when we write; a Kudu-written 7th digit is
  truncated on read (a run rewritten by us may lose those 100 ns).
* **Durations** (for the API's `duration`): .NET TimeSpan "c", `[-][d.]hh:mm:ss[.fffffff]`; the
  fraction is all 7 digits when present (TimeSpan does not trim) and omitted when zero.

Decisions:

* **mkdir is the arbiter of run ids.** Kudu takes `DateTime.UtcNow` for the id and creates the
  folder with "ensure exists", so two runs in the same 100 µs would share a folder; it relies on
  the run lock to make that impossible. We create the folder with an exclusive `mkdir` (atomic on
  local file systems and on NFS/SMB servers) and, if the id is taken, try the next tick. This
  holds across threads, processes and daemons sharing the site, lock or no lock. The start time
  stored is `now` itself (Kudu reads the clock twice, so its id and StartTime differ slightly).
* **Statuses are rewritten by write-then-rename** (`records.atomic`), so a reader never sees half
  a file; Kudu rewrites in place with retries. Only a finished run's status is fsync'ed: it is
  the record that stays. `Initializing` and `Running` are written on the way to the process
  (an fsync there cost a run request milliseconds), and after a crash of the host such a run
  is `Aborted` by `repair_abandoned` whatever the disk kept; the rename alone already makes
  each write atomic against a crash of the daemon.
* **Reading is tolerant and read-only**: a missing folder, a missing, oversized or malformed
  status file, a status that is a link or no regular file (`records.safeopen`), an unknown
  status string, an invalid date: "no run" (None, or skipped by the listing). Keys are
  matched case-insensitively as Newtonsoft does. A missing StartTime falls back to the time
  encoded in the run id. Nothing is repaired while reading.
* **Only 18-digit real directories are runs.** Lock files, `job_scheduler.log`, temp files,
  symlinks and other folders are ignored everywhere, retention included (Kudu counts every
  sub-folder, but there are none but runs in practice). Run ids and job names given by callers
  are validated, so that no id can be used to reach outside the job's data folder.
* **`latest` skips unreadable runs**: it reads from the newest name down until a status reads.
  Kudu's `GetLatestJobRun` looks at the newest folder only and returns null when that folder has
  no readable status yet (e.g. for the instant between mkdir and the first status write).
* **Aborted is persisted** (Part A #13). Kudu never stores `Aborted`: it shows a stored `Running`
  as `Aborted` when the run lock is free or a newer run exists, and its duration grows forever.
  `repair_abandoned` (called at start-up, after leftover processes are ended) rewrites every
  `Running` *or* `Initializing` run that the caller's `is_live` says is dead as `Aborted` with an
  end time, so the history stops changing. Any API-side "computed on read" rule can stay as a
  safety net; it will rarely have anything to do.
* **Retention never touches a live run.** `apply_retention` is Kudu's `OldRunsCleanup`: before a
  new run is created, keep the newest `history_size - 1` run folders and delete the others. Kudu
  deletes by name only; when the caller passes `is_active`, every deletion candidate that is not
  known to be finished (status `Running`, `Initializing`, or no readable status yet, which is
  what a run looks like between its mkdir and its first write) is kept if `is_active(run_id)`
  says it is live. Such runs are not compensated for by deleting newer ones, so the history may
  exceed its size until they end. Without `is_active` the rule is Kudu's: the usual caller holds
  the job's run lock, which is held for a run's whole life, so no run of the job can be live.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final

import structlog

from webjobsd.model import JobKey, JobKind, RunStatus, is_valid_job_name
from webjobsd.records import safeopen
from webjobsd.records.atomic import write_json_atomic
from webjobsd.site import SiteLayout

__all__ = [
    "OUTPUT_LOG_FILE",
    "STATUS_FILE",
    "RunRecord",
    "RunStore",
    "format_kudu_datetime",
    "format_timespan",
    "is_valid_run_id",
    "new_run_id",
    "parse_kudu_datetime",
    "run_id_time",
]

log = structlog.get_logger("webjobsd.runstore")

STATUS_FILE: Final = "status"
OUTPUT_LOG_FILE: Final = "output_log.txt"

# [0-9], not \d: \d also matches non-ASCII digits, which are not run ids.
_RUN_ID: Final = re.compile(r"[0-9]{18}")
_TICK: Final = timedelta(microseconds=100)  # one unit of the run id's `ffff`
# Consecutive taken ids before create_run gives up: 1000 ticks is 100 ms worth of runs of one
# job, far beyond any real burst; the bound only stops a loop on a broken file system.
_MAX_ID_ATTEMPTS: Final = 1000
# A status file is about 150 bytes; anything much larger is not ours and is not worth reading.
_MAX_STATUS_BYTES: Final = 64 * 1024
_UNFINISHED: Final = frozenset({RunStatus.INITIALIZING, RunStatus.RUNNING})

_KUDU_DATETIME: Final = re.compile(
    r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2})"
    r"(?:\.(?P<fraction>[0-9]{1,7}))?"
    r"(?P<zone>Z|[+-][0-9]{2}:?[0-9]{2})?"
)
# .NET's default(DateTime): Newtonsoft omits it when writing, but a file written by other tools
# may spell it out; it means "unset".
_DOTNET_DEFAULT_DATETIME: Final = datetime(1, 1, 1, tzinfo=UTC)


# -- formats --------------------------------------------------------------------------------


def _as_utc(dt: datetime) -> datetime:
    # A naive datetime is ambiguous (local or UTC?): refuse it rather than guess.
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"a timezone-aware datetime is required, got {dt!r}")
    return dt.astimezone(UTC)


def new_run_id(now: datetime) -> str:
    """The run id of a run started at `now`: UTC `yyyyMMddHHmmssffff`."""
    utc = _as_utc(now)
    return (
        f"{utc.year:04d}{utc.month:02d}{utc.day:02d}"
        f"{utc.hour:02d}{utc.minute:02d}{utc.second:02d}{utc.microsecond // 100:04d}"
    )


def is_valid_run_id(run_id: str) -> bool:
    """18 ASCII digits, nothing else (so no separators, no `..`)."""
    return bool(_RUN_ID.fullmatch(run_id))


def run_id_time(run_id: str) -> datetime:
    """The UTC time a run id encodes (raises ValueError for an invalid id or date)."""
    if not is_valid_run_id(run_id):
        raise ValueError(f"not a run id: {run_id!r}")
    return datetime(
        int(run_id[0:4]),
        int(run_id[4:6]),
        int(run_id[6:8]),
        int(run_id[8:10]),
        int(run_id[10:12]),
        int(run_id[12:14]),
        int(run_id[14:18]) * 100,
        tzinfo=UTC,
    )


def format_kudu_datetime(dt: datetime) -> str:
    """Newtonsoft's ISO form of a UTC DateTime, e.g. `2024-09-04T17:33:18.1234567Z`."""
    utc = _as_utc(dt)
    text = (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}"
        f"T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}"
    )
    # `FFFFFFF`: seven digits with trailing zeros trimmed, and no separator when none remain.
    fraction = f"{utc.microsecond * 10:07d}".rstrip("0")
    if fraction:
        text += "." + fraction
    return text + "Z"


def parse_kudu_datetime(text: str) -> datetime:
    """An aware UTC datetime from Kudu's ISO text; 0-7 fraction digits, `Z`, an offset or no
    zone (read as UTC: Kudu only stores UTC). Raises ValueError when it is not such a date."""
    match = _KUDU_DATETIME.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not an ISO date: {text!r}")
    fraction = (match["fraction"] or "").ljust(7, "0")
    zone = match["zone"]
    tz = UTC
    if zone and zone != "Z":
        digits = zone[1:].replace(":", "")
        offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        if offset >= timedelta(days=1):
            raise ValueError(f"offset out of range: {text!r}")
        tz = timezone(-offset if zone[0] == "-" else offset)
    try:
        local = datetime.strptime(match["date"], "%Y-%m-%dT%H:%M:%S").replace(
            # Truncated to microseconds, like .NET truncates when it formats fewer digits.
            microsecond=int(fraction) // 10,
            tzinfo=tz,
        )
        return local.astimezone(UTC)
    except OverflowError as error:  # e.g. year 1 with a positive offset
        raise ValueError(f"date out of range: {text!r}") from error


def format_timespan(delta: timedelta) -> str:
    """.NET TimeSpan "c": `[-][d.]hh:mm:ss[.fffffff]`, e.g. `00:00:05.1234567`, `1.02:03:04`."""
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    sign = "-" if micros < 0 else ""
    seconds, micros = divmod(abs(micros), 1_000_000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    text = f"{sign}{f'{days}.' if days else ''}{hours:02d}:{minutes:02d}:{seconds:02d}"
    # Unlike DateTime's `F`, TimeSpan's fraction is never trimmed: 7 digits or none.
    return text + (f".{micros * 10:07d}" if micros else "")


# -- the record -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One triggered run as stored in `{runId}/status`. Times are aware datetimes."""

    job_name: str
    run_id: str
    status: RunStatus
    trigger: str
    start_time: datetime
    end_time: datetime | None = None

    def __post_init__(self) -> None:
        # Fail where a naive datetime enters, not later in an unrelated subtraction.
        _as_utc(self.start_time)
        if self.end_time is not None:
            _as_utc(self.end_time)

    @property
    def is_finished(self) -> bool:
        return self.status not in _UNFINISHED

    def to_status_document(self) -> dict[str, str]:
        """The content of the status file, keys in Kudu's order, defaults omitted."""
        document: dict[str, str] = {}
        if self.trigger:
            document["Trigger"] = self.trigger
        document["Status"] = self.status.value
        document["StartTime"] = format_kudu_datetime(self.start_time)
        if self.end_time is not None:
            document["EndTime"] = format_kudu_datetime(self.end_time)
        return document

    @classmethod
    def from_status_document(cls, job_name: str, run_id: str, doc: object) -> RunRecord:
        """The record a status document describes; raises ValueError when it describes none."""
        if not isinstance(doc, Mapping):
            raise ValueError("a status document is a JSON object")
        status = _field(doc, "Status")
        if not isinstance(status, str):
            raise ValueError("no status")
        trigger = _field(doc, "Trigger")
        if trigger is not None and not isinstance(trigger, str):
            raise ValueError("the trigger is not a string")
        start_time = _date_field(doc, "StartTime") or run_id_time(run_id)
        return cls(
            job_name=job_name,
            run_id=run_id,
            status=RunStatus(status),  # ValueError for a status we do not know
            trigger=trigger or "",
            start_time=start_time,
            end_time=_date_field(doc, "EndTime"),
        )

    def duration(self, now: datetime) -> timedelta:
        """`(end or now) - start`, as Kudu's `duration`; it grows while the run is unfinished."""
        return (self.end_time or now) - self.start_time

    def with_status(self, status: RunStatus, end_time: datetime | None = None) -> RunRecord:
        """A copy with another status, and `end_time` when given (else the current one)."""
        return replace(self, status=status, end_time=end_time or self.end_time)


def _field(doc: Mapping[Any, Any], name: str) -> object:
    # Newtonsoft matches property names case-insensitively; an exact match wins.
    if name in doc:
        return doc[name]
    lowered = name.lower()
    return next((v for k, v in doc.items() if isinstance(k, str) and k.lower() == lowered), None)


def _date_field(doc: Mapping[Any, Any], name: str) -> datetime | None:
    value = _field(doc, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a string")
    parsed = parse_kudu_datetime(value)
    return None if parsed == _DOTNET_DEFAULT_DATETIME else parsed


# -- the store ------------------------------------------------------------------------------


class RunStore:
    """Triggered run folders under `data/jobs/triggered/`. Stateless: every call reads disk, so
    several stores (threads, processes, daemons sharing the site) see each other's runs.

    The one thing it keeps is `generation`, a count of the changes made through it (runs
    created, rewritten, trimmed), so that a reader caching what the folders say knows without
    touching the disk that this daemon changed a run since it looked.
    """

    def __init__(self, layout: SiteLayout) -> None:
        self._layout = layout
        self._generation_lock = threading.Lock()
        self._generation = 0

    @property
    def generation(self) -> int:
        return self._generation

    def _changed(self) -> None:
        # Called after the change is on disk: whoever sees the new count sees the change.
        with self._generation_lock:
            self._generation += 1

    def _job_dir(self, job_name: str) -> Path:
        if not is_valid_job_name(job_name):
            raise ValueError(f"invalid job name: {job_name!r}")
        return self._layout.data_dir(JobKey(JobKind.TRIGGERED, job_name))

    def _run_dir(self, job_name: str, run_id: str) -> Path:
        if not is_valid_run_id(run_id):
            raise ValueError(f"invalid run id: {run_id!r}")
        return self._job_dir(job_name) / run_id

    def output_log_path(self, job_name: str, run_id: str) -> Path:
        """`{runId}/output_log.txt` (raises ValueError for an invalid name or id)."""
        return self._run_dir(job_name, run_id) / OUTPUT_LOG_FILE

    def job_names(self) -> list[str]:
        """Names of the triggered job data folders present, sorted."""
        root = self._layout.data_jobs_root / JobKind.TRIGGERED.value
        try:
            with os.scandir(root) as entries:
                return sorted(
                    entry.name
                    for entry in entries
                    if is_valid_job_name(entry.name) and entry.is_dir()
                )
        except OSError:
            return []

    # -- writing ----------------------------------------------------------------------------

    def create_run(self, job_name: str, trigger: str, now: datetime) -> RunRecord:
        """Create a new run folder with status `Initializing` and return its record.

        The id comes from `now`; when another run already took it, the next tick is tried.
        Raises ValueError for an invalid job name, OSError when the folder or status cannot be
        written (no half-created run is left behind then).
        """
        job_dir = self._job_dir(job_name)
        job_dir.mkdir(parents=True, exist_ok=True)
        base = run_id_time(new_run_id(now))  # `now` truncated to its tick
        for attempt in range(_MAX_ID_ATTEMPTS):
            run_id = new_run_id(base + attempt * _TICK)
            run_dir = job_dir / run_id
            try:
                run_dir.mkdir()  # exclusive: the one process whose mkdir succeeds owns the id
            except FileExistsError:
                continue
            record = RunRecord(
                job_name=job_name,
                run_id=run_id,
                status=RunStatus.INITIALIZING,
                trigger=trigger,
                start_time=now,
            )
            try:
                write_json_atomic(run_dir / STATUS_FILE, record.to_status_document(), fsync=False)
            except BaseException:
                # An empty folder would count against the history size and hold an id.
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
            finally:
                self._changed()
            return record
        raise FileExistsError(
            f"no free run id for {job_name!r} in {_MAX_ID_ATTEMPTS} ticks from {new_run_id(now)}"
        )

    def write(self, record: RunRecord) -> None:
        """Replace the run's status file atomically (fsync'ed once the run is finished).

        Raises FileNotFoundError when the run folder no longer exists, so that a run whose
        history was removed is not resurrected as a folder holding only a status; ValueError
        for an invalid name or id; OSError when the write fails.
        """
        run_dir = self._run_dir(record.job_name, record.run_id)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run folder is gone: {run_dir}")
        try:
            write_json_atomic(
                run_dir / STATUS_FILE, record.to_status_document(), fsync=record.is_finished
            )
        finally:
            self._changed()

    # -- reading ----------------------------------------------------------------------------

    def read(self, job_name: str, run_id: str) -> RunRecord | None:
        """The stored run, or None when there is no such run with a readable status."""
        if not is_valid_job_name(job_name) or not is_valid_run_id(run_id):
            return None
        run_dir = self._job_dir(job_name) / run_id
        try:
            # The same rule as the listing: a symlink or a file named like a run is not a run.
            if not stat.S_ISDIR(os.lstat(run_dir).st_mode):
                return None
        except OSError:
            return None
        return self._read(job_name, run_dir)

    def list_runs(self, job_name: str) -> list[RunRecord]:
        """Every run with a readable status, newest first (by run id)."""
        if not is_valid_job_name(job_name):
            return []
        job_dir = self._job_dir(job_name)
        runs = (self._read(job_name, job_dir / run_id) for run_id in self._run_ids(job_dir))
        return [record for record in runs if record is not None]

    def latest(self, job_name: str) -> RunRecord | None:
        """The newest run with a readable status; reads only as many status files as needed."""
        if not is_valid_job_name(job_name):
            return None
        job_dir = self._job_dir(job_name)
        runs = (self._read(job_name, job_dir / run_id) for run_id in self._run_ids(job_dir))
        return next((record for record in runs if record is not None), None)

    def _run_ids(self, job_dir: Path) -> list[str]:
        """Names of run folders, newest first; none when the job has no data folder."""
        try:
            with os.scandir(job_dir) as entries:
                ids = [
                    entry.name
                    for entry in entries
                    # Not through symlinks: a run folder is ours, and rmtree refuses links.
                    if is_valid_run_id(entry.name) and entry.is_dir(follow_symlinks=False)
                ]
        except OSError:
            return []
        ids.sort(reverse=True)
        return ids

    def _read(self, job_name: str, run_dir: Path) -> RunRecord | None:
        try:
            raw = safeopen.read_bytes(run_dir / STATUS_FILE, _MAX_STATUS_BYTES + 1)
            if len(raw) > _MAX_STATUS_BYTES:
                return None
            # utf-8-sig: a status edited by hand on Windows may start with a BOM.
            document = json.loads(raw.decode("utf-8-sig").strip())
            return RunRecord.from_status_document(job_name, run_dir.name, document)
        except (OSError, ValueError):  # includes JSON, Unicode and date errors
            return None

    # -- maintenance ------------------------------------------------------------------------

    def apply_retention(
        self,
        job_name: str,
        history_size: int,
        is_active: Callable[[str], bool] | None = None,
    ) -> list[str]:
        """Kudu's `OldRunsCleanup`, called before a new run is created: keep the newest
        `history_size - 1` runs and delete the others. Returns the ids deleted.

        With `is_active`, a candidate that is not known to be finished is kept when
        `is_active(run_id)` is true (see the module docstring). Deletion errors are logged,
        never raised: a history that cannot be trimmed must not stop a run.
        """
        if history_size < 1:
            raise ValueError(f"history_size must be positive, got {history_size}")
        if not is_valid_job_name(job_name):
            return []
        job_dir = self._job_dir(job_name)
        deleted: list[str] = []
        for run_id in self._run_ids(job_dir)[history_size - 1 :]:
            run_dir = job_dir / run_id
            live = (
                is_active is not None and self._may_be_live(job_name, run_dir) and is_active(run_id)
            )
            if live:
                log.info("retention keeps a live run", job=job_name, run_id=run_id)
                continue
            try:
                shutil.rmtree(run_dir)
            except FileNotFoundError:
                continue  # another instance trimmed it first
            except OSError as error:
                log.warning("cannot delete old run", job=job_name, run_id=run_id, error=str(error))
                continue
            deleted.append(run_id)
        if deleted:
            self._changed()
        return deleted

    def _may_be_live(self, job_name: str, run_dir: Path) -> bool:
        record = self._read(job_name, run_dir)
        # No readable status: possibly a run between its mkdir and its first status write.
        return record is None or not record.is_finished

    def repair_abandoned(
        self,
        job_name: str,
        *,
        is_live: Callable[[RunRecord], bool],
        now: datetime,
    ) -> list[RunRecord]:
        """Persist `Aborted` for every `Running`/`Initializing` run that `is_live` says is dead.

        The end time is `now`, or the end time already stored, and never before the start (a
        clock of another host sharing the site may be behind). Returns the records written;
        a run that cannot be rewritten is logged and left as it is.
        """
        repaired: list[RunRecord] = []
        for record in self._unfinished(job_name):
            if is_live(record):
                continue
            end_time = record.end_time or max(now, record.start_time)
            aborted = record.with_status(RunStatus.ABORTED, end_time=end_time)
            try:
                self.write(aborted)
            except OSError as error:
                log.warning(
                    "cannot record an abandoned run as aborted",
                    job=job_name,
                    run_id=record.run_id,
                    error=str(error),
                )
                continue
            log.info("abandoned run recorded as aborted", job=job_name, run_id=record.run_id)
            repaired.append(aborted)
        return repaired

    def _unfinished(self, job_name: str) -> Iterator[RunRecord]:
        return (record for record in self.list_runs(job_name) if not record.is_finished)
