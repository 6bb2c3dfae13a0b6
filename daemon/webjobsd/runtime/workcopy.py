"""Working copies ("shadow copies", Part B §4.3): jobs run from a copy unless `is_in_place`.

Running from a copy means a deployment can overwrite the job folder while the old process is still
running. A copy is reused while the source is unchanged: every source file is present in the copy
with the same mtime, and no file present at the last copy has disappeared from the source. Files the
job itself creates in its copy do not count. On any change the whole per-job temp folder is removed
and a fresh copy is made into a new random sub-folder, mtimes preserved.

Blocking: callers run `prepare` in a thread.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

Note = Callable[[str], None]


def mtime_map(root: Path) -> dict[str, int]:
    """Relative path → mtime (ns) of every regular file below root, not following links."""
    result: dict[str, int] = {}
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(directory, d))]
        for filename in filenames:
            path = os.path.join(directory, filename)
            try:
                stat = os.lstat(path)
            except OSError:
                continue
            result[os.path.relpath(path, root)] = stat.st_mtime_ns
    return result


class WorkingCopy:
    def __init__(self, source: Path, parent: Path) -> None:
        self._source = source
        self._parent = parent
        self._current: Path | None = None
        self._source_at_copy: dict[str, int] = {}
        self._source_identity: tuple[int, int] | None = None

    @property
    def current(self) -> Path | None:
        return self._current

    def _change_reason(self, source_now: dict[str, int]) -> str | None:
        assert self._current is not None
        if self._identity() != self._source_identity:
            # Replaced as a whole (a deployment swaps folders): files may keep their timestamps.
            return "Job directory change detected: the job folder was replaced."
        copy_now = mtime_map(self._current)
        for rel, mtime in source_now.items():
            if rel not in copy_now:
                return (
                    f"Job directory change detected: Job file '{rel}' exists in source "
                    "directory but not in working directory."
                )
            if copy_now[rel] != mtime:
                return (
                    f"Job directory change detected: Job file '{rel}' timestamp differs "
                    "between source and working directories."
                )
        for rel in self._source_at_copy:
            if rel not in source_now:
                return f"Job directory change detected: Job file '{rel}' has been deleted."
        return None

    def prepare(self, note: Note) -> Path:
        """The folder to run from: the existing copy when still valid, else a fresh one."""
        source_now = mtime_map(self._source)
        if self._current is not None and self._current.is_dir():
            reason = self._change_reason(source_now)
            if reason is None:
                return self._current
            note(reason)
        self.discard()
        self._parent.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(dir=self._parent))
        # copytree needs a missing destination; the random folder reserves the name.
        target.rmdir()
        shutil.copytree(self._source, target, symlinks=True, copy_function=shutil.copy2)
        self._current = target
        self._source_at_copy = source_now
        self._source_identity = self._identity()
        return target

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._source)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def discard(self) -> None:
        """Remove every copy of this job (the per-job temp folder)."""
        shutil.rmtree(self._parent, ignore_errors=True)
        self._current = None
        self._source_at_copy = {}
