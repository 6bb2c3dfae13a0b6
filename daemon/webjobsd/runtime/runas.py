"""Running jobs as another user (`run_as_user` / `run_as_group`) when the daemon runs as root,
and who owns which of a job's folders.

The switch happens in the child through `subprocess`'s own `user`, `group` and `extra_groups`
(no `preexec_fn`).

Ownership, decided so that a job can never make the daemon write where it should not:

* The job's **data folder** (`SITE/data/jobs/TYPE/NAME/`, Kudu's `WEBJOBS_DATA_PATH`) is the
  daemon's and is never handed over: the daemon (root) opens its status, start history, logs,
  locks and run history there, and a job that could write the folder could put a link or a
  FIFO at one of those names (it did: its output appended to a root-only file, a lock's JSON
  written over one, the event loop blocked on a FIFO). The job can read it (its logs and
  history), as on Kudu. `records.safeopen` is the second line of defence.
* The job's **own folder** (`job-data/` inside its data folder, `WEBJOBSD_JOB_DATA_PATH`) is
  made before every start and belongs to the job's user (the daemon's user without
  `run_as_user`); the daemon never opens anything in it. Kudu has no such folder: a job that
  writes files next to its logs on Kudu writes them here under `run_as_user`.
* The **working copy** is handed over (recursively) before the job starts. An in-place job runs
  from its folder as deployed: its ownership is the deployer's business.
* **Upgrades**: older versions handed the data folder to the job's user. `reclaim_data_folder`
  takes it back, with everything in it but the job's own folder, at the daemon's start and
  before every start of the job. A file with several hard links is left alone (changing its
  owner would change the owner of the file it is linked to); `records.safeopen` refuses to
  write such a file anyway.

Every change of owner walks the tree with `os.fwalk` and changes entries relative to the folder
descriptors it opened, links not followed: another process of the same user, running while we
walk, cannot turn a folder of the walk into a link elsewhere.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

import structlog

from webjobsd.model import JobKind
from webjobsd.site import JOB_DATA_FOLDER, SiteLayout

log = structlog.get_logger("webjobsd.runas")


class RunAsError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class RunAs:
    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    def environment(self) -> dict[str, str]:
        return {"USER": self.user, "LOGNAME": self.user, "HOME": self.home}

    def hand_over(self, path: Path, *, recursive: bool) -> None:
        """chown `path` (and, if asked, everything below it, links not followed).

        A tree whose top already belongs to the user was handed over whole before (the top
        changes last): a working copy reused for a restart is not walked again, so the walk
        never goes through a tree the job has had its hands on.
        """
        st = os.lstat(path)
        if (st.st_uid, st.st_gid) == (self.uid, self.gid):
            return
        if recursive:
            _chown_tree(path, self.uid, self.gid)
        else:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)


def _chown_tree(path: Path, uid: int, gid: int, *, skip: str | None = None) -> int:
    """chown `path` and everything below it but the top-level entry `skip`, links not
    followed, files with several links left alone; returns how many entries changed."""
    changed = 0

    def change(name: str | Path, st: os.stat_result, dir_fd: int | None = None) -> None:
        nonlocal changed
        if (st.st_uid, st.st_gid) == (uid, gid):
            return
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            log.warning("left a hard-linked file alone", file=str(path / name), owner=st.st_uid)
            return
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        changed += 1

    for top, dirnames, filenames, dir_fd in os.fwalk(path):
        if skip is not None and top == str(path) and skip in dirnames:
            dirnames.remove(skip)
        for name in (*dirnames, *filenames):
            if top == str(path) and name == skip:
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            change(name, st, dir_fd)
    # The top last: a top with the new owner says that the whole tree has it.
    change(path, os.lstat(path))
    return changed


def reclaim_data_folder(data_dir: Path) -> None:
    """Make a job's data folder (and what is in it, but the job's own folder) the daemon's
    again, if an older version handed it to a job's user; see the module docstring.

    One `lstat` when there is nothing to do. Without root, nothing can be taken back (and no
    job could have been given anything).
    """
    try:
        st = os.lstat(data_dir)
    except FileNotFoundError:
        return
    uid, gid = os.geteuid(), os.getegid()
    if st.st_uid == uid or uid != 0 or not stat.S_ISDIR(st.st_mode):
        return
    changed = _chown_tree(data_dir, uid, gid, skip=JOB_DATA_FOLDER)
    log.warning(
        "took back a data folder an older version gave to a job's user",
        folder=str(data_dir),
        owner=st.st_uid,
        entries=changed,
    )


def reclaim_data_folders(layout: SiteLayout) -> None:
    """`reclaim_data_folder` for every job's data folder on the site (at the daemon's start)."""
    for kind in JobKind:
        try:
            with os.scandir(layout.data_jobs_root / kind.value) as entries:
                folders = [
                    Path(entry.path) for entry in entries if entry.is_dir(follow_symlinks=False)
                ]
        except OSError:
            continue
        for folder in folders:
            try:
                reclaim_data_folder(folder)
            except OSError as error:
                log.error("cannot take back a data folder", folder=str(folder), error=str(error))


def prepare_job_data_folder(folder: Path, run_as: RunAs | None) -> None:
    """Make the job's own folder, owned by the job's user (blocking)."""
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        # A link or a file an older version's job put there: the folder must be a folder.
        os.unlink(folder)
        os.mkdir(folder, 0o700)
        st = os.lstat(folder)
    if run_as is not None and (st.st_uid, st.st_gid) != (run_as.uid, run_as.gid):
        # Recursively: with another run_as_user than before, the job must own its old files.
        run_as.hand_over(folder, recursive=True)


def resolve_run_as(user: str | None, group: str | None) -> RunAs | None:
    if not user and not group:
        return None
    if os.geteuid() != 0:
        raise RunAsError("run_as_user/run_as_group need the daemon to run as root")
    try:
        entry = pwd.getpwnam(user) if user else pwd.getpwuid(os.geteuid())
    except KeyError as error:
        raise RunAsError(f"run_as_user: no user named {user!r}") from error
    try:
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError as error:
        raise RunAsError(f"run_as_group: no group named {group!r}") from error
    groups = tuple(sorted({g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem}))
    return RunAs(entry.pw_name, entry.pw_uid, gid, groups, entry.pw_dir)
