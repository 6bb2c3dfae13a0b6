"""KuduSync's rules and whole job folders (deploy/sync.py), on real files in a temp folder."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from webjobsd.deploy.staging import STAGING, Staging
from webjobsd.deploy.sync import (
    TEMP_PREFIX,
    SyncError,
    first_deployment_manifest,
    read_manifest,
    remove_sync_leftovers,
    sync_tree,
    write_manifest,
)

OLD = 1_600_000_000_000_000_000  # a fixed mtime (ns), as a zip's entries carry


def mtime_of(content: str) -> int:
    """Edited content gets another mtime, the same content the same one (as in a zip)."""
    return OLD + zlib.crc32(content.encode()) % 100_000 * 1_000_000_000


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        os.utime(path, ns=(mtime_of(content), mtime_of(content)))
    return root


def contents(root: Path) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and STAGING not in path.parts:
            found[str(path.relative_to(root))] = path.read_text()
    return found


class Sync:
    """A wwwroot with its jobs root, synced the way the pipeline does it."""

    def __init__(self, base: Path, jobs_rel: str = "App_Data/jobs") -> None:
        self.base = base
        self.wwwroot = base / "wwwroot"
        self.jobs_root = self.wwwroot / jobs_rel
        self.staging = Staging(self.jobs_root, "inst1")
        self.count = 0
        self.manifest: set[str] | None = None

    def deploy(self, files: dict[str, str], *, clean: bool = False, **kwargs: object):  # type: ignore[no-untyped-def]
        self.count += 1
        source = tree(self.base / f"src{self.count}", files)
        previous = None if clean else (self.manifest or set())
        result = sync_tree(
            source,
            self.wwwroot,
            jobs_root=self.jobs_root,
            staging=self.staging,
            previous=previous,
            **kwargs,  # type: ignore[arg-type]
        )
        self.manifest = set(result.manifest)
        return result


JOBS = {
    "index.html": "<h1>v1</h1>",
    "App_Data/jobs/continuous/a/run.sh": "echo a1",
    "App_Data/jobs/continuous/b/run.sh": "echo b1",
    "App_Data/jobs/triggered/t/run.sh": "echo t1",
}


def test_copies_only_what_differs_and_keeps_mtimes(tmp_path: Path) -> None:
    sync = Sync(tmp_path)
    first = sync.deploy(JOBS)
    assert first.copied == 4
    assert contents(sync.wwwroot) == JOBS
    assert (sync.wwwroot / "index.html").stat().st_mtime_ns == mtime_of(JOBS["index.html"])
    again = sync.deploy(JOBS)
    assert (again.copied, again.deleted, again.changed_jobs) == (0, 0, [])
    # Same size, other mtime: copied (KuduSync's test), and the mtime follows.
    source = tree(tmp_path / "src-mtime", JOBS)
    os.utime(source / "index.html", ns=(OLD, OLD))
    result = sync_tree(
        source, sync.wwwroot, jobs_root=sync.jobs_root, staging=sync.staging, previous=set()
    )
    assert result.copied == 1
    assert (sync.wwwroot / "index.html").stat().st_mtime_ns == OLD


def test_same_size_and_mtime_with_other_bytes_is_copied(tmp_path: Path) -> None:
    """Reproducible builds (`zip -X`, SOURCE_DATE_EPOCH) give every version the same mtimes: a
    change of the same size must still deploy, or the old code keeps running."""
    sync = Sync(tmp_path)
    sync.deploy(JOBS)
    source = tree(tmp_path / "src-same-stamp", JOBS)
    changed = source / "App_Data/jobs/continuous/a/run.sh"
    changed.write_text("echo a2")  # the same length as "echo a1"
    stamp = mtime_of(JOBS["App_Data/jobs/continuous/a/run.sh"])
    os.utime(changed, ns=(stamp, stamp))
    result = sync_tree(
        source, sync.wwwroot, jobs_root=sync.jobs_root, staging=sync.staging, previous=set()
    )
    assert result.copied == 1
    assert result.changed_jobs == ["continuous/a"]
    assert (sync.wwwroot / "App_Data/jobs/continuous/a/run.sh").read_text() == "echo a2"


def test_a_job_whose_files_only_got_new_times_is_not_changed(tmp_path: Path) -> None:
    """A package rebuilt with fresh timestamps: web content follows KuduSync (copied, new mtime),
    but a job folder whose bytes are the same is not rebuilt, nor listed as changed."""
    sync = Sync(tmp_path)
    sync.deploy(JOBS)
    live_a = sync.jobs_root / "continuous/a"
    inode = live_a.stat().st_ino
    source = tree(tmp_path / "src-new-times", JOBS)
    for path in source.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(OLD + 7, OLD + 7))
    result = sync_tree(
        source, sync.wwwroot, jobs_root=sync.jobs_root, staging=sync.staging, previous=set()
    )
    assert result.changed_jobs == []
    assert result.copied == 1  # index.html only
    assert live_a.stat().st_ino == inode
    assert (sync.wwwroot / "index.html").stat().st_mtime_ns == OLD + 7
    # The exec bit is part of a job's content: a mode change alone still rebuilds the job.
    (source / "App_Data/jobs/continuous/b/run.sh").chmod(0o755)
    result = sync_tree(
        source, sync.wwwroot, jobs_root=sync.jobs_root, staging=sync.staging, previous=set()
    )
    assert result.changed_jobs == ["continuous/b"]


def test_the_manifest_lists_files_and_folders_but_never_ignored_names(tmp_path: Path) -> None:
    sync = Sync(tmp_path)
    result = sync.deploy(
        {
            "a/b.txt": "x",
            ".git/config": "secret",
            "sub/.hg/store": "x",
            ".deployment": "[config]",
            "deploy.sh": "rm -rf /",
            "sub/keep.txt": "k",
        }
    )
    assert result.manifest == ["a", "a/b.txt", "sub", "sub/keep.txt"]
    assert contents(sync.wwwroot) == {"a/b.txt": "x", "sub/keep.txt": "k"}
    path = tmp_path / "manifest"
    write_manifest(path, result.manifest)
    assert read_manifest(path) == set(result.manifest)
    path.write_text("a\\b.txt\r\n\r\n/sub/\n")  # Windows separators, blank lines
    assert read_manifest(path) == {"a/b.txt", "sub"}
    assert read_manifest(tmp_path / "none") is None


def test_deletes_only_what_the_previous_manifest_lists_unless_clean(tmp_path: Path) -> None:
    sync = Sync(tmp_path)
    sync.deploy({"keep.txt": "1", "gone.txt": "1", "olddir/x.txt": "1"})
    tree(sync.wwwroot, {"uploaded-by-ftp.txt": "ftp", "olddir/runtime.log": "log"})
    (sync.wwwroot / ".git").mkdir()
    result = sync.deploy({"keep.txt": "1"})
    # gone.txt and olddir were in the manifest: KuduSync deletes a listed folder whole.
    assert contents(sync.wwwroot) == {"keep.txt": "1", "uploaded-by-ftp.txt": "ftp"}
    assert result.deleted == 2
    sync.deploy({"keep.txt": "22"}, clean=True)
    assert contents(sync.wwwroot) == {"keep.txt": "22"}
    assert (sync.wwwroot / ".git").is_dir(), "ignored names are never deleted"


def test_first_deployment_manifest(tmp_path: Path) -> None:
    site = tmp_path / "site-root"
    assert first_deployment_manifest(site) == {"hostingstart.html"}
    (site / "site").mkdir(parents=True)
    (site / "site" / "firstDeploymentManifest").write_text("old.html\nimg\n")
    assert first_deployment_manifest(site) == {"old.html", "img"}
    sync = Sync(tmp_path)
    tree(sync.wwwroot, {"hostingstart.html": "placeholder", "mine.txt": "m"})
    sync.manifest = first_deployment_manifest(tmp_path / "nothing-here")
    sync.deploy({"index.html": "i"})
    assert contents(sync.wwwroot) == {"index.html": "i", "mine.txt": "m"}


def test_an_unchanged_job_folder_is_not_touched_a_changed_one_is_swapped_whole(
    tmp_path: Path,
) -> None:
    sync = Sync(tmp_path)
    first = sync.deploy(JOBS)
    assert first.changed_jobs == ["continuous/a", "continuous/b", "triggered/t"]
    a, b = sync.jobs_root / "continuous" / "a", sync.jobs_root / "continuous" / "b"
    a_inode, b_inode = a.stat().st_ino, b.stat().st_ino
    b_run_inode = (b / "run.sh").stat().st_ino
    (a / "runtime.txt").write_text("made by the job")
    (b / "runtime.txt").write_text("made by the job")
    v2 = {**JOBS, "App_Data/jobs/continuous/a/run.sh": "echo a2"}
    second = sync.deploy(v2)
    assert second.changed_jobs == ["continuous/a"]
    assert second.removed_jobs == []
    assert a.stat().st_ino != a_inode, "a changed job folder is swapped in, not edited"
    assert (a / "run.sh").read_text() == "echo a2"
    assert (a / "runtime.txt").read_text() == "made by the job", "run-time files survive"
    assert b.stat().st_ino == b_inode and (b / "run.sh").stat().st_ino == b_run_inode
    assert not (sync.jobs_root / STAGING).exists()
    # A file deleted from a job is deleted (it was in the manifest), in a new folder.
    third = sync.deploy({**v2, "App_Data/jobs/continuous/b/lib.sh": "x"})
    assert third.changed_jobs == ["continuous/b"]
    fourth = sync.deploy(v2)
    assert fourth.changed_jobs == ["continuous/b"]
    assert sorted(p.name for p in b.iterdir()) == ["run.sh", "runtime.txt"]


def test_removed_jobs_go_in_one_step_ftp_jobs_stay(tmp_path: Path) -> None:
    sync = Sync(tmp_path)
    sync.deploy(JOBS)
    tree(sync.jobs_root, {"continuous/by-ftp/run.sh": "echo ftp"})
    result = sync.deploy({k: v for k, v in JOBS.items() if "/b/" not in k})
    assert result.removed_jobs == ["continuous/b"]
    assert result.changed_jobs == []
    assert not (sync.jobs_root / "continuous" / "b").exists()
    assert (sync.jobs_root / "continuous" / "by-ftp" / "run.sh").exists()
    clean = sync.deploy({"index.html": "only"}, clean=True)
    assert sorted(clean.removed_jobs) == ["continuous/a", "continuous/by-ftp", "triggered/t"]
    assert contents(sync.wwwroot) == {"index.html": "only"}
    assert not (sync.wwwroot / "App_Data").exists(), "emptied folders above the jobs go"


def test_a_listed_app_data_goes_job_by_job_keeping_other_content_rules(tmp_path: Path) -> None:
    sync = Sync(tmp_path)
    sync.deploy({**JOBS, "App_Data/data.txt": "d"})
    result = sync.deploy({"index.html": "<h1>v1</h1>"})
    assert sorted(result.removed_jobs) == ["continuous/a", "continuous/b", "triggered/t"]
    assert contents(sync.wwwroot) == {"index.html": "<h1>v1</h1>"}
    assert not (sync.wwwroot / "App_Data").exists()


def test_jobs_root_moved_by_webjobs_root_path(tmp_path: Path) -> None:
    sync = Sync(tmp_path, jobs_rel="background/jobs")
    files = {
        "background/jobs/continuous/a/run.sh": "echo a1",
        "background/jobs/continuous/b/run.sh": "echo b1",
        "App_Data/jobs/continuous/not-a-job-here/run.sh": "x",
    }
    sync.deploy(files)
    b = sync.jobs_root / "continuous" / "b"
    inode = b.stat().st_ino
    result = sync.deploy(
        {
            **files,
            "background/jobs/continuous/a/run.sh": "echo a2",
            "App_Data/jobs/continuous/not-a-job-here/run.sh": "y",
        }
    )
    assert result.changed_jobs == ["continuous/a"]
    assert b.stat().st_ino == inode


def test_a_target_inside_a_job_folder_rebuilds_that_job(tmp_path: Path) -> None:
    sync = Sync(tmp_path)
    sync.deploy(JOBS)
    a = sync.jobs_root / "continuous" / "a"
    inode = a.stat().st_ino
    source = tree(tmp_path / "artifact", {"lib/helper.sh": "echo help"})
    result = sync_tree(
        source, a / "bin", jobs_root=sync.jobs_root, staging=sync.staging, previous=None
    )
    assert result.changed_jobs == ["continuous/a"]
    assert a.stat().st_ino != inode
    assert (a / "run.sh").read_text() == "echo a1"
    assert (a / "bin" / "lib" / "helper.sh").read_text() == "echo help"


def test_a_failure_while_building_jobs_changes_nothing(tmp_path: Path) -> None:
    sync = Sync(tmp_path)
    sync.deploy(JOBS)
    a = sync.jobs_root / "continuous" / "a"
    inode = a.stat().st_ino
    changed = {
        **JOBS,
        "index.html": "<h1>v2</h1>",
        "App_Data/jobs/continuous/a/run.sh": "echo a2",
        "App_Data/jobs/continuous/b/run.sh": "echo b2",
    }
    source = tree(tmp_path / "src-broken", changed)

    def break_source(message: str) -> None:
        if message.startswith("Preparing job folders"):
            (source / "App_Data/jobs/continuous/b/run.sh").unlink()

    with pytest.raises(FileNotFoundError):
        sync_tree(
            source,
            sync.wwwroot,
            jobs_root=sync.jobs_root,
            staging=sync.staging,
            previous=set(sync.manifest or ()),
            progress=break_source,
        )
    assert contents(sync.wwwroot) == JOBS
    assert a.stat().st_ino == inode
    assert not (sync.jobs_root / STAGING).exists()


def test_links_in_the_target_are_replaced_never_followed(tmp_path: Path) -> None:
    outside = tree(tmp_path / "outside", {"victim.txt": "safe"})
    sync = Sync(tmp_path)
    sync.wwwroot.mkdir()
    (sync.wwwroot / "node_modules").symlink_to(outside)
    (sync.wwwroot / "file.txt").symlink_to(outside / "victim.txt")
    sync.deploy({"node_modules/x.js": "x", "file.txt": "new"})
    assert (outside / "victim.txt").read_text() == "safe"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert not (sync.wwwroot / "node_modules").is_symlink()
    assert not (sync.wwwroot / "file.txt").is_symlink()
    assert contents(sync.wwwroot) == {"file.txt": "new", "node_modules/x.js": "x"}


def test_refusals(tmp_path: Path) -> None:
    sync = Sync(tmp_path)
    sync.deploy(JOBS)
    source = tree(tmp_path / "src-file-for-jobs", {"App_Data/jobs": "a file"})
    with pytest.raises(SyncError, match="jobs folder"):
        sync_tree(
            source, sync.wwwroot, jobs_root=sync.jobs_root, staging=sync.staging, previous=None
        )
    assert contents(sync.wwwroot) == JOBS
    fifo_source = tree(tmp_path / "src-fifo", {"a.txt": "a"})
    os.mkfifo(fifo_source / "pipe")
    with pytest.raises(SyncError, match="not a file"):
        sync_tree(
            fifo_source, sync.wwwroot, jobs_root=sync.jobs_root, staging=sync.staging, previous=None
        )
    with pytest.raises(SyncError, match="overlap"):
        sync_tree(
            sync.wwwroot,
            sync.wwwroot / "x",
            jobs_root=sync.jobs_root,
            staging=sync.staging,
            previous=None,
        )


def test_temporary_files_of_a_killed_sync_are_removed(tmp_path: Path) -> None:
    sync = Sync(tmp_path)
    sync.deploy({"a/b.txt": "b"})
    leftover = sync.wwwroot / "a" / f"{TEMP_PREFIX}0123.tmp"
    leftover.write_text("half")
    assert remove_sync_leftovers(sync.wwwroot) == 1
    assert not leftover.exists()
    leftover.write_text("half")
    sync.deploy({"a/b.txt": "b"})
    assert not leftover.exists(), "a later sync removes them too"
