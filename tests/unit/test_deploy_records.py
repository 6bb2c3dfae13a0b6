"""Deployment records on disk: Kudu's fields and formats, the structured log, ids that cannot
leave `deployments/`, retention (Part A #14) and the repair of records a dead daemon left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from webjobsd.deploy.lock import DeploymentLock
from webjobsd.deploy.records import (
    UNKNOWN_ERROR,
    DeploymentRecord,
    DeploymentStore,
    DeployStatus,
    LogType,
    format_deploy_time,
    is_valid_deployment_id,
)
from webjobsd.site import SiteLayout

T0 = datetime(2026, 12, 2, 7, 5, 34, 123456, tzinfo=UTC)


@pytest.fixture
def layout(tmp_path: Path) -> SiteLayout:
    return SiteLayout.build(tmp_path / "site", instance_id="test01", temp_root=tmp_path / "temp")


@pytest.fixture
def store(layout: SiteLayout) -> DeploymentStore:
    return DeploymentStore(layout)


def finished(
    store: DeploymentStore, record_id: str, status: DeployStatus, received: datetime
) -> DeploymentRecord:
    record = store.create(id=record_id, deployer="test", message=record_id)
    record.received_time = record.start_time = received
    if status == DeployStatus.SUCCESS:
        record.mark_success(received + timedelta(seconds=1))
    else:
        record.mark_failed(received + timedelta(seconds=1))
    store.save(record)
    return record


def test_times_have_seven_fraction_digits_and_z() -> None:
    assert format_deploy_time(T0) == "2026-12-02T07:05:34.1234560Z"
    assert format_deploy_time(T0.replace(microsecond=0)) == "2026-12-02T07:05:34.0000000Z"
    with pytest.raises(ValueError):
        format_deploy_time(T0.replace(tzinfo=None))


def test_create_writes_kudu_fields_with_numeric_status(
    store: DeploymentStore, layout: SiteLayout
) -> None:
    record_id = store.new_id()
    assert len(record_id) == 32 and int(record_id, 16) >= 0
    store.create(id=record_id, deployer="GITHUB_ZIP_DEPLOY", message="hello")
    doc = json.loads((layout.deployments_dir / record_id / "status.json").read_text())
    assert doc["id"] == record_id
    assert doc["status"] == 0
    assert doc["status_text"] == "Receiving changes."
    assert doc["author"] == doc["author_email"] == "N/A"
    assert doc["complete"] is False and doc["end_time"] is None
    assert doc["received_time"].endswith("Z") and len(doc["received_time"]) == 28
    # No temp file left beside it (atomic write renames into place).
    assert sorted(p.name for p in (layout.deployments_dir / record_id).iterdir()) == ["status.json"]
    with pytest.raises(FileExistsError):
        store.create(id=record_id, deployer="x", message="again")


def test_round_trip_and_api_object(store: DeploymentStore) -> None:
    record = store.create(id="abc123", deployer="d", message="m", author="Ann")
    record.mark_building()
    record.changed_jobs = ["continuous/ticker"]
    store.save(record)
    again = store.get("abc123")
    assert again == record
    assert again is not None and again.status == DeployStatus.BUILDING
    assert again.status_text == "Building and Deploying 'abc123'."
    record.mark_success(T0)
    store.save(record)
    api = record.to_json("https://h.example:8443", active=True, site_name="mysite")
    assert list(api)[:20] == [
        "id",
        "status",
        "status_text",
        "author_email",
        "author",
        "deployer",
        "message",
        "progress",
        "received_time",
        "start_time",
        "end_time",
        "last_success_end_time",
        "complete",
        "active",
        "is_temp",
        "is_readonly",
        "url",
        "log_url",
        "site_name",
        "provisioningState",
    ]
    assert api["status"] == 4 and api["complete"] is True and api["active"] is True
    assert api["end_time"] == api["last_success_end_time"] == "2026-12-02T07:05:34.1234560Z"
    assert api["url"] == "https://h.example:8443/api/deployments/abc123"
    assert api["log_url"] == "https://h.example:8443/api/deployments/abc123/log"
    assert api["provisioningState"] == "Succeeded"
    assert api["changed_jobs"] == ["continuous/ticker"]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        "a\x00b",
        "-x",
        ".hidden",
        "active",
        "TOOLS",
        "drop",
        "x" * 129,
        "é",
        "a b",
    ],
)
def test_invalid_ids_never_name_a_path(store: DeploymentStore, bad: str) -> None:
    assert not is_valid_deployment_id(bad)
    assert store.get(bad) is None
    with pytest.raises(ValueError):
        store.create(id=bad, deployer="d", message="m")
    with pytest.raises(ValueError):
        store.log(bad)


@pytest.mark.parametrize(
    "good",
    [
        "0" * 40,
        "4f1c0e2a9b8d4c6e8f0a1b2c3d4e5f60",
        "4f1c0e2a-9b8d-4c6e-8f0a-1b2c3d4e5f60",
        "temp-0a1b2c3d",
        "abc123def1733123456789",
        "v1.2_build-7",
    ],
)
def test_kudu_ids_are_valid(good: str) -> None:
    assert is_valid_deployment_id(good)


def test_unreadable_records_are_skipped(store: DeploymentStore, layout: SiteLayout) -> None:
    finished(store, "good", DeployStatus.SUCCESS, T0)
    (layout.deployments_dir / "broken").mkdir()
    (layout.deployments_dir / "broken" / "status.json").write_text("{not json")
    (layout.deployments_dir / "other").mkdir()
    (layout.deployments_dir / "other" / "status.json").write_text(
        json.dumps({**store.get("good").to_document(), "id": "good"})  # type: ignore[union-attr]
    )
    (layout.deployments_dir / "linked").symlink_to(layout.deployments_dir / "good")
    (layout.deployments_dir / "empty").mkdir()
    (layout.deployments_dir / "active").write_text("good")
    assert [record.id for record in store.all()] == ["good"]
    assert store.get("broken") is None and store.get("other") is None
    assert store.active_id() == "good"


def test_all_is_newest_received_first(store: DeploymentStore) -> None:
    for offset, record_id in [(2, "b"), (0, "a"), (5, "c")]:
        finished(store, record_id, DeployStatus.SUCCESS, T0 + timedelta(minutes=offset))
    assert [record.id for record in store.all()] == ["c", "b", "a"]


def test_latest_prefers_unfinished_then_greatest_end_time(store: DeploymentStore) -> None:
    assert store.latest() is None
    old = finished(store, "old", DeployStatus.SUCCESS, T0)
    newer = finished(store, "newer", DeployStatus.FAILED, T0 + timedelta(minutes=1))
    # Received earlier but ended last: `latest` is by end time, as Kudu's.
    old.end_time = T0 + timedelta(hours=1)
    store.save(old)
    assert store.latest() == (old, False)
    running = store.create(id="running", deployer="d", message="m")
    assert store.latest() == (running, True)
    assert newer.id != running.id


def test_active(store: DeploymentStore, layout: SiteLayout) -> None:
    assert store.active_id() is None
    finished(store, "one", DeployStatus.SUCCESS, T0)
    store.set_active("one")
    assert layout.active_deployment_path.read_bytes() == b"one"
    assert store.active_id() == "one"
    layout.active_deployment_path.write_text("../../etc")
    assert store.active_id() is None


def test_delete_removes_the_whole_folder(store: DeploymentStore, layout: SiteLayout) -> None:
    finished(store, "gone", DeployStatus.FAILED, T0)
    store.log("gone").add("a line")
    store.manifest_path("gone").write_text("a.txt\n")
    store.delete("gone")
    assert store.get("gone") is None
    assert list(layout.deployments_dir.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        store.delete("gone")


def test_log_structure_children_and_raised_types(store: DeploymentStore) -> None:
    store.create(id="d1", deployer="d", message="m")
    deployment_log = store.log("d1")
    first = deployment_log.add("Fetching changes.")
    command = deployment_log.add("Running deployment command...")
    deployment_log.add("copied a.txt", parent=command)
    deployment_log.add("disk almost full", LogType.WARNING, parent=command)
    deployment_log.add("Deployment successful.")
    top = deployment_log.entries()
    assert [entry.message for entry in top] == [
        "Fetching changes.",
        "Running deployment command...",
        "Deployment successful.",
    ]
    assert [entry.type for entry in top] == [LogType.MESSAGE, LogType.WARNING, LogType.MESSAGE]
    assert [entry.has_children for entry in top] == [False, True, False]
    assert len({entry.id for entry in top}) == 3 and top[0].id == first
    children = deployment_log.children(command)
    assert [(c.message, c.type) for c in children] == [
        ("copied a.txt", LogType.MESSAGE),
        ("disk almost full", LogType.WARNING),
    ]
    assert deployment_log.children(first) == []
    assert deployment_log.children("nope") == []


def test_log_skips_a_line_cut_by_a_crash(store: DeploymentStore) -> None:
    store.create(id="d1", deployer="d", message="m")
    deployment_log = store.log("d1")
    deployment_log.add("whole")
    with deployment_log.path.open("ab") as handle:
        handle.write(b'{"id":"x","parent":null,"log_ti')
    assert [entry.message for entry in deployment_log.entries()] == ["whole"]
    assert deployment_log.last_error() is None


def test_log_appends_from_many_processes_never_interleave(store: DeploymentStore) -> None:
    store.create(id="d1", deployer="d", message="m")
    script = textwrap.dedent(
        """
        import sys
        from webjobsd.deploy.records import DeploymentLog
        from pathlib import Path
        log = DeploymentLog(Path(sys.argv[1]))
        for i in range(200):
            log.add(sys.argv[2] + str(i) + "x" * 3000)
        """
    )
    path = store.log("d1").path
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(path), f"w{n}-"]) for n in range(3)
    ]
    for writer in writers:
        assert writer.wait(timeout=60) == 0
    messages = [entry.message for entry in store.log("d1").entries()]
    assert len(messages) == 600
    assert len(path.read_bytes().splitlines()) == 600


def test_retention_keeps_ten_succeeded_the_active_running_and_newest_failed(
    store: DeploymentStore,
) -> None:
    ids = []
    for n in range(13):
        ids.append(
            finished(store, f"ok{n:02d}", DeployStatus.SUCCESS, T0 + timedelta(minutes=n)).id
        )
    store.set_active("ok00")  # the oldest one is active: never purged
    for n in range(3):
        finished(store, f"bad{n}", DeployStatus.FAILED, T0 + timedelta(minutes=20 + n))
    running = store.create(id="running", deployer="d", message="m")
    running.received_time = T0 - timedelta(days=30)  # the oldest of all, still running
    store.save(running)
    removed = store.purge()
    kept = {record.id for record in store.all()}
    assert kept == {"running", "ok00", "bad2", *ids[3:]}
    assert sorted(removed) == ["bad0", "bad1", "ok01", "ok02"]
    assert store.purge() == []


def test_repair_marks_unfinished_failed_with_kudus_text(store: DeploymentStore) -> None:
    finished(store, "done", DeployStatus.SUCCESS, T0)
    stuck = store.create(id="stuck", deployer="d", message="m")
    stuck.mark_building()
    stuck.progress = "Extracting"
    store.save(stuck)
    assert store.repair_if_lock_free() == ["stuck"]
    record = store.get("stuck")
    assert record is not None
    assert record.status == DeployStatus.FAILED and record.complete
    assert record.end_time is not None and record.status_text == "" and record.progress == ""
    assert record.last_success_end_time is None
    entries = store.log("stuck").entries()
    assert [(e.message, e.type) for e in entries] == [(UNKNOWN_ERROR, LogType.ERROR)]
    assert store.get("done") is not None and store.get("done").status == DeployStatus.SUCCESS  # type: ignore[union-attr]
    assert store.repair_if_lock_free() == []


def test_repair_leaves_records_alone_while_a_deployment_holds_the_lock(
    store: DeploymentStore, layout: SiteLayout
) -> None:
    store.create(id="live", deployer="d", message="m")
    holder = DeploymentLock(layout)
    assert holder.try_acquire({"who": "test"})
    try:
        assert store.repair_if_lock_free() is None
        assert store.get("live").status == DeployStatus.PENDING  # type: ignore[union-attr]
    finally:
        holder.release()
    assert store.repair_if_lock_free() == ["live"]


def test_a_record_from_kudu_style_dates_reads(store: DeploymentStore, layout: SiteLayout) -> None:
    folder = layout.deployments_dir / "k1"
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(
        json.dumps(
            {
                "id": "k1",
                "status": 4,
                "received_time": "2024-05-01T10:11:12.1234567Z",
                "end_time": "2024-05-01T10:11:13Z",
                "complete": True,
            }
        )
    )
    record = store.get("k1")
    assert record is not None
    assert record.received_time == datetime(2024, 5, 1, 10, 11, 12, 123456, tzinfo=UTC)
    assert record.start_time == record.received_time
    assert record.author == "N/A" and record.is_readonly
    assert os.path.exists(folder / "status.json")
