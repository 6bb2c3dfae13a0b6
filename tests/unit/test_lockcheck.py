"""The start-up lock check's parts: `/proc/self/mountinfo` as the kernel writes it, the mount
that holds a path, and the check itself on this machine's storage (whose locks exclude).

A mount whose locks do not exclude is made with an LD_PRELOAD in tests/test_lockcheck.py."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from webjobsd.records.lockcheck import (
    CHECK_FILE_NAME,
    Mount,
    check_locks,
    mount_of,
    parse_mountinfo,
)


def mount_point_by_walking_up(path: Path) -> str:
    """The mount point of `path` found without mountinfo: the first folder upwards that is one."""
    current = path.resolve()
    while not os.path.ismount(current):
        current = current.parent
    return str(current)


def device_of(path: Path) -> str:
    device = os.stat(path).st_dev
    return f"{os.major(device)}:{os.minor(device)}"


def test_every_line_of_this_process_mountinfo_is_read() -> None:
    text = Path("/proc/self/mountinfo").read_text()
    mounts = parse_mountinfo(text)
    assert len(mounts) == len(text.splitlines()) > 0
    assert all(mount.mount_point.startswith("/") and mount.fs_type for mount in mounts)
    assert "/" in {mount.mount_point for mount in mounts}


def test_the_mount_of_a_folder_is_the_one_the_kernel_reports_for_it(tmp_path: Path) -> None:
    """Two oracles that do not read mountinfo: the folder's `st_dev`, and the first folder
    upwards that `os.path.ismount` says is a mount point."""
    folder = tmp_path / "site" / "data"
    folder.mkdir(parents=True)
    mount = mount_of(
        str(folder.resolve()), parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    )
    assert mount is not None
    assert mount.mount_point == mount_point_by_walking_up(folder)
    assert mount.device == device_of(folder)


# The kernel escapes space, tab, LF and backslash in paths as \ooo. Optional fields (shared:,
# master:) come before the "-"; a tmpfs mounted twice on one folder is listed twice.
MOUNTINFO = "\n".join(
    [
        "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard",
        r"60 27 0:50 / /mnt/my\040share rw,relatime shared:7 master:3 - cifs"
        r" //files/team\040share rw,vers=3.1.1",
        "61 27 254:1 / /mnt/my rw,relatime - ext4 /dev/vdb rw",
        r"62 27 0:51 / /srv/back\134slash\011tab rw - fuse.sshfs me@host:/a\040b rw",
        "63 27 0:52 / /run/stack rw - tmpfs tmpfs rw",
        "64 63 0:53 / /run/stack rw - tmpfs top rw",
        "65 27 0:54 / /srv/nosource rw - tmpfs  rw",
        "not a mountinfo line",
        "",
    ]
)


def test_escaped_spaces_and_other_escapes_are_undone() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[1] == Mount("/mnt/my share", "cifs", "//files/team share", "0:50")
    assert mounts[3] == Mount("/srv/back\\slash\ttab", "fuse.sshfs", "me@host:/a b", "0:51")
    assert mounts[6] == Mount("/srv/nosource", "tmpfs", "", "0:54")
    assert len(mounts) == 7


def test_the_longest_whole_component_prefix_wins() -> None:
    mounts = parse_mountinfo(MOUNTINFO)

    def point(path: str) -> str | None:
        found = mount_of(path, mounts)
        return found.mount_point if found else None

    assert point("/mnt/my share/site/data/webjobsd") == "/mnt/my share"
    assert point("/mnt/my share") == "/mnt/my share"
    assert point("/mnt/my/site") == "/mnt/my"
    # A prefix of the name is not a parent folder.
    assert point("/mnt/my sharedrive/site") == "/"
    assert point("/mnt/myself") == "/"
    assert point("/srv/back\\slash\ttab/x") == "/srv/back\\slash\ttab"
    # Mounted on top of another on the same folder: the later line is the one in use.
    top = mount_of("/run/stack/x", mounts)
    assert top is not None and top.source == "top"
    assert mount_of("/x", []) is None


def test_locks_on_this_machine_exclude(tmp_path: Path) -> None:
    folder = tmp_path / "site" / "data" / "webjobsd"
    result = check_locks(folder)
    assert result.works, result
    assert result.error is None
    assert result.lock_file == str(folder / CHECK_FILE_NAME)
    assert (folder / CHECK_FILE_NAME).is_file()
    assert result.mount_point == mount_point_by_walking_up(folder)
    assert result.fs_type and result.source is not None
    # Both locks are released: a third open takes the lock at once.
    with open(folder / CHECK_FILE_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_lock_held_elsewhere_during_the_check_counts_as_exclusion(tmp_path: Path) -> None:
    """Another daemon's check holding the file all along: its hold refused ours."""
    folder = tmp_path / "data"
    folder.mkdir()
    with open(folder / CHECK_FILE_NAME, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = check_locks(folder)
    assert result.works
    assert result.error is not None and "another holder" in result.error


def test_a_check_that_cannot_open_its_file_fails_with_the_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file where the folder should be")
    result = check_locks(blocker)
    assert not result.works
    assert result.error is not None and result.error.startswith("cannot check: ")
    assert result.mount_point == mount_point_by_walking_up(tmp_path)
