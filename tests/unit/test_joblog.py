"""The job log: exact line format, splitting of a job's output, rotation, cap and I/O failures."""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from io import FileIO, RawIOBase
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from webjobsd.records import joblog
from webjobsd.records.joblog import JobLogWriter, LineSplitter, LogLevel, OutputCapture

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

MiB = 1024 * 1024
T0 = datetime(2017, 2, 10, 16, 10, 43, 987654, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def make_writer(path: Path, **kwargs: object) -> JobLogWriter:
    kwargs.setdefault("clock", FakeClock())
    return JobLogWriter(path, "af2b06", **kwargs)  # type: ignore[arg-type]


def read_lines(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8").split("\n")[:-1]


# -- line format ----------------------------------------------------------------------------


def test_exact_line_format_with_lf(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    with make_writer(log) as writer:
        writer.system(LogLevel.INFO, "Status changed to Starting")
        writer.console(LogLevel.INFO, b"hello")
        writer.console(LogLevel.ERR, "boom")
        writer.system(LogLevel.ERR, "Job failed due to exit code 1")
        writer.system(LogLevel.WARN, "careful")
        writer.console_lines(LogLevel.INFO, [b"one", b"", b"three"])

    assert log.read_bytes() == (
        b"[02/10/2017 16:10:43 > af2b06: SYS INFO] Status changed to Starting\n"
        b"[02/10/2017 16:10:43 > af2b06: INFO] hello\n"
        b"[02/10/2017 16:10:43 > af2b06: ERR ] boom\n"
        b"[02/10/2017 16:10:43 > af2b06: SYS ERR ] Job failed due to exit code 1\n"
        b"[02/10/2017 16:10:43 > af2b06: SYS WARN] careful\n"
        b"[02/10/2017 16:10:43 > af2b06: INFO] one\n"
        b"[02/10/2017 16:10:43 > af2b06: INFO] \n"
        b"[02/10/2017 16:10:43 > af2b06: INFO] three\n"
    )


def test_timestamp_is_utc_and_follows_the_clock(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    clock = FakeClock(datetime(2024, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))
    with make_writer(log, clock=clock) as writer:
        writer.console(LogLevel.INFO, b"a")
        clock.now += timedelta(microseconds=1)  # the cached prefix must not outlive its second
        writer.console(LogLevel.INFO, b"b")
        clock.now = datetime(2025, 1, 1, 2, 0, 0, tzinfo=timezone(timedelta(hours=2)))
        writer.console(LogLevel.INFO, b"c")

    assert read_lines(log) == [
        "[12/31/2024 23:59:59 > af2b06: INFO] a",
        "[01/01/2025 00:00:00 > af2b06: INFO] b",
        "[01/01/2025 00:00:00 > af2b06: INFO] c",
    ]


def test_multi_line_system_message_becomes_several_sys_lines(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    with make_writer(log) as writer:
        writer.system(LogLevel.ERR, "Traceback:\r\n  line 1\n  line 2")

    assert read_lines(log) == [
        "[02/10/2017 16:10:43 > af2b06: SYS ERR ] Traceback:",
        "[02/10/2017 16:10:43 > af2b06: SYS ERR ]   line 1",
        "[02/10/2017 16:10:43 > af2b06: SYS ERR ]   line 2",
    ]


def test_binary_garbage_is_written_as_one_line_of_text_each(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    garbage = [
        bytes(range(256)),  # every byte value, LF and CR included
        b"nul\x00inside\tTAB kept",
        b"\xff\xfe invalid \xc3( utf-8 \xe2\x82",
        "caf\u00e9 \U0001f600 \u0085nel".encode(),
        b"\x1b[31mred\x1b[0m",
    ]
    with make_writer(log) as writer:
        writer.console_lines(LogLevel.INFO, garbage)
        writer.console(LogLevel.ERR, b"single\nwith LF\r\nand CRLF")

    text = log.read_bytes().decode("utf-8")  # strict: the file is valid UTF-8
    lines = text.split("\n")[:-1]
    assert len(lines) == len(garbage) + 1
    controls = {chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]} - {"\t", "\n"}
    assert not controls & set(text)
    assert lines[1].endswith("] nul\ufffdinside\tTAB kept")
    assert lines[2].endswith("] \ufffd\ufffd invalid \ufffd( utf-8 \ufffd")
    assert lines[3].endswith("] caf\u00e9 \U0001f600 \ufffdnel")
    assert lines[4].endswith("] \ufffd[31mred\ufffd[0m")
    assert lines[5].endswith(": ERR ] single\ufffdwith LF\ufffd\ufffdand CRLF")


def lines_of(block: bytes) -> list[bytes]:
    """The lines of a block from `LineSplitter` (each ends with LF)."""
    return block.split(b"\n")[:-1]


def feed(splitter: LineSplitter, chunk: bytes) -> list[bytes]:
    return lines_of(splitter.feed_block(chunk))


def flush(splitter: LineSplitter) -> list[bytes]:
    return lines_of(splitter.flush_block())


# -- rendering against a reference ----------------------------------------------------------

PREFIX = b"[02/10/2017 16:10:43 > af2b06: INFO] "
CONTROLS_BUT_LF = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]")
CONTROLS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|\xc2[\x80-\x9f]")
REPLACEMENT = "\ufffd".encode()

# Text that needs no change: printable ASCII, TAB, valid UTF-8 including 0xC2 sequences that
# are not C1 controls (NBSP, degree sign), U+2028.
PLAIN = [b"a", b"Z", b"0", b" ", b"~", b"\t", b"x" * 40]
PLAIN += [char.encode() for char in "\u00e9\u00a0\u00b0\u20ac\U0001f600\u2028"]
# Every kind of byte that must be replaced, and near misses around the C1 controls.
TRICKY = [bytes([byte]) for byte in b"\x00\x01\x08\n\x0b\x0c\r\x1b\x1f\x7f\x80\x85\xff"]
TRICKY += b"\xc2 \xc2\x80 \xc2\x85 \xc2\x9f \xc2\xa0 \xc2\x7f \xc2\xc2".split()
TRICKY += b"\xe2\x82 \xed\xa0\x80 \xf4\x90\x80\x80 \xc0\xaf".split()  # invalid UTF-8


def reference_render(lines: list[bytes]) -> bytes:
    """The straightforward definition: one regex over every byte, then UTF-8 repair."""
    if not lines:
        return b""
    joined = b"\n".join(lines)
    if joined.count(b"\n") == len(lines) - 1:
        joined = CONTROLS_BUT_LF.sub(REPLACEMENT, joined)
    else:
        joined = b"\n".join([CONTROLS.sub(REPLACEMENT, line) for line in lines])
    joined = joined.decode("utf-8", "replace").encode("utf-8")
    return PREFIX + joined.replace(b"\n", b"\n" + PREFIX) + b"\n"


def written(path: Path, batches: list[list[bytes]]) -> bytes:
    with make_writer(path, max_bytes=1 << 40) as writer:
        for batch in batches:
            writer.console_lines(LogLevel.INFO, batch)
    data = path.read_bytes()
    data.decode("utf-8")  # strict
    assert data.count(b"\n") == sum(map(len, batches))
    return data


def random_line(rng: random.Random, tricky: bool) -> bytes:
    tokens = PLAIN + TRICKY if tricky else PLAIN
    line = b"".join(rng.choices(tokens, k=rng.choice([0, 1, 2, 5, 12])))
    if rng.random() < 0.02:  # a long line, with what it holds at either end or inside
        filler = b"".join(rng.choices(PLAIN, k=3000))
        cut = rng.randrange(len(filler) + 1)
        line = rng.choice([line + filler, filler + line, filler[:cut] + line + filler[cut:]])
    return line


def test_random_batches_render_like_the_reference(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    batches: list[list[bytes]] = []
    for _ in range(3000):
        tricky = rng.random() < 0.5
        lines = [random_line(rng, tricky) for _ in range(rng.choice([1, 1, 2, 3, 8]))]
        if tricky and rng.random() < 0.3:  # a control right at an edge of the batch
            edge = rng.choice(TRICKY)
            lines[0], lines[-1] = rng.choice(
                [(edge + lines[0], lines[-1]), (lines[0], lines[-1] + edge)]
            )
        batches.append(lines)

    assert written(tmp_path / "log.txt", batches) == b"".join(map(reference_render, batches))


def test_blocks_render_like_the_reference(tmp_path: Path) -> None:
    """`console_block`, the capture path: its LFs are the separators, the rest as lines."""
    rng = random.Random(20261128)
    batches: list[list[bytes]] = []
    for _ in range(3000):
        tricky = rng.random() < 0.5
        count = rng.choice([1, 1, 2, 3, 8, 200])
        batches.append([random_line(rng, tricky).replace(b"\n", b"") for _ in range(count)])
    batches += [[b""], [b"", b""], [b"\xc2"], [b"\x85"], [b"a\xc2", b"\x85b"], [b"\r"]]
    log = tmp_path / "log.txt"
    with make_writer(log, max_bytes=1 << 40) as writer:
        for batch in batches:
            writer.console_block(LogLevel.INFO, b"".join(line + b"\n" for line in batch))
        writer.console_block(LogLevel.INFO, b"")
        writer.console_block(LogLevel.INFO, b"no LF at the end")
    assert log.read_bytes() == b"".join(map(reference_render, [*batches, [b"no LF at the end"]]))


def test_edge_cases_render_like_the_reference(tmp_path: Path) -> None:
    batches = [
        [b""],
        [b"", b"", b""],
        [b"\x00"],
        [b"\x7f", b"plain"],
        [b"plain", b"\x1b"],
        [b"\r"],
        [b"tab\tonly\t"],
        [b"ends with lead \xc2", b"\x85 starts with C1 tail"],  # not a C1 control: LF between
        [b"\xc2\xc2\x85", b"\xc2\xa0nbsp", b"\xc2\x7f"],
        [b"\xe2\xc2\x85"],
        [b"line\nwith its own LF", b"plain"],
        [b"\n"],
        ["caf\u00e9 20\u00b0C \u2028 \U0001f600".encode()],
        [b"x" * 200_000 + b"\x01"],
        [b"\x01" + b"x" * 200_000, b"y" * 70_000],
        [b"\xff" * 3, b"\xf0\x9f\x98"],
    ]
    assert written(tmp_path / "log.txt", batches) == b"".join(map(reference_render, batches))


def test_lines_cut_at_max_line_bytes_render_like_the_reference(tmp_path: Path) -> None:
    # Pieces of a long line may end or start in the middle of a UTF-8 sequence or a C1 control.
    rng = random.Random(7)
    batches: list[list[bytes]] = []
    for _ in range(300):
        data = b"".join(rng.choices([*PLAIN, *TRICKY, b"\n", b"\r\n"], k=rng.randrange(1, 80)))
        splitter = LineSplitter(rng.randrange(1, 8))
        start = 0
        for end in sorted(rng.sample(range(len(data) + 1), k=min(len(data) + 1, 4))):
            batches.append(feed(splitter, data[start:end]))
            start = end
        batches += [feed(splitter, data[start:]), flush(splitter)]
    batches = [batch for batch in batches if batch]

    assert written(tmp_path / "log.txt", batches) == b"".join(map(reference_render, batches))


def test_plain_text_is_written_without_rewriting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def rewrite(*_args: object) -> bytes:
        raise AssertionError("a plain batch took the replacing path")

    monkeypatch.setattr(joblog, "_clean", rewrite)
    lines = [
        b"tab\tand text",
        b"",
        "caf\u00e9 \u00a0 20\u00b0C \U0001f600".encode(),
        b"x" * 100_000,
    ]
    assert written(tmp_path / "log.txt", [lines]) == b"".join(
        PREFIX + line + b"\n" for line in lines
    )


# -- rotation -------------------------------------------------------------------------------


def write_numbered(writer: JobLogWriter, count: int) -> None:
    for number in range(count):
        writer.console(LogLevel.INFO, f"line {number:05d}".encode())


def numbers_in(path: Path) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for line in read_lines(path)]


def test_rotation_keeps_exactly_n_generations(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    with make_writer(log, max_bytes=500, generations=3) as writer:
        write_numbered(writer, 200)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "job_log.txt",
        "job_prev_log.2.txt",
        "job_prev_log.3.txt",
        "job_prev_log.txt",
    ]
    oldest_first = ["job_prev_log.3.txt", "job_prev_log.2.txt", "job_prev_log.txt", "job_log.txt"]
    kept = [n for name in oldest_first for n in numbers_in(tmp_path / name)]
    assert kept == list(range(kept[0], 200))  # the newest lines, contiguous, oldest first
    for name in oldest_first:
        assert 0 < (tmp_path / name).stat().st_size <= 500


def test_scheduler_log_rotates_into_the_shared_prev_name(tmp_path: Path) -> None:
    log = tmp_path / "job_scheduler.log"
    with make_writer(log, max_bytes=100, generations=1) as writer:
        write_numbered(writer, 10)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["job_prev_log.txt", "job_scheduler.log"]
    assert numbers_in(tmp_path / "job_prev_log.txt") + numbers_in(log) == [6, 7, 8, 9]


def test_custom_rotated_name_and_zero_generations(tmp_path: Path) -> None:
    with make_writer(tmp_path / "a.log", max_bytes=100, rotated_name="a.old") as writer:
        write_numbered(writer, 20)
    with make_writer(tmp_path / "b.log", max_bytes=100, generations=0) as writer:
        write_numbered(writer, 20)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.2.old",
        "a.3.old",
        "a.log",
        "a.old",
        "b.log",
    ]


def test_writer_follows_a_log_rotated_or_removed_by_someone_else(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    with make_writer(log) as writer:
        writer.console(LogLevel.INFO, b"first")
        log.rename(tmp_path / "elsewhere.txt")  # e.g. another instance rotated it
        writer.console(LogLevel.INFO, b"second")
        log.unlink()
        writer.console(LogLevel.INFO, b"third")

    assert read_lines(tmp_path / "elsewhere.txt") == ["[02/10/2017 16:10:43 > af2b06: INFO] first"]
    assert read_lines(log) == ["[02/10/2017 16:10:43 > af2b06: INFO] third"]
    assert writer.dropped_lines == 0


def test_size_counts_lines_of_other_writers(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    with make_writer(log, max_bytes=1000) as one, make_writer(log, max_bytes=1000) as two:
        one.console(LogLevel.INFO, b"x" * 500)
        two.console(LogLevel.INFO, b"y" * 500)  # would exceed 1000: rotates first
        one.console(LogLevel.INFO, b"z")  # follows the rotation instead of appending to prev

    assert numbers_or_text(tmp_path / "job_prev_log.txt") == ["x" * 500]
    assert numbers_or_text(log) == ["y" * 500, "z"]


def numbers_or_text(path: Path) -> list[str]:
    return [line.split("] ", 1)[1] for line in read_lines(path)]


# -- cap mode -------------------------------------------------------------------------------

CAP_WARNING = (
    "[02/10/2017 16:10:43 > af2b06: WARN] Reached maximum allowed output size for this run "
    "({cap} bytes); further output is discarded."
)


def test_cap_writes_whole_lines_then_one_warning_then_only_system_lines(tmp_path: Path) -> None:
    log = tmp_path / "output_log.txt"
    first = b"[02/10/2017 16:10:43 > af2b06: SYS INFO] Status changed to Running\n"
    line_size = len(b"[02/10/2017 16:10:43 > af2b06: INFO] line 00000\n")
    cap = len(first) + 2 * line_size + 10  # room for two console lines, not three
    with make_writer(log, cap_bytes=cap, max_bytes=1) as writer:
        writer.system(LogLevel.INFO, "Status changed to Running")
        writer.console_lines(LogLevel.INFO, [f"line {n:05d}".encode() for n in range(5)])
        writer.console(LogLevel.ERR, b"dropped")
        writer.system(LogLevel.INFO, "Status changed to Success")

    assert read_lines(log) == [
        "[02/10/2017 16:10:43 > af2b06: SYS INFO] Status changed to Running",
        "[02/10/2017 16:10:43 > af2b06: INFO] line 00000",
        "[02/10/2017 16:10:43 > af2b06: INFO] line 00001",
        CAP_WARNING.format(cap=cap),
        "[02/10/2017 16:10:43 > af2b06: SYS INFO] Status changed to Success",
    ]
    assert writer.cap_reached
    assert writer.discarded_lines == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output_log.txt"]  # no rotation


def test_cap_reached_exactly_keeps_the_last_line(tmp_path: Path) -> None:
    log = tmp_path / "output_log.txt"
    line = b"[02/10/2017 16:10:43 > af2b06: INFO] 0123456789\n"
    with make_writer(log, cap_bytes=2 * len(line)) as writer:
        writer.console(LogLevel.INFO, b"0123456789")
        writer.console(LogLevel.INFO, b"0123456789")
        assert not writer.cap_reached
        writer.console(LogLevel.INFO, b"0")

    assert log.read_bytes().startswith(2 * line)
    assert read_lines(log)[2] == CAP_WARNING.format(cap=2 * len(line))


# -- I/O failures ---------------------------------------------------------------------------


class DiskFullSwitch:
    """Opens the real log, or the kernel's /dev/full (every write fails with ENOSPC)."""

    def __init__(self) -> None:
        self.full = False
        self.opened: list[str] = []

    def __call__(self, path: Path) -> RawIOBase:
        target = "/dev/full" if self.full else path
        self.opened.append(str(target))
        return open(target, "ab", buffering=0)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_enospc_drops_lines_without_raising_then_reports_them(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    disk = DiskFullSwitch()
    with make_writer(log, opener=disk) as writer:
        writer.console(LogLevel.INFO, b"before")
        disk.full = True
        log.unlink()  # make the writer reopen, now onto the full "disk"
        writer.console_lines(LogLevel.INFO, [b"lost 1", b"lost 2"])
        writer.system(LogLevel.INFO, "lost 3")
        assert writer.dropped_lines == 3
        disk.full = False
        writer.console(LogLevel.INFO, b"after")
        writer.console(LogLevel.INFO, b"again")

    assert "/dev/full" in disk.opened
    assert writer.dropped_lines == 3
    assert read_lines(log) == [
        "[02/10/2017 16:10:43 > af2b06: SYS WARN] 3 log line(s) were dropped because the log "
        "could not be written: No space left on device",
        "[02/10/2017 16:10:43 > af2b06: INFO] after",
        "[02/10/2017 16:10:43 > af2b06: INFO] again",
    ]


def test_unopenable_log_drops_lines_without_raising(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    writer = make_writer(blocker / "job_log.txt")
    writer.console(LogLevel.INFO, b"nowhere to go")
    writer.system(LogLevel.INFO, "nor this")
    writer.close()
    writer.console(LogLevel.INFO, b"ignored after close")
    assert writer.dropped_lines == 2


def test_partial_write_at_the_file_size_limit_is_terminated_and_reported(tmp_path: Path) -> None:
    # A real short write followed by EFBIG: RLIMIT_FSIZE in a child process, then raised back.
    script = textwrap.dedent(
        """
        import resource, signal, sys
        from datetime import UTC, datetime
        from pathlib import Path
        from webjobsd.records.joblog import JobLogWriter, LogLevel

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        clock = lambda: datetime(2017, 2, 10, 16, 10, 43, tzinfo=UTC)
        writer = JobLogWriter(Path(sys.argv[1]), "af2b06", clock=clock)
        writer.console(LogLevel.INFO, b"kept")
        resource.setrlimit(resource.RLIMIT_FSIZE, (60, hard))
        writer.console_lines(LogLevel.INFO, [b"torn", b"lost"])
        assert writer.dropped_lines == 2, writer.dropped_lines
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        writer.console(LogLevel.INFO, b"recovered")
        writer.close()
        """
    )
    log = tmp_path / "job_log.txt"
    subprocess.run([sys.executable, "-c", script, str(log)], check=True, timeout=30)

    lines = read_lines(log)
    kept = "[02/10/2017 16:10:43 > af2b06: INFO] kept"
    assert lines[0] == kept
    assert lines[1] == "[02/10/2017 16:10:43 > af2b06: INFO] torn"[: 60 - len(kept) - 1]
    assert lines[2].endswith(
        "SYS WARN] 2 log line(s) were dropped because the log could not be written: File too large"
    )
    assert lines[3] == "[02/10/2017 16:10:43 > af2b06: INFO] recovered"


# -- LineSplitter ---------------------------------------------------------------------------


def split_all(data: bytes, cuts: list[int], max_line_bytes: int = MiB) -> list[bytes]:
    splitter = LineSplitter(max_line_bytes)
    lines: list[bytes] = []
    bounds = [0, *cuts, len(data)]
    for start, end in itertools.pairwise(bounds):
        lines += feed(splitter, data[start:end])
    return lines + flush(splitter)


def reference_split(data: bytes, max_line_bytes: int) -> list[bytes]:
    """The obvious, slow definition the splitter must match for every chunking."""
    *complete, rest = data.split(b"\n")
    lines = [line.removesuffix(b"\r") for line in complete]
    if rest.removesuffix(b"\r"):
        lines.append(rest.removesuffix(b"\r"))
    out: list[bytes] = []
    for line in lines:
        out += [line[i : i + max_line_bytes] for i in range(0, len(line), max_line_bytes)] or [b""]
    return out


def test_every_chunk_boundary_gives_the_same_lines() -> None:
    data = b"alpha\r\nbeta\n\ngamma\r\r\n\rdelta\r\nlast"
    expected = [b"alpha", b"beta", b"", b"gamma\r", b"\rdelta", b"last"]
    for cut in range(len(data) + 1):
        assert split_all(data, [cut]) == expected, cut
    assert split_all(data, list(range(1, len(data)))) == expected  # one byte at a time


def test_crlf_split_across_chunks_leaves_no_cr() -> None:
    splitter = LineSplitter()
    assert feed(splitter, b"hello\r") == []
    assert feed(splitter, b"\nworld\r") == [b"hello"]
    assert flush(splitter) == [b"world"]
    assert flush(splitter) == []


def test_random_chunking_matches_reference_with_small_max() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        data = bytes(rng.choices(b"ab\r\n", k=rng.randrange(0, 60)))
        cuts = sorted(rng.sample(range(len(data) + 1), k=min(len(data) + 1, rng.randrange(0, 8))))
        size = rng.randrange(1, 7)
        assert split_all(data, cuts, size) == reference_split(data, size), (data, cuts, size)


def test_100_kib_line_is_kept_whole() -> None:
    line = bytes(random.Random(1).choices(b"abcdefghij", k=100 * 1024))
    data = b"before\n" + line + b"\r\nafter\n"
    cuts = list(range(5, len(data), 65536))
    assert split_all(data, cuts) == [b"before", line, b"after"]


def test_3_mib_line_is_split_at_max_line_bytes() -> None:
    line = bytes(random.Random(2).choices(b"0123456789", k=3 * MiB))
    data = line + b"\r\n" + line + b"tail\n"
    cuts = list(range(65536, len(data), 65536))
    lines = split_all(data, cuts, MiB)
    assert [len(piece) for piece in lines] == [MiB] * 3 + [MiB] * 3 + [4]
    assert b"".join(lines[:3]) == line
    assert b"".join(lines[3:]) == line + b"tail"


def test_splitter_memory_stays_bounded_without_newlines() -> None:
    splitter = LineSplitter(1000)
    emitted = 0
    for _ in range(100):
        emitted += sum(map(len, feed(splitter, b"x" * 777)))
        assert len(splitter._partial) <= 1001
    assert emitted + sum(map(len, flush(splitter))) == 77700


def test_writer_renders_a_flood_in_few_writes(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    writes: list[int] = []

    class CountingFile(FileIO):
        def write(self, data: ReadableBuffer, /) -> int:
            count = super().write(data)
            writes.append(count)
            return count

    data = b"".join(b"line %d\n" % n for n in range(200_000))
    splitter = LineSplitter()
    with make_writer(
        log, opener=lambda path: CountingFile(path, "ab"), max_bytes=1 << 40
    ) as writer:
        for start in range(0, len(data), 65536):
            writer.console_lines(LogLevel.INFO, feed(splitter, data[start : start + 65536]))

    assert len(writes) <= len(data) // 65536 + 1
    lines = read_lines(log)
    assert len(lines) == 200_000
    assert lines[-1] == "[02/10/2017 16:10:43 > af2b06: INFO] line 199999"


# -- OutputCapture ---------------------------------------------------------------------------

CHILD = r"""
import sys
out = sys.stdout.buffer
for n in range(1000):
    out.write(b"line %d\n" % n)
out.write(b"x" * 200000 + b"\n")   # longer than the StreamReader limit (64 KiB)
out.write(b"windows\r\n")
out.write(b"\xff\x00bin\n")
out.write(b"unterminated")
out.flush()
sys.stderr.write("err line\n")
"""


async def run_child(
    on_block: Callable[[bytes], None], on_activity: Callable[[], None] | None = None
) -> tuple[int, list[bytes]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    errors: list[bytes] = []

    async def pump(reader: asyncio.StreamReader, capture: OutputCapture) -> None:
        while chunk := await reader.read(4096):
            capture.feed(chunk)
        capture.close()
        capture.close()  # a second EOF changes nothing

    await asyncio.gather(
        pump(process.stdout, OutputCapture(on_block, on_activity=on_activity)),
        pump(process.stderr, OutputCapture(errors.append)),
    )
    return await process.wait(), errors


async def test_capture_from_a_real_subprocess() -> None:
    batches: list[bytes] = []
    activity = 0

    def on_activity() -> None:
        nonlocal activity
        activity += 1

    code, errors = await run_child(batches.append, on_activity)

    # Every block is whole lines: ending in LF, and split back exactly into the lines.
    assert all(batch.endswith(b"\n") for batch in batches)
    lines = lines_of(b"".join(batches))
    assert code == 0
    assert errors == [b"err line\n"]
    assert lines[:1000] == [b"line %d" % n for n in range(1000)]
    assert lines[1000:] == [b"x" * 200000, b"windows", b"\xff\x00bin", b"unterminated"]
    assert all(batches)
    assert activity >= len(batches) - 1  # the final flush batch needs no read


async def test_capture_into_the_writer(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    with make_writer(log) as writer:
        code, _ = await run_child(lambda block: writer.console_block(LogLevel.INFO, block))

    lines = read_lines(log)
    assert code == 0
    assert len(lines) == 1004
    assert lines[1002] == "[02/10/2017 16:10:43 > af2b06: INFO] \ufffd\ufffdbin"
    assert lines[1003] == "[02/10/2017 16:10:43 > af2b06: INFO] unterminated"


# -- held host lines ------------------------------------------------------------------------


class CountingFile(FileIO):
    """A real append-mode file that counts the writes reaching it (one `write` or `writev`)."""

    writes = 0

    def write(self, data: ReadableBuffer) -> int:
        CountingFile.writes += 1
        return super().write(data)


def counting_opener(path: Path) -> RawIOBase:
    return CountingFile(path, "ab")


def test_held_host_lines_go_out_in_order_with_the_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "job_log.txt"
    writev_calls: list[int] = []
    real_writev = joblog.os.writev

    def counting_writev(fd: int, buffers: list[bytes]) -> int:
        writev_calls.append(len(buffers))
        return real_writev(fd, buffers)

    monkeypatch.setattr(joblog.os, "writev", counting_writev)
    CountingFile.writes = 0
    with make_writer(log, opener=counting_opener) as writer:
        assert writer.hold_system(LogLevel.INFO, "Status changed to Starting") is True
        assert writer.hold_system(LogLevel.INFO, "Run script 'run.sh'") is False
        assert not log.exists() or log.read_bytes() == b""  # nothing written yet
        writer.console(LogLevel.INFO, b"first output")
        assert CountingFile.writes + len(writev_calls) == 1  # one write for all three
        assert writer.hold_system(LogLevel.WARN, "careful") is True
        writer.flush_held()
        writer.flush_held()  # nothing held: no write
        assert CountingFile.writes + len(writev_calls) == 2
        writer.hold_system(LogLevel.INFO, "Status changed to Stopped")
    # Closing writes what is still held.
    assert [line.split("] ", 1)[1] for line in read_lines(log)] == [
        "Status changed to Starting",
        "Run script 'run.sh'",
        "first output",
        "careful",
        "Status changed to Stopped",
    ]
    assert " SYS INFO]" in read_lines(log)[0] and " SYS WARN]" in read_lines(log)[3]


def test_held_lines_keep_the_time_they_were_said(tmp_path: Path) -> None:
    log = tmp_path / "job_log.txt"
    clock = FakeClock()
    with make_writer(log, clock=clock) as writer:
        writer.hold_system(LogLevel.INFO, "said first")
        clock.now = T0 + timedelta(seconds=5)
        writer.system(LogLevel.INFO, "said later")
    first, later = read_lines(log)
    assert first.startswith("[02/10/2017 16:10:43 ") and first.endswith("said first")
    assert later.startswith("[02/10/2017 16:10:48 ") and later.endswith("said later")


def test_held_lines_are_not_counted_against_a_runs_output_cap_but_fill_it(tmp_path: Path) -> None:
    log = tmp_path / "output_log.txt"
    line = b"x" * 60
    with make_writer(log, cap_bytes=200) as writer:
        writer.hold_system(LogLevel.INFO, "Status changed to Running")
        writer.console_lines(LogLevel.INFO, [line] * 5)
    lines = read_lines(log)
    assert lines[0].endswith("Status changed to Running")  # SYS lines are always written
    assert "Reached maximum allowed output size" in lines[-1]
    assert log.stat().st_size <= 200 + len(lines[-1]) + 1
