"""Which live processes belong to a job, and signalling exactly those (Part A #11, #13, #19).

Owns: the identity of a job's process tree, every read of `/proc` or call to psutil that decides
it, and (with the supervisor, which spawns) every signal sent to a job process. A job's leader
is started by someone else (the supervisor) with `start_new_session=True` and
`WEBJOBSD_PROCESS_TOKEN=<token>` in its environment, which every descendant inherits. A job's
members are then:

* its process group, `identity.pgid` — but a group id is a recycled number, so the group is
  trusted only while the leader is verified alive (same pid *and* same start time) or while at
  least one live member of the group still carries the token. The kernel never hands out a pid
  that is in use as a process group id, so a group that still holds a token carrier is ours;
* every process whose `/proc/PID/environ` carries the token entry, wherever it lives: this
  catches descendants that called `setsid` (or were double-forked) and left the group.

Must not: spawn processes, keep state between calls (beyond the requests waiting for the next
scan, and a count of scans), decide policy (when to escalate from SIGTERM to SIGKILL is the
supervisor's ladder), or read /proc on the event loop. Every plain public function here does
blocking I/O proportional to the number of processes on the host. Callers on the loop use the
`a`-prefixed coroutines (`asignal_members`, `afind_members`, `akill_members`) instead of wrapping
those in `asyncio.to_thread`: they share one host scan per wave (below), read in a thread.

Scans shared per wave: a job's stop needs several fresh looks at /proc (signal, "is it gone yet?",
the final kill), and jobs stop in waves (a shutdown, a deployment). The coroutines hand their
requests to a `loopbatch.LoopBatch`: every request of a loop turn, and every request made while a
scan runs, is served by *one* scan in *one* thread, which then also does the per-job work (the
leader check, the group pass when some job's group is trusted, the signals). A wave of N jobs
costs O(1) host scans. The alternative kept for threads, `_SharedScans` (a single flight among
threads), is bounded by the executor: N stops become 4N thread tasks queued on a handful of
threads, and each scan serves only the few threads waiting on it, about N / threads scans a wave.

Limits worth knowing: a scan is a snapshot — a job that forks during it can add processes, so a
caller that must end a job repeats `signal_members` until `find_members` is empty (`killpg`
reaches new group members atomically; escaped ones are caught by the next round). A process that
both left the group and exec'd with a scrubbed environment (or overwrote its environ area, as
some `setproctitle` implementations do) is invisible; so is one whose environ we may not read
(another user's process, or a set-uid program when the daemon is not root).
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from webjobsd.runtime.loopbatch import LoopBatch, Outcome

if TYPE_CHECKING:
    import psutil

log = structlog.get_logger("webjobsd.proctree")

TOKEN_VARIABLE = "WEBJOBSD_PROCESS_TOKEN"

_PROC = "/proc"
_NUL = b"\0"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# `Z` zombie, `X`/`x` dead: such a pid holds no memory and runs no code; signalling it is useless,
# and counting it as a member would make "wait until no members remain" wait for its reaper.
_DEAD_STATES = frozenset({"Z", "X", "x"})

# errno values that mean "this pid is gone or not ours to read". Anything else (EMFILE, ENOMEM,
# ...) is a real failure of the daemon and must not silently shrink a job to fewer members.
_UNREADABLE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH, errno.EACCES, errno.EPERM})

# Start times are compared as epoch seconds: kernel start ticks + the boot time from /proc/stat.
# The boot time is whole seconds and moves when the wall clock is *stepped* (slewing moves both
# clocks together and leaves it alone), so a tiny step can flip it by one second. The slack covers
# that flip and nothing more; a pid reused by a process started within it would need the whole
# pid space to wrap in that time. A larger clock step makes `is_alive` report a live leader as
# dead; `find_members` still finds it through its token.
_CREATE_TIME_SLACK_S = 1.5


def new_token() -> str:
    """A fresh token for `WEBJOBSD_PROCESS_TOKEN`: 128 random bits, safe in an environ entry."""
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """What a restarted daemon needs to recognise a job's processes (persisted as JSON).

    `create_time` is the leader's start in epoch seconds (psutil's `create_time()`); `0.0` means
    unknown, which simply never verifies the leader, leaving the token as the only proof.
    """

    pid: int
    pgid: int
    create_time: float
    token: str

    def __post_init__(self) -> None:
        # Validated here, not only in from_json: a pgid of 0 or 1 handed to killpg would signal
        # our own group or everything we may signal, and a token with NUL can never match.
        if self.pid <= 0 or self.pgid <= 0:
            raise ValueError(f"pid and pgid must be positive: {self.pid}, {self.pgid}")
        if not self.token or "\0" in self.token:
            raise ValueError("token must be a non-empty string without NUL")

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "pgid": self.pgid,
            "create_time": self.create_time,
            "token": self.token,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessIdentity:
        """Raises ValueError on anything but what `to_json` writes (the file may be tampered)."""
        if not isinstance(data, Mapping):
            raise ValueError("process identity must be a JSON object")
        create_time, token = data.get("create_time"), data.get("token")
        # bool is an int subclass, but `true` is neither a pid nor a time.
        if not isinstance(create_time, int | float) or isinstance(create_time, bool):
            raise ValueError(f"process identity: create_time must be a number, got {create_time!r}")
        if not isinstance(token, str):
            raise ValueError(f"process identity: token must be a string, got {token!r}")
        return cls(
            pid=_json_int(data, "pid"),
            pgid=_json_int(data, "pgid"),
            create_time=float(create_time),
            token=token,
        )

    @property
    def token_entry(self) -> bytes:
        """The exact `NAME=value` environ entry that marks this job's processes."""
        return f"{TOKEN_VARIABLE}={self.token}".encode()


def _json_int(data: Mapping[str, Any], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"process identity: {name} must be an integer, got {value!r}")
    return value


def identity_of(pid: int, token: str) -> ProcessIdentity | None:
    """Identity of a live process, or None if it is gone or a zombie.

    Call it right after spawning, before the child can be reaped, so that the pid cannot have
    been reused. `token` is recorded, not verified.
    """
    stat = _read_stat(pid)
    if stat is None or stat.is_dead:
        return None
    return ProcessIdentity(
        pid=pid, pgid=stat.pgid, create_time=_epoch_start(stat.start_ticks), token=token
    )


def is_alive(identity: ProcessIdentity) -> bool:
    """The identified process itself still runs: same pid, same start time, not a zombie."""
    stat = _read_stat(identity.pid)
    return stat is not None and not stat.is_dead and _same_start(stat, identity)


def find_members(identity: ProcessIdentity) -> list[psutil.Process]:
    """Every live process of the job (see the module docstring), sorted by pid.

    Never includes the calling process. Each returned `psutil.Process` was built while the pid
    still denoted the member, so psutil's own pid-reuse checks protect later calls on it.
    """
    # Imported here, not at the top: only stopping a job needs it, and the running daemon
    # stays about 1 MB smaller until then (the lazy-import rule of http/lazy.py).
    import psutil

    members: list[psutil.Process] = []
    for stat in sorted(_scan_job(identity).members, key=lambda s: s.pid):
        try:
            process = psutil.Process(stat.pid)
        except psutil.Error:
            continue
        # The pid may have died and been reused between the scan and psutil's own read of it;
        # same start ticks on both sides of the constructor prove it is the process we scanned.
        again = _read_stat(stat.pid)
        if again is not None and not again.is_dead and again.start_ticks == stat.start_ticks:
            members.append(process)
    return members


def signal_members(identity: ProcessIdentity, sig: int) -> int:
    """Send `sig` to every member; returns how many processes were targeted.

    A trusted group gets one `killpg` (it also reaches processes forked after the scan); members
    outside the group are signalled one by one through a pidfd opened and then verified against
    the scanned start time, so a pid reused in the meantime is never hit. Members that vanished
    are ignored; members we may not signal are logged and not counted.
    """
    return _signal_scanned(identity, _scan_job(identity), sig)


def signal_jobs(identities: Sequence[ProcessIdentity], sig: int) -> int:
    """`signal_members` for many jobs from one look at the host; returns how many processes
    were targeted. For the end of a shutdown, where a scan per job would cost one host scan
    each (seconds on a crowded, busy host) and the daemon must not exit before it is done."""
    if not identities:
        return 0
    scan = _SHARED_SCANS.fresh()
    return sum(_signal_scanned(i, _scan_job(i, scan), sig) for i in identities)


def _signal_scanned(identity: ProcessIdentity, scan: _JobScan, sig: int) -> int:
    count = 0
    if scan.group:
        try:
            os.killpg(identity.pgid, sig)
            count += len(scan.group)
        except ProcessLookupError:
            pass
        except PermissionError:
            log.warning("may not signal process group", pgid=identity.pgid, signal=sig)
    for stat in scan.escaped:
        if _signal_exact(stat, sig):
            count += 1
    return count


# --- from the event loop: one host scan per wave --------------------------------------------------

# Rounds of `akill_members`: a scan is a snapshot, a member may fork between it and the signal.
KILL_ROUNDS = 10


async def asignal_members(identity: ProcessIdentity, sig: int) -> int:
    """`signal_members` from the event loop, on the wave's shared scan (it began after the call)."""
    return (await _WAVES.submit(_TreeRequest(identity, sig))).signalled


async def afind_members(identity: ProcessIdentity) -> tuple[int, ...]:
    """The pids (sorted) `find_members` would return, on the wave's shared scan. For "is anything
    left?" and reports only: to act on a member, use `asignal_members`, which checks the pid
    still denotes the scanned process."""
    return (await _WAVES.submit(_TreeRequest(identity, None))).members


async def akill_members(identity: ProcessIdentity, rounds: int = KILL_ROUNDS) -> bool:
    """SIGKILL every member, in rounds until a fresh scan finds none (at most `rounds`, each on
    its wave's scan); True when a scan found none left."""
    for _ in range(rounds):
        # The scan that finds nothing to signal is the "none left" check: no separate look.
        if not await asignal_members(identity, signal.SIGKILL):
            return True
    return False


def host_scans_taken() -> int:
    """How many host scans this process has made (all callers): what a wave costs, observable."""
    with _SCAN_COUNT_LOCK:
        return _scan_count


@dataclass(frozen=True, slots=True)
class _TreeRequest:
    identity: ProcessIdentity
    sig: int | None  # None: look only


@dataclass(frozen=True, slots=True)
class _TreeAnswer:
    members: tuple[int, ...]  # pids the scan found, sorted
    signalled: int  # processes targeted by the signal (0 when looking only)


def _serve_wave(requests: Sequence[_TreeRequest]) -> list[Outcome[_TreeAnswer]]:
    """One host scan for every request of the batch, in the batch's thread: the per-job work
    (the leader's stat, the group pass if any group is trusted, the signals) runs here too."""
    scan = _HostScan()
    answers: list[Outcome[_TreeAnswer]] = []
    jobs: dict[ProcessIdentity, _JobScan] = {}
    for request in requests:
        try:
            job = jobs.get(request.identity)
            if job is None:
                job = jobs[request.identity] = _scan_job(request.identity, scan)
            signalled = (
                0 if request.sig is None else _signal_scanned(request.identity, job, request.sig)
            )
            answers.append(_TreeAnswer(tuple(sorted(s.pid for s in job.members)), signalled))
        except Exception as error:  # this job's failure (EMFILE, say) is its caller's, alone
            answers.append(error)
    return answers


_WAVES: LoopBatch[_TreeRequest, _TreeAnswer] = LoopBatch(_serve_wave, "proctree scan")


def find_processes_with_marker(marker: bytes) -> list[int]:
    """Pids (sorted) of live processes whose environ holds the entry `marker` exactly.

    `marker` is a whole `NAME=value` entry, e.g. `b"WEBJOBSD_OWNER=instance@/site/root"`; a
    longer value or another variable ending in the same text does not match. Never includes the
    calling process. Used at start-up to find what a previous life of the daemon left running.
    """
    return [stat.pid for stat in _marker_scan(marker)]


def signal_processes_with_marker(marker: bytes, sig: int) -> int:
    """Send `sig` to every process `find_processes_with_marker` would list; returns how many.

    Prefer this to `os.kill` on the listed pids: each one is signalled only if it is still the
    process that was scanned (pidfd + start time), never a newcomer that got its pid.
    """
    return sum(1 for stat in _marker_scan(marker) if _signal_exact(stat, sig))


def tree_cpu_seconds(identity: ProcessIdentity) -> float:
    """User + system CPU seconds of all live members, plus what they have reaped of children.

    The reaped children's share keeps the figure from dropping when a short-lived helper exits
    and is waited for by a member; it still drops when a member is reaped by a non-member (the
    leader by the daemon, an orphan by init). For an idle timeout treat any change as activity.
    """
    return sum(stat.cpu_ticks for stat in _scan_job(identity).members) / _CLOCK_TICKS


# --- /proc access --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Stat:
    pid: int
    state: str
    pgid: int
    start_ticks: int
    cpu_ticks: int

    @property
    def is_dead(self) -> bool:
        return self.state in _DEAD_STATES


@dataclass(frozen=True, slots=True)
class _JobScan:
    group: tuple[_Stat, ...]  # empty unless the group id is trusted
    escaped: tuple[_Stat, ...]  # token carriers outside the group

    @property
    def members(self) -> tuple[_Stat, ...]:
        return self.group + self.escaped


_SCAN_COUNT_LOCK = threading.Lock()
_scan_count = 0


class _HostScan:
    """One look at every process of the host, shared by every job that asks at about the same time.

    Token carriers are found at once (an environ read per process, the cheap file); the stat of
    every process, needed only to list a live group's members, is read on first demand and then
    kept for the other jobs sharing this scan.
    """

    def __init__(self) -> None:
        global _scan_count
        with _SCAN_COUNT_LOCK:
            _scan_count += 1
        self._own_pid = os.getpid()
        self.carriers: dict[bytes, list[_Stat]] = {}
        for pid in _pids():
            if pid == self._own_pid:
                continue
            token = _token_of(pid)
            if token is None:
                continue
            stat = _read_stat(pid)
            if stat is not None and not stat.is_dead:
                self.carriers.setdefault(token, []).append(stat)
        self._groups: dict[int, list[_Stat]] | None = None
        self._groups_lock = threading.Lock()

    def group(self, pgid: int) -> list[_Stat]:
        with self._groups_lock:
            if self._groups is None:
                groups: dict[int, list[_Stat]] = {}
                for pid in _pids():
                    if pid == self._own_pid:
                        continue
                    stat = _read_stat(pid)
                    if stat is not None and not stat.is_dead:
                        groups.setdefault(stat.pgid, []).append(stat)
                self._groups = groups
            return self._groups.get(pgid, [])


class _SharedScans:
    """Single flight: a caller gets a scan that *began after it asked*, never an older one.

    When a hundred jobs stop together each of them needs a fresh look at /proc; one scan that
    starts after all of them asked answers them all, so the cost is per stop wave, not per job
    times processes. Tickets order "asked" against "began": a scan serves a caller only if its
    ticket is larger than the caller's.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._ticket = 0
        self._running = False
        self._latest: tuple[int, _HostScan] | None = None

    def fresh(self) -> _HostScan:
        with self._condition:
            self._ticket += 1
            asked = self._ticket
            while True:
                if self._latest is not None and self._latest[0] > asked:
                    return self._latest[1]
                if not self._running:
                    self._running = True
                    self._ticket += 1
                    began = self._ticket
                    break
                self._condition.wait()
        scan: _HostScan | None = None
        try:
            scan = _HostScan()
            return scan
        finally:
            with self._condition:
                self._running = False
                if scan is not None:
                    self._latest = (began, scan)
                self._condition.notify_all()


_SHARED_SCANS = _SharedScans()


def _scan_job(identity: ProcessIdentity, scan: _HostScan | None = None) -> _JobScan:
    """The job's members from a shared host scan; trust follows the module docstring.

    The commonest call (right after a leader exits, to catch leftovers) finds no carrier and an
    untrusted group, so it costs one environ read per process and no stat pass at all.
    """
    # Never our own group: a record whose pgid is ours (corrupt, or a job not started in its own
    # session) must not make killpg take the daemon down with the job.
    group_usable = identity.pgid > 1 and identity.pgid != os.getpgrp()
    if scan is None:
        scan = _SHARED_SCANS.fresh()
    carriers = scan.carriers.get(identity.token.encode(), [])
    group_trusted = group_usable and any(stat.pgid == identity.pgid for stat in carriers)
    if group_usable and not group_trusted:
        leader = _read_stat(identity.pid)
        group_trusted = (
            leader is not None
            and not leader.is_dead
            and leader.pgid == identity.pgid
            and _same_start(leader, identity)
        )
    if not group_trusted:
        return _JobScan(group=(), escaped=tuple(carriers))
    escaped = tuple(stat for stat in carriers if stat.pgid != identity.pgid)
    return _JobScan(group=tuple(scan.group(identity.pgid)), escaped=escaped)


def _marker_scan(marker: bytes) -> list[_Stat]:
    if not marker or _NUL in marker or b"=" not in marker:
        raise ValueError(f"marker must be a NAME=value entry without NUL: {marker!r}")
    own_pid = os.getpid()
    found: list[_Stat] = []
    for pid in _pids():
        # environ first: it rules out nearly every process, so stat is read only for the hits.
        if pid == own_pid or not _environ_has(pid, marker):
            continue
        stat = _read_stat(pid)
        if stat is not None and not stat.is_dead:
            found.append(stat)
    return sorted(found, key=lambda stat: stat.pid)


def _pids() -> Iterator[int]:
    # Plain names, not Path objects: this runs over every process of the host on every scan.
    for name in os.listdir(_PROC):
        if name.isdigit():
            yield int(name)


def _read_proc_file(pid: int, name: str) -> bytes | None:
    """The whole file, or None when the process is gone or not ours to read."""
    try:
        fd = os.open(f"{_PROC}/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        if error.errno in _UNREADABLE_ERRNOS:
            return None
        raise
    try:
        chunks: list[bytes] = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as error:
        if error.errno in _UNREADABLE_ERRNOS:
            return None
        raise
    finally:
        os.close(fd)


def _read_stat(pid: int) -> _Stat | None:
    data = _read_proc_file(pid, "stat")
    if not data:
        return None
    # `comm` is in parentheses and may itself contain spaces and ')': split after the last ')'.
    # Fields after it, 0-based: 0 state, 2 pgrp, 11 utime, 12 stime, 13 cutime, 14 cstime,
    # 19 starttime (proc(5) numbers them 3, 5, 14-17, 22).
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return _Stat(
            pid=pid,
            state=fields[0].decode("ascii", "replace"),
            pgid=int(fields[2]),
            start_ticks=int(fields[19]),
            cpu_ticks=sum(int(value) for value in fields[11:15]),
        )
    except (IndexError, ValueError):
        return None


def _environ_has(pid: int, entry: bytes) -> bool:
    # Raw bytes and a substring search: psutil.Process.environ() decodes and splits every entry
    # of every process, which is most of a host-wide scan's cost for no benefit.
    data = _read_proc_file(pid, "environ")
    if not data or entry not in data:
        return False
    # Whole-entry match: `TOKEN=ab` must not match `TOKEN=abc` nor `XTOKEN=ab`.
    padded = _NUL + data if data.endswith(_NUL) else _NUL + data + _NUL
    return _NUL + entry + _NUL in padded


_TOKEN_PREFIX = TOKEN_VARIABLE.encode() + b"="


def _token_of(pid: int) -> bytes | None:
    """The value of the process's token entry, if its environ has one (whole-entry match)."""
    data = _read_proc_file(pid, "environ")
    if not data:
        return None
    at = data.find(_TOKEN_PREFIX)
    while at != -1:
        if at == 0 or data[at - 1] == 0:
            value_start = at + len(_TOKEN_PREFIX)
            value_end = data.find(_NUL, value_start)
            return data[value_start : value_end if value_end != -1 else len(data)]
        at = data.find(_TOKEN_PREFIX, at + 1)
    return None


def _epoch_start(start_ticks: int, boot_time: float | None = None) -> float:
    # Same formula as psutil's Process.create_time() on Linux, so the two agree exactly.
    return start_ticks / _CLOCK_TICKS + (_boot_time() if boot_time is None else boot_time)


def _boot_time() -> float:
    """`btime` of /proc/stat, read as psutil's `boot_time()` reads it (every call: the clock
    may have been stepped), without importing psutil for it."""
    with open(f"{_PROC}/stat", "rb") as file:
        for line in file:
            if line.startswith(b"btime"):
                return float(line.split()[1])
    raise RuntimeError(f"no btime in {_PROC}/stat")


def _same_start(stat: _Stat, identity: ProcessIdentity, boot_time: float | None = None) -> bool:
    started = _epoch_start(stat.start_ticks, boot_time)
    return abs(started - identity.create_time) <= _CREATE_TIME_SLACK_S


def _signal_exact(stat: _Stat, sig: int) -> bool:
    """Signal the scanned process and nothing else, even if its pid was reused since the scan."""
    try:
        pidfd = os.pidfd_open(stat.pid)
    except ProcessLookupError:
        return False
    except OSError as error:
        if error.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
        return _signal_checked(stat, sig)  # kernel < 5.3: check, then kill (racy by a hair)
    try:
        # The pidfd pins whichever process had the pid when it was opened; the same start ticks
        # read after opening prove that process is the one we scanned.
        now = _read_stat(stat.pid)
        if now is None or now.start_ticks != stat.start_ticks:
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("may not signal process", pid=stat.pid, signal=sig)
        return False
    finally:
        os.close(pidfd)


def _signal_checked(stat: _Stat, sig: int) -> bool:
    now = _read_stat(stat.pid)
    if now is None or now.start_ticks != stat.start_ticks:
        return False
    try:
        os.kill(stat.pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("may not signal process", pid=stat.pid, signal=sig)
        return False
    return True
