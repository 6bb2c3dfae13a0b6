"""The read side of the jobs API: what each job shows, read cheaply, and whole lists cached.

A job's JSON is a function of the request's base URL, its spec (the catalog's) and the facts of
its data folder (`views.JobFacts`). Three layers keep a list of a thousand jobs from costing a
thousand folder scans, file reads and JSON encodings per request:

* **Facts** (`FactsReader`): the aggregated `status_*` files of every instance sharing the site,
  the WebJobs SDK marker, the latest run, read with one `scandir` per continuous job and plain
  string paths. A status file is parsed again only when its identity (inode, size, mtime)
  changed; writers replace it by rename, so a rewrite is a new inode. Whether another instance
  is alive is asked once per instance per build, not once per file.
* **Fragments**: each job's encoded JSON, kept per base URL (a few per job) and reused while
  its spec (by identity) and facts stay the same. A job whose latest run is unfinished is
  encoded afresh at every build, since its duration grows.
* **Bodies** (`JobLists`): a list's bytes and its ETag (a hash of those bytes), kept per
  (base URL, kinds) and served as they are, 304s included, while valid. One build per
  (base URL, kinds, state) runs at a time, in a worker thread; requests arriving meanwhile share
  it.

Decisions:

* **What this daemon changes shows at once.** A body is stamped with the state of the daemon it
  was built from: the catalog's specs (compared by identity: pointer compares, no hashing), the
  count of status files this process wrote (`records.status.status_writes`), the run store's
  count of its own changes, and the runs in flight here. Each count is bumped after its write
  is on disk, and the state is taken on the loop before a build reads anything, so a request
  made after a stop, a start, a run, an upload, a settings change or a status transition never
  gets a body read before it.
* **What other daemons sharing the site change shows within `DISK_FRESH_S` (1 s)**, plus one
  build: their status files and runs, whether they are still alive, an SDK marker a job wrote,
  a file written through `/api/vfs`. Nothing in this process hears of those; a watch per job
  data folder would double the watcher's threads and descriptors (one per watch), and a read
  per request is what made the list slow. Kudu's own job list is a cache that only the
  local instance's changes clear (Part B §8.3), so clients already live with far staler lists.
  For the same reason a running run's `duration` in a list may be up to a second old.
* **Single-job, history and run GETs read the disk at every request**, as Kudu's do: one job is
  cheap, and a client polling one job sees what the files say now.
* **Keyed by base URL.** Every href is built from the request's base (with a trusted proxy's
  forwarded host and scheme), so a body or fragment is never served to a request with another
  base. Both caches are small LRUs, so a client sending many Host headers cannot grow memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from webjobsd.http.context import ApiContext
from webjobsd.model import ContinuousStatus, JobKey, JobKind, JobSpec, RunStatus
from webjobsd.records.runstore import OUTPUT_LOG_FILE, RunRecord, RunStore
from webjobsd.records.status import (
    STATUS_FILE_PREFIX,
    StatusEntry,
    StatusPath,
    aggregate_status_files,
    read_status_entry,
    status_writes,
)
from webjobsd.runtime.locks import FileLock
from webjobsd.site import SiteLayout
from webjobsd.views import (
    ContinuousFacts,
    JobFacts,
    RunFacts,
    TriggeredFacts,
    etag_of_body,
    job_json,
    run_facts_json,
)

__all__ = ["DISK_FRESH_S", "JOB_LISTS", "FactsReader", "JobLists", "RenderedList"]

DISK_FRESH_S: Final = 1.0
SDK_MARKER: Final = "webjobssdk.marker"
SCHEDULER_LOG: Final = "job_scheduler.log"
ERROR_LOG: Final = "error_log.txt"
_MAX_BODIES: Final = 8
_MAX_BASES: Final = 4

Kinds = tuple[JobKind, ...]
# (catalog epoch, disk epoch): see _ChangeWatch.
State = tuple[int, int]


# -- facts -----------------------------------------------------------------------------------


def once_per_instance(is_live: Callable[[str], bool]) -> Callable[[str], bool]:
    """`is_live` asked at most once per instance (each answer costs an open and an flock)."""
    answers: dict[str, bool] = {}

    def live(instance_id: str) -> bool:
        answer = answers.get(instance_id)
        if answer is None:
            answer = answers[instance_id] = is_live(instance_id)
        return answer

    return live


class FactsReader:
    """Reads the facts of jobs from their data folders. Blocking: call it in a worker thread.

    Safe to use from several threads at once: its only state is a cache of parsed status files
    updated with single dict operations, so a race costs at worst one extra parse.
    """

    def __init__(self, layout: SiteLayout, run_store: RunStore) -> None:
        self._layout = layout
        self._store = run_store
        # Plain strings: pathlib objects and enum values cost more than the syscalls here.
        self._kind_dirs = {
            kind: os.path.join(layout.data_jobs_root, kind.value) for kind in JobKind
        }
        self._statuses: dict[str, tuple[tuple[int, int, int], StatusEntry]] = {}

    def data_dir(self, key: JobKey) -> str:
        return f"{self._kind_dirs[key.kind]}/{key.name}"

    def facts(
        self, key: JobKey, is_live: Callable[[str], bool], active: Mapping[str, str]
    ) -> JobFacts:
        """`active`: run id of the run in flight on this daemon, by job name."""
        if key.kind is JobKind.CONTINUOUS:
            return self.continuous(key, is_live)
        return self.triggered(key, active)

    def continuous(self, key: JobKey, is_live: Callable[[str], bool]) -> ContinuousFacts:
        files: list[tuple[str, StatusPath]] = []
        using_sdk = False
        prefix = len(STATUS_FILE_PREFIX)
        try:
            with os.scandir(self.data_dir(key)) as entries:
                for entry in entries:
                    name = entry.name
                    if name == SDK_MARKER:
                        # As Path.exists: a dangling link is no marker.
                        using_sdk = not entry.is_symlink() or os.path.exists(entry.path)
                    elif (
                        name.startswith(STATUS_FILE_PREFIX)
                        and len(name) > prefix
                        and entry.is_file()
                    ):
                        files.append((name[prefix:], entry.path))
        except OSError:
            # No data folder (yet): no status file, no marker; a folder that fails half way
            # is read as empty, as records.status does.
            files, using_sdk = [], False
        files.sort()
        reasons: list[str] = []
        instances = {path: instance for instance, path in files}

        def read(path: StatusPath) -> ContinuousStatus | None:
            entry = self._read_status(path)
            if entry is None:
                return None
            if entry.reason:
                reasons.append(f"{instances[path]}: {entry.reason}")
            return entry.status

        status, detailed = aggregate_status_files(self._layout.instance_id, files, is_live, read)
        return ContinuousFacts(
            status=status,
            detailed_status=detailed,
            using_sdk=using_sdk,
            error="; ".join(reasons) or None,
        )

    def _read_status(self, path: StatusPath) -> StatusEntry | None:
        where = os.fspath(path)
        try:
            st = os.stat(where)
        except OSError:
            return None
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._statuses.get(where)
        if cached is not None and cached[0] == identity:
            return cached[1]
        entry = read_status_entry(where)
        # An unusable file is read again next time: it may be a passing problem.
        if entry is not None:
            self._statuses[where] = (identity, entry)
        return entry

    def trim(self, continuous_jobs: int) -> None:
        """Forget parsed files once there are far more than jobs (deleted jobs, dead instances)."""
        if len(self._statuses) > 4 * continuous_jobs + 64:
            self._statuses.clear()

    def triggered(self, key: JobKey, active: Mapping[str, str]) -> TriggeredFacts:
        folder = self.data_dir(key)
        latest = self._store.latest(key.name)
        return TriggeredFacts(
            latest=self.run(latest, latest.run_id, active) if latest is not None else None,
            has_scheduler_log=os.path.exists(f"{folder}/{SCHEDULER_LOG}"),
            using_sdk=os.path.exists(f"{folder}/{SDK_MARKER}"),
        )

    def run(self, record: RunRecord, latest_id: str | None, active: Mapping[str, str]) -> RunFacts:
        folder = f"{self.data_dir(JobKey(JobKind.TRIGGERED, record.job_name))}/{record.run_id}"
        return RunFacts(
            record=record,
            shown_status=self._shown_status(record, latest_id, active),
            has_output=os.path.exists(f"{folder}/{OUTPUT_LOG_FILE}"),
            has_error_log=os.path.exists(f"{folder}/{ERROR_LOG}"),
        )

    def _shown_status(
        self, record: RunRecord, latest_id: str | None, active: Mapping[str, str]
    ) -> RunStatus:
        """Kudu computes Aborted on read: an unfinished run that nobody is running."""
        if record.status not in (RunStatus.RUNNING, RunStatus.INITIALIZING):
            return record.status
        if active.get(record.job_name) == record.run_id:
            return record.status
        lock = self._layout.run_lock_path(JobKey(JobKind.TRIGGERED, record.job_name))
        if record.run_id == latest_id and FileLock.is_locked_by_other(lock):
            return record.status
        return RunStatus.ABORTED


# -- what this daemon changed ----------------------------------------------------------------


def active_runs(ctx: ApiContext) -> dict[str, str]:
    """Run id of the run in flight on this daemon, by job name (recorded runs only)."""
    return {
        name: run.record.run_id
        for name, run in ctx.triggered.active.items()
        if run.record is not None
    }


class _ChangeWatch:
    """This daemon's own changes, seen from the loop as two epochs.

    The catalog epoch moves when the specs do; the disk epoch when this process wrote a status
    file or a run, or a run here started, moved or ended. Checking costs O(jobs) pointer
    compares and a few integer reads, nothing on disk.
    """

    def __init__(self, ctx: ApiContext) -> None:
        self._ctx = ctx
        self.specs: Mapping[JobKey, JobSpec] = {}
        self.active: Mapping[str, str] = {}
        self._writes: tuple[object, ...] = ()
        self.state: State = (0, 0)

    def observe(self) -> State:
        catalog, disk = self.state
        specs = self._ctx.specs()
        if specs != self.specs:
            # A copy: the builds read it in a thread while the catalog moves on.
            self.specs = dict(specs)
            catalog += 1
        in_flight = tuple(
            sorted(
                (name, run.record.run_id, run.record.status.value)
                for name, run in self._ctx.triggered.active.items()
                if run.record is not None
            )
        )
        writes = (status_writes(), self._ctx.run_store.generation, in_flight)
        if writes != self._writes:
            self._writes = writes
            self.active = {name: run_id for name, run_id, _ in in_flight}
            disk += 1
        self.state = (catalog, disk)
        return self.state


# -- lists -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RenderedList:
    body: bytes
    etag: str
    state: State
    # time.monotonic() after which facts in the body may be older than DISK_FRESH_S.
    fresh_until: float


@dataclass(frozen=True, slots=True)
class _Plan:
    base: str
    kinds: Kinds
    specs: Mapping[JobKey, JobSpec]
    active: Mapping[str, str]
    state: State


@dataclass(slots=True)
class _Known:
    """What a build learnt about one job: its facts and their encodings, by base URL."""

    spec: JobSpec
    disk_epoch: int
    read_at: float
    facts: JobFacts
    encoded: dict[str, bytes]


def _retrieve(task: asyncio.Task[RenderedList]) -> None:
    # Every waiter may have gone (clients disconnecting): read a failure so it is not reported
    # as never retrieved; the waiters that are still there get it raised.
    if not task.cancelled():
        task.exception()


def _kudu_order(spec: JobSpec) -> tuple[bool, str]:
    # Kudu lists triggered jobs first, then continuous ones.
    return spec.key.kind is JobKind.CONTINUOUS, spec.key.name


class JobLists:
    """The jobs API's reads: cached list bodies, and fresh single jobs, histories and runs.

    The caches behind `body` are touched only under `_build_lock` (in worker threads); the
    bodies and builds maps only on the loop.
    """

    def __init__(self, ctx: ApiContext) -> None:
        self._ctx = ctx
        self.reader = FactsReader(ctx.layout, ctx.run_store)
        self._watch = _ChangeWatch(ctx)
        self._bodies: OrderedDict[tuple[str, Kinds], RenderedList] = OrderedDict()
        self._builds: dict[tuple[str, Kinds], tuple[State, asyncio.Task[RenderedList]]] = {}
        self._build_lock = threading.Lock()
        self._known: dict[JobKey, _Known] = {}
        self._pruned_at = -1
        self._order: dict[Kinds, tuple[int, list[JobSpec]]] = {}

    async def body(self, base: str, kinds: Kinds) -> RenderedList:
        """The list of `kinds` as seen from `base`, rebuilt only when it may have changed."""
        state = self._watch.observe()
        slot = (base, kinds)
        cached = self._bodies.get(slot)
        if cached is not None and cached.state == state and time.monotonic() <= cached.fresh_until:
            self._bodies.move_to_end(slot)
            return cached
        build = self._builds.get(slot)
        if build is None or build[0] != state:
            plan = _Plan(base, kinds, self._watch.specs, self._watch.active, state)
            task = asyncio.create_task(self._build(slot, plan), name="job-list")
            task.add_done_callback(_retrieve)
            build = self._builds[slot] = (state, task)
        # Shielded: a client that goes away does not cancel a build others wait for.
        return await asyncio.shield(build[1])

    async def _build(self, slot: tuple[str, Kinds], plan: _Plan) -> RenderedList:
        try:
            rendered = await asyncio.to_thread(self._render, plan)
        finally:
            current = self._builds.get(slot)
            if current is not None and current[1] is asyncio.current_task():
                del self._builds[slot]
        # A build overtaken by a change is still right for the requests that waited for it,
        # but not worth keeping.
        if rendered.state == self._watch.state:
            self._bodies[slot] = rendered
            self._bodies.move_to_end(slot)
            while len(self._bodies) > _MAX_BODIES:
                self._bodies.popitem(last=False)
        return rendered

    async def close(self) -> None:
        """Let the builds in flight end (they are short), so that none outlives the server."""
        await asyncio.gather(*(task for _, task in self._builds.values()), return_exceptions=True)

    def _render(self, plan: _Plan) -> RenderedList:
        with self._build_lock:
            started = time.monotonic()
            now = datetime.now(UTC)
            is_live = once_per_instance(self._ctx.instance_is_live)
            parts: list[bytes] = []
            oldest = started
            for spec in self._ordered(plan):
                known = self._refreshed(spec, plan, started, is_live)
                oldest = min(oldest, known.read_at)
                parts.append(self._encoded(known, plan.base, now))
            self._prune(plan)
        body = b"[" + b", ".join(parts) + b"]"  # json.dumps' own list separator
        return RenderedList(body, etag_of_body(body), plan.state, oldest + DISK_FRESH_S)

    def _ordered(self, plan: _Plan) -> list[JobSpec]:
        catalog_epoch = plan.state[0]
        known = self._order.get(plan.kinds)
        if known is not None and known[0] == catalog_epoch:
            return known[1]
        ordered = sorted(
            (spec for spec in plan.specs.values() if spec.key.kind in plan.kinds), key=_kudu_order
        )
        self._order[plan.kinds] = (catalog_epoch, ordered)
        return ordered

    def _refreshed(
        self, spec: JobSpec, plan: _Plan, started: float, is_live: Callable[[str], bool]
    ) -> _Known:
        """The job's facts, read again unless this daemon changed nothing since they were read
        and they are young enough that the body keeps at least half its freshness."""
        disk_epoch = plan.state[1]
        known = self._known.get(spec.key)
        if known is not None and known.spec is spec:
            if known.disk_epoch == disk_epoch and started - known.read_at <= DISK_FRESH_S / 2:
                return known
            facts = self.reader.facts(spec.key, is_live, plan.active)
            if facts != known.facts:
                known.facts = facts
                known.encoded.clear()
        else:
            facts = self.reader.facts(spec.key, is_live, plan.active)
            known = self._known[spec.key] = _Known(spec, disk_epoch, started, facts, {})
        # Stamped with the build's start: facts read later in the build are younger than that.
        known.disk_epoch, known.read_at = disk_epoch, started
        return known

    @staticmethod
    def _encoded(known: _Known, base: str, now: datetime) -> bytes:
        data = known.encoded.get(base)
        if data is not None and not known.facts.moves_with_time:
            return data
        # json.dumps' defaults, as web.json_response uses: the bytes a whole-list dump makes.
        data = json.dumps(job_json(base, known.spec, known.facts, now)).encode()
        if len(known.encoded) >= _MAX_BASES and base not in known.encoded:
            known.encoded.clear()
        known.encoded[base] = data
        return data

    def _prune(self, plan: _Plan) -> None:
        """Forget removed jobs, once per catalog change."""
        if plan.state[0] == self._pruned_at:
            return
        self._pruned_at = plan.state[0]
        for key in [key for key in self._known if key not in plan.specs]:
            del self._known[key]
        self.reader.trim(sum(1 for key in plan.specs if key.kind is JobKind.CONTINUOUS))

    # -- reads that always look at the disk ------------------------------------------------

    async def job(self, base: str, spec: JobSpec) -> dict[str, Any]:
        active = active_runs(self._ctx)
        is_live = once_per_instance(self._ctx.instance_is_live)

        def build() -> dict[str, Any]:
            facts = self.reader.facts(spec.key, is_live, active)
            return job_json(base, spec, facts, datetime.now(UTC))

        return await asyncio.to_thread(build)

    async def history(self, base: str, name: str) -> list[dict[str, Any]]:
        active = active_runs(self._ctx)

        def build() -> list[dict[str, Any]]:
            records = self._ctx.run_store.list_runs(name)
            latest_id = records[0].run_id if records else None
            now = datetime.now(UTC)
            return [
                run_facts_json(base, self.reader.run(record, latest_id, active), now)
                for record in records
            ]

        return await asyncio.to_thread(build)

    async def run(self, base: str, name: str, run_id: str) -> dict[str, Any] | None:
        active = active_runs(self._ctx)

        def build() -> dict[str, Any] | None:
            store = self._ctx.run_store
            record = store.read(name, run_id)
            if record is None:
                return None
            latest = store.latest(name)
            facts = self.reader.run(record, latest.run_id if latest else None, active)
            return run_facts_json(base, facts, datetime.now(UTC))

        return await asyncio.to_thread(build)


JOB_LISTS = web.AppKey("webjobsd_job_lists", JobLists)


def install(app: web.Application, ctx: ApiContext) -> JobLists:
    lists = JobLists(ctx)
    app[JOB_LISTS] = lists

    async def close(_app: web.Application) -> None:
        await lists.close()

    app.on_cleanup.append(close)
    return lists
