"""The catalog: scans the jobs root and owns the desired state, `{JobKey: JobSpec}`.

A scan of the job folder is the truth; watcher events only say which folders to look at again.
For each job folder the scan applies Kudu's script rules (a folder without a runnable script is no
job), reads `settings.job` leniently, checks `disable.job`, validates the name (Part A #3) and
computes a fingerprint over the files that matter.

Decisions:
* A `settings.job` that fails to parse keeps the last good settings of that job (its fingerprint
  does not change, so nothing restarts) and the error is logged with the file name.
* A job folder whose newest file is younger than `settle_s` is *settling* (a copy is in progress):
  the catalog keeps the previous spec and reports the key, so the caller looks again later. This
  protects the periodic rescan, which has no quiet period of its own, from starting half a job.
* Problems are logged once per distinct problem, not at every rescan.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import structlog

from webjobsd.discovery.ignore import ALWAYS_RELEVANT, IGNORED_DIRECTORIES, is_ignored_name
from webjobsd.discovery.jobsettings import JobSettingsError, load_job_settings
from webjobsd.discovery.scripts import find_script_dir, select_command
from webjobsd.model import JobKey, JobKind, JobSettings, JobSpec, is_valid_job_name

log = structlog.get_logger("webjobsd.catalog")

NO_RUNNABLE_SCRIPT = "No runnable script file was found."
# Files whose mtime is this far in the future are not taken as "being written" (clock skew, zips
# with odd timestamps), or they would never settle.
_FUTURE_TOLERANCE_S = 2.0


@dataclass(frozen=True, slots=True)
class FolderScan:
    fingerprint_parts: tuple[tuple[str, int, int], ...]
    newest_mtime: float


@dataclass(slots=True)
class RefreshResult:
    changed: set[JobKey] = field(default_factory=set)
    settling: set[JobKey] = field(default_factory=set)


def scan_folder(job_dir: Path) -> FolderScan:
    """(relative path, size, mtime) of every file that matters, and the newest mtime seen."""
    parts: list[tuple[str, int, int]] = []
    newest = 0.0
    for directory, dirnames, filenames in os.walk(job_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRECTORIES)
        for filename in filenames:
            path = os.path.join(directory, filename)
            try:
                stat = os.lstat(path)
            except OSError:
                continue
            newest = max(newest, stat.st_mtime)
            if filename in ALWAYS_RELEVANT or is_ignored_name(filename):
                # settings.job enters the fingerprint through its parsed content, disable.job
                # through the disabled flag; noise not at all.
                continue
            parts.append((os.path.relpath(path, job_dir), stat.st_size, stat.st_mtime_ns))
    parts.sort()
    return FolderScan(tuple(parts), newest)


def fingerprint_of(scan: FolderScan, settings: JobSettings) -> str:
    digest = hashlib.sha256()
    for rel, size, mtime in scan.fingerprint_parts:
        digest.update(f"{rel}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    digest.update(json.dumps(dict(settings.raw), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


class Catalog:
    def __init__(
        self,
        jobs_root: Path,
        *,
        settle_s: float,
        which: Callable[[str], str | None] = shutil.which,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._jobs_root = jobs_root
        self._settle_s = settle_s
        self._which = which
        self._clock = clock
        self._specs: dict[JobKey, JobSpec] = {}
        self._errors: dict[JobKey, str] = {}
        self._reported: dict[object, str] = {}
        self.generation = 0

    # -- published views ---------------------------------------------------------------------

    @property
    def specs(self) -> Mapping[JobKey, JobSpec]:
        return MappingProxyType(self._specs)

    @property
    def errors(self) -> Mapping[JobKey, str]:
        return MappingProxyType(self._errors)

    def job_dirs(self) -> set[Path]:
        return {spec.job_dir for spec in self._specs.values()} | {
            self._jobs_root / key.kind.value / key.name for key in self._errors
        }

    # -- scanning ----------------------------------------------------------------------------

    def present_keys(self) -> set[JobKey]:
        keys: set[JobKey] = set()
        for kind in JobKind:
            kind_dir = self._jobs_root / kind.value
            try:
                entries = list(os.scandir(kind_dir))
            except OSError:
                continue
            for entry in entries:
                if not entry.is_dir(follow_symlinks=True):
                    continue
                if not is_valid_job_name(entry.name):
                    self._report_once(
                        ("name", kind, entry.name),
                        f"invalid job name {entry.name!r}: skipped (1-64 letters, digits, "
                        "'-', '_', '.', not starting with '.')",
                        folder=entry.path,
                    )
                    continue
                keys.add(JobKey(kind, entry.name))
        return keys

    def refresh(self, keys: Iterable[JobKey] | None = None) -> RefreshResult:
        """Look again at `keys` (all job folders when None) and update the specs."""
        result = RefreshResult()
        if keys is None:
            present = self.present_keys()
            targets = present | set(self._specs) | set(self._errors)
        else:
            targets = set(keys)
        for key in sorted(targets):
            self._refresh_one(key, result)
        if result.changed:
            self.generation += 1
        return result

    def _refresh_one(self, key: JobKey, result: RefreshResult) -> None:
        job_dir = self._jobs_root / key.kind.value / key.name
        previous = self._specs.get(key)
        if not is_valid_job_name(key.name) or not job_dir.is_dir():
            self._drop(key, result)
            return
        try:
            scan = scan_folder(job_dir)
        except OSError as error:
            self._set_error(key, f"cannot read job folder: {error}", job_dir)
            return
        now = self._clock()
        if now - self._settle_s < scan.newest_mtime <= now + _FUTURE_TOLERANCE_S:
            result.settling.add(key)
            return
        try:
            command = select_command(job_dir, which=self._which)
            script_dir = find_script_dir(job_dir)
        except OSError as error:
            if not job_dir.is_dir():  # removed while we looked
                self._drop(key, result)
            else:
                self._set_error(key, f"cannot read job folder: {error}", job_dir)
            return
        if command is None:
            self._drop(key, result)
            self._set_error(key, NO_RUNNABLE_SCRIPT, job_dir)
            return
        settings = self._read_settings(key, script_dir / "settings.job", previous)
        spec = JobSpec(
            key=key,
            job_dir=job_dir,
            command=command,
            settings=settings,
            disabled=(script_dir / "disable.job").exists(),
            fingerprint=fingerprint_of(scan, settings),
        )
        self._errors.pop(key, None)
        self._forget_reports(key, kinds={"error"})
        if spec != previous:
            self._specs[key] = spec
            result.changed.add(key)
            log.info(
                "job discovered" if previous is None else "job changed",
                job=str(key),
                run_command=command.run_command,
                host=command.host,
                disabled=spec.disabled,
                fingerprint=spec.fingerprint,
            )

    def _read_settings(self, key: JobKey, path: Path, previous: JobSpec | None) -> JobSettings:
        try:
            settings, warnings = load_job_settings(path)
        except JobSettingsError as error:
            kept = previous.settings if previous is not None else JobSettings()
            self._report_once(
                ("settings", key, str(error)),
                f"settings.job does not parse: {error}; keeping the last good settings",
                folder=str(path),
            )
            return kept
        self._forget_reports(key, kinds={"settings"})
        for warning in warnings:
            self._report_once(("settings-warning", key, warning), warning, folder=str(path))
        return settings

    def _drop(self, key: JobKey, result: RefreshResult) -> None:
        if self._specs.pop(key, None) is not None:
            result.changed.add(key)
            log.info("job removed", job=str(key))
        self._errors.pop(key, None)
        self._forget_reports(key, kinds={"error", "settings", "settings-warning"})

    def _set_error(self, key: JobKey, message: str, folder: Path) -> None:
        self._errors[key] = message
        self._report_once(("error", key, message), message, folder=str(folder))

    def _report_once(self, marker: object, message: str, *, folder: str) -> None:
        if marker in self._reported:
            return
        self._reported[marker] = message
        log.warning("job folder problem", folder=folder, problem=message)

    def _forget_reports(self, key: JobKey, *, kinds: set[str]) -> None:
        """Forget logged problems so that they are logged again if they come back."""
        for marker in list(self._reported):
            if isinstance(marker, tuple) and marker[0] in kinds and marker[1] == key:
                del self._reported[marker]
