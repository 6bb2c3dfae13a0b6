"""A job folder's content over real files: what counts, the hash cache, odd entries."""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from webjobsd.discovery.contents import (
    EntryKind,
    HashCache,
    content_digest,
    open_regular,
    read_content,
)
from webjobsd.discovery.ignore import is_ignored_name, is_upload_temp_name
from webjobsd.runtime.workcopy import remove_tree

LATER = 3600.0  # a scan an hour after the files were written: none of them is racy


def write(root: Path, rel: str, data: bytes = b"echo hi\n", *, age_s: float = 60.0) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    old = time.time() - age_s
    os.utime(path, (old, old))
    return path


def make_deep(root: Path, depth: int) -> Path:
    """`depth` nested folders, made one by one (pathlib's and os's makedirs recurse)."""
    path = os.fspath(root)
    for _ in range(depth):
        path = os.path.join(path, "d")
        os.mkdir(path)
    return Path(path)


def scan(root: Path, cache: HashCache | None = None) -> str:
    return content_digest(read_content(root, cache, now=time.time() + LATER))


@pytest.mark.parametrize(
    "name",
    [
        ".run.sh.aB3xY9",  # rsync
        ".big.bin.000000",
        ".in.run.sh.",  # proftpd
        ".in.run.sh",  # lftp 4.9
        ".pureftpd-upload.5f3a.1.ab",
        "bundle.zip.filepart",  # WinSCP
        "data.part",
        "setup.crdownload",
        "x.partial",
    ],
)
def test_upload_temp_names_are_noise_that_marks_an_upload(name: str) -> None:
    assert is_ignored_name(name)
    assert is_upload_temp_name(name)


@pytest.mark.parametrize(
    "name",
    [
        ".env",
        ".config",
        ".npmrc",
        ".eslintrc.json",
        "run.sh",
        "settings.job",
        "disable.job",
        ".a.abcde",
        ".a.abcdefg",
        "..abcdef",
    ],
)
def test_job_files_that_look_alike_are_job_files(name: str) -> None:
    assert not is_ignored_name(name)
    assert not is_upload_temp_name(name)


def test_unchanged_files_are_read_once(tmp_path: Path) -> None:
    for index in range(20):
        write(tmp_path, f"lib/f{index}.txt", b"x" * index)
    cache = HashCache()
    first = scan(tmp_path, cache)
    assert cache.files_hashed == 20
    assert scan(tmp_path, cache) == first
    assert cache.files_hashed == 20


def test_touch_reads_the_file_again_and_keeps_the_digest(tmp_path: Path) -> None:
    path = write(tmp_path, "run.sh")
    cache = HashCache()
    first = scan(tmp_path, cache)
    os.utime(path)
    assert scan(tmp_path, cache) == first
    assert cache.files_hashed == 2


def test_new_bytes_under_the_same_size_and_mtime_change_the_digest(tmp_path: Path) -> None:
    """What `unzip -o` of a zip built with fixed dates does: only the inode's ctime tells."""
    path = write(tmp_path, "run.sh", b"echo AAAA\n")
    before = path.stat()
    cache = HashCache()
    first = scan(tmp_path, cache)
    with open(path, "r+b") as handle:
        handle.write(b"echo BBBB\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert scan(tmp_path, cache) != first


def test_a_file_changed_just_now_is_read_again(tmp_path: Path) -> None:
    """Timestamps move in ticks: a hash taken within RACY_S of a change is not trusted."""
    write(tmp_path, "run.sh")
    cache = HashCache()
    read_content(tmp_path, cache)  # now: the file's ctime is this very moment
    read_content(tmp_path, cache)
    assert cache.files_hashed == 2


def test_the_cache_holds_only_files_that_exist(tmp_path: Path) -> None:
    paths = [write(tmp_path, f"f{index}") for index in range(10)]
    cache = HashCache()
    scan(tmp_path, cache)
    assert len(cache) == 10
    for path in paths[3:]:
        path.unlink()
    scan(tmp_path, cache)
    assert len(cache) == 3
    cache.forget(os.fspath(tmp_path))
    assert len(cache) == 0


def test_exec_bit_and_link_targets_count_noise_does_not(tmp_path: Path) -> None:
    script = write(tmp_path, "run.sh")
    os.symlink("run.sh", tmp_path / "start")
    first = scan(tmp_path)
    for noise in (".run.sh.aB3xY9", "run.sh~", ".git/HEAD", "__pycache__/x.pyc", "up.filepart"):
        write(tmp_path, noise)
    (tmp_path / "empty").mkdir()
    write(tmp_path, "settings.job", b'{"is_singleton": true}')
    assert scan(tmp_path) == first
    script.chmod(0o755)
    executable = scan(tmp_path)
    assert executable != first
    os.unlink(tmp_path / "start")
    os.symlink("other.sh", tmp_path / "start")
    assert scan(tmp_path) not in (first, executable)
    kinds = {entry.rel: entry.kind for entry in read_content(tmp_path).entries}
    assert kinds == {
        "run.sh": EntryKind.EXECUTABLE,
        "start": EntryKind.LINK,
        "settings.job": EntryKind.FILE,
    }


def test_an_upload_in_progress_is_recent_but_not_content(tmp_path: Path) -> None:
    write(tmp_path, "run.sh")
    first = read_content(tmp_path)
    write(tmp_path, ".big.bin.Qw3rTy", b"partial", age_s=0.0)
    during = read_content(tmp_path)
    assert content_digest(during) == content_digest(first)
    assert during.newest_mtime > first.newest_mtime + 30


def test_fifos_and_sockets_are_skipped_never_opened(tmp_path: Path) -> None:
    write(tmp_path, "run.sh")
    os.mkfifo(tmp_path / "pipe")  # no writer: opening it for reading would block
    short = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(short / "sock"))
        os.rename(short / "sock", tmp_path / "sock")
    finally:
        os.rmdir(short)
    content = read_content(tmp_path)
    assert [entry.rel for entry in content.entries] == ["run.sh"]
    assert content.skipped == ("pipe (FIFO)", "sock (socket)")
    assert open_regular(str(tmp_path / "pipe")) is None
    assert open_regular(str(tmp_path / "sock")) is None


def test_a_folder_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    bottom = make_deep(tmp_path, 1500)
    try:
        write(bottom, "deep.txt")
        content = read_content(tmp_path)
        assert [entry.rel.count("/") for entry in content.entries] == [1500]
    finally:
        remove_tree(tmp_path / "d")  # pytest's own clean-up recurses


def test_big_files_are_hashed_in_chunks(tmp_path: Path) -> None:
    big = write(tmp_path, "big.bin", b"")
    with open(big, "wb") as handle:
        handle.truncate(64 * 1024 * 1024)  # sparse: 64 MiB read in 1 MiB chunks
    expected = hashlib.sha256(b"\0" * (64 * 1024 * 1024)).hexdigest()
    assert read_content(tmp_path).entries[0].digest == expected
