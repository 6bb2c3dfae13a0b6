"""Kudu's job log: line format, capture of a job's output, size rotation and the per-run cap.

This module owns every byte written to `job_log.txt` (continuous jobs), `output_log.txt`
(triggered runs) and `job_scheduler.log`, and the turning of a job's stdout/stderr byte stream
into log lines. It knows nothing about jobs or statuses: callers pick the path and the levels
(stdout -> INFO, stderr -> ERR, Part B §2.6).

Line format (Part B §2.6, with LF instead of CRLF per Part A #15)::

    [MM/dd/yyyy HH:mm:ss > {instanceId}: {SYS }{LEVEL:<4}] {message}\\n

Decisions:

* **Text stays text.** Job bytes are decoded as UTF-8 with `errors="replace"`, and every C0
  control character except TAB (so also NUL, CR, LF, ESC), DEL and every C1 control
  (U+0080-U+009F, which includes NEL, a line break for some readers) become U+FFFD. A log line
  therefore never contains a line break of its own and the file always decodes as strict UTF-8.
  U+2028/U+2029 are left alone: they are printable text for the tools that read these logs.
  Host messages given to `JobLogWriter.system` are split on line breaks instead, so that a
  multi-line message (a traceback) becomes several SYS lines rather than one line with U+FFFD.
* **Rotation (Part A #14).** Before a write that would make a non-empty log larger than
  `max_bytes`, the log is renamed to `job_prev_log.txt` and older rotations shift to
  `job_prev_log.2.txt` ... `job_prev_log.{generations}.txt`; the oldest is overwritten. Kudu
  rolls only after the file already exceeds the limit; rolling before keeps every file within
  `max_bytes` unless a single batch is larger by itself.
* **Several writers.** Instances sharing `data/` append to the same `job_log.txt`. Before every
  write the writer checks that the path still names the file it holds open (another instance,
  or an operator, may have rotated or deleted it) and reopens it if not; the file size that
  drives rotation comes from that same `stat`, so it counts every writer's lines. Rotation is
  best-effort like Kudu's: two instances rotating in the same instant can lose one generation.
* **Cap mode (triggered runs).** With `cap_bytes` there is no rotation; console lines are
  written while they keep the file within the cap, then one non-SYS WARN line says that output
  is discarded, and later console lines are counted in `discarded_lines` only. SYS lines are
  always written.
* **I/O errors never reach the caller.** A failed write (ENOSPC, EFBIG, EIO, a vanished
  folder...) drops the lines that did not make it, counts them in `dropped_lines` and closes the
  file; the next write reopens it and, once writing works again, starts with a SYS WARN line
  giving the number of lines dropped since the last such notice. A line cut short by a partial
  write is counted as dropped and terminated before the notice, so the file stays line-based.
* **Descriptors are budgeted.** With an `OpenLogBudget` (records.openlogs) the writer holds its
  file open only while it is among the most recently written of the daemon's logs; the budget
  closes the oldest (`release_idle`) and the next write reopens it, the same path as a log
  rotated by another instance. Without one the file stays open until `close`.
* **Never through a link, never blocking.** The log is opened through `records.safeopen`
  (`O_NOFOLLOW | O_NONBLOCK` relative to its folder, regular single-link files only), and the
  per-write check is an `lstat`: a link, hard link, FIFO or socket found at the log's name is
  removed (the entry, never what it points to), said once in the daemon's log naming the file,
  and a fresh regular log is created in its place. The log is the job's output: suspending it
  until someone notices would lose that output for nothing.
* **Cost.** One `stat` and one `write` (or `writev`) per call, whatever the number of lines,
  and the timestamp prefix is formatted once per second. Captured output travels as *blocks*:
  the bytes of complete lines as they came from the pipe (`LineSplitter.feed_block`,
  `console_block`), never split into a list of lines on the way. A plain block (valid UTF-8
  without controls, the usual case) is checked with one `translate`, then prefixed with one
  `replace` of LF by LF + prefix and written with `writev` (the first prefix and the body as
  they are, not joined into a third copy); only a block with something to clean is split and
  rendered line by line. Splitting and joining 2.6 million short lines per 256 MiB cost more
  than everything else together. The `stat` stays per write rather than per N bytes: with the
  large blocks of a flood (`runtime.pipereader`) it is one per 512 KiB, under 1 % of the
  capture's time in a profile, and it is what makes other writers' lines count.

The writer is synchronous. Its public methods take one lock, because a job that floods has its
pipes read by threads of their own (`runtime.pipereader`) while the event loop writes the host's
lines; `on_written` is called from whichever thread wrote.
"""

from __future__ import annotations

import enum
import errno
import itertools
import os
import re
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from io import RawIOBase
from pathlib import Path
from typing import Final

from webjobsd.records import safeopen
from webjobsd.records.controls import CONTROLS_BUT_LF, has_control_but_lf
from webjobsd.records.openlogs import OpenLogBudget

__all__ = [
    "DEFAULT_GENERATIONS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_LINE_BYTES",
    "DEFAULT_ROTATED_NAME",
    "JobLogWriter",
    "LineSplitter",
    "LogLevel",
    "Opener",
    "OutputCapture",
]

DEFAULT_MAX_BYTES: Final = 10 * 1024 * 1024
DEFAULT_GENERATIONS: Final = 3
DEFAULT_ROTATED_NAME: Final = "job_prev_log.txt"
DEFAULT_MAX_LINE_BYTES: Final = 1024 * 1024

# What becomes U+FFFD: every C0 control but TAB, DEL, and the C1 controls (U+0080-U+009F,
# two bytes in UTF-8). LF is a control too, except as the separator of a joined batch.
_C0_BUT_LF: Final = CONTROLS_BUT_LF
_C0: Final = _C0_BUT_LF + b"\n"
_C1: Final = re.compile(rb"\xc2[\x80-\x9f]")
_C1_LEAD: Final = b"\xc2"
# Translation tables that turn those C0 bytes into NUL, itself one of them, so that one
# `replace` of NUL then replaces them all.
_MARK_C0_BUT_LF: Final = bytes.maketrans(_C0_BUT_LF, bytes(len(_C0_BUT_LF)))
_MARK_C0: Final = bytes.maketrans(_C0, bytes(len(_C0)))
_NUL: Final = b"\x00"
_REPLACEMENT: Final = "\ufffd".encode()
_CR: Final = 0x0D
_LF: Final = 0x0A

Buffer = bytes | memoryview

Opener = Callable[[Path], RawIOBase]
"""Opens the log for appending; returns an unbuffered binary file (`write` may be partial)."""


class LogLevel(enum.StrEnum):
    INFO = "INFO"
    WARN = "WARN"
    ERR = "ERR"


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _open_append(path: Path) -> RawIOBase:
    fd = safeopen.open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    # Unbuffered: a short write must be visible to us (it tells how much of a batch reached
    # the disk), and nothing may linger in a Python buffer if the daemon is killed.
    return open(fd, "ab", buffering=0)


def _format_stamp(now: datetime) -> str:
    """Kudu's invariant-culture general pattern `MM/dd/yyyy HH:mm:ss`, in UTC."""
    if now.tzinfo is not None:
        now = now.astimezone(UTC)
    return (
        f"{now.month:02d}/{now.day:02d}/{now.year:04d} "
        f"{now.hour:02d}:{now.minute:02d}:{now.second:02d}"
    )


def _format_prefix(stamp: str, instance_id: str, level: LogLevel, *, system: bool) -> bytes:
    sys_tag = "SYS " if system else ""
    return f"[{stamp} > {instance_id}: {sys_tag}{level.value:<4}] ".encode(errors="replace")


def _render(prefix: bytes, lines: Sequence[bytes]) -> bytes:
    """`prefix + line + LF` for every line, each made into exactly one line of valid UTF-8.

    Works on the whole batch at once (C-level passes) instead of line by line, which matters
    when a job floods millions of short lines.
    """
    if not lines:
        return b""
    joined = b"\n".join(lines)
    if _is_plain(joined, len(lines)):
        return _prefixed(prefix, lines)
    body = _clean(lines, joined)
    return prefix + body.replace(b"\n", b"\n" + prefix) + b"\n"


def _render_block(prefix: bytes, block: bytes) -> list[Buffer]:
    """`_render` of the lines in `block` (complete lines, each ending with LF), in pieces to
    write one after the other."""
    if not block:
        return []
    # The block's own LFs are its separators: no other C0 control may be in it.
    if not has_control_but_lf(block) and _is_text(block):
        # Replacing every LF leaves one prefix too many after the last one; the memoryview
        # drops it, and the first prefix goes out as a piece of its own: no further copy.
        body = block.replace(b"\n", b"\n" + prefix)
        return [prefix, memoryview(body)[: len(body) - len(prefix)]]
    return [_render(prefix, block.split(b"\n")[:-1])]


def _is_plain(joined: bytes, count: int) -> bool:
    """Whether the `count` lines joined into `joined` are valid UTF-8 without any control.

    True for the usual batch, which then goes out as it came. The check is a few C-level
    passes (about 2 GB/s); replacing controls costs several times more, so only batches that
    have some pay for it.
    """
    # Deleting the C0 controls removes exactly the separators when the lines have none.
    if len(joined) - len(joined.translate(None, _C0)) != count - 1:
        return False
    return _is_text(joined)


def _is_text(data: bytes) -> bool:
    """Valid UTF-8 without C1 controls."""
    # 0xC2 also starts common characters (NBSP, degree sign...): search only when it occurs.
    if _C1_LEAD in data and _C1.search(data) is not None:
        return False
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _prefixed(prefix: bytes, lines: Sequence[bytes]) -> bytes:
    """`prefix + line + LF` for every line, in one allocation of the final size."""
    if len(lines) == 1:
        return b"".join((prefix, lines[0], b"\n"))
    # Few large temporaries: with glibc, freeing them returns memory to the system and the
    # next batch pays page faults to get it back.
    edges = [prefix + lines[0], *lines[1:-1], lines[-1] + b"\n"]
    return (b"\n" + prefix).join(edges)


def _clean(lines: Sequence[bytes], joined: bytes) -> bytes:
    """`lines` joined with LF, with every control as U+FFFD and invalid UTF-8 replaced."""
    if joined.count(b"\n") == len(lines) - 1:
        joined = _replace_controls(joined, _MARK_C0_BUT_LF)
    else:  # some element carries its own LF: it must not start a log line without a prefix
        joined = b"\n".join([_replace_controls(line, _MARK_C0) for line in lines])
    try:
        joined.decode("utf-8")
    except UnicodeDecodeError:
        # LF is ASCII and ends any pending multi-byte sequence, so decoding the joined batch
        # replaces exactly what decoding each line would, and keeps the separators intact.
        joined = joined.decode("utf-8", "replace").encode("utf-8")
    return joined


def _replace_controls(data: bytes, marks: bytes) -> bytes:
    """`data` with the C0 bytes that `marks` maps to NUL, and the C1 controls, as U+FFFD."""
    # The two kinds never share a byte and U+FFFD contains no 0xC2, so replacing one kind
    # after the other gives what a single left-to-right pass over both would.
    data = data.translate(marks).replace(_NUL, _REPLACEMENT)
    if _C1_LEAD in data:
        data = _C1.sub(_REPLACEMENT, data)
    return data


class JobLogWriter:
    """Appends Kudu-formatted lines to one log file; see the module docstring for the rules."""

    def __init__(
        self,
        path: Path,
        instance_id: str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        generations: int = DEFAULT_GENERATIONS,
        rotated_name: str = DEFAULT_ROTATED_NAME,
        cap_bytes: int | None = None,
        clock: Callable[[], datetime] = _utc_now,
        opener: Opener = _open_append,
        create_folder: bool = True,
        on_written: Callable[[int], None] | None = None,
        open_logs: OpenLogBudget | None = None,
    ) -> None:
        if max_bytes < 1 or generations < 0 or (cap_bytes is not None and cap_bytes < 0):
            raise ValueError("max_bytes must be >= 1, generations and cap_bytes >= 0")
        if Path(rotated_name).name != rotated_name or rotated_name == path.name:
            raise ValueError(f"rotated_name must be a plain file name, not {rotated_name!r}")
        self.path = path
        self.instance_id = instance_id
        self.max_bytes = max_bytes
        self.cap_bytes = cap_bytes
        # Named at rotation only: a thousand idle jobs would each keep a list of paths.
        self._rotated_name = rotated_name
        self._generations = generations
        self._clock = clock
        self._opener = opener
        # A run's log must not bring back a run folder that retention or a person removed.
        self._create_folder = create_folder
        # Told how many bytes reached the file (metrics); never given lines that did not.
        self._on_written = on_written
        # Shared by the writers of one daemon: a log written rarely is closed when another needs
        # the descriptor (records.openlogs), and reopened by its next write.
        self._open_logs = open_logs
        self._lock = threading.Lock()
        self._file: RawIOBase | None = None
        self._identity: tuple[int, int] | None = None
        self._closed = False
        # Host lines held for one write with whatever comes next (`hold_system`).
        self._held: list[bytes] = []
        # The per-second prefix cache: formatting a timestamp costs more than a whole batch.
        self._stamp_second: datetime | None = None
        self._prefixes: dict[tuple[bool, LogLevel], bytes] = {}
        # I/O failure bookkeeping.
        self.dropped_lines = 0  # lines lost to I/O errors since creation (never reset)
        self._unreported_drops = 0
        self._last_error = ""
        self._torn = False
        # Cap bookkeeping.
        self.discarded_lines = 0  # console lines discarded once the cap was reached
        self.cap_reached = False

    # -- public API -------------------------------------------------------------------------

    def system(self, level: LogLevel, message: str) -> None:
        """A host line (`SYS` tag); a multi-line message becomes one line per line."""
        with self._lock:
            self._append([self._system_line(level, message)], console=False)

    def hold_system(self, level: LogLevel, message: str) -> bool:
        """`system`, but the line waits for the next write of this writer (any kind, or
        `flush_held`) and goes out with it, in order, as one write. Returns True when nothing
        was held before: the caller then arranges one `flush_held` (its loop's next turn).

        For an owner that says several things in a row (a start: the singleton setting, the
        status, the script, the status again): one `stat` and one `write` instead of one each.
        The line keeps the time it was said."""
        with self._lock:
            if self._closed:
                return False
            first = not self._held
            self._held.append(self._system_line(level, message))
            return first

    def holding(self) -> bool:
        """Whether host lines are held (`hold_system`) and not written yet."""
        with self._lock:
            return bool(self._held)

    def flush_held(self) -> None:
        """Write the held host lines now (nothing when none are held)."""
        with self._lock:
            self._write_held()

    def console(self, level: LogLevel, message: bytes | str) -> None:
        """One line of the job's output; control characters inside it become U+FFFD."""
        data = message if isinstance(message, bytes) else message.encode(errors="replace")
        self.console_lines(level, [data])

    def console_lines(self, level: LogLevel, lines: Sequence[bytes]) -> None:
        """Many lines of the job's output in one write."""
        if lines:
            with self._lock:
                self._append([_render(self._prefix(level, system=False), lines)], console=True)

    def console_block(self, level: LogLevel, block: bytes) -> None:
        """The job's output as `LineSplitter.feed_block` gives it (complete lines), one write."""
        if block and not block.endswith(b"\n"):
            block += b"\n"  # the last line is a line too, not something to lose
        if block:
            with self._lock:
                self._append(_render_block(self._prefix(level, system=False), block), console=True)

    def open_now(self) -> None:
        """Open the file (and make its folder) now, from a worker thread when a job starts, so
        that the event loop's first lines are plain writes: at 1000 jobs starting together the
        first write's mkdir and open were a quarter of the loop's time. Lines held so far
        (`hold_system`) are written with it. A failure is left to the first write, which
        reports it as any write does."""
        with self._lock:
            if self._closed:
                return
            if self._write_held():
                return
            try:
                self._current_size()
            except OSError:
                self._drop_file()

    def close(self) -> None:
        """Close the file (after the held lines); every later write is ignored."""
        with self._lock:
            self._write_held()
            self._closed = True
            self._drop_file()

    def release_idle(self) -> bool:
        """Close the file unless a write holds the writer this instant (`OpenLogBudget`); the
        next write reopens it. True when nothing is left open."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._drop_file()
            return True
        finally:
            self._lock.release()

    def __enter__(self) -> JobLogWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- formatting -------------------------------------------------------------------------

    def _system_line(self, level: LogLevel, message: str) -> bytes:
        """A host message rendered as SYS lines, one per line of the message."""
        lines = [part.removesuffix("\r").encode(errors="replace") for part in message.split("\n")]
        return _render(self._prefix(level, system=True), lines)

    def _prefix(self, level: LogLevel, *, system: bool) -> bytes:
        now = self._clock()
        second = now.replace(microsecond=0)
        if second != self._stamp_second:
            self._stamp_second = second
            self._prefixes.clear()
        key = (system, level)
        prefix = self._prefixes.get(key)
        if prefix is None:
            prefix = _format_prefix(_format_stamp(now), self.instance_id, level, system=system)
            self._prefixes[key] = prefix
        return prefix

    def _drop_notice(self) -> bytes:
        """The SYS WARN line owed for earlier drops (empty when nothing was dropped)."""
        lead = b"\n" if self._torn else b""  # end the line a partial write left unterminated
        if not self._unreported_drops:
            return lead
        message = (
            f"{self._unreported_drops} log line(s) were dropped because the log could not "
            f"be written: {self._last_error}"
        )
        return lead + _render(self._prefix(LogLevel.WARN, system=True), [message.encode()])

    # -- writing ----------------------------------------------------------------------------

    def _write_held(self) -> bool:
        """Write the held host lines (with the lock held); False when none were held."""
        if not self._held:
            return False
        self._append([], console=False)
        return True

    def _append(self, pieces: list[Buffer], *, console: bool) -> None:
        if self._closed:
            return
        # Held host lines go first: they were said before whatever is written now.
        held, self._held = self._held, []
        held_length = sum(map(len, held))
        length = sum(map(len, pieces))
        if not length and not held_length:
            return
        try:
            size = self._current_size()
            if self.cap_bytes is not None:
                if console:
                    capped = self._apply_cap(b"".join(pieces), size + held_length)
                    pieces, length = [capped], len(capped)
            elif size > 0 and size + held_length + length > self.max_bytes:
                self._rotate()
                self._current_size()
        except OSError as exc:
            self._lost(b"".join([*held, *pieces]), exc)
            return
        if held_length:
            pieces = [*held, *pieces]
            length += held_length
        if length:
            notice = self._drop_notice()
            self._write([notice, *pieces] if notice else pieces, len(notice))

    def _apply_cap(self, data: bytes, size: int) -> bytes:
        """The part of `data` that fits under the cap, plus the one-time WARN line."""
        assert self.cap_bytes is not None
        if self.cap_reached:
            self.discarded_lines += data.count(b"\n")
            return b""
        budget = self.cap_bytes - size
        if len(data) <= budget:
            return data
        # Whole lines only: cut after the last LF that still fits.
        cut = data.rfind(b"\n", 0, budget) + 1 if budget > 0 else 0
        self.cap_reached = True
        self.discarded_lines += data.count(b"\n", cut)
        message = (
            f"Reached maximum allowed output size for this run ({self.cap_bytes} bytes); "
            "further output is discarded."
        )
        return data[:cut] + _render(self._prefix(LogLevel.WARN, system=False), [message.encode()])

    def _write(self, pieces: list[Buffer], notice_len: int) -> None:
        assert self._file is not None
        total = sum(map(len, pieces))
        written = 0
        try:
            if len(pieces) == 1:
                view = memoryview(pieces[0])
                while written < total:
                    count = self._file.write(view[written:])
                    if not count:  # a regular file never does this; do not spin if one does
                        raise OSError(errno.EIO, os.strerror(errno.EIO))
                    written += count
            else:
                fd = self._file.fileno()
                while written < total:
                    count = os.writev(fd, _after(pieces, written))
                    if not count:
                        raise OSError(errno.EIO, os.strerror(errno.EIO))
                    written += count
        except OSError as exc:
            self._partial_failure(b"".join(pieces), notice_len, written, exc)
            return
        self._unreported_drops = 0
        self._torn = False
        if self._on_written is not None:
            self._on_written(written)

    def _partial_failure(self, payload: bytes, notice_len: int, written: int, exc: OSError) -> None:
        if written >= notice_len:
            self._unreported_drops = 0  # the notice reached the file
        if written:
            self._torn = payload[written - 1] != _LF
        self._lost(payload[max(written, notice_len) :], exc)

    def _lost(self, unwritten: bytes, exc: OSError) -> None:
        # Every line whose LF did not reach the file is lost, including one cut in the middle.
        lost = unwritten.count(b"\n")
        self.dropped_lines += lost
        self._unreported_drops += lost
        self._last_error = exc.strerror or str(exc)
        # Reopen on the next write: the folder may have been removed, the fd may be stale.
        self._drop_file()

    # -- file management --------------------------------------------------------------------

    def _current_size(self) -> int:
        """Open (or reopen) the file the path names now, and return its size."""
        try:
            # Not following a link: what names our file is our file, anything else is reopened.
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and self._file is not None and self._identity == (st.st_dev, st.st_ino):
            if self._open_logs is not None:
                self._open_logs.used(self)
            return st.st_size
        self._drop_file()
        if self._create_folder:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file = self._opener(self.path)
        except safeopen.UnsafeFileError as error:
            if not safeopen.remove_unsafe(self.path, error):
                raise
            self._file = self._opener(self.path)
        fst = os.fstat(self._file.fileno())
        self._identity = (fst.st_dev, fst.st_ino)
        if self._open_logs is not None:
            self._open_logs.opened(self)
        return fst.st_size

    def _rotate(self) -> None:
        """Shift the generations and move the log to the first one (best-effort)."""
        self._drop_file()  # our fd would follow the file to its rotated name
        rotated = _rotation_paths(self.path.parent, self._rotated_name, self._generations)
        try:
            if not rotated:
                self.path.unlink(missing_ok=True)
                return
            for older, newer in reversed(list(itertools.pairwise(rotated))):
                _replace_if_exists(older, newer)
            self.path.replace(rotated[0])
        except OSError:
            # Rotation is housekeeping: when it fails the line still goes to the current log.
            pass

    def _drop_file(self) -> None:
        file, self._file, self._identity = self._file, None, None
        if file is not None:
            if self._open_logs is not None:
                self._open_logs.dropped(self)
            try:
                file.close()
            except OSError:
                pass


def _after(pieces: list[Buffer], offset: int) -> list[Buffer]:
    """What is left of `pieces` once their first `offset` bytes were written."""
    if not offset:
        return pieces
    for index, piece in enumerate(pieces):
        if offset < len(piece):
            return [memoryview(piece)[offset:], *pieces[index + 1 :]]
        offset -= len(piece)
    return []


def _rotation_paths(folder: Path, rotated_name: str, generations: int) -> list[Path]:
    """`job_prev_log.txt`, `job_prev_log.2.txt`, ... newest first."""
    base = Path(rotated_name)
    names = [rotated_name] + [f"{base.stem}.{n}{base.suffix}" for n in range(2, generations + 1)]
    return [folder / name for name in names[:generations]]


def _replace_if_exists(source: Path, target: Path) -> None:
    try:
        source.replace(target)
    except FileNotFoundError:
        pass


class LineSplitter:
    """Turns byte chunks into complete lines, in bounded memory.

    Lines end at LF; one trailing CR is removed (CRLF), even when CR and LF arrive in different
    chunks. A line longer than `max_line_bytes` is emitted in pieces of exactly that size (the
    last piece shorter), the first pieces as soon as they are known, so the splitter never holds
    more than `max_line_bytes + 1` bytes between calls. Empty lines are kept.
    """

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be >= 1")
        self._max = max_line_bytes
        self._partial = bytearray()

    def feed_block(self, chunk: bytes) -> bytes:
        """The complete lines the chunk ends, as one block: each line ends with LF, CR-LF is
        LF, no line is longer than `max_line_bytes`. Empty when no line ended."""
        last = chunk.rfind(b"\n")
        if last < 0:
            self._partial += chunk
            return self._drain_partial()
        if self._partial:
            # One copy: the partial line and the chunk's complete lines straight into the block.
            block = b"".join((self._partial, memoryview(chunk)[: last + 1]))
            self._partial = bytearray(memoryview(chunk)[last + 1 :])
        else:
            block = chunk if last == len(chunk) - 1 else chunk[: last + 1]
            self._partial += memoryview(chunk)[last + 1 :]
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n")
        if len(block) > self._max:
            block = self._cut_long_lines(block)
        return block + self._drain_partial() if len(self._partial) > self._max else block

    def flush_block(self) -> bytes:
        """The unterminated rest at EOF as a block (empty if it is empty or only a CR)."""
        rest, self._partial = bytes(self._partial), bytearray()
        if rest.endswith(b"\r"):
            rest = rest[:-1]
        return b"".join(piece + b"\n" for piece in self._pieces(rest)) if rest else b""

    def _cut_long_lines(self, block: bytes) -> bytes:
        lines = block.split(b"\n")
        lines.pop()  # the empty string after the final LF
        if max(map(len, lines)) <= self._max:
            return block
        return b"".join(piece + b"\n" for line in lines for piece in self._pieces(line))

    def _pieces(self, line: bytes) -> list[bytes]:
        # `or [line]`: an empty line is a line too, not zero pieces.
        return [line[i : i + self._max] for i in range(0, len(line), self._max)] or [line]

    def _drain_partial(self) -> bytes:
        """Pieces of a partial line longer than the maximum, as lines of a block."""
        pieces: list[bytes] = []
        partial = self._partial
        # Keep max+1 bytes when the last one is CR: it may be the CR of a CRLF still to come,
        # and emitting it now would leave an empty line behind.
        while len(partial) > self._max and not (
            len(partial) == self._max + 1 and partial[-1] == _CR
        ):
            pieces.append(bytes(partial[: self._max]))
            pieces.append(b"\n")
            del partial[: self._max]
        return b"".join(pieces)


class OutputCapture:
    """One output pipe of a job into complete-line blocks: `feed` each chunk as it is read,
    `close` at EOF. `on_block` gets what `LineSplitter.feed_block` makes of each chunk, so
    `JobLogWriter.console_block` writes one chunk's lines with one write.

    Fed from the pipe's `data_received` as the bytes arrive: no StreamReader in between, whose
    buffer would copy every byte twice more, and whose reading task would add a loop turn per
    chunk. A pipe that floods is fed by its reader thread instead (`runtime.pipereader`), never
    by both at once. `on_activity` is called for every chunk, empty lines included (idle
    timeouts).
    """

    def __init__(
        self,
        on_block: Callable[[bytes], None],
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        on_activity: Callable[[], None] | None = None,
    ) -> None:
        self._on_block = on_block
        self._on_activity = on_activity
        self._splitter = LineSplitter(max_line_bytes)
        self._closed = False

    def feed(self, chunk: bytes) -> None:
        if self._closed:
            return
        if self._on_activity is not None:
            self._on_activity()
        if block := self._splitter.feed_block(chunk):
            self._on_block(block)

    def close(self) -> None:
        """EOF: the unterminated rest goes out as a last line. Later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if rest := self._splitter.flush_block():
            self._on_block(rest)
