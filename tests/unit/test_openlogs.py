"""The budget of open job logs: the least recently written closes first, nothing is lost."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from webjobsd.records.joblog import JobLogWriter, LogLevel
from webjobsd.records.openlogs import OpenLogBudget, limit_for


def open_paths() -> set[Path]:
    """The files this process holds open, from /proc (what the kernel says, not our state)."""
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.add(Path(os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            continue
    return held


def writers(tmp_path: Path, count: int, budget: OpenLogBudget) -> list[JobLogWriter]:
    return [
        JobLogWriter(tmp_path / f"job{index}" / "job_log.txt", "i1", open_logs=budget)
        for index in range(count)
    ]


def test_the_least_recently_written_log_is_closed_and_reopened_by_its_next_write(
    tmp_path: Path,
) -> None:
    budget = OpenLogBudget(limit=2)
    first, second, third = writers(tmp_path, 3, budget)
    first.system(LogLevel.INFO, "one")
    second.system(LogLevel.INFO, "two")
    first.system(LogLevel.INFO, "one again")  # first is now the most recent
    third.system(LogLevel.INFO, "three")  # over the budget: second, the oldest, is closed

    held = open_paths()
    assert first.path in held and third.path in held
    assert second.path not in held
    assert len(budget) == 2 and budget.closed_idle == 1

    second.system(LogLevel.INFO, "two again")  # reopened; first is the oldest now
    held = open_paths()
    assert second.path in held and third.path in held and first.path not in held

    for writer in (first, second, third):
        writer.close()
    assert len(budget) == 0
    assert [line.split("] ")[1] for line in second.path.read_text().splitlines()] == [
        "two",
        "two again",
    ]
    assert first.path.read_text().count("\n") == 2


def test_many_writers_in_threads_stay_within_the_budget_and_lose_no_line(tmp_path: Path) -> None:
    budget = OpenLogBudget(limit=4)
    logs = writers(tmp_path, 16, budget)
    lines_each = 200
    start = threading.Barrier(len(logs))

    def write(writer: JobLogWriter, index: int) -> None:
        start.wait()
        for number in range(lines_each):
            writer.console(LogLevel.INFO, f"{index} {number}")

    threads = [
        threading.Thread(target=write, args=(writer, index)) for index, writer in enumerate(logs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # A writer busy at the instant it was asked kept its file; the next opening asks again,
    # and at rest nobody refuses: the budget holds exactly.
    late = JobLogWriter(tmp_path / "late" / "job_log.txt", "i1", open_logs=budget)
    late.system(LogLevel.INFO, "late")
    everyone = [*logs, late]
    held = [writer.path for writer in everyone if writer.path in open_paths()]
    assert len(held) == len(budget) == budget.limit
    assert late.path in held
    assert budget.closed_idle >= len(everyone) - budget.limit
    late.close()
    for index, writer in enumerate(logs):
        writer.close()
        lines = [line.split("] ", 1)[1] for line in writer.path.read_text().splitlines()]
        assert lines == [f"{index} {number}" for number in range(lines_each)]
    assert not any(writer.path in open_paths() for writer in logs)


def test_a_writer_without_a_budget_keeps_its_file_open(tmp_path: Path) -> None:
    writer = JobLogWriter(tmp_path / "job_log.txt", "i1")
    writer.system(LogLevel.INFO, "one")
    assert writer.path in open_paths()
    writer.close()
    assert writer.path not in open_paths()


@pytest.mark.parametrize(
    ("soft", "expected"), [(1024, 128), (20_000, 2500), (65_536, 8192), (40, 16)]
)
def test_the_budget_is_a_share_of_the_file_limit(soft: int, expected: int) -> None:
    assert limit_for(soft) == expected
