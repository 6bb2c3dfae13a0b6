"""The start history file of continuous jobs (`records.starts`): bounded, reloaded, tolerant."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from webjobsd.records.starts import (
    MAX_STARTS,
    ProcessStart,
    StartHistory,
    read_start_history,
    starts_path,
)
from webjobsd.runtime.writes import OrderedWrites

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def test_a_start_and_its_end_are_written_and_read_back(tmp_path: Path) -> None:
    path = starts_path(tmp_path, "inst1")
    history = StartHistory(path, clock=Clock())
    history.started(101)
    history.ended("exited", -9)
    history.started(102)
    document = json.loads(path.read_text())
    assert document == {
        "starts": [
            {
                "pid": 101,
                "start_time": "2026-11-28T12:00:01Z",
                "end_time": "2026-11-28T12:00:02Z",
                "ended": "exited",
                "exit_code": -9,
            },
            {
                "pid": 102,
                "start_time": "2026-11-28T12:00:03Z",
                "end_time": None,
                "ended": None,
                "exit_code": None,
            },
        ]
    }
    assert [entry.unexpected_end for entry in history.entries] == [True, False]


async def test_writes_handed_to_the_records_thread_land_in_order_with_the_state_asked(
    tmp_path: Path,
) -> None:
    """Through `OrderedWrites` (as the supervisor does): each write carries the history as it
    was when asked, the thread writes them in that order, and the file ends at the latest."""
    path = starts_path(tmp_path, "inst1")
    writes = OrderedWrites()
    seen: list[list[int]] = []

    def submit(write: Callable[..., None], *args: object) -> None:
        def write_and_look(*inner: object) -> None:
            write(*inner)
            seen.append([entry["pid"] for entry in json.loads(path.read_text())["starts"]])

        writes.submit(write_and_look, *args)

    history = StartHistory(path, clock=Clock(), submit=submit)
    for pid in range(1, 6):
        history.started(pid)
        history.save()  # what the loop's next turn does
        history.ended("exited", 1)
    history.flush()  # the unit's last word: the end still waiting for its delay
    await writes.close()
    assert seen == [list(range(1, pid + 1)) for pid in range(1, 6)] + [[1, 2, 3, 4, 5]]
    final = json.loads(path.read_text())["starts"]
    assert [(entry["pid"], entry["ended"]) for entry in final] == [
        (pid, "exited") for pid in range(1, 6)
    ]


def test_an_end_without_an_open_start_changes_nothing(tmp_path: Path) -> None:
    history = StartHistory(starts_path(tmp_path, "inst1"), clock=Clock())
    history.ended("stopped")
    history.started(7)
    history.ended("stopped", 0)
    history.ended("exited", 1)
    assert [(e.ended, e.exit_code) for e in history.entries] == [("stopped", 0)]


def test_the_history_keeps_the_newest_entries_only(tmp_path: Path) -> None:
    path = starts_path(tmp_path, "inst1")
    history = StartHistory(path, clock=Clock())
    for pid in range(MAX_STARTS + 25):
        history.started(pid)
        history.ended("exited", 1)
    pids = [entry["pid"] for entry in json.loads(path.read_text())["starts"]]
    assert pids == list(range(25, MAX_STARTS + 25))


def test_an_entry_left_open_by_a_dead_daemon_reads_as_lost(tmp_path: Path) -> None:
    path = starts_path(tmp_path, "inst1")
    before = StartHistory(path, clock=Clock())
    before.started(1)
    before.ended("stopped", 0)
    before.started(2)  # and the daemon is killed here
    after = StartHistory(path, clock=Clock())
    assert [e.ended for e in after.entries] == ["stopped", "lost"]
    assert [e["ended"] for e in json.loads(path.read_text())["starts"]] == ["stopped", "lost"]
    after.started(3)
    assert [e.pid for e in after.entries] == [1, 2, 3]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"[]",
        b'{"starts": {}}',
        b'{"starts": [1]}',
        b'{"starts": [{"pid": 1}]}',
        b'{"starts": [{"pid": 1, "start_time": 5}]}',
        b'{"starts": [{"pid": "x", "start_time": "2026-11-28T12:00:00Z"}]}',
        b'{"starts": [{"pid": 1, "start_time": "2026-11-28T12:00:00Z", "ended": "eaten"}]}',
        b'{"starts": [{"pid": 1, "start_time": "2026-11-28T12:00:00Z", "exit_code": "1"}]}',
        b'{"starts": [{"pid": 1, "start_time": "yesterday"}]}',
        b'{"starts": [{"pid": 1, "start_time": "2026-11-28T12:00:00Z", "ended": []}]}',
        b'{"starts": [{"pid": 1, "start_time": "2026-11-28T12:00:00Z", "ended": {}}]}',
        b'{"starts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
)
def test_a_malformed_file_is_logged_and_replaced(tmp_path: Path, content: bytes) -> None:
    path = starts_path(tmp_path, "inst1")
    path.write_bytes(content)
    with capture_logs() as logs:
        history = StartHistory(path, clock=Clock())
    assert history.entries == ()
    assert [(e["event"], e["file"]) for e in logs] == [
        ("start history is malformed; starting afresh", str(path))
    ]
    history.started(5)
    assert [e["pid"] for e in json.loads(path.read_text())["starts"]] == [5]


def test_every_instance_is_read_and_merged_in_time_order(tmp_path: Path) -> None:
    clock = Clock()
    first = StartHistory(starts_path(tmp_path, "a"), clock=clock)
    second = StartHistory(starts_path(tmp_path, "b"), clock=clock)
    first.started(1)
    second.started(2)
    first.ended("exited", 3)
    first.started(3)
    (tmp_path / "status_a").write_text('{"Status":"Running"}')
    (tmp_path / "starts_c.json").write_text("garbage")
    merged = read_start_history(tmp_path)
    assert [(item.instance_id, item.start.pid, item.restart) for item in merged] == [
        ("a", 1, False),
        ("b", 2, False),
        ("a", 3, True),
    ]
    assert read_start_history(tmp_path / "missing") == []


def test_restarts_follow_each_file_even_when_the_clock_stepped_back(tmp_path: Path) -> None:
    clock = Clock()
    first = StartHistory(starts_path(tmp_path, "a"), clock=clock)
    second = StartHistory(starts_path(tmp_path, "b"), clock=clock)
    first.started(1)
    first.ended("exited", 1)
    second.started(2)
    second.ended("stopped", 0)
    clock.now -= timedelta(hours=1)  # NTP stepped the clock back
    first.started(3)
    merged = read_start_history(tmp_path)
    assert [(item.start.pid, item.restart) for item in merged] == [
        (3, True),
        (1, False),
        (2, False),
    ]


def test_an_open_start_of_an_instance_that_is_gone_reads_as_lost(tmp_path: Path) -> None:
    clock = Clock()
    for instance, pid in (("alive", 1), ("gone", 2)):
        StartHistory(starts_path(tmp_path, instance), clock=clock).started(pid)
    merged = read_start_history(tmp_path, is_live=lambda instance: instance == "alive")
    assert [(item.instance_id, item.start.ended) for item in merged] == [
        ("alive", None),
        ("gone", "lost"),
    ]
    assert [item.start.ended for item in read_start_history(tmp_path)] == [None, None]


def test_an_entry_round_trips_through_json() -> None:
    entry = ProcessStart(
        pid=9,
        start_time=T0,
        end_time=T0 + timedelta(microseconds=1500),
        ended="failed to start",
        exit_code=None,
    )
    assert ProcessStart.from_json(entry.to_json()) == entry
