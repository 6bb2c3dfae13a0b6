"""Working copies over real folders: made for a spec, verified, reused while the folder settles."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from tests.unit.test_contents import make_deep, write

from webjobsd.discovery.catalog import Catalog
from webjobsd.model import JobKey, JobKind, JobSpec
from webjobsd.runtime.workcopy import FolderChanged, WorkingCopy, remove_tree

APP = JobKey(JobKind.CONTINUOUS, "app")


class Job:
    """A job folder, the catalog that settles it, and its working copy."""

    def __init__(self, root: Path) -> None:
        self.jobs = root / "jobs"
        self.folder = self.jobs / "continuous" / "app"
        self.copies = root / "temp" / "app"
        self.catalog = Catalog(self.jobs, settle_s=0.0, which=lambda name: f"/usr/bin/{name}")
        self.copy = WorkingCopy(self.folder, self.copies)
        self.notes: list[str] = []

    def settled(self) -> JobSpec:
        self.catalog.refresh()
        return self.catalog.specs[APP]

    def prepare(self, spec: JobSpec) -> Path:
        return self.copy.prepare(spec, self.notes.append)


@pytest.fixture
def job(tmp_path: Path) -> Job:
    made = Job(tmp_path)
    write(made.folder, "run.sh", b"echo v1\n")
    write(made.folder, "lib/data.txt", b"one\n")
    return made


def test_a_copy_is_reused_for_its_spec_and_rebuilt_for_a_new_one(job: Job) -> None:
    spec = job.settled()
    first = job.prepare(spec)
    assert (first / "run.sh").read_bytes() == b"echo v1\n"
    assert job.prepare(spec) == first
    write(job.folder, "run.sh", b"echo v2, longer\n")
    second = job.prepare(job.settled())
    assert second != first and not first.exists()
    assert (second / "run.sh").read_bytes() == b"echo v2, longer\n"
    assert job.notes == [
        "Job directory change detected: the job files changed since the last copy."
    ]


def test_while_the_folder_changes_the_last_settled_copy_runs(job: Job) -> None:
    spec = job.settled()
    first = job.prepare(spec)
    write(job.folder, "run.sh", b"echo half-wr", age_s=0.0)  # the catalog has not settled it
    assert job.prepare(spec) == first
    assert (first / "run.sh").read_bytes() == b"echo v1\n"


def test_a_copy_that_does_not_match_the_settled_spec_is_refused(job: Job) -> None:
    spec = job.settled()
    write(job.folder, "run.sh", b"echo half-wr", age_s=0.0)
    with pytest.raises(FolderChanged):
        job.prepare(spec)
    assert job.copy.current is None
    assert list(job.copies.iterdir()) == []


def test_a_refused_copy_keeps_the_previous_one(job: Job) -> None:
    first = job.prepare(job.settled())
    write(job.folder, "run.sh", b"echo v2\n")
    newer = job.settled()
    write(job.folder, "run.sh", b"echo v3, being written\n", age_s=0.0)
    with pytest.raises(FolderChanged):
        job.prepare(newer)
    assert job.copy.current == first
    assert list(job.copies.iterdir()) == [first]
    assert (first / "run.sh").read_bytes() == b"echo v1\n"


def test_a_copy_the_job_changed_is_made_again(job: Job) -> None:
    spec = job.settled()
    first = job.prepare(spec)
    (first / "lib" / "data.txt").write_text("scribbled\n")
    (first / "new-output.txt").write_text("the job's own file does not count\n")
    second = job.prepare(spec)
    assert second != first
    assert (second / "lib" / "data.txt").read_text() == "one\n"
    assert "Job file 'lib/data.txt' timestamp differs" in job.notes[-1]


def test_noise_is_not_copied_links_are_special_files_are_skipped(job: Job) -> None:
    for noise in (".run.sh.aB3xY9", ".in.data.txt.", "x.filepart", ".git/HEAD", "a.pyc"):
        write(job.folder, noise, age_s=60)
    write(job.folder, ".env", b"KEY=1\n")
    os.symlink("lib/data.txt", job.folder / "data")
    os.mkfifo(job.folder / "pipe")
    (job.folder / "empty").mkdir()
    copy = job.prepare(job.settled())
    found = sorted(
        os.path.relpath(os.path.join(folder, name), copy)
        for folder, folders, files in os.walk(copy)
        for name in (*folders, *files)
    )
    assert found == [".env", "data", "empty", "lib", "lib/data.txt", "run.sh"]
    assert os.readlink(copy / "data") == "lib/data.txt"
    assert job.notes == ["Skipped 'pipe': a FIFO is not a job file and is not copied."]


def test_modes_and_times_are_kept(job: Job) -> None:
    script = job.folder / "run.sh"
    script.chmod(0o750)
    os.utime(script, ns=(1_700_000_000_000_000_000, 1_700_000_000_123_456_789))
    copy = job.prepare(job.settled())
    copied = (copy / "run.sh").stat()
    assert copied.st_mode & 0o777 == 0o750
    assert copied.st_mtime_ns == 1_700_000_000_123_456_789


def test_a_folder_deeper_than_the_recursion_limit_is_copied_and_removed(job: Job) -> None:
    write(make_deep(job.folder, 1200), "deep.txt", b"down here\n")
    try:
        copy = job.prepare(job.settled())
        assert (copy / Path(*["d"] * 1200) / "deep.txt").read_text() == "down here\n"
        job.copy.discard()
        assert not job.copies.exists()
    finally:
        remove_tree(job.folder / "d")  # pytest's own clean-up recurses
        job.copy.discard()


def test_remove_tree_removes_read_only_folders(tmp_path: Path) -> None:
    locked = tmp_path / "copy" / "locked"
    write(locked, "f.txt")
    locked.chmod(0o500)
    remove_tree(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_an_in_place_job_waits_for_its_folder_to_hold_the_settled_files(job: Job) -> None:
    spec = job.settled()
    assert job.copy.check_in_place(spec) == job.folder
    write(job.folder, "lib/data.txt", b"half", age_s=0.0)
    with pytest.raises(FolderChanged):
        job.copy.check_in_place(spec)
    write(job.folder, "lib/data.txt", b"one\n", age_s=0.0)
    assert job.copy.check_in_place(spec) == job.folder


def test_a_first_copy_removes_copies_left_from_before(job: Job) -> None:
    stale = job.copies / "leftover"
    write(stale, "old.txt")
    copy = job.prepare(job.settled())
    assert list(job.copies.iterdir()) == [copy]


def test_remove_tree_of_a_link_removes_the_link_not_its_target(tmp_path: Path) -> None:
    target = write(tmp_path / "target", "keep.txt").parent
    os.symlink(target, tmp_path / "link")
    remove_tree(tmp_path / "link")
    assert not os.path.lexists(tmp_path / "link")
    assert (target / "keep.txt").exists()


def test_a_copy_across_file_systems_reads_and_writes(tmp_path: Path) -> None:
    """copy_file_range refuses (EXDEV) between tmpfs and a disk: the copy falls back."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the temp folder")
    source = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        made = Job(tmp_path)
        made.jobs = source / "jobs"
        made.folder = made.jobs / "continuous" / "app"
        made.catalog = Catalog(made.jobs, settle_s=0.0, which=lambda name: f"/usr/bin/{name}")
        made.copy = WorkingCopy(made.folder, made.copies)
        write(made.folder, "run.sh", b"echo across\n" * 1000)
        copy = made.prepare(made.settled())
        assert os.stat(copy).st_dev != os.stat(made.folder).st_dev
        assert (copy / "run.sh").read_bytes() == b"echo across\n" * 1000
    finally:
        remove_tree(source)
