"""runtime.lockguard: a held lock is checked from threads of its own and fenced once, when it is
lost or when no check completes in time, even while a check hangs in the kernel.

The hang is a real one: a FUSE mount whose server never answers (not even its INIT), so any
lookup under it waits, as calls on a hard NFS mount whose server is unreachable do. It is made
in a child process with a mount namespace of its own (`unshare --mount`): nothing outside ever
sees the mount, and the child's exit aborts the connection, whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.helpers import wait_for_sync

from webjobsd.runtime.lockguard import Fence, Guard, LockGuards
from webjobsd.runtime.locks import FileLock

UNSHARE_MOUNT = ["unshare", "--mount", "--propagation", "private"]
DAEMON_SOURCE = Path(__import__("webjobsd").__file__).resolve().parents[1]


def _guard(
    guards: LockGuards, lock: FileLock, fences: list[Fence], **timing: float
) -> tuple[Guard, int]:
    """The guard and the number of its descriptor (closed by the guards once it ended)."""
    fd = lock.duplicate()
    guard = guards.watch(
        fd,
        lock.path,
        check_s=timing.get("check_s", 0.05),
        fence_s=timing.get("fence_s", 5.0),
        on_fence=lambda guard: fences.append(guard.fence) if guard.fence else None,
    )
    return guard, fd


def _closed(fd: int, path: Path) -> bool:
    """The guard's descriptor is closed (or its number now names another file)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") != str(path)
    except OSError:
        return True


def test_a_replaced_lock_file_is_fenced_once_as_lost(tmp_path: Path) -> None:
    with FileLock(tmp_path / "singleton.job.lock") as lock:
        assert lock.try_acquire({})
        fences: list[Fence] = []
        guard, fd = _guard(LockGuards(), lock, fences)
        (tmp_path / "new").write_text("{}")
        os.rename(tmp_path / "new", lock.path)
        wait_for_sync(lambda: fences, timeout=2, what="a fence")
        wait_for_sync(lambda: _closed(fd, lock.path), timeout=2, what="its descriptor closed")
        assert len(fences) == 1 and fences[0].lost and guard.fence is fences[0]
        assert fences[0].event.startswith("singleton lock lost")
        assert "replaced" in fences[0].detail


def test_a_deleted_lock_file_is_fenced_as_lost(tmp_path: Path) -> None:
    with FileLock(tmp_path / "singleton.job.lock") as lock:
        assert lock.try_acquire({})
        fences: list[Fence] = []
        _guard(LockGuards(), lock, fences)
        lock.path.unlink()
        wait_for_sync(lambda: fences, timeout=2, what="a fence")
        assert fences[0].lost and "ENOENT" in fences[0].detail


def test_held_locks_are_not_fenced_and_a_stopped_guard_lets_its_descriptor_go(
    tmp_path: Path,
) -> None:
    guards = LockGuards()
    with (
        FileLock(tmp_path / "one.lock") as one,
        FileLock(tmp_path / "two.lock") as two,
    ):
        assert one.try_acquire({}) and two.try_acquire({})
        fences: list[Fence] = []
        # Checks every 20 ms for twice the fence bound: each beats it by far.
        first, first_fd = _guard(guards, one, fences, check_s=0.02, fence_s=0.3)
        _, second_fd = _guard(guards, two, fences, check_s=0.02, fence_s=0.3)
        deadline = time.monotonic() + 0.6
        wait_for_sync(lambda: time.monotonic() > deadline, timeout=5, what="checks to run")
        first.stop()
        wait_for_sync(lambda: _closed(first_fd, one.path), timeout=2, what="its descriptor closed")
        assert not _closed(second_fd, two.path)
        deadline = time.monotonic() + 0.6
        wait_for_sync(lambda: time.monotonic() > deadline, timeout=5, what="checks to run")
        assert fences == []
        assert first.fence is None
        # The guard's descriptor is closed; the lock is still held through ours.
        assert FileLock.is_locked_by_other(one.path)
        # Two threads for every guard of the daemon.
        assert len([t for t in threading.enumerate() if t.name.startswith("lock-")]) >= 2


HUNG_CHECK = r"""
import ctypes, json, os, sys, threading, time
from pathlib import Path
from webjobsd.runtime.lockguard import LockGuards
from webjobsd.runtime.locks import FileLock

work = Path(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
lock = FileLock(work / "held.lock")
assert lock.try_acquire({})
hung = work / "hung"
hung.mkdir()
device = os.open("/dev/fuse", os.O_RDWR)
options = f"fd={device},rootmode=40000,user_id=0,group_id=0".encode()
if libc.mount(b"webjobsd-hung", str(hung).encode(), b"fuse", 0, options) != 0:
    print(f"cannot mount FUSE: {os.strerror(ctypes.get_errno())}")
    sys.exit(77)
fenced = threading.Event()
seen = []
def on_fence(guard):
    seen.append((time.monotonic() - started, guard.fence))
    fenced.set()
started = time.monotonic()
guard_fd = lock.duplicate()
LockGuards().watch(
    guard_fd, hung / "singleton.job.lock", check_s=0.1, fence_s=1.0, on_fence=on_fence
)
fenced.wait(20)
checker = next(t for t in threading.enumerate() if t.name == "lock-check")
with open(f"/proc/self/task/{checker.native_id}/wchan") as wchan:
    waiting_in = wchan.read()
held_at_fence = os.readlink(f"/proc/self/fd/{guard_fd}") == str(lock.path)
os.close(device)  # the connection aborts: the waiting lookup fails with ENOTCONN
deadline = time.monotonic() + 10
def closed():
    try:
        return os.readlink(f"/proc/self/fd/{guard_fd}") != str(lock.path)
    except OSError:
        return True
while not closed() and time.monotonic() < deadline:
    time.sleep(0.01)
libc.umount2(str(hung).encode(), 2)
after_s, fence = seen[0] if seen else (None, None)
print(json.dumps({
    "fences": len(seen), "after_s": after_s, "event": fence and fence.event,
    "detail": fence and fence.detail, "lost": fence and fence.lost,
    "checker_waiting_in": waiting_in, "held_at_fence": held_at_fence,
    "closed_after_abort": closed(),
}))
"""


def test_a_check_hung_in_the_kernel_is_fenced_by_the_watchdog(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or not os.path.exists("/dev/fuse"):
        pytest.skip("needs unshare and /dev/fuse")
    done = subprocess.run(
        [*UNSHARE_MOUNT, sys.executable, "-c", HUNG_CHECK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(DAEMON_SOURCE)},
        check=False,
    )
    if done.returncode == 77 or "unshare failed" in done.stderr:
        pytest.skip(done.stdout.strip() or done.stderr.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["fences"] == 1, seen
    assert seen["lost"] is False
    assert seen["event"].startswith("cannot verify the singleton lock for 1 s: stopping the job")
    # Fenced by the watchdog at the bound, while the check still hung.
    assert 1.0 <= seen["after_s"] < 2.5, seen
    # The checker was still waiting in the kernel, its descriptor open; it closed it once the
    # call returned (the connection aborted).
    assert "fuse" in seen["checker_waiting_in"], seen
    assert seen["held_at_fence"] is True
    assert seen["closed_after_abort"] is True
