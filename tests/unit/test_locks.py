"""FileLock with real contention: two opens in one process, another process, a holder that is
SIGKILLed, a job child that must not inherit the lock, and owner info that outlives its writer.

"Can another process take it?" is always asked of a real subprocess: an in-process check could
not tell flock from POSIX locks, whose per-process semantics are the bug this module avoids.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tests.helpers import wait_for_sync

from webjobsd.runtime.locks import FileLock

T = TypeVar("T")

HOLDER = textwrap.dedent(
    """
    import os, sys
    from webjobsd.runtime.locks import FileLock
    lock = FileLock(sys.argv[1])
    if not lock.try_acquire({"pid": os.getpid(), "role": "holder"}):
        sys.exit(3)
    sys.stdin.buffer.read()  # hold until the parent closes our stdin (or kills us)
    """
)

# Exit 0 if the lock could be taken (then released at exit), 1 if someone holds it.
PROBE = textwrap.dedent(
    """
    import sys
    from webjobsd.runtime.locks import FileLock
    sys.exit(0 if FileLock(sys.argv[1]).try_acquire({"role": "probe"}) else 1)
    """
)


def wait_until(condition: Callable[[], T | None], what: str, timeout_s: float = 15.0) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
    value: T = wait_for_sync(condition, timeout=timeout_s, interval=0.01, what=what)
    return value


def free_for_another_process(path: Path) -> bool:
    result = subprocess.run([sys.executable, "-c", PROBE, str(path)], timeout=30, check=False)
    assert result.returncode in (0, 1), result
    return result.returncode == 0


class Holders:
    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def __call__(self, path: Path) -> subprocess.Popen[bytes]:
        """A subprocess that holds `path`, returned once its owner info is on disk."""
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE)
        self.processes.append(process)

        def holding() -> bool:
            assert process.poll() is None, f"holder exited with {process.returncode}"
            return FileLock.read_owner(path) == {"pid": process.pid, "role": "holder"}

        wait_until(holding, f"pid {process.pid} to hold {path}")
        return process

    def cleanup(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
            if process.stdin is not None:
                process.stdin.close()


@pytest.fixture
def holder() -> Iterator[Holders]:
    holders = Holders()
    try:
        yield holders
    finally:
        holders.cleanup()


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "jobs" / "triggered" / "job" / "triggeredJob.lock"


def test_two_locks_in_one_process_contend(lock_path: Path) -> None:
    first, second = FileLock(lock_path), FileLock(lock_path)
    try:
        assert first.try_acquire({"who": "first"})  # parent folders are created
        assert first.held
        assert not second.try_acquire({"who": "second"})
        assert not second.held
        assert FileLock.read_owner(lock_path) == {"who": "first"}

        first.release()
        assert not first.held
        assert second.try_acquire({"who": "second"})
        assert FileLock.read_owner(lock_path) == {"who": "second"}
    finally:
        first.release()
        second.release()


def test_reads_and_probes_in_the_holders_process_keep_the_lock(lock_path: Path) -> None:
    # With POSIX locks, each of these closes a descriptor of the file and drops the lock.
    with FileLock(lock_path) as lock:
        assert lock.try_acquire({"who": "me"})
        assert FileLock.read_owner(lock_path) == {"who": "me"}
        assert FileLock.is_locked_by_other(lock_path)  # another open, even in this process
        lock_path.read_bytes()
        os.close(os.open(lock_path, os.O_RDWR))

        assert not free_for_another_process(lock_path)
        assert lock.held
    assert free_for_another_process(lock_path)


def test_contention_with_another_process(lock_path: Path, holder: Holders) -> None:
    process = holder(lock_path)
    mine = FileLock(lock_path)
    try:
        assert FileLock.is_locked_by_other(lock_path)
        assert not mine.try_acquire({"who": "me"})
        assert FileLock.read_owner(lock_path) == {"pid": process.pid, "role": "holder"}

        assert process.stdin is not None
        process.stdin.close()  # the holder exits normally
        assert process.wait(timeout=10) == 0

        assert not FileLock.is_locked_by_other(lock_path)
        assert mine.try_acquire({"who": "me"})
        assert not free_for_another_process(lock_path)
    finally:
        mine.release()


def test_a_sigkilled_holder_releases_the_lock(lock_path: Path, holder: Holders) -> None:
    process = holder(lock_path)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL

    # Its owner info survives it: a hint for repairs, never proof of life.
    assert FileLock.read_owner(lock_path) == {"pid": process.pid, "role": "holder"}
    assert not FileLock.is_locked_by_other(lock_path)
    with FileLock(lock_path) as lock:
        assert lock.try_acquire({"who": "successor"})
        assert FileLock.read_owner(lock_path) == {"who": "successor"}


def test_a_job_child_does_not_inherit_the_lock(lock_path: Path) -> None:
    lock = FileLock(lock_path)
    child: subprocess.Popen[bytes] | None = None
    try:
        assert lock.try_acquire({"who": "daemon"})
        # close_fds=False passes every inheritable descriptor; ours must not be one.
        child = subprocess.Popen(["sleep", "60"], close_fds=False)
        child_fds = Path(f"/proc/{child.pid}/fd")
        targets = {str(fd.readlink()) for fd in child_fds.iterdir()}
        assert str(lock_path) not in targets

        lock.release()
        assert free_for_another_process(lock_path)  # the child still runs, the lock is gone
        assert child.poll() is None
    finally:
        lock.release()
        if child is not None:
            child.kill()
            child.wait(timeout=10)


def test_update_owner_rewrites_without_a_stale_tail(lock_path: Path) -> None:
    with FileLock(lock_path) as lock:
        assert lock.try_acquire({"OperationName": "Acquiring lock", "padding": "x" * 200})
        lock.update_owner({"pid": 7})
        assert lock_path.read_bytes() == b'{"pid":7}'
        assert FileLock.read_owner(lock_path) == {"pid": 7}


def test_misuse_raises(lock_path: Path) -> None:
    lock = FileLock(lock_path)
    with pytest.raises(RuntimeError):
        lock.update_owner({"pid": 1})
    try:
        assert lock.try_acquire({})
        with pytest.raises(RuntimeError):
            lock.try_acquire({})
    finally:
        lock.release()


def test_unserialisable_owner_leaves_the_lock_free(lock_path: Path) -> None:
    lock = FileLock(lock_path)
    with pytest.raises(TypeError):
        lock.try_acquire({"when": object()})
    assert not lock.held
    assert free_for_another_process(lock_path)


def test_release_keeps_the_file_and_is_idempotent(lock_path: Path) -> None:
    lock = FileLock(lock_path)
    assert lock.try_acquire({"who": "me"})
    lock.release()
    lock.release()
    assert lock_path.exists()
    assert not lock.held


def test_context_manager_releases_on_error(lock_path: Path) -> None:
    with pytest.raises(KeyError), FileLock(lock_path) as lock:
        assert lock.try_acquire({"who": "me"})
        raise KeyError("boom")
    assert not lock.held
    assert free_for_another_process(lock_path)


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe{}", b"[1, 2]", b'"text"', b"null"])
def test_read_owner_tolerates_garbage(lock_path: Path, content: bytes) -> None:
    lock_path.parent.mkdir(parents=True)
    lock_path.write_bytes(content)
    assert FileLock.read_owner(lock_path) is None


def test_missing_file_is_neither_owned_nor_locked_nor_created(lock_path: Path) -> None:
    assert FileLock.read_owner(lock_path) is None
    assert not FileLock.is_locked_by_other(lock_path)
    assert not lock_path.exists()


def test_acquire_retries_when_the_file_is_replaced_under_it(
    lock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. We open the lock file. 2. Someone replaces it before our flock. 3. Our lock on the old
    inode protects nothing, so try_acquire must start over on the new file."""
    lock_path.parent.mkdir(parents=True)
    lock_path.write_bytes(b"{}")
    real_flock = fcntl.flock
    replaced: list[bool] = []

    def flock_after_replacing(fd: Any, operation: int) -> None:
        if not replaced:
            replaced.append(True)
            replacement = lock_path.with_name("replacement")
            replacement.write_bytes(json.dumps({"who": "replacer"}).encode())
            replacement.replace(lock_path)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_replacing)
    with FileLock(lock_path) as lock:
        assert lock.try_acquire({"who": "me"})
        monkeypatch.undo()
        assert replaced
        # The lock and the owner info are on the file now at the path.
        assert FileLock.read_owner(lock_path) == {"who": "me"}
        assert not free_for_another_process(lock_path)


def test_release_unlocks_even_if_the_descriptor_was_duplicated(lock_path: Path) -> None:
    """A fork that has not exec'd yet shares the open file description; a dup does the same."""
    lock = FileLock(lock_path)
    assert lock.try_acquire({"who": "me"})
    assert lock._fd is not None
    duplicate = os.dup(lock._fd)
    try:
        lock.release()
        assert free_for_another_process(lock_path)
    finally:
        lock.release()
        os.close(duplicate)


def test_a_dup_for_a_checker_keeps_the_lock_until_release(lock_path: Path) -> None:
    """`duplicate()` (the lock guard's descriptor): closing it never lets the lock go, and
    `release` lets it go even while the dup is still open."""
    lock = FileLock(lock_path)
    assert lock.try_acquire({"who": "me"})
    first = lock.duplicate()
    os.close(first)
    assert not free_for_another_process(lock_path)
    second = lock.duplicate()
    try:
        lock.release()
        assert free_for_another_process(lock_path)
    finally:
        os.close(second)
    with pytest.raises(RuntimeError):
        lock.duplicate()


def test_a_lock_on_another_file_system_than_expected_is_refused(lock_path: Path) -> None:
    """A lost mount shows the local folder under it: a lock there would be nobody else's."""
    lock_path.parent.mkdir(parents=True)
    here = os.stat(lock_path.parent).st_dev
    with pytest.raises(OSError, match="on another file system"):
        FileLock(lock_path, device=here + 1).try_acquire({"who": "me"})
    # Nothing is left held, and the expected file system takes it.
    assert free_for_another_process(lock_path)
    with FileLock(lock_path, device=here) as lock:
        assert lock.try_acquire({"who": "me"})
        assert not free_for_another_process(lock_path)
