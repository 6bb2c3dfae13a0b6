"""records.safeopen and the records built on it: links never followed, FIFOs never waited for.

A FIFO open that blocked would hang the test itself; every such case runs in a worker thread
joined with a deadline, so a regression fails instead of wedging the suite.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from webjobsd.model import ContinuousStatus, JobKey, JobKind
from webjobsd.records import safeopen
from webjobsd.records.atomic import write_bytes_atomic, write_json_atomic
from webjobsd.records.joblog import JobLogWriter, LogLevel
from webjobsd.records.logtail import LogTail, Start
from webjobsd.records.starts import StartHistory
from webjobsd.records.status import read_status_file, write_continuous_status
from webjobsd.runtime.locks import FileLock
from webjobsd.site import SiteLayout

T = TypeVar("T")
DEADLINE_S = 5.0


def within_deadline(call: Callable[[], T]) -> T:
    """`call()` in a thread; fails (instead of hanging) when it blocks."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as error:  # handed to the test thread
            failure.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(DEADLINE_S)
    if worker.is_alive():
        # Unblock the worker (it waits for a writer or reader of a FIFO) before failing.
        pytest.fail(f"blocked for more than {DEADLINE_S} s")
    if failure:
        raise failure[0]
    return outcome[0]


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside the folder under attack, which nothing may change."""
    path = tmp_path / "outside" / "secret"
    path.parent.mkdir()
    path.write_bytes(b"root-only content\n")
    path.chmod(0o600)
    return path


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


# -- the module -----------------------------------------------------------------------------


def test_regular_file_opens_for_reading_and_writing(tmp_path: Path) -> None:
    path = tmp_path / "file"
    fd = safeopen.open_file(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(fd, b"hello\n")
    os.close(fd)
    assert safeopen.read_bytes(path, 100) == b"hello\n"
    assert safeopen.read_bytes(path, 3) == b"hel"


def test_symlink_is_refused_and_its_target_untouched(tmp_path: Path, secret: Path) -> None:
    link = tmp_path / "data" / "job_log.txt"
    link.parent.mkdir()
    link.symlink_to(secret)
    with pytest.raises(safeopen.UnsafeFileError, match="symbolic link"):
        safeopen.open_file(link, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with pytest.raises(safeopen.UnsafeFileError):
        safeopen.read_bytes(link, 100)
    assert secret.read_bytes() == b"root-only content\n"


def test_dangling_symlink_creates_nothing_where_it_points(tmp_path: Path) -> None:
    target = tmp_path / "outside" / "profile"
    target.parent.mkdir()
    link = tmp_path / "data" / "job_log.txt"
    link.parent.mkdir()
    link.symlink_to(target)
    with pytest.raises(safeopen.UnsafeFileError):
        safeopen.open_file(link, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    assert not target.exists()


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_CREAT])
def test_fifo_is_refused_without_blocking(tmp_path: Path, flags: int) -> None:
    path = fifo(tmp_path / "data" / "job_log.txt")
    with pytest.raises(safeopen.UnsafeFileError, match="FIFO"):
        within_deadline(lambda: safeopen.open_file(path, flags))


def test_hard_link_is_refused_for_writing(tmp_path: Path, secret: Path) -> None:
    link = tmp_path / "data" / "status"
    link.parent.mkdir()
    os.link(secret, link)
    with pytest.raises(safeopen.UnsafeFileError, match="hard links"):
        safeopen.open_file(link, os.O_WRONLY | os.O_APPEND)
    assert secret.read_bytes() == b"root-only content\n"


def test_linked_folder_is_refused(tmp_path: Path, secret: Path) -> None:
    folder = tmp_path / "run"
    folder.symlink_to(secret.parent, target_is_directory=True)
    with pytest.raises(OSError):
        safeopen.open_folder(folder)
    with pytest.raises(OSError):
        write_bytes_atomic(folder / "secret", b"overwritten")
    assert secret.read_bytes() == b"root-only content\n"


def test_atomic_write_replaces_a_link_instead_of_writing_through_it(
    tmp_path: Path, secret: Path
) -> None:
    target = tmp_path / "data" / "status_test01"
    target.parent.mkdir()
    target.symlink_to(secret)
    write_json_atomic(target, {"Status": "Running"}, mode=0o640)
    assert secret.read_bytes() == b"root-only content\n"
    st = os.lstat(target)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert target.read_text() == '{"Status":"Running"}'
    assert sorted(p.name for p in target.parent.iterdir()) == ["status_test01"]


def test_temp_file_is_new_and_relative_to_the_folder(tmp_path: Path) -> None:
    folder_fd = safeopen.open_folder(tmp_path / "data", create=True)
    try:
        fd, name = safeopen.create_temp_at(folder_fd, ".status.")
        os.close(fd)
        assert name.startswith(".status.") and name.endswith(".tmp")
        assert stat.S_IMODE(os.stat(name, dir_fd=folder_fd).st_mode) == 0o600
    finally:
        os.close(folder_fd)


# -- the records that use it ------------------------------------------------------------------


def test_job_log_replaces_a_link_with_a_fresh_log(tmp_path: Path, secret: Path) -> None:
    path = tmp_path / "data" / "job_log.txt"
    with JobLogWriter(path, "test01") as writer:
        writer.system(LogLevel.INFO, "first")
        path.unlink()
        path.symlink_to(secret)
        writer.console(LogLevel.INFO, "second")
    assert secret.read_bytes() == b"root-only content\n"
    assert stat.S_ISREG(os.lstat(path).st_mode)
    assert "second" in path.read_text()


def test_job_log_replaces_a_fifo_without_blocking(tmp_path: Path) -> None:
    path = fifo(tmp_path / "data" / "job_log.txt")
    writer = JobLogWriter(path, "test01")
    within_deadline(lambda: writer.console(LogLevel.INFO, "after the fifo"))
    writer.close()
    assert stat.S_ISREG(os.lstat(path).st_mode)
    assert "after the fifo" in path.read_text()
    assert writer.dropped_lines == 0


def test_lock_on_a_link_locks_a_fresh_file(tmp_path: Path, secret: Path) -> None:
    path = tmp_path / "data" / "triggeredJob.lock"
    path.parent.mkdir()
    path.symlink_to(secret)
    assert FileLock.read_owner(path) is None
    assert not FileLock.is_locked_by_other(path)
    with FileLock(path) as lock:
        assert lock.try_acquire({"InstanceId": "test01"})
    assert secret.read_bytes() == b"root-only content\n"
    assert FileLock.read_owner(path) == {"InstanceId": "test01"}


def test_lock_on_a_fifo_does_not_block(tmp_path: Path) -> None:
    path = fifo(tmp_path / "data" / "singleton.job.lock")
    assert within_deadline(lambda: FileLock.read_owner(path)) is None
    assert not within_deadline(lambda: FileLock.is_locked_by_other(path))
    with FileLock(path) as lock:
        assert within_deadline(lambda: lock.try_acquire({"InstanceId": "test01"}))
    assert stat.S_ISREG(os.lstat(path).st_mode)


def test_status_and_start_history_never_follow_links_or_block(tmp_path: Path, secret: Path) -> None:
    layout = SiteLayout.build(tmp_path / "site", instance_id="test01", temp_root=tmp_path / "t")
    key = JobKey(JobKind.CONTINUOUS, "job")
    status = layout.status_path(key)
    status.parent.mkdir(parents=True)
    fifo(status.with_name("status_other"))
    assert within_deadline(lambda: read_status_file(status.with_name("status_other"))) is None
    status.symlink_to(secret)
    assert read_status_file(status) is None
    write_continuous_status(layout, key, ContinuousStatus.RUNNING)
    assert read_status_file(status) is ContinuousStatus.RUNNING

    starts = layout.data_dir(key) / "starts_test01.json"
    fifo(starts)
    history = within_deadline(lambda: StartHistory(starts))
    history.started(1234)
    assert stat.S_ISREG(os.lstat(starts).st_mode)
    assert secret.read_bytes() == b"root-only content\n"


def test_log_tail_reads_no_link_and_no_fifo(tmp_path: Path, secret: Path) -> None:
    path = tmp_path / "data" / "job_log.txt"
    path.parent.mkdir()
    path.symlink_to(secret)
    tail = LogTail(path, Start(offset=0))
    assert tail.read(final=True) == []
    path.unlink()
    fifo(path)
    assert within_deadline(lambda: tail.read(final=True)) == []
    tail.close()
