"""Continuous status files: format, tolerant reading, and Kudu's cross-instance aggregation."""

from __future__ import annotations

from pathlib import Path

import pytest

from webjobsd.model import ContinuousStatus, JobKey, JobKind
from webjobsd.records.status import (
    StatusEntry,
    aggregate_status,
    read_status_entry,
    read_status_file,
    write_continuous_status,
)
from webjobsd.site import SiteLayout

KEY = JobKey(JobKind.CONTINUOUS, "worker")


@pytest.fixture
def layout(tmp_path: Path) -> SiteLayout:
    return SiteLayout.build(tmp_path / "site", instance_id="cccccc", temp_root=tmp_path / "tmp")


def put(layout: SiteLayout, instance_id: str, content: bytes) -> Path:
    path = layout.status_path(KEY, instance_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


class Liveness:
    """The callback: which other instances hold their instance lock."""

    def __init__(self, *live: str) -> None:
        self.live = set(live)
        self.asked: list[str] = []

    def __call__(self, instance_id: str) -> bool:
        self.asked.append(instance_id)
        return instance_id in self.live


# -- write / read ---------------------------------------------------------------------------


def test_write_is_compact_json_in_the_instance_file(layout: SiteLayout) -> None:
    write_continuous_status(layout, KEY, ContinuousStatus.STARTING)
    write_continuous_status(layout, KEY, ContinuousStatus.PENDING_RESTART)

    data_dir = layout.data_dir(KEY)
    assert [p.name for p in data_dir.iterdir()] == ["status_cccccc"]  # no temp file left
    assert (data_dir / "status_cccccc").read_bytes() == b'{"Status":"PendingRestart"}'
    assert read_status_file(data_dir / "status_cccccc") is ContinuousStatus.PENDING_RESTART


def test_a_reason_is_written_beside_the_status_and_read_back(layout: SiteLayout) -> None:
    """The reason a job is held in its status: an extra key Kudu's readers ignore; a reason that
    is not text is no reason; a very long one is cut."""
    write_continuous_status(layout, KEY, ContinuousStatus.PENDING_RESTART, "disk full")
    path = layout.status_path(KEY)
    assert path.read_bytes() == b'{"Status":"PendingRestart","Reason":"disk full"}'
    assert read_status_file(path) is ContinuousStatus.PENDING_RESTART
    assert read_status_entry(path) == StatusEntry(ContinuousStatus.PENDING_RESTART, "disk full")
    put(layout, "cccccc", b'{"Status":"Running","Reason":["no"]}')
    assert read_status_entry(path) == StatusEntry(ContinuousStatus.RUNNING, None)
    write_continuous_status(layout, KEY, ContinuousStatus.STARTING, "x" * 5000)
    entry = read_status_entry(path)
    assert entry is not None and entry.reason == "x" * 1000


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"Status":"Running"}', ContinuousStatus.RUNNING),
        (b'\xef\xbb\xbf {"status":"Stopped","Other":1}\r\n', ContinuousStatus.STOPPED),
        (b'{"Status":"Bogus"}', None),
        (b'{"Status":7}', None),
        (b'["Running"]', None),
        (b"{not json", None),
        (b"", None),
        (b"\xff\xfe", None),
    ],
)
def test_read_is_tolerant(
    layout: SiteLayout, content: bytes, expected: ContinuousStatus | None
) -> None:
    assert read_status_file(put(layout, "aaaaaa", content)) is expected


def test_read_of_a_missing_or_unreadable_path_is_none(layout: SiteLayout) -> None:
    assert read_status_file(layout.status_path(KEY, "nobody")) is None
    layout.status_path(KEY, "dir").mkdir(parents=True)
    assert read_status_file(layout.status_path(KEY, "dir")) is None


# -- aggregation ----------------------------------------------------------------------------


def test_no_status_file_is_initializing_without_newline(layout: SiteLayout) -> None:
    assert aggregate_status(layout, KEY, Liveness()) == ("Initializing", "cccccc - Initializing")
    layout.data_dir(KEY).mkdir(parents=True)
    assert aggregate_status(layout, KEY, Liveness()) == ("Initializing", "cccccc - Initializing")


def test_stale_file_of_a_dead_instance_is_deleted_and_live_one_kept(layout: SiteLayout) -> None:
    put(layout, "aaaaaa", b'{"Status":"Running"}')  # live
    dead = put(layout, "bbbbbb", b'{"Status":"Running"}')  # its instance is gone
    write_continuous_status(layout, KEY, ContinuousStatus.PENDING_RESTART)
    liveness = Liveness("aaaaaa")

    status, detailed = aggregate_status(layout, KEY, liveness)

    assert (status, detailed) == ("PendingRestart", "aaaaaa - Running\ncccccc - PendingRestart\n")
    assert not dead.exists()
    assert layout.status_path(KEY, "aaaaaa").exists()
    assert sorted(liveness.asked) == ["aaaaaa", "bbbbbb"]  # never asked about itself


def test_status_is_the_last_one_that_is_not_inactive(layout: SiteLayout) -> None:
    put(layout, "aaaaaa", b'{"Status":"Running"}')
    put(layout, "bbbbbb", b'{"Status":"InactiveInstance"}')
    write_continuous_status(layout, KEY, ContinuousStatus.INACTIVE_INSTANCE)

    assert aggregate_status(layout, KEY, Liveness("aaaaaa", "bbbbbb")) == (
        "Running",
        "aaaaaa - Running\nbbbbbb - InactiveInstance\ncccccc - InactiveInstance\n",
    )


def test_all_inactive_gives_the_first_one(layout: SiteLayout) -> None:
    put(layout, "aaaaaa", b'{"Status":"InactiveInstance"}')
    write_continuous_status(layout, KEY, ContinuousStatus.INACTIVE_INSTANCE)

    status, _ = aggregate_status(layout, KEY, Liveness("aaaaaa"))
    assert status == "InactiveInstance"


def test_unreadable_files_read_as_initializing(layout: SiteLayout) -> None:
    put(layout, "aaaaaa", b"garbage")
    put(layout, "cccccc", b"")  # its own file, even half-written by hand, is always read

    assert aggregate_status(layout, KEY, Liveness("aaaaaa")) == (
        "Initializing",
        "aaaaaa - Initializing\ncccccc - Initializing\n",
    )


def test_only_stale_files_is_initializing(layout: SiteLayout) -> None:
    put(layout, "aaaaaa", b'{"Status":"Running"}')

    assert aggregate_status(layout, KEY, Liveness()) == ("Initializing", "cccccc - Initializing")
    assert list(layout.data_dir(KEY).iterdir()) == []


def test_other_files_in_the_data_folder_are_ignored(layout: SiteLayout) -> None:
    write_continuous_status(layout, KEY, ContinuousStatus.RUNNING)
    data_dir = layout.data_dir(KEY)
    for name in ["job_log.txt", ".status_aaaaaa.x1.tmp", "status_", "singleton.job.lock"]:
        (data_dir / name).write_text("x")
    (data_dir / "status_dddddd").mkdir()

    assert aggregate_status(layout, KEY, Liveness()) == ("Running", "cccccc - Running\n")
    assert len(list(data_dir.iterdir())) == 6  # nothing deleted but stale status files
