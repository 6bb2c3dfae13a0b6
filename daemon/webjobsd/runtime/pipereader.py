"""A thread that reads one output pipe of a job that floods, instead of the event loop.

A pipe starts on the event loop (`jobprocess._JobProtocol`): most jobs write little, and a thread
per pipe would cost a stack and a wake-up each. Once a pipe has carried `pipesize`'s threshold
and a single read still finds `FLOOD_READ_BYTES` waiting (the job writes faster than the loop
reads), `jobprocess` pauses the loop's reading of that pipe and hands it to a `PipeReader`:

* **Large reads, no loop turn per chunk.** The thread reads up to `READ_BYTES` at a time and
  feeds the pipe's `OutputCapture` itself; the log writer renders and writes from this thread.
  Reads, polls and writes release the GIL, so the event loop keeps answering meanwhile; the
  rendering in between holds it for well under a millisecond per chunk.
* **Why `READ_BYTES` is 512 KiB and not the 1 MiB of the pipe.** A chunk and its rendered copy
  (1.37 times larger with Kudu's prefix) stay under glibc's mmap threshold (`webjobsd.malloc`),
  so they reuse heap pages instead of faulting fresh ones in for every chunk.
* **Bounded.** At most `MAX_READERS` threads at once (more would not help on a few cores); the
  other pipes stay on the loop. A reader whose pipe stays quiet for `IDLE_S` hands the pipe back
  to the loop and ends, so only pipes that flood now hold a thread.
* **End.** At EOF, or when `stop` is asked (the job ended but a descendant holds the pipe), the
  thread closes the capture itself (the unterminated last line goes out after everything read
  before it) and only then tells the loop, which closes the pipe. The loop never closes a pipe
  that a thread may still read.

Why a `poll` with a wake-up pipe rather than a plain blocking read: `stop` must be able to end a
reader whose pipe is held open by a process that writes nothing, and closing a descriptor under
a blocked `read` would let the number be reused while the thread still holds it.
"""

from __future__ import annotations

import asyncio
import enum
import os
import select
import threading
from collections.abc import Callable
from typing import Final

import structlog

from webjobsd.records.joblog import OutputCapture

log = structlog.get_logger("webjobsd.process")

READ_BYTES: Final = 512 * 1024
FLOOD_READ_BYTES: Final = 64 * 1024
MAX_READERS: Final = 8
IDLE_S: Final = 5.0

_POLL_IN: Final = select.POLLIN | select.POLLHUP | select.POLLERR


class Ending(enum.Enum):
    EOF = "eof"  # the pipe reached its end (or failed): the capture is closed
    STOPPED = "stopped"  # `stop` was asked: the capture is closed
    IDLE = "idle"  # quiet for IDLE_S: the capture is open, the loop reads the pipe again


class _Budget:
    """Readers running now; used from the event loop thread only."""

    def __init__(self) -> None:
        self.running = 0


_budget = _Budget()


def available() -> bool:
    """Whether another pipe may get a reader thread now (event loop thread only)."""
    return _budget.running < MAX_READERS


class PipeReader:
    """Reads `fd` (non-blocking, owned by the caller) into `capture` until EOF, `stop` or idle.

    `on_end` is called on `loop` once the thread is done with `fd` and `capture`.
    """

    def __init__(
        self,
        fd: int,
        capture: OutputCapture,
        loop: asyncio.AbstractEventLoop,
        on_end: Callable[[Ending], None],
    ) -> None:
        self._fd = fd
        self._capture = capture
        self._loop = loop
        self._on_end = on_end
        self._wake_read, self._wake_write = os.pipe()
        self._stopping = False
        self._done = False  # `on_end` was called; the wake-up pipe is closed
        self._thread = threading.Thread(target=self._run, name=f"pipe-reader-{fd}", daemon=True)

    def start(self) -> None:
        _budget.running += 1
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end (it closes the capture); `on_end` follows."""
        if not self._stopping and not self._done:
            self._stopping = True
            # The wake-up pipe is closed on the loop only, after the thread ended: this never
            # writes to a number that was closed and reused.
            os.write(self._wake_write, b"x")

    def _run(self) -> None:
        ending = Ending.EOF
        try:
            ending = self._read_until_end()
        except Exception:
            log.exception("pipe reader failed", fd=self._fd)
        if ending is not Ending.IDLE:
            try:
                self._capture.close()
            except Exception:
                log.exception("output capture failed", fd=self._fd)
        try:
            self._loop.call_soon_threadsafe(self._ended, ending)
        except RuntimeError:  # the loop is closed: nobody waits for this pipe any more
            pass

    def _read_until_end(self) -> Ending:
        poller = select.poll()
        poller.register(self._fd, _POLL_IN)
        poller.register(self._wake_read, select.POLLIN)
        idle_ms = int(IDLE_S * 1000)
        while not self._stopping:
            try:
                chunk = os.read(self._fd, READ_BYTES)
            except BlockingIOError:
                # Nothing waiting: sleep until there is, or until `stop`, or hand back when idle.
                if not poller.poll(idle_ms):
                    return Ending.IDLE
                continue
            except OSError as error:
                log.warning("cannot read job output", fd=self._fd, error=str(error))
                return Ending.EOF
            if not chunk:
                return Ending.EOF
            try:
                self._capture.feed(chunk)
            except Exception:
                # As on the loop: a log that cannot take the output must not stop the reading.
                log.exception("output capture failed", fd=self._fd)
        return Ending.STOPPED

    def _ended(self, ending: Ending) -> None:
        _budget.running -= 1
        self._thread.join()  # it has posted this as its last act: returns at once
        self._done = True
        os.close(self._wake_read)
        os.close(self._wake_write)
        if ending is Ending.IDLE and self._stopping:
            # `stop` came after the thread saw the quiet pipe: end the capture as asked.
            try:
                self._capture.close()
            except Exception:
                log.exception("output capture failed", fd=self._fd)
            ending = Ending.STOPPED
        self._on_end(ending)


def on_loop(callback: Callable[[int], None]) -> Callable[[int], None]:
    """`callback`, safe to call from a reader thread: counts from other threads are summed and
    delivered on the event loop that was running when this was made (one wake-up at a time)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return callback
    return _OnLoop(callback, loop)


class _OnLoop:
    # One per job log, for as long as the job is known: slots, not closures and their cells.
    __slots__ = ("_callback", "_lock", "_loop", "_loop_thread", "_pending")

    def __init__(self, callback: Callable[[int], None], loop: asyncio.AbstractEventLoop) -> None:
        self._callback = callback
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        self._pending = 0

    def __call__(self, n: int) -> None:
        if threading.get_ident() == self._loop_thread:
            self._callback(n)
            return
        with self._lock:
            first = self._pending == 0
            self._pending += n
        if first:
            try:
                self._loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed
                pass

    def _deliver(self) -> None:
        with self._lock:
            count, self._pending = self._pending, 0
        self._callback(count)
