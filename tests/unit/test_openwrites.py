"""Open-for-write bookkeeping from inotify events (pure, clock-driven), and the look into /proc
for folders that arrived."""

from __future__ import annotations

import os
from pathlib import Path

from webjobsd.discovery.openwrites import CreatorOpens, OpenWrites, writers_under_each

J = "/jobs/continuous/app"


def test_a_write_holds_until_the_close() -> None:
    writes = OpenWrites()
    writes.event("modified", f"{J}/big.bin", "", is_directory=False, now=1.0)
    writes.event("modified", f"{J}/big.bin", "", is_directory=False, now=2.0)
    assert writes.open_paths(100.0) == {f"{J}/big.bin": 1.0}
    writes.event("closed", f"{J}/big.bin", "", is_directory=False, now=101.0)
    assert writes.open_paths(101.0) == {}


def test_a_creators_open_holds_but_a_readers_close_releases_an_unwritten_one() -> None:
    opens, writes = CreatorOpens(), OpenWrites()
    path = f"{J}/lib.txt"
    for kind in ("created", "opened"):
        if opens.keep(kind, path, is_directory=False, now=0.0):
            writes.event(kind, path, "", is_directory=False, now=0.0)
    assert writes.open_paths(1.0) == {path: 0.0}
    assert writes.open_paths(1.0, written_only=True) == {}
    assert opens.keep("closed_no_write", path, is_directory=False, now=1.0)
    writes.event("closed_no_write", path, "", is_directory=False, now=1.0)
    assert writes.open_paths(1.0) == {}
    # A later reader's open of the same file is not passed on at all.
    assert not opens.keep("opened", path, is_directory=False, now=2.0)
    assert not opens.keep("closed_no_write", path, is_directory=False, now=2.0)


def test_a_readers_close_does_not_end_the_mark_of_a_file_its_creator_still_holds() -> None:
    """An FTP upload that stalls before its first byte: the file is created and held open; the
    daemon reads it meanwhile (hashing). The reader's close must not end the writer's mark; the
    creator's close does."""
    opens, writes = CreatorOpens(), OpenWrites()
    path = f"{J}/lib.txt"

    def event(kind: str, now: float) -> None:
        if opens.keep(kind, path, is_directory=False, now=now):
            writes.event(kind, path, "", is_directory=False, now=now)

    event("created", 0.0)
    event("opened", 0.0)  # the creator's
    for at in (1.0, 2.0):  # two reads while the upload stalls
        event("opened", at)
        event("closed_no_write", at + 0.1)
        assert writes.open_paths(at + 0.2) == {path: 0.0}
    event("opened", 3.0)  # a reader still has it open when the creator closes
    event("closed", 4.0)
    assert writes.open_paths(4.0) == {}
    event("closed_no_write", 4.5)
    assert writes.open_paths(4.5) == {}


def test_a_create_without_its_open_is_forgotten() -> None:
    opens = CreatorOpens()
    assert opens.keep("created", f"{J}/link", is_directory=False, now=0.0)  # ln -s: no open
    assert not opens.keep("opened", f"{J}/link", is_directory=False, now=60.0)


def test_made_up_events_of_a_folder_moved_in_are_not_passed_on() -> None:
    """The files of a folder renamed in are reported as created (the folder's own move event
    names the job already): not passed on, and the next open (a reader's: the daemon's own, or
    an in-place job's interpreter) does not count as a creator's."""
    opens = CreatorOpens()
    assert not opens.keep("created", f"{J}/run.sh", is_directory=False, now=0.0, synthetic=True)
    assert not opens.keep("created", f"{J}/lib", is_directory=True, now=0.0, synthetic=True)
    assert not opens.keep("opened", f"{J}/run.sh", is_directory=False, now=0.01)


def test_marks_move_with_a_rename_and_go_with_a_delete() -> None:
    writes = OpenWrites()
    writes.event("modified", "/jobs/.staging/x/run.sh", "", is_directory=False, now=0.0)
    writes.event("moved", "/jobs/.staging/x", J, is_directory=True, now=1.0)
    assert writes.open_paths(1.0) == {f"{J}/run.sh": 0.0}
    writes.event("deleted", J, "", is_directory=True, now=2.0)
    assert writes.open_paths(2.0) == {}


def test_vim_swap_files_never_hold_and_the_cap_releases_a_stale_mark() -> None:
    writes = OpenWrites(cap_s=60.0)
    writes.event("modified", f"{J}/.run.sh.swp", "", is_directory=False, now=0.0)
    writes.event("modified", f"{J}/data.bin", "", is_directory=False, now=0.0)
    assert writes.open_paths(59.0) == {f"{J}/data.bin": 0.0}
    assert writes.open_paths(60.0) == {}


def test_an_upload_temp_name_open_for_writing_holds_its_job_other_noise_does_not() -> None:
    from pathlib import Path

    from webjobsd.discovery.watcher import writing_job
    from webjobsd.model import JobKey, JobKind

    root = Path("/jobs")
    app = JobKey(JobKind.CONTINUOUS, "app")
    assert writing_job(root, f"{J}/big.bin") == app
    assert writing_job(root, f"{J}/.big.bin.Ab12Cd") == app  # rsync
    assert writing_job(root, f"{J}/lib/.in.data.bin.") == app  # lftp, proftpd
    assert writing_job(root, f"{J}/cache.tmp") is None
    assert writing_job(root, f"{J}/.git/.pack.Ab12Cd") is None
    assert writing_job(root, "/elsewhere/continuous/app/.big.bin.Ab12Cd") is None


def test_one_look_into_proc_answers_for_each_folder(tmp_path: Path) -> None:
    """Folders that arrived together are asked about in one pass over /proc; each gets its own
    answer (this process writes into one of them and only reads in the other)."""
    written, quiet = tmp_path / "written", tmp_path / "quiet"
    for folder in (written, quiet):
        folder.mkdir()
        (folder / "run.sh").write_text("echo\n")
    with open(quiet / "run.sh", "rb"), open(written / "data.bin", "wb") as writer:
        writer.write(b"half")
        writer.flush()
        answers = writers_under_each([written, quiet])
    assert answers[written] is True
    if os.geteuid() == 0:  # every process's descriptors can be read: /proc tells
        assert answers[quiet] is False
        assert writers_under_each([written, quiet]) == {written: False, quiet: False}
    else:
        assert answers[quiet] is not True
