"""The site-wide deployment lock: two opens in one process exclude each other, so do two
processes, a holder killed by SIGKILL frees it, and a shared-lock probe does not make an
acquirer fail."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from webjobsd.deploy.lock import DeploymentLock, deployment_in_progress, lock_owner
from webjobsd.site import SiteLayout

HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from webjobsd.deploy.lock import DeploymentLock
    from webjobsd.site import SiteLayout
    layout = SiteLayout.build(Path(sys.argv[1]), instance_id="child", temp_root=Path(sys.argv[2]))
    lock = DeploymentLock(layout)
    if not lock.try_acquire({"who": "child"}):
        sys.exit(3)
    print("held", flush=True)
    sys.stdin.buffer.read()
    """
)


@pytest.fixture
def layout(tmp_path: Path) -> SiteLayout:
    return SiteLayout.build(tmp_path / "site", instance_id="test01", temp_root=tmp_path / "temp")


def test_two_opens_in_one_process_exclude_each_other(layout: SiteLayout) -> None:
    first, second = DeploymentLock(layout), DeploymentLock(layout)
    assert not deployment_in_progress(layout)
    assert first.try_acquire({"who": "first"})
    assert first.held and deployment_in_progress(layout)
    assert lock_owner(layout) == {"who": "first"}
    assert not second.try_acquire({"who": "second"})
    assert not second.held
    first.release()
    assert not deployment_in_progress(layout)
    assert second.try_acquire({"who": "second"})
    second.release()
    first.release()  # idempotent


def test_another_process_excludes_and_sigkill_frees(layout: SiteLayout, tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(layout.site_root), str(tmp_path / "t2")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"held\n"
            ours = DeploymentLock(layout)
            assert deployment_in_progress(layout)
            assert not ours.try_acquire({"who": "parent"})
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            assert ours.try_acquire({"who": "parent"})
            ours.release()
        finally:
            child.kill()
            child.wait(timeout=30)


def test_child_cannot_take_it_while_we_hold_it(layout: SiteLayout, tmp_path: Path) -> None:
    ours = DeploymentLock(layout)
    assert ours.try_acquire({"who": "parent"})
    try:
        result = subprocess.run(
            [sys.executable, "-c", HOLDER, str(layout.site_root), str(tmp_path / "t2")],
            input=b"",
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 3, result
    finally:
        ours.release()


PROBER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    print("probing", flush=True)
    while True:
        fd = os.open(sys.argv[1], os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            time.sleep(0.002)
        except BlockingIOError:
            pass  # a deployment holds it: the probe says "in progress"
        os.close(fd)
        time.sleep(0.002)
    """
)


def test_probes_do_not_make_an_acquire_fail(layout: SiteLayout) -> None:
    """The jobs side probes with a shared flock (as `FileLock.is_locked_by_other`); a
    deployment starting meanwhile must not get a spurious 409. The prober here holds its shared
    lock half of the time in 2 ms slices (the real probe: microseconds), so that about one
    single attempt in two fails: 20 acquisitions without the retry would fail."""
    layout.deployments_lock_path.parent.mkdir(parents=True)
    layout.deployments_lock_path.touch()
    with subprocess.Popen(
        [sys.executable, "-c", PROBER, str(layout.deployments_lock_path)],
        stdout=subprocess.PIPE,
    ) as prober:
        try:
            assert prober.stdout is not None
            assert prober.stdout.readline() == b"probing\n"
            for _ in range(20):
                lock = DeploymentLock(layout)
                assert lock.try_acquire({"who": "deploy"})
                lock.release()
        finally:
            prober.kill()
            prober.wait(timeout=30)
