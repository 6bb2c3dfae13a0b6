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
from webjobsd.runtime.lockguard import Fence, LockGuard
from webjobsd.runtime.locks import FileLock

DAEMON_SOURCE = Path(__import__("webjobsd").__file__).resolve().parents[1]


def _guard(lock: FileLock, fences: list[Fence], **timing: float) -> LockGuard:
    guard = LockGuard(
        lock.duplicate(),
        lock.path,
        check_s=timing.get("check_s", 0.05),
        fence_s=timing.get("fence_s", 5.0),
        on_fence=fences.append,
        name="unit",
    )
    guard.start()
    return guard


def _guard_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.endswith("-unit")]


def test_a_replaced_lock_file_is_fenced_once_as_lost(tmp_path: Path) -> None:
    with FileLock(tmp_path / "singleton.job.lock") as lock:
        assert lock.try_acquire({})
        fences: list[Fence] = []
        guard = _guard(lock, fences)
        (tmp_path / "new").write_text("{}")
        os.rename(tmp_path / "new", lock.path)
        wait_for_sync(lambda: fences, timeout=2, what="a fence")
        wait_for_sync(lambda: not _guard_threads(), timeout=2, what="the guard's threads ended")
        assert len(fences) == 1 and fences[0].lost and guard.fence is fences[0]
        assert fences[0].event.startswith("singleton lock lost")
        assert "replaced" in fences[0].detail


def test_a_deleted_lock_file_is_fenced_as_lost(tmp_path: Path) -> None:
    with FileLock(tmp_path / "singleton.job.lock") as lock:
        assert lock.try_acquire({})
        fences: list[Fence] = []
        _guard(lock, fences)
        lock.path.unlink()
        wait_for_sync(lambda: fences, timeout=2, what="a fence")
        assert fences[0].lost and "ENOENT" in fences[0].detail


def test_a_held_lock_is_not_fenced_and_stop_ends_the_threads(tmp_path: Path) -> None:
    with FileLock(tmp_path / "singleton.job.lock") as lock:
        assert lock.try_acquire({})
        fences: list[Fence] = []
        # Twenty checks, and a fence bound they all beat by far.
        guard = _guard(lock, fences, check_s=0.02, fence_s=0.3)
        deadline = time.monotonic() + 0.4 + 0.02 * 20
        wait_for_sync(lambda: time.monotonic() > deadline, timeout=5, what="checks to run")
        guard.stop()
        wait_for_sync(lambda: not _guard_threads(), timeout=2, what="the guard's threads ended")
        assert fences == []
        # The guard's descriptor is closed; the lock is still held through ours.
        assert FileLock.is_locked_by_other(lock.path)


HUNG_CHECK = r"""
import ctypes, json, os, sys, threading, time
from pathlib import Path
from webjobsd.runtime.lockguard import LockGuard
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
def on_fence(fence):
    seen.append((time.monotonic() - started, fence))
    fenced.set()
started = time.monotonic()
guard = LockGuard(
    lock.duplicate(), hung / "singleton.job.lock", check_s=0.1, fence_s=1.0,
    on_fence=on_fence, name="hung",
)
guard.start()
fenced.wait(20)
checker = next(t for t in threading.enumerate() if t.name == "lock-check-hung")
stuck = checker.is_alive()
os.close(device)  # the connection aborts: the waiting lookup fails with ENOTCONN
checker.join(10)
libc.umount2(str(hung).encode(), 2)
after_s, fence = seen[0] if seen else (None, None)
print(json.dumps({
    "fences": len(seen), "after_s": after_s, "event": fence and fence.event,
    "detail": fence and fence.detail, "lost": fence and fence.lost,
    "stuck_at_fence": stuck, "checker_ended": not checker.is_alive(),
}))
"""


def test_a_check_hung_in_the_kernel_is_fenced_by_the_watchdog(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or not os.path.exists("/dev/fuse"):
        pytest.skip("needs unshare and /dev/fuse")
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", HUNG_CHECK]
        + [str(tmp_path)],
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
    assert seen["stuck_at_fence"] is True
    assert seen["checker_ended"] is True
