"""`PipeReader` on real pipes, and a flooding job read by one through `JobProcess`.

1. At EOF the reader closes the capture itself: the unterminated last line comes after
   everything read before it, and only then is the loop told.
2. `stop` ends a reader whose pipe is held open without data; the partial line is not lost.
3. A reader whose pipe stays quiet hands it back with the capture still open.
4. A job that floods is read by a reader thread; when it is stopped, every line it wrote is in
   its log, the last unterminated one included, and the thread is gone.
5. Byte counts from a reader thread reach the loop summed (`on_loop`).
6. The log writer takes writes from several threads without mixing their lines.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import wait_for
from webjobsd.records.joblog import JobLogWriter, LogLevel, OutputCapture
from webjobsd.runtime import pipereader
from webjobsd.runtime.jobprocess import JobProcess
from webjobsd.runtime.pipereader import Ending, PipeReader


async def start_reader(
    blocks: list[bytes],
) -> tuple[PipeReader, int, asyncio.Future[Ending]]:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[Ending] = loop.create_future()

    def on_end(ending: Ending) -> None:
        os.close(read_end)
        ended.set_result(ending)

    reader = PipeReader(read_end, OutputCapture(blocks.append), loop, on_end)
    reader.start()
    return reader, write_end, ended


async def test_eof_closes_the_capture_before_the_loop_is_told() -> None:
    blocks: list[bytes] = []
    _reader, write_end, ended = await start_reader(blocks)
    data = b"".join(b"line %d\n" % n for n in range(100_000)) + b"last, unterminated"
    await asyncio.to_thread(_write_all, write_end, data)
    os.close(write_end)
    assert await asyncio.wait_for(ended, 10) is Ending.EOF
    assert b"".join(blocks) == data + b"\n"


async def test_stop_ends_a_reader_of_a_silent_pipe_and_keeps_the_partial_line() -> None:
    blocks: list[bytes] = []
    reader, write_end, ended = await start_reader(blocks)
    try:
        os.write(write_end, b"one\ntwo, unterminated")
        await wait_for(lambda: blocks, what="the first line")
        reader.stop()
        assert await asyncio.wait_for(ended, 10) is Ending.STOPPED
        assert b"".join(blocks) == b"one\ntwo, unterminated\n"
    finally:
        os.close(write_end)


async def test_a_quiet_pipe_is_handed_back_with_the_capture_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pipereader, "IDLE_S", 0.05)
    blocks: list[bytes] = []
    _reader, write_end, ended = await start_reader(blocks)
    try:
        os.write(write_end, b"one\ntwo")
        assert await asyncio.wait_for(ended, 10) is Ending.IDLE
        assert blocks == [b"one\n"]  # "two" waits for its end of line, as on the loop
    finally:
        os.close(write_end)


async def test_a_flooding_job_is_read_by_a_thread_and_loses_nothing_when_stopped(
    tmp_path: Path,
) -> None:
    log = JobLogWriter(tmp_path / "job_log.txt", "i0", max_bytes=1 << 40)
    readers: set[str] = set()

    def on_stdout(block: bytes) -> None:
        readers.add(threading.current_thread().name)
        log.console_block(LogLevel.INFO, block)

    # One write of 4 MiB keeps the pipe full whenever the daemon reads: a flood.
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "out = sys.stdout.buffer\n"
        "out.write(b''.join(b'%07d\\n' % n for n in range(512 * 1024)) + b'tail')\n"
        "out.flush()\n"
        "open('written', 'w').close()\n"
        "time.sleep(60)\n"
    )
    process = await JobProcess.spawn(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=dict(os.environ),
        token=f"test-{tmp_path.name}",
        on_stdout=on_stdout,
        on_stderr=lambda block: log.console_block(LogLevel.ERR, block),
        max_line_bytes=1024 * 1024,
    )
    try:
        await wait_for(lambda: (tmp_path / "written").exists(), what="the flood written")
        assert await process.stop(10) is True
    finally:
        await process.close()
        log.close()
    assert any(name.startswith("pipe-reader-") for name in readers), readers
    assert not [t for t in threading.enumerate() if t.name.startswith("pipe-reader-")]
    lines = (tmp_path / "job_log.txt").read_bytes().split(b"\n")
    body = [line.partition(b"] ")[2] for line in lines[:-1]]
    assert body == [b"%07d" % n for n in range(512 * 1024)] + [b"tail"]


async def test_counts_from_a_thread_reach_the_loop_summed() -> None:
    received: list[int] = []
    count = pipereader.on_loop(received.append)
    count(5)  # on the loop: at once
    assert received == [5]
    thread = threading.Thread(target=lambda: [count(n) for n in (1, 2, 3)])
    thread.start()
    thread.join()
    await wait_for(lambda: sum(received) == 11, what="the counts")
    assert len(received) == 2  # one delivery for the three


def test_writes_from_several_threads_keep_their_lines_whole(tmp_path: Path) -> None:
    path = tmp_path / "job_log.txt"
    with JobLogWriter(path, "i0", max_bytes=64 * 1024, generations=50) as writer:

        def flood(tag: bytes) -> None:
            for n in range(300):
                writer.console_block(LogLevel.INFO, b"%s %d\n" % (tag, n) * 20)
                writer.system(LogLevel.INFO, f"{tag.decode()} {n}")

        threads = [threading.Thread(target=flood, args=(tag,)) for tag in (b"a", b"b", b"c")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    files = sorted(tmp_path.iterdir())
    lines = [line for file in files for line in file.read_bytes().splitlines()]
    assert len(lines) == 3 * 300 * 21
    assert all(line.startswith(b"[") and line.count(b"]") == 1 for line in lines)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
