"""Running jobs as another user (`run_as_user` / `run_as_group`) when the daemon runs as root.

The switch happens in the child through `subprocess`'s own `user`, `group` and `extra_groups`
(no `preexec_fn`). What the job must write is handed over first: its working copy (recursively)
and its data folder (the folder only; the daemon keeps writing the status and log files in it).
An in-place job runs from its folder as deployed: its ownership is the deployer's business.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from pathlib import Path


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
        """chown `path` (and, if asked, everything below it, links not followed)."""
        os.chown(path, self.uid, self.gid, follow_symlinks=False)
        if not recursive:
            return
        for directory, dirnames, filenames in os.walk(path):
            for name in (*dirnames, *filenames):
                os.chown(os.path.join(directory, name), self.uid, self.gid, follow_symlinks=False)


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
