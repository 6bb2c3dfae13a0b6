"""What the daemon's own reads cost the watch: inotify reports them all, so fewer is cheaper.

Every folder listed and every file read inside the watched tree is an `IN_OPEN` and an
`IN_CLOSE_NOWRITE` the watcher's thread must read (see discovery/batchobserver.py). These tests
count them with a real inotify watch and a real observer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify_c import InotifyEvent

from tests.helpers import wait_for_sync
from webjobsd.discovery.batchobserver import (
    READ_PAUSE_S,
    BatchingInotifyFD,
    BatchingInotifyObserver,
    is_folder_read,
)
from webjobsd.discovery.catalog import observe_job
from webjobsd.discovery.scripts import select_command
from webjobsd.model import JobKey, JobKind

IN_CLOSE_NOWRITE = 0x10
IN_OPEN = 0x20
IN_ISDIR = 0x40000000
_EVENT_HEADER = struct.Struct("iIII")


@contextmanager
def folder_opens(folder: Path) -> Iterator[Callable[[], int]]:
    """Count the opens of `folder` itself while the block runs (a raw inotify watch on it).

    Closes are watched too: the kernel merges an event into an identical one still unread, so
    opens alone would count one for any number in a row."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        assert libc.inotify_add_watch(fd, os.fsencode(folder), IN_OPEN | IN_CLOSE_NOWRITE) >= 0

        def count() -> int:
            opens = 0
            while True:
                try:
                    buffer = os.read(fd, 65536)
                except BlockingIOError:
                    return opens
                offset = 0
                while offset < len(buffer):
                    _wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(buffer, offset)
                    offset += _EVENT_HEADER.size + length
                    opens += bool(mask & IN_ISDIR and mask & IN_OPEN and length == 0)

        yield count
    finally:
        os.close(fd)


def test_one_look_at_a_job_lists_its_folder_twice_at_most(tmp_path: Path) -> None:
    """The content walk and the script choice each list the folder once; the script folder and
    the settings are taken from that choice, not from listings of their own."""
    job = tmp_path / "continuous" / "lister"
    job.mkdir(parents=True)
    (job / "run.sh").write_text("echo hi\n")
    (job / "settings.job").write_text("{}")
    with folder_opens(job) as opens:
        seen = observe_job(
            job,
            JobKey(JobKind.CONTINUOUS, "lister"),
            settle_s=0.0,
            now=time.time(),
            which=lambda _: "/bin/bash",
        )
        assert seen.command is not None and seen.command.script_name == "run.sh"
        assert opens() <= 2


def test_the_script_choice_lists_each_folder_once(tmp_path: Path) -> None:
    job = tmp_path / "job"
    inner = job / "inner"
    inner.mkdir(parents=True)
    (inner / "run.sh").write_text("echo hi\n")
    with folder_opens(job) as outer_opens, folder_opens(inner) as inner_opens:
        command = select_command(job, which=lambda _: "/bin/bash")
        assert command is not None and command.script_dir == "inner"
        assert (outer_opens(), inner_opens()) == (1, 1)


class _CountingReader(BatchingInotifyFD):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.masks: list[int] = []

    def read_events(self, *, event_buffer_size: int = 65536) -> list[InotifyEvent]:
        events = super().read_events(event_buffer_size=event_buffer_size)
        self.reads += bool(events)
        self.masks.extend(event.mask for event in events)
        return events


class _Collect(FileSystemEventHandler):
    def __init__(self) -> None:
        self.opened: list[str] = []
        self.seen: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()

    def on_any_event(self, event: FileSystemEvent) -> None:
        with self.lock:
            self.seen.append(
                (event.event_type, os.fsdecode(event.src_path), os.fsdecode(event.dest_path))
            )

    def on_opened(self, event: FileSystemEvent) -> None:
        with self.lock:
            self.opened.append(os.fsdecode(event.src_path))


@contextmanager
def watching(folder: Path) -> Iterator[tuple[_CountingReader, _Collect]]:
    """A real batching observer on `folder` (recursive), with a reader that records its reads."""
    reader = _CountingReader()
    observer = BatchingInotifyObserver(reader)
    handler = _Collect()
    observer.schedule(handler, os.fspath(folder), recursive=True)
    observer.start()
    try:
        yield reader, handler
    finally:
        observer.stop()
        observer.join()


def test_the_watch_reads_a_stream_of_events_in_batches_and_loses_none(tmp_path: Path) -> None:
    files = [tmp_path / f"f{index}" for index in range(500)]
    for path in files:
        path.write_bytes(b"x")
    with watching(tmp_path) as (reader, handler):
        started = time.monotonic()
        for path in files:  # 1000 events: an open and a close each
            path.read_bytes()
        wait_for_sync(lambda: len(handler.opened) == len(files), what="every open delivered")
        elapsed = time.monotonic() - started
        assert handler.opened == [os.fspath(path) for path in files]
        # One read per pause at most, however fast the events come. Read as they come (what
        # watchdog's own reader does), this burst takes one read for every few events.
        assert reader.reads <= elapsed / READ_PAUSE_S + 1, (reader.reads, elapsed)


def test_the_reads_of_folders_are_dropped_as_read_and_nothing_else(tmp_path: Path) -> None:
    """Listing a watched folder makes events watchdog never turns into anything; the reader drops
    them as it reads them. Files opened and closed, folders made, moved in and removed, and
    files removed still arrive."""
    watched = tmp_path / "jobs"
    listed = watched / "listed"
    listed.mkdir(parents=True)
    (listed / "run.sh").write_text("echo\n")
    outside = tmp_path / "staged"
    outside.mkdir()
    with watching(watched) as (reader, handler):
        for _ in range(50):
            os.listdir(watched)
            os.listdir(listed)
        (listed / "run.sh").read_text()
        (watched / "made").mkdir()
        outside.rename(watched / "moved")
        (watched / "made").rmdir()
        (listed / "run.sh").unlink()
        expected = {
            ("opened", os.fspath(listed / "run.sh"), ""),
            ("closed_no_write", os.fspath(listed / "run.sh"), ""),
            ("created", os.fspath(watched / "made"), ""),
            ("moved", "", os.fspath(watched / "moved")),
            ("deleted", os.fspath(watched / "made"), ""),
            ("deleted", os.fspath(listed / "run.sh"), ""),
        }
        wait_for_sync(lambda: expected <= set(handler.seen), what=f"all of {expected}")
        assert reader.masks, "nothing was read"
        assert not [hex(mask) for mask in reader.masks if is_folder_read(mask)]
        assert any(mask & IN_ISDIR for mask in reader.masks)  # the folders' own changes
