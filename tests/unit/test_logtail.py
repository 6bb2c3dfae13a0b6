"""LogTail over real files: whole lines by offset, rotation and truncation, tails, UTF-8 cuts."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from webjobsd.records import logtail
from webjobsd.records.logtail import Chunk, ChunkKind, LogTail, LogWakeups, Start


def lines(*texts: str) -> list[str]:
    return list(texts)


def test_only_whole_lines_are_read_and_the_offset_follows_them(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    log.write_bytes(b"one\ntwo\nthr")
    tail = LogTail(log, Start(offset=0))
    assert tail.read() == [Chunk(ChunkKind.LINES, 8, ["one", "two"])]
    assert tail.read() == []
    with log.open("ab") as f:
        f.write(b"ee\n")
    assert tail.read() == [Chunk(ChunkKind.LINES, 14, ["three"])]
    tail.close()


def test_final_read_returns_the_unterminated_rest(tmp_path: Path) -> None:
    log = tmp_path / "output_log.txt"
    log.write_bytes(b"a\nlast")
    tail = LogTail(log, Start(offset=2))
    assert tail.read() == []
    assert tail.read(final=True) == [Chunk(ChunkKind.LINES, 6, ["last"])]
    tail.close()


def test_rotation_reads_the_old_file_to_its_end_before_the_new_one(tmp_path: Path) -> None:
    """Lines appended to the old file after our last read, and its unterminated rest, come
    before `rotated`; then the new file from 0."""
    log = tmp_path / "job_log.txt"
    log.write_bytes(b"1\n")
    tail = LogTail(log, Start(offset=0))
    assert tail.read() == [Chunk(ChunkKind.LINES, 2, ["1"])]
    with log.open("ab") as f:
        f.write(b"2\n3")
    log.rename(tmp_path / "job_prev_log.txt")
    assert tail.read() == [Chunk(ChunkKind.LINES, 4, ["2"])]
    log.write_bytes(b"4\n")
    assert tail.read() == [Chunk(ChunkKind.LINES, 5, ["3"]), Chunk(ChunkKind.ROTATED, 0)]
    assert tail.read() == [Chunk(ChunkKind.LINES, 2, ["4"])]
    tail.close()


def test_a_missing_path_after_a_rename_waits_for_the_new_file(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    log.write_bytes(b"1\n")
    tail = LogTail(log, Start(offset=0))
    tail.read()
    log.rename(tmp_path / "job_prev_log.txt")
    assert tail.read() == []
    log.write_bytes(b"2\n")
    assert tail.read() == [Chunk(ChunkKind.ROTATED, 0)]
    assert tail.read() == [Chunk(ChunkKind.LINES, 2, ["2"])]
    tail.close()


def test_truncation_restarts_at_zero(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    log.write_bytes(b"long line\n")
    tail = LogTail(log, Start(offset=0))
    tail.read()
    os.truncate(log, 0)
    with log.open("ab") as f:
        f.write(b"x\n")
    assert tail.read() == [Chunk(ChunkKind.TRUNCATED, 0)]
    assert tail.read() == [Chunk(ChunkKind.LINES, 2, ["x"])]
    tail.close()


def test_a_resume_offset_beyond_the_file_means_it_was_rotated(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    log.write_bytes(b"new\n")
    tail = LogTail(log, Start(offset=1000))
    assert tail.read() == [Chunk(ChunkKind.ROTATED, 0)]
    assert tail.read() == [Chunk(ChunkKind.LINES, 4, ["new"])]
    tail.close()


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        (Start(lines=2), ["c", "d"]),
        (Start(lines=10), ["a", "b", "c", "d"]),
        (Start(lines=0), []),
        (Start(max_bytes=4), ["c", "d"]),  # "b\nc\nd\n" has 6 bytes: starts at "c"
        (Start(max_bytes=5), ["c", "d"]),  # cuts inside "b\n": the next whole line
        (Start(max_bytes=6), ["b", "c", "d"]),
    ],
)
def test_tails_start_at_a_line(tmp_path: Path, start: Start, expected: list[str]) -> None:
    log = tmp_path / "job_log.txt"
    log.write_bytes(b"a\nb\nc\nd\n")
    tail = LogTail(log, start)
    got = [line for chunk in tail.read() for line in chunk.lines]
    assert got == expected
    tail.close()


def test_tail_lines_scan_several_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logtail, "_SCAN_BLOCK", 3)
    log = tmp_path / "job_log.txt"
    log.write_bytes(b"".join(f"line{i}\n".encode() for i in range(10)))
    tail = LogTail(log, Start(lines=3))
    assert tail.read()[0].lines == ["line7", "line8", "line9"]
    tail.close()


def test_a_line_longer_than_a_batch_is_cut_between_characters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logtail, "BATCH_BYTES", 5)
    log = tmp_path / "job_log.txt"
    log.write_bytes("abcé\n".encode() + "€x\n".encode())  # é is 2 bytes, € is 3
    tail = LogTail(log, Start(offset=0))
    assert tail.read() == [Chunk(ChunkKind.LINES, 5, ["abcé"])]  # the 5th byte is not LF
    # The LF of the cut line ends no line of its own.
    assert tail.read() == [Chunk(ChunkKind.LINES, 10, ["€x"])]
    assert tail.read() == []
    assert tail.offset == 11
    tail.close()


def test_carriage_returns_split_lines_as_sse_would(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    log.write_bytes(b"a\rb\r\nc\n\xff\n")
    tail = LogTail(log, Start(offset=0))
    assert tail.read()[0].lines == ["a", "b", "c", "\ufffd"]
    tail.close()


async def test_wakeups_reach_subscribers_of_the_job_and_close_wakes_all() -> None:
    wakeups = LogWakeups()
    with wakeups.subscribe("a") as a, wakeups.subscribe("b") as b:
        wakeups.written("a", 10)
        assert a.is_set() and not b.is_set()
        wakeups.close()
        assert b.is_set()
        with wakeups.subscribe("c") as c:
            assert c.is_set()
    assert wakeups.subscribers == 0
    await asyncio.sleep(0)


def test_an_offset_inside_a_character_starts_at_the_next_one(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    log.write_bytes("a€b\n".encode())
    tail = LogTail(log, Start(offset=2))  # the second byte of €
    assert tail.read() == [Chunk(ChunkKind.LINES, 6, ["b"])]
    tail.close()
