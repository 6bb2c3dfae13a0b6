"""Following a job log as it grows: whole lines by byte offset, across rotation and truncation.

This module owns the reading side of `job_log.txt` and `output_log.txt` (`records.joblog`
owns the writing side). It knows nothing about HTTP: `http.logstream` turns its `Chunk`s into
Server-Sent Events.

Decisions:

* **The offset is a byte offset in the file the path names now.** A resumed reader (an SSE
  `Last-Event-ID`) starts there; an offset beyond the current size can only mean that the file
  was rotated or truncated since, so the reader restarts at 0 and says so with a `ROTATED`
  chunk instead of waiting for bytes that will never come.
* **Whole lines only.** A read stops after the last LF it saw, so a line that is still being
  written (or a UTF-8 sequence cut by the read size) is read again, whole, next time. Only a
  batch with no LF at all in `BATCH_BYTES` is cut, at a UTF-8 character boundary; and at the
  very end (`final=True`: the run is over) the unterminated rest is sent as a last line.
* **Rotation by identity, truncation by size.** At EOF the reader compares the inode the path
  names with the one it holds: a different file means the log was rotated (`joblog` renames it
  away, then a new one starts), and since the old descriptor still reads the renamed file,
  everything written to it before the rotation has been read by then. A missing path is the
  instant between the rename and the next write: keep the old file and look again later. The
  same inode with a size below the offset is a truncation (an operator's `> job_log.txt`).
  A file truncated and then grown past the offset between two looks cannot be told from
  growth; that is the price of not keeping a checksum.
* **Wake-ups are hints.** `LogWakeups` lets this daemon's log writers wake the readers of a
  job at once; writes by another instance are only seen by polling, so a reader must poll
  too. A missed wake-up costs latency, never lines.
* The log is opened through `records.safeopen`: a link or a FIFO at its name is never followed
  nor waited for, and reads as no log yet.
* Blocking I/O (stat, pread): callers run `read` in a worker thread.
"""

from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from webjobsd.records import safeopen

__all__ = [
    "BATCH_BYTES",
    "Chunk",
    "ChunkKind",
    "LogTail",
    "LogWakeups",
    "Start",
    "start_of_tail",
]

BATCH_BYTES: Final = 256 * 1024
# How far back `start_of_tail` looks for the lines asked: bounds the work of a large `tail`.
TAIL_SCAN_MAX_BYTES: Final = 16 * 1024 * 1024
_SCAN_BLOCK: Final = 64 * 1024


class ChunkKind(enum.Enum):
    LINES = "lines"
    ROTATED = "rotated"
    TRUNCATED = "truncated"


@dataclass(frozen=True, slots=True)
class Chunk:
    """What the reader found: lines ending at `offset`, or a restart at offset 0."""

    kind: ChunkKind
    offset: int
    lines: list[str] = field(default_factory=list)


def _split_lines(data: bytes) -> list[str]:
    """Text lines of `data` (which ends a line); CR counts as a break too, as in SSE."""
    text = data.decode("utf-8", "replace")
    if text.endswith("\n"):
        text = text[:-1]
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _utf8_cut(data: bytes) -> int:
    """The largest length <= len(data) that does not end inside a UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)  # ASCII: nothing pending
        if byte >= 0xC0:  # a lead byte: is its sequence complete?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)  # not UTF-8 anyway: any cut is as good


def _char_start(fd: int, offset: int) -> int:
    """`offset`, moved past UTF-8 continuation bytes: a client's arbitrary offset must not
    start the stream inside a character (our own ids are always at a line start)."""
    data = os.pread(fd, 3, offset)
    skip = 0
    while skip < len(data) and 0x80 <= data[skip] < 0xC0:
        skip += 1
    return offset + skip


def start_of_tail(fd: int, size: int, *, lines: int | None, max_bytes: int | None) -> int:
    """Offset of the start of the last `lines` lines, or of the first line that starts within
    the last `max_bytes` bytes; always at a line start."""
    if lines is not None:
        return _start_of_last_lines(fd, size, lines)
    assert max_bytes is not None
    if size <= max_bytes:
        return 0
    start = size - max_bytes
    # The byte before `start` tells whether `start` begins a line; else skip to the next one.
    data = os.pread(fd, max_bytes + 1, start - 1)
    newline = data.find(b"\n")
    return size if newline < 0 else start + newline


def _start_of_last_lines(fd: int, size: int, lines: int) -> int:
    if lines <= 0:
        return size
    end = size
    # The LF that ends the last line does not start one.
    if size and os.pread(fd, 1, size - 1) == b"\n":
        end -= 1
    seen = 0
    floor = max(0, size - TAIL_SCAN_MAX_BYTES)
    while end > floor:
        start = max(floor, end - _SCAN_BLOCK)
        block = os.pread(fd, end - start, start)
        position = len(block)
        while (position := block.rfind(b"\n", 0, position)) >= 0:
            seen += 1
            if seen == lines:
                return start + position + 1
        end = start
    return floor if floor == 0 else _next_line(fd, floor)


def _next_line(fd: int, offset: int) -> int:
    data = os.pread(fd, _SCAN_BLOCK, offset - 1)
    newline = data.find(b"\n")
    return offset + newline if newline >= 0 else offset


@dataclass(frozen=True, slots=True)
class Start:
    """Where a new reader begins: an offset, or the tail (`lines` or `max_bytes`) of the file."""

    offset: int | None = None
    lines: int | None = None
    max_bytes: int | None = None


class LogTail:
    """Reads one log path by offset; see the module docstring. Not thread-safe: one caller."""

    def __init__(self, path: Path, start: Start) -> None:
        self.path = path
        self.offset = 0
        self._start: Start | None = start
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        # The last batch was cut inside an over-long line: its LF ends no line of its own.
        self._mid_line = False

    def read(self, *, final: bool = False) -> list[Chunk]:
        """What is new since the last call: at most `BATCH_BYTES` of lines, or a restart.

        An empty list means nothing new (yet). `final`: the writer is done, so an
        unterminated last line is returned as it is.
        """
        if self._fd is None:
            restart = self._open()
            if self._fd is None:
                return []
            if restart:
                return [Chunk(ChunkKind.ROTATED, 0)]
        chunks: list[Chunk] = []
        lines = self._read_lines(final=final)
        if lines is not None:
            return [lines]
        changed = self._check_identity()
        if changed is not None:
            # The old file is complete: what is left of it without an LF is its last line.
            tail = self._read_lines(final=True)
            if tail is not None:
                chunks.append(tail)
            chunks.append(self._restart(changed))
        return chunks

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    # -- internals --------------------------------------------------------------------------

    def _open(self) -> bool:
        """Open the file the path names; True when a resume offset was beyond its end."""
        try:
            fd = safeopen.open_file(self.path, os.O_RDONLY)
        except (FileNotFoundError, safeopen.UnsafeFileError):
            # A link or a FIFO is not the log: as if none were there yet (the writer replaces
            # it with a regular file at its next write).
            return False
        st = os.fstat(fd)
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)
        start, self._start = self._start, None
        if start is None:  # reopened after a rotation
            self.offset = 0
            return False
        if start.offset is not None:
            if start.offset > st.st_size:
                self.offset = 0
                return True
            self.offset = _char_start(fd, start.offset)
            return False
        self.offset = start_of_tail(fd, st.st_size, lines=start.lines, max_bytes=start.max_bytes)
        return False

    def _read_lines(self, *, final: bool) -> Chunk | None:
        assert self._fd is not None
        data = os.pread(self._fd, BATCH_BYTES, self.offset)
        full = len(data) == BATCH_BYTES
        if self._mid_line and data.startswith(b"\n"):
            self.offset += 1
            data = data[1:]
        if not data:
            return None
        self._mid_line = False
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if full:
                cut = _utf8_cut(data)
                self._mid_line = True
            elif final:
                cut = len(data)
            else:
                return None
        self.offset += cut
        return Chunk(ChunkKind.LINES, self.offset, _split_lines(data[:cut]))

    def _check_identity(self) -> ChunkKind | None:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return None  # between a rotation's rename and the next write: look again later
        if (st.st_dev, st.st_ino) != self._identity:
            return ChunkKind.ROTATED
        if st.st_size < self.offset:
            return ChunkKind.TRUNCATED
        return None

    def _restart(self, kind: ChunkKind) -> Chunk:
        if kind is ChunkKind.ROTATED:
            self.close()  # the next read opens the new file at 0
        self.offset = 0
        self._mid_line = False
        return Chunk(kind, 0)


class LogWakeups:
    """Wakes the readers of a job's logs when this daemon writes to them (keyed by job name).

    Keyed by name, not path, because that is what the writers' byte counters know; a reader of
    the other kind of job with the same name wakes for nothing and finds nothing new. `close`
    wakes everyone for good (shutdown).
    """

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self.closed = False

    def written(self, job_name: str, _count: int = 0) -> None:
        for event in self._waiters.get(job_name, ()):
            event.set()

    @contextmanager
    def subscribe(self, job_name: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        if self.closed:
            event.set()
        self._waiters.setdefault(job_name, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(job_name)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_name]

    def close(self) -> None:
        self.closed = True
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    @property
    def subscribers(self) -> int:
        return sum(len(waiters) for waiters in self._waiters.values())
