"""Where a deployed job is prepared, how it replaces the live folder, and the cleaning of what a
killed daemon left behind (`deploy.jobpackage` and the deployments prepare; `app` cleans at start).

Decisions:

* **The staging folder is `{jobs_root}/.webjobsd-staging/{instance}/`**: inside the jobs root,
  so the swap is a rename on one file system, and not a kind folder, so its events are noise to
  the watcher. It is created by a deploy and removed when it is empty again: the daemon creates
  nothing inside wwwroot by itself (a `git clone` into an empty wwwroot must work).
* **One folder per instance id.** Daemons of other instances may share the site; only the
  daemon holding this instance's lock writes in this instance's folder. So at start, before the
  API listens, everything in it is provably the debris of a killed deploy, and everything else
  belongs to someone else and is left alone.
* **The swap is two renames, and a start repairs a kill between them.** The old folder is
  parked first under a name that says which job it is (`old.{kind}.{token}.{name}`), then the
  new one renamed in. A kill between the two leaves the job missing and its old folder parked:
  the next start puts it back before its first scan. One atomic step,
  `renameat2(RENAME_EXCHANGE)`, was tried and rejected: when two watched folders trade places,
  watchdog's inotify emitter (7.1) loses track of which watch is which, and its reader thread
  dies at the next removal of the old content (a KeyError in `_remove_watch_internally`),
  leaving the daemon's watcher blind. The window it would close is two system calls long.
* **Uploads** are received under the instance's temp root (`{temp_root}/uploads`, a folder per
  instance id like the rest of the temp root): everything there at start was being received
  or extracted when the daemon died, and goes. (A `temp_dir` shared by two instances is not
  supported: their working copies would collide as well.)
* **Folders of older versions** (`new-*` and `old-*` directly in `.webjobsd-staging`, no
  instance in their path): a `new-*` untouched for `LEGACY_AGE_S` is removed (no deploy takes
  that long once its upload is in); an `old-*` does not say which job it was, so it is logged
  for a person to look at, never deleted.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from webjobsd.model import JobKey, JobKind, is_valid_job_name
from webjobsd.site import SiteLayout

log = structlog.get_logger("webjobsd.deploy.staging")

STAGING: Final = ".webjobsd-staging"
LEGACY_AGE_S: Final = 3600.0
_MKDIR_ATTEMPTS: Final = 5


def _remove(path: Path) -> None:
    """A folder with its content, or a link or file itself (never what a link points to)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _instance_folder_name(instance_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", instance_id).lstrip(".")
    return safe or "_"


@dataclass(frozen=True, slots=True)
class Staging:
    """This instance's staging folder under a jobs root."""

    jobs_root: Path
    instance_id: str

    @classmethod
    def of(cls, layout: SiteLayout) -> Staging:
        return cls(layout.jobs_root, layout.instance_id)

    @property
    def root(self) -> Path:
        return self.jobs_root / STAGING

    @property
    def folder(self) -> Path:
        return self.root / _instance_folder_name(self.instance_id)

    def new_folder(self) -> Path:
        """A fresh, empty folder to prepare a job in (creating the staging folders)."""
        new = self.folder / f"new.{secrets.token_hex(6)}"
        for _ in range(_MKDIR_ATTEMPTS):
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                new.mkdir(mode=0o755)
            except FileNotFoundError:
                continue  # another daemon's `release` removed the empty root meanwhile
            return new
        raise OSError(errno.ENOENT, "the staging folder keeps vanishing", str(self.folder))

    def swap_into_place(self, new: Path, target: Path) -> None:
        """Make `new` the folder at `target` (a job folder), then remove the old content."""
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (target.is_symlink() or target.exists()):
            os.rename(new, target)
            return
        key = JobKey(JobKind(target.parent.name), target.name)
        parked = self.folder / f"old.{key.kind.value}.{secrets.token_hex(6)}.{key.name}"
        os.rename(target, parked)
        os.rename(new, target)
        _remove(parked)

    def release(self) -> None:
        """Remove the staging folders if they are empty (another deploy may be using them)."""
        for folder in (self.folder, self.root):
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue  # a kill between the two removals left the root alone
            except OSError:
                return

    def clean_at_start(self) -> None:
        """Undo what a killed deploy of this instance left; see the module's decisions."""
        if self.folder.is_dir():
            for entry in sorted(self.folder.iterdir()):
                self._clean_entry(entry)
        if self.root.is_dir():
            self._clean_legacy()
        self.release()

    def _clean_entry(self, entry: Path) -> None:
        parts = entry.name.split(".", 3)
        if len(parts) == 4 and parts[0] == "old" and parts[1] in JobKind._value2member_map_:
            name = parts[3]
            target = self.jobs_root / parts[1] / name
            if is_valid_job_name(name) and not (target.is_symlink() or target.exists()):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(entry, target)
                log.warning(
                    "restored a job folder a killed deploy had moved aside",
                    job=name,
                    kind=parts[1],
                    folder=str(target),
                )
                return
        _remove(entry)
        log.info("removed what a killed deploy left", path=str(entry))

    def _clean_legacy(self) -> None:
        now = time.time()
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("new-"):
                try:
                    age = now - entry.lstat().st_mtime
                except FileNotFoundError:
                    continue
                if age >= LEGACY_AGE_S:
                    _remove(entry)
                    log.info("removed what a killed deploy left", path=str(entry))
            elif entry.name.startswith("old-"):
                log.warning(
                    "a job folder moved aside by a killed deploy of an older version: "
                    "check which job it is and move it back or remove it",
                    path=str(entry),
                )


def clean_after_kill(layout: SiteLayout, upload_dir: Path) -> None:
    """At start, before the API listens: this instance's staging debris and partial uploads.
    Creates nothing (a missing jobs root or upload folder is simply clean)."""
    Staging.of(layout).clean_at_start()
    if upload_dir.is_dir():
        for entry in sorted(upload_dir.iterdir()):
            _remove(entry)
            log.info("removed a partial upload", path=str(entry))
