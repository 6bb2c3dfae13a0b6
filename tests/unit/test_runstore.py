"""Triggered run history: Kudu's formats, mkdir-arbitrated ids, listing, retention and repair."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from webjobsd.model import JobKey, JobKind, RunStatus
from webjobsd.records import runstore
from webjobsd.records.runstore import (
    RunRecord,
    RunStore,
    format_kudu_datetime,
    format_timespan,
    is_valid_run_id,
    new_run_id,
    parse_kudu_datetime,
    run_id_time,
)
from webjobsd.site import SiteLayout

JOB = "nightly"
T0 = datetime(2024, 9, 4, 17, 33, 18, 123456, tzinfo=UTC)


@pytest.fixture
def layout(tmp_path: Path) -> SiteLayout:
    return SiteLayout.build(tmp_path / "site", instance_id="test01", temp_root=tmp_path / "temp")


@pytest.fixture
def store(layout: SiteLayout) -> RunStore:
    return RunStore(layout)


def job_dir(layout: SiteLayout, name: str = JOB) -> Path:
    return layout.data_dir(JobKey(JobKind.TRIGGERED, name))


def status_bytes(layout: SiteLayout, run_id: str) -> bytes:
    return (job_dir(layout) / run_id / "status").read_bytes()


def put_run(layout: SiteLayout, run_id: str, content: bytes | None) -> Path:
    """A run folder written by hand (by Kudu, an older daemon, or garbage)."""
    run_dir = job_dir(layout) / run_id
    run_dir.mkdir(parents=True)
    if content is not None:
        (run_dir / "status").write_bytes(content)
    return run_dir


def make_runs(store: RunStore, count: int, status: RunStatus = RunStatus.SUCCESS) -> list[str]:
    """`count` runs one second apart, oldest first, stored with `status`."""
    ids = []
    for i in range(count):
        record = store.create_run(JOB, "External - test", T0 + timedelta(seconds=i))
        store.write(record.with_status(status))
        ids.append(record.run_id)
    return ids


# -- formats --------------------------------------------------------------------------------


def test_run_id_is_utc_yyyymmddhhmmssffff() -> None:
    now = datetime(2016, 5, 19, 21, 49, 38, 193399, tzinfo=UTC)
    assert new_run_id(now) == "201605192149381933"  # 100 µs ticks, truncated not rounded
    # An aware time in another zone gives the same id: ids are UTC.
    assert new_run_id(now.astimezone(timezone(timedelta(hours=-7)))) == "201605192149381933"
    assert new_run_id(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)) == "202401020304050000"
    assert run_id_time("201605192149381933") == datetime(2016, 5, 19, 21, 49, 38, 193300, UTC)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError):
        new_run_id(datetime(2024, 1, 1))
    with pytest.raises(ValueError):
        format_kudu_datetime(datetime(2024, 1, 1))
    with pytest.raises(ValueError):
        RunRecord(JOB, "202401010000000000", RunStatus.RUNNING, "", datetime(2024, 1, 1))


@pytest.mark.parametrize(
    ("dt", "text"),
    [
        (T0, "2024-09-04T17:33:18.123456Z"),
        (T0.replace(microsecond=0), "2024-09-04T17:33:18Z"),  # no fraction, no dot
        (T0.replace(microsecond=100000), "2024-09-04T17:33:18.1Z"),  # trailing zeros trimmed
        (T0.replace(microsecond=120), "2024-09-04T17:33:18.00012Z"),
        (T0.replace(microsecond=1), "2024-09-04T17:33:18.000001Z"),
        (T0.replace(microsecond=999999), "2024-09-04T17:33:18.999999Z"),
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00Z"),  # 4-digit year always
        (
            datetime(2024, 9, 4, 19, 33, 18, 500000, tzinfo=timezone(timedelta(hours=2))),
            "2024-09-04T17:33:18.5Z",  # always written as UTC
        ),
    ],
)
def test_format_kudu_datetime(dt: datetime, text: str) -> None:
    assert format_kudu_datetime(dt) == text
    assert parse_kudu_datetime(text) == dt


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-09-04T17:33:18.1234567Z", T0),  # Kudu's 7th digit is truncated
        ("2024-09-04T17:33:18.1234569Z", T0),
        ("2024-09-04T17:33:18Z", T0.replace(microsecond=0)),
        ("2024-09-04T17:33:18.1Z", T0.replace(microsecond=100000)),
        ("2024-09-04T17:33:18.1234567", T0),  # no zone: Kudu stores UTC only
        ("2024-09-04T19:33:18.1234567+02:00", T0),
        ("2024-09-04T12:03:18.123456-05:30", T0),
        ("2024-09-04T19:33:18.123456+0200", T0),
        (" 2024-09-04T17:33:18.123456Z\n", T0),
    ],
)
def test_parse_kudu_datetime_is_tolerant(text: str, expected: datetime) -> None:
    parsed = parse_kudu_datetime(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "2024-09-04",
        "2024-09-04 17:33:18Z",
        "2024-09-04T17:33:18.12345678Z",  # 8 fraction digits
        "2024-09-04T17:33:18.Z",
        "2024-13-04T17:33:18Z",
        "2024-09-04T17:33:18+25:00",
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "\uff12\uff10\uff12\uff14-09-04T17:33:18Z",  # non-ASCII digits
    ],
)
def test_parse_kudu_datetime_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_kudu_datetime(text)


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(0), "00:00:00"),
        (timedelta(seconds=5, microseconds=123456), "00:00:05.1234560"),
        (timedelta(seconds=5, microseconds=100000), "00:00:05.1000000"),  # never trimmed
        (timedelta(microseconds=1), "00:00:00.0000010"),
        (timedelta(days=1, hours=2, minutes=3, seconds=4), "1.02:03:04"),
        (timedelta(days=12, hours=23, minutes=59, seconds=59), "12.23:59:59"),
        (timedelta(hours=23, minutes=59, seconds=59, microseconds=999999), "23:59:59.9999990"),
        (timedelta(seconds=-1), "-00:00:01"),
        (-timedelta(days=1, microseconds=500), "-1.00:00:00.0005000"),
    ],
)
def test_format_timespan(delta: timedelta, text: str) -> None:
    assert format_timespan(delta) == text


@pytest.mark.parametrize(
    ("run_id", "valid"),
    [
        ("201605192149381933", True),
        ("20160519214938193", False),  # 17 digits
        ("2016051921493819330", False),  # 19 digits
        ("../x", False),
        ("../201605192149381933", False),
        ("20160519214938193a", False),
        ("201605192149381933\n", False),
        ("".join(chr(0xFF10 + int(c)) for c in "201605192149381933"), False),  # full-width digits
        ("", False),
    ],
)
def test_run_id_validation(store: RunStore, run_id: str, valid: bool) -> None:
    assert is_valid_run_id(run_id) is valid
    if not valid:
        assert store.read(JOB, run_id) is None
        with pytest.raises(ValueError):
            store.output_log_path(JOB, run_id)


# -- the record -----------------------------------------------------------------------------


def test_status_document_omits_defaults_and_keeps_kudu_order() -> None:
    record = RunRecord(JOB, "202409041733181234", RunStatus.RUNNING, "Schedule - 0 * * * * *", T0)
    assert list(record.to_status_document().items()) == [
        ("Trigger", "Schedule - 0 * * * * *"),
        ("Status", "Running"),
        ("StartTime", "2024-09-04T17:33:18.123456Z"),
    ]
    ended = record.with_status(RunStatus.FAILED, end_time=T0 + timedelta(seconds=2))
    assert ended.to_status_document()["EndTime"] == "2024-09-04T17:33:20.123456Z"
    assert "Trigger" not in RunRecord(JOB, "1" * 18, RunStatus.RUNNING, "", T0).to_status_document()


def test_record_from_a_kudu_written_document() -> None:
    doc = {
        "trigger": "External - curl/8.5.0",  # Newtonsoft matches keys case-insensitively
        "Status": "Success",
        "StartTime": "2024-09-04T17:33:18.1234567Z",
        "EndTime": "2024-09-04T17:33:20.0000001Z",
        "Unknown": [1, 2],
    }
    record = RunRecord.from_status_document(JOB, "202409041733181234", doc)
    assert record == RunRecord(
        JOB,
        "202409041733181234",
        RunStatus.SUCCESS,
        "External - curl/8.5.0",
        T0,
        datetime(2024, 9, 4, 17, 33, 20, tzinfo=UTC),
    )


def test_record_defaults_when_fields_are_missing() -> None:
    doc = {"Status": "Running", "EndTime": "0001-01-01T00:00:00"}
    record = RunRecord.from_status_document(JOB, "202409041733181234", doc)
    assert record.trigger == ""
    assert record.start_time == datetime(2024, 9, 4, 17, 33, 18, 123400, tzinfo=UTC)  # from id
    assert record.end_time is None  # .NET's default DateTime means unset


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {},
        {"Status": "Starting"},  # a continuous status
        {"Status": 3},
        {"Status": "Running", "StartTime": "yesterday"},
        {"Status": "Running", "StartTime": 5},
        {"Status": "Running", "Trigger": 5},
    ],
)
def test_record_from_a_bad_document_is_a_value_error(doc: object) -> None:
    with pytest.raises(ValueError):
        RunRecord.from_status_document(JOB, "202409041733181234", doc)


def test_duration_grows_until_the_end() -> None:
    record = RunRecord(JOB, "202409041733181234", RunStatus.RUNNING, "", T0)
    assert record.duration(T0 + timedelta(seconds=7)) == timedelta(seconds=7)
    ended = record.with_status(RunStatus.SUCCESS, end_time=T0 + timedelta(seconds=3))
    assert ended.duration(T0 + timedelta(days=9)) == timedelta(seconds=3)
    # with_status without an end time keeps the one stored.
    assert ended.with_status(RunStatus.FAILED).end_time == ended.end_time


# -- create / write / read ------------------------------------------------------------------


def test_status_file_is_kudu_compact_json_and_end_time_appears_at_the_end(
    layout: SiteLayout, store: RunStore
) -> None:
    record = store.create_run(JOB, "External - curl/8.5.0", T0)

    assert record.run_id == "202409041733181234"
    assert record.status is RunStatus.INITIALIZING
    assert status_bytes(layout, record.run_id) == (
        b'{"Trigger":"External - curl/8.5.0","Status":"Initializing",'
        b'"StartTime":"2024-09-04T17:33:18.123456Z"}'
    )

    store.write(record.with_status(RunStatus.RUNNING))
    assert b"EndTime" not in status_bytes(layout, record.run_id)

    end = datetime(2024, 9, 4, 17, 33, 20, 100000, tzinfo=UTC)
    store.write(record.with_status(RunStatus.SUCCESS, end_time=end))
    assert status_bytes(layout, record.run_id) == (
        b'{"Trigger":"External - curl/8.5.0","Status":"Success",'
        b'"StartTime":"2024-09-04T17:33:18.123456Z","EndTime":"2024-09-04T17:33:20.1Z"}'
    )
    assert sorted(p.name for p in (job_dir(layout) / record.run_id).iterdir()) == ["status"]
    assert store.read(JOB, record.run_id) == record.with_status(RunStatus.SUCCESS, end_time=end)
    assert store.output_log_path(JOB, record.run_id) == (
        job_dir(layout) / record.run_id / "output_log.txt"
    )


def test_same_now_gives_different_ids_one_tick_apart(store: RunStore) -> None:
    first = store.create_run(JOB, "External - a", T0)
    second = store.create_run(JOB, "External - b", T0)
    third = store.create_run(JOB, "External - c", T0)

    assert [first.run_id, second.run_id, third.run_id] == [
        "202409041733181234",
        "202409041733181235",
        "202409041733181236",
    ]
    assert store.read(JOB, second.run_id) == second
    assert second.start_time == T0  # the real start; only the id moved


def test_a_bumped_id_carries_into_the_next_year(store: RunStore) -> None:
    now = datetime(2024, 12, 31, 23, 59, 59, 999950, tzinfo=UTC)
    ids = [store.create_run(JOB, "", now).run_id for _ in range(2)]
    assert ids == ["202412312359599999", "202501010000000000"]


def test_a_failed_status_write_leaves_no_run_behind(
    layout: SiteLayout, store: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runstore, "write_json_atomic", no_space)
    with pytest.raises(OSError):
        store.create_run(JOB, "", T0)
    assert list(job_dir(layout).iterdir()) == []


def test_invalid_job_names_are_refused(store: RunStore) -> None:
    with pytest.raises(ValueError):
        store.create_run("../continuous/x", "", T0)
    assert store.read("../x", "202409041733181234") is None
    assert store.list_runs("..") == []
    assert store.latest("a/b") is None
    assert store.apply_retention("..", 1) == []


def test_write_does_not_resurrect_a_deleted_run(layout: SiteLayout, store: RunStore) -> None:
    record = store.create_run(JOB, "", T0)
    (job_dir(layout) / record.run_id / "status").unlink()
    (job_dir(layout) / record.run_id).rmdir()

    with pytest.raises(FileNotFoundError):
        store.write(record.with_status(RunStatus.STOPPED))
    assert not (job_dir(layout) / record.run_id).exists()


_CREATOR = textwrap.dedent(
    """
    import sys, time
    from datetime import UTC, datetime
    from pathlib import Path
    from webjobsd.records.runstore import RunStore
    from webjobsd.site import SiteLayout

    site, temp, go, tag = sys.argv[1:5]
    store = RunStore(SiteLayout.build(Path(site), instance_id=tag, temp_root=Path(temp)))
    Path(go + "." + tag).touch()
    deadline = time.monotonic() + 20
    while not Path(go).exists():
        if time.monotonic() > deadline:
            sys.exit("never told to go")
        time.sleep(0.001)
    now = datetime(2024, 9, 4, 17, 33, 18, tzinfo=UTC)
    for _ in range(40):
        print(store.create_run("nightly", "External - " + tag, now).run_id, flush=True)
    """
)


def test_two_processes_creating_at_the_same_instant_never_collide(
    tmp_path: Path, layout: SiteLayout, store: RunStore
) -> None:
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    procs = {
        tag: subprocess.Popen(
            [sys.executable, "-c", _CREATOR, str(layout.site_root), str(tmp_path), str(go), tag],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for tag in ("a", "b")
    }
    try:
        deadline = time.monotonic() + 30
        while not all(Path(f"{go}.{tag}").exists() for tag in procs):
            assert time.monotonic() < deadline, "creators did not start"
            assert all(p.poll() is None for p in procs.values()), "a creator died"
            time.sleep(0.01)
        go.touch()  # both are polling now: they start within a millisecond of each other
        outputs = {tag: p.communicate(timeout=30) for tag, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    ids: dict[str, str] = {}
    for tag, (out, err) in outputs.items():
        assert procs[tag].returncode == 0, err
        for run_id in out.split():
            assert run_id not in ids, f"{run_id} given to both {ids[run_id]} and {tag}"
            ids[run_id] = tag
    assert len(ids) == 80
    # All ids are ticks from the same instant, and each folder holds its creator's status.
    assert sorted(ids) == [
        new_run_id(T0.replace(microsecond=0) + i * runstore._TICK) for i in range(80)
    ]
    for record in store.list_runs(JOB):
        assert record.trigger == f"External - {ids[record.run_id]}"
    assert len(store.list_runs(JOB)) == 80


# -- listing --------------------------------------------------------------------------------


def test_listing_is_newest_first_and_skips_garbage_and_non_runs(
    layout: SiteLayout, store: RunStore
) -> None:
    ids = make_runs(store, 3)
    put_run(layout, "209901010000000000", b"{not json")  # newest name, garbage status
    put_run(layout, "209901010000000001", None)  # no status yet
    put_run(layout, "209901010000000002", b'{"Status":"Bogus"}')
    put_run(layout, "209901010000000003", b"\xff\xfe")
    put_run(layout, "209901010000000004", b'{"Status":"Running"' + b" " * 70_000 + b"}")
    put_run(layout, "20990101000000000", b'{"Status":"Success"}')  # 17 digits
    put_run(layout, "notarun", b'{"Status":"Success"}')
    (job_dir(layout) / "209901010000000005").write_text('{"Status":"Success"}')  # a file
    (job_dir(layout) / "209901010000000006").symlink_to(job_dir(layout) / ids[0])
    (job_dir(layout) / "job_scheduler.log").write_text("log")
    (job_dir(layout) / "triggeredJob.lock").write_text("")
    (job_dir(layout) / "status").write_text("")

    runs = store.list_runs(JOB)

    assert [r.run_id for r in runs] == ids[::-1]
    assert all(r.status is RunStatus.SUCCESS for r in runs)
    assert store.latest(JOB) == runs[0]
    assert store.read(JOB, "209901010000000000") is None
    assert store.read(JOB, "209901010000000001") is None
    assert store.read(JOB, "209901010000000006") is None  # a symlink is not a run
    assert store.read(JOB, "209901010000000005") is None


def test_a_job_that_never_ran_has_no_runs(store: RunStore) -> None:
    assert store.list_runs(JOB) == []
    assert store.latest(JOB) is None
    assert store.read(JOB, "202409041733181234") is None
    assert store.job_names() == []


def test_latest_reads_only_from_the_newest_down(
    store: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = make_runs(store, 50)
    store.write(store.latest(JOB).with_status(RunStatus.RUNNING))  # type: ignore[union-attr]
    reads: list[str] = []
    real_read = RunStore._read

    def counting_read(self: RunStore, job_name: str, run_dir: Path) -> RunRecord | None:
        reads.append(run_dir.name)
        return real_read(self, job_name, run_dir)

    monkeypatch.setattr(RunStore, "_read", counting_read)
    latest = store.latest(JOB)

    assert latest is not None
    assert (latest.run_id, latest.status) == (ids[-1], RunStatus.RUNNING)
    assert reads == [ids[-1]]


def test_job_names_lists_triggered_data_folders(layout: SiteLayout, store: RunStore) -> None:
    store.create_run("b-job", "", T0)
    store.create_run("a.job", "", T0)
    root = layout.data_jobs_root / "triggered"
    (root / ".hidden").mkdir()
    (root / "a file").write_text("")
    layout.data_dir(JobKey(JobKind.CONTINUOUS, "cont")).mkdir(parents=True)

    assert store.job_names() == ["a.job", "b-job"]


# -- retention ------------------------------------------------------------------------------


def test_retention_follows_kudus_history_size_test(layout: SiteLayout, store: RunStore) -> None:
    """Kudu's `TriggeredJobTriggers`: 3 runs, then history size 5: counts go 4, 5, 5, 5."""
    make_runs(store, 3)
    (job_dir(layout) / "job_scheduler.log").write_text("")
    counts = []
    created = []
    for i in range(4):
        store.apply_retention(JOB, 5)
        created.append(store.create_run(JOB, "", T0 + timedelta(minutes=1 + i)).run_id)
        counts.append(len(store.list_runs(JOB)))

    assert counts == [4, 5, 5, 5]
    assert (job_dir(layout) / "job_scheduler.log").exists()  # not a run, never counted
    assert [r.run_id for r in store.list_runs(JOB)][:4] == created[::-1]


def test_retention_deletes_the_oldest_and_returns_their_ids(
    layout: SiteLayout, store: RunStore
) -> None:
    ids = make_runs(store, 6)
    put_run(layout, "200001010000000000", b"garbage")  # oldest, unreadable: deleted too

    assert store.apply_retention(JOB, 3) == [ids[3], ids[2], ids[1], ids[0], "200001010000000000"]
    assert [r.run_id for r in store.list_runs(JOB)] == [ids[5], ids[4]]
    assert store.apply_retention(JOB, 3) == []
    assert store.apply_retention(JOB, 1) == [ids[5], ids[4]]
    with pytest.raises(ValueError):
        store.apply_retention(JOB, 0)


def test_retention_never_removes_a_live_run(layout: SiteLayout, store: RunStore) -> None:
    ids = make_runs(store, 6)
    live_running, dead_running, live_initializing = ids[0], ids[1], ids[2]
    for run_id, status in [
        (live_running, RunStatus.RUNNING),
        (dead_running, RunStatus.RUNNING),
        (live_initializing, RunStatus.INITIALIZING),
    ]:
        store.write(store.read(JOB, run_id).with_status(status))  # type: ignore[union-attr]
    just_created = put_run(layout, "200001010000000000", None)  # mkdir done, status not yet
    asked: list[str] = []

    def is_active(run_id: str) -> bool:
        asked.append(run_id)
        return run_id in {live_running, live_initializing, just_created.name}

    deleted = store.apply_retention(JOB, 2, is_active=is_active)

    assert deleted == [ids[4], ids[3], dead_running]
    assert sorted(asked) == sorted(
        [live_initializing, dead_running, live_running, just_created.name]
    )
    remaining = [r.run_id for r in store.list_runs(JOB)]
    assert remaining == [ids[5], live_initializing, live_running]
    assert just_created.exists()


def test_retention_logs_but_does_not_raise_when_a_delete_fails(
    layout: SiteLayout, store: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = make_runs(store, 3)

    def refuse(path: Path) -> None:
        if path.name == ids[0]:
            raise PermissionError(13, "Permission denied", str(path))
        real_rmtree(path)

    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", refuse)

    assert store.apply_retention(JOB, 1) == [ids[2], ids[1]]
    assert [r.run_id for r in store.list_runs(JOB)] == [ids[0]]


# -- repair ---------------------------------------------------------------------------------


def test_abandoned_runs_become_aborted_with_an_end_time(
    layout: SiteLayout, store: RunStore
) -> None:
    ids = make_runs(store, 5)
    statuses = [
        RunStatus.SUCCESS,
        RunStatus.RUNNING,  # dead
        RunStatus.INITIALIZING,  # dead: the daemon died before launching it
        RunStatus.FAILED,
        RunStatus.RUNNING,  # live
    ]
    for run_id, status in zip(ids, statuses, strict=True):
        store.write(store.read(JOB, run_id).with_status(status))  # type: ignore[union-attr]
    now = T0 + timedelta(hours=1)
    asked: list[str] = []

    def is_live(record: RunRecord) -> bool:
        asked.append(record.run_id)
        return record.run_id == ids[4]

    repaired = store.repair_abandoned(JOB, is_live=is_live, now=now)

    assert [r.run_id for r in repaired] == [ids[2], ids[1]]
    assert all(r.status is RunStatus.ABORTED and r.end_time == now for r in repaired)
    assert sorted(asked) == sorted([ids[1], ids[2], ids[4]])  # finished runs are not asked
    assert [r.status for r in store.list_runs(JOB)] == [
        RunStatus.RUNNING,
        RunStatus.FAILED,
        RunStatus.ABORTED,
        RunStatus.ABORTED,
        RunStatus.SUCCESS,
    ]
    assert json.loads(status_bytes(layout, ids[1])) == {
        "Trigger": "External - test",
        "Status": "Aborted",
        "StartTime": format_kudu_datetime(T0 + timedelta(seconds=1)),
        "EndTime": "2024-09-04T18:33:18.123456Z",
    }
    assert store.repair_abandoned(JOB, is_live=is_live, now=now) == []  # idempotent


def test_repair_never_ends_a_run_before_it_started_and_keeps_a_stored_end(
    layout: SiteLayout, store: RunStore
) -> None:
    put_run(
        layout,
        "202409041733181234",
        b'{"Status":"Running","StartTime":"2024-09-04T17:33:18.1234567Z"}',
    )
    put_run(
        layout,
        "202409041733190000",
        b'{"Status":"Running","StartTime":"2024-09-04T17:33:19Z","EndTime":"2024-09-04T17:33:25Z"}',
    )
    behind = T0 - timedelta(minutes=5)  # this host's clock is behind the one that started it

    repaired = store.repair_abandoned(JOB, is_live=lambda _: False, now=behind)

    assert {r.run_id: r.end_time for r in repaired} == {
        "202409041733190000": datetime(2024, 9, 4, 17, 33, 25, tzinfo=UTC),
        "202409041733181234": T0,
    }
    assert all(r.duration(behind) >= timedelta(0) for r in repaired)
