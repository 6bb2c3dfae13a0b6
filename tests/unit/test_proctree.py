"""proctree against real processes: a job in its own session whose descendants fork, leave the
group with `setsid`, get orphaned, or drop the token; found, signalled, and nothing else touched.

Every process a test starts is killed in the fixture's `finally` (by an independent psutil scan,
not by the code under test) and the test's own child is reaped, so a failing test leaks nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
from tests.helpers import wait_for_sync

from webjobsd.runtime import proctree
from webjobsd.runtime.proctree import TOKEN_VARIABLE, ProcessIdentity

T = TypeVar("T")


def wait_until(condition: Callable[[], T | None], what: str, timeout_s: float = 15.0) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
    value: T = wait_for_sync(condition, timeout=timeout_s, interval=0.01, what=what)
    return value


def carriers_of(entry: str) -> set[int]:
    """Live (non-zombie) processes whose environ has `entry` — psutil's view, independent of
    the code under test."""
    name, _, value = entry.partition("=")
    found: set[int] = set()
    for process in psutil.process_iter():
        try:
            if process.pid == os.getpid() or process.status() == psutil.STATUS_ZOMBIE:
                continue
            if process.environ().get(name) == value:
                found.add(process.pid)
        except psutil.Error:
            continue
    return found


def no_carriers(entry: str) -> bool:
    return not carriers_of(entry)


def is_sleep(pid: int) -> bool:
    return psutil.Process(pid).name() == "sleep"


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclasses.dataclass
class Job:
    process: subprocess.Popen[bytes]
    token: str
    pid_file: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def identity(self) -> ProcessIdentity:
        identity = proctree.identity_of(self.pid, self.token)
        assert identity is not None
        return identity

    def recorded(self, count: int) -> dict[str, int]:
        """`tag:pid` lines the script wrote, once `count` are there and every sleep has exec'd
        (after exec, setsid has been called and the environ is the final one)."""

        def ready() -> dict[str, int] | None:
            lines = self.pid_file.read_text().split() if self.pid_file.exists() else []
            if len(lines) < count:
                return None
            tagged = {tag: int(pid) for tag, _, pid in (line.partition(":") for line in lines)}
            for tag, pid in tagged.items():
                try:
                    if tag != "subshell" and psutil.Process(pid).name() != "sleep":
                        return None
                except psutil.NoSuchProcess:
                    return None
            return tagged

        return wait_until(ready, f"{count} processes recorded in {self.pid_file}")

    def kill_leader_and_reap(self) -> None:
        # Our own unreaped child: its pid cannot have been reused, so a plain kill is safe.
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


class Spawner:
    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self.jobs: list[Job] = []
        self.tracked: list[psutil.Process] = []
        self.entries: list[str] = []

    def __call__(self, script: str, **extra_env: str) -> Job:
        token = proctree.new_token()
        pid_file = self._tmp_path / f"pids-{len(self.jobs)}"
        env = {**os.environ, TOKEN_VARIABLE: token, "PIDFILE": str(pid_file), **extra_env}
        self.entries.append(f"{TOKEN_VARIABLE}={token}")
        self.entries.extend(f"{name}={value}" for name, value in extra_env.items())
        process = subprocess.Popen(
            ["bash", "-c", script], env=env, start_new_session=True, stdin=subprocess.DEVNULL
        )
        job = Job(process, token, pid_file)
        self.jobs.append(job)
        return job

    def track(self, pid: int) -> None:
        """Kill this process at clean-up too (one that carries no token)."""
        self.tracked.append(psutil.Process(pid))

    def cleanup(self) -> None:
        for job in self.jobs:
            if job.process.poll() is None:
                # Unreaped, so the group id is certainly still ours.
                try:
                    os.killpg(job.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for process in self.tracked:
            try:
                process.kill()  # psutil checks the pid was not reused
            except psutil.NoSuchProcess:
                pass
        for entry in self.entries:
            for pid in carriers_of(entry):
                try:
                    psutil.Process(pid).kill()
                except psutil.NoSuchProcess:
                    pass
        for job in self.jobs:
            job.process.wait(timeout=10)  # reap our children: no zombie is left behind
        for entry in self.entries:
            wait_until(partial(no_carriers, entry), f"no process left with {entry}")
        wait_until(lambda: not any(p.is_running() and running(p.pid) for p in self.tracked), "end")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(tmp_path)
    try:
        yield spawner
    finally:
        spawner.cleanup()


# The brief's tree: children, a grandchild, one child that calls setsid, and one that is
# double-forked out of the group and orphaned (reparented to init).
TREE = """
sleep 60 & echo "child:$!" >> "$PIDFILE"
setsid sleep 60 & echo "setsid:$!" >> "$PIDFILE"
( setsid sleep 60 & echo "orphan:$!" >> "$PIDFILE" )
( sleep 60 & echo "grandchild:$!" >> "$PIDFILE"; echo "subshell:$BASHPID" >> "$PIDFILE"; wait ) &
wait
"""


def test_identity_of_a_fresh_leader(spawn: Spawner) -> None:
    job = spawn("exec sleep 60")
    identity = job.identity()
    assert identity.pid == identity.pgid == job.pid
    assert identity.token == job.token
    assert identity.create_time == pytest.approx(psutil.Process(job.pid).create_time(), abs=0.01)
    assert proctree.is_alive(identity)


def test_identity_json_round_trip() -> None:
    identity = ProcessIdentity(pid=1234, pgid=1234, create_time=1.7e9 + 0.25, token="abc")
    assert ProcessIdentity.from_json(json.loads(json.dumps(identity.to_json()))) == identity
    # An integral create time in a hand-written record is accepted as a float.
    assert ProcessIdentity.from_json({"pid": 5, "pgid": 5, "create_time": 0, "token": "t"}) == (
        ProcessIdentity(pid=5, pgid=5, create_time=0.0, token="t")
    )


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"pid": "12", "pgid": 12, "create_time": 1.0, "token": "t"},
        {"pid": True, "pgid": 12, "create_time": 1.0, "token": "t"},
        {"pid": 12, "pgid": 12, "create_time": "now", "token": "t"},
        {"pid": 12, "pgid": 12, "create_time": 1.0, "token": 7},
        {"pid": 12, "pgid": 0, "create_time": 1.0, "token": "t"},
        {"pid": 12, "pgid": 12, "create_time": 1.0, "token": ""},
        {"pid": 12, "pgid": 12, "create_time": 1.0, "token": "a\0b"},
        [12, 12, 1.0, "t"],
    ],
)
def test_identity_from_json_rejects_garbage(raw: object) -> None:
    with pytest.raises(ValueError):
        ProcessIdentity.from_json(raw)  # type: ignore[arg-type]


def test_find_members_finds_the_whole_tree_including_escapees(spawn: Spawner) -> None:
    job = spawn(TREE)
    recorded = job.recorded(5)
    identity = job.identity()

    members = {process.pid for process in proctree.find_members(identity)}

    assert members == {job.pid, *recorded.values()}
    # The escapees really escaped: another group, and the orphan is no longer below the leader.
    assert os.getpgid(recorded["setsid"]) != job.pid
    assert os.getpgid(recorded["orphan"]) != job.pid
    below_leader = {p.pid for p in psutil.Process(job.pid).children(recursive=True)}
    assert recorded["orphan"] not in below_leader


def test_signal_members_sigkill_leaves_nothing(spawn: Spawner) -> None:
    job = spawn(TREE)
    recorded = job.recorded(5)
    identity = job.identity()

    signalled = proctree.signal_members(identity, signal.SIGKILL)

    assert signalled == 6
    assert job.process.wait(timeout=10) == -signal.SIGKILL
    entry = f"{TOKEN_VARIABLE}={job.token}"
    wait_until(partial(no_carriers, entry), "every token carrier to die")
    wait_until(lambda: not any(running(pid) for pid in recorded.values()), "the tree to die")
    assert proctree.find_members(identity) == []
    assert not proctree.is_alive(identity)
    assert proctree.signal_members(identity, signal.SIGKILL) == 0


def test_pid_reuse_guard(spawn: Spawner) -> None:
    job = spawn("exec sleep 60")
    identity = job.identity()
    # What a stale record looks like after the pid went to an unrelated process: same pid, an
    # older start time, a token the process does not carry.
    stale = dataclasses.replace(identity, create_time=identity.create_time - 30, token="gone")

    assert proctree.is_alive(identity)
    assert not proctree.is_alive(stale)
    assert not proctree.is_alive(dataclasses.replace(identity, create_time=0.0))
    assert proctree.find_members(stale) == []
    assert proctree.tree_cpu_seconds(stale) == 0.0
    assert proctree.signal_members(stale, signal.SIGKILL) == 0
    assert job.process.poll() is None and running(job.pid)


def test_a_zombie_is_not_alive_nor_a_member(spawn: Spawner) -> None:
    job = spawn("exec sleep 60")
    identity = job.identity()
    job.process.send_signal(signal.SIGKILL)
    wait_until(lambda: psutil.Process(job.pid).status() == psutil.STATUS_ZOMBIE, "a zombie")

    assert not proctree.is_alive(identity)
    assert proctree.identity_of(job.pid, job.token) is None
    assert proctree.find_members(identity) == []
    job.process.wait(timeout=10)


def test_group_is_trusted_only_while_it_holds_a_token_carrier(spawn: Spawner) -> None:
    job = spawn(
        """
        sleep 60 & echo "token:$!" >> "$PIDFILE"
        env -i sleep 60 & echo "bare:$!" >> "$PIDFILE"
        wait
        """
    )
    recorded = job.recorded(2)
    spawn.track(recorded["bare"])
    identity = job.identity()
    everyone = {job.pid, recorded["token"], recorded["bare"]}
    # The bare one carries no token: it is found only as a member of the verified group.
    assert {p.pid for p in proctree.find_members(identity)} == everyone

    job.kill_leader_and_reap()
    # Leader gone; a token carrier remaining in the group still vouches for its group id.
    assert {p.pid for p in proctree.find_members(identity)} == everyone - {job.pid}

    psutil.Process(recorded["token"]).kill()
    wait_until(lambda: not running(recorded["token"]), "the token carrier to die")
    # Nothing left proves the group id is still the job's, so it is not trusted (nor signalled).
    assert proctree.find_members(identity) == []
    assert proctree.signal_members(identity, 0) == 0


def test_never_includes_the_caller_nor_signals_its_group() -> None:
    own_start = psutil.Process().create_time()
    ours = ProcessIdentity(
        pid=os.getpid(), pgid=os.getpgrp(), create_time=own_start, token=proctree.new_token()
    )
    assert proctree.find_members(ours) == []
    assert proctree.signal_members(ours, 0) == 0  # signal 0: harmless even if the guard failed


def test_processes_with_marker_match_whole_entries(spawn: Spawner) -> None:
    owner = f"test-{proctree.new_token()}@/site/root"
    wanted = spawn("exec sleep 60", WEBJOBSD_OWNER=owner)
    longer_value = spawn("exec sleep 60", WEBJOBSD_OWNER=owner + "2")
    other_name = spawn("exec sleep 60", X_WEBJOBSD_OWNER=owner)
    for job in (wanted, longer_value, other_name):
        wait_until(partial(is_sleep, job.pid), "exec")

    marker = f"WEBJOBSD_OWNER={owner}".encode()
    assert proctree.find_processes_with_marker(marker) == [wanted.pid]

    assert proctree.signal_processes_with_marker(marker, signal.SIGKILL) == 1
    assert wanted.process.wait(timeout=10) == -signal.SIGKILL
    assert longer_value.process.poll() is None and other_name.process.poll() is None
    assert proctree.find_processes_with_marker(marker) == []


@pytest.mark.parametrize("marker", [b"", b"A=1\0B=2", b"NO_VALUE"])
def test_find_processes_with_marker_rejects_non_entries(marker: bytes) -> None:
    with pytest.raises(ValueError):
        proctree.find_processes_with_marker(marker)
    with pytest.raises(ValueError):
        proctree.signal_processes_with_marker(marker, 0)


def test_tree_cpu_seconds_counts_the_tree(spawn: Spawner) -> None:
    # The leader only waits; the CPU is burnt by a child that escaped the group.
    job = spawn('setsid bash -c "while :; do :; done" & echo "burner:$!" >> "$PIDFILE"; wait')
    wait_until(lambda: job.pid_file.exists() and job.pid_file.read_text(), "the burner's pid")
    identity = job.identity()

    wait_until(lambda: proctree.tree_cpu_seconds(identity) >= 0.2, "0.2 s of CPU")

    assert proctree.signal_members(identity, signal.SIGKILL) == 2
    job.process.wait(timeout=10)
    entry = f"{TOKEN_VARIABLE}={job.token}"
    wait_until(partial(no_carriers, entry), "the burner to die")
    assert proctree.tree_cpu_seconds(identity) == 0.0


def test_concurrent_callers_share_scans_and_each_sees_the_whole_tree(
    spawn: Spawner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop wave of many jobs costs a few host scans, not one per job; sharing never hands a
    caller a scan that began before it asked (each caller still sees every member)."""
    job = spawn(TREE)
    recorded = job.recorded(5)
    identity = job.identity()
    scans = 0
    original = proctree._HostScan.__init__

    def counted(self: proctree._HostScan) -> None:
        nonlocal scans
        scans += 1
        original(self)

    monkeypatch.setattr(proctree._HostScan, "__init__", counted)
    callers = 24
    barrier = threading.Barrier(callers)

    def one_caller() -> set[int]:
        barrier.wait()
        return {process.pid for process in proctree.find_members(identity)}

    with ThreadPoolExecutor(callers) as pool:
        results = list(pool.map(lambda _: one_caller(), range(callers)))

    assert all(result == {job.pid, *recorded.values()} for result in results)
    assert scans < callers / 2, scans


async def test_the_loop_operations_find_and_end_the_whole_tree_on_shared_scans(
    spawn: Spawner,
) -> None:
    """`afind_members`/`asignal_members`/`akill_members` keep the rules of the blocking ones
    (escapees found, group trusted through its token carriers once the leader is gone), and
    many callers at once share one scan."""
    job = spawn(TREE)
    recorded = job.recorded(5)
    identity = job.identity()
    tree = {job.pid, *recorded.values()}

    before = proctree.host_scans_taken()
    looks = await asyncio.gather(*(proctree.afind_members(identity) for _ in range(20)))
    assert proctree.host_scans_taken() - before == 1
    assert all(set(look) == tree for look in looks)

    # The leader dies and is reaped: the group is trusted through the carriers still in it.
    job.kill_leader_and_reap()
    assert set(await proctree.afind_members(identity)) == tree - {job.pid}

    assert await proctree.akill_members(identity)
    entry = f"{TOKEN_VARIABLE}={job.token}"
    wait_until(partial(no_carriers, entry), "every token carrier to die")
    assert await proctree.afind_members(identity) == ()
    assert await proctree.asignal_members(identity, signal.SIGKILL) == 0
