"""The catalog: scans the jobs root and owns the desired state, `{JobKey: JobSpec}`.

A scan of the job folder is the truth; watcher events only say which folders to look at again.
For each job folder the scan applies Kudu's script rules (a folder without a runnable script is no
job), reads `settings.job` leniently, checks `disable.job`, validates the name (Part A #3) and
computes a fingerprint over the files that matter: their content, through a hash cache that reads a
file again only when its identity (inode, size, mtime, ctime) changed (`contents.py`).

Looking and deciding are split: `observe()` only reads the file system and returns
`Observation`s (safe to run in a worker thread, it touches no catalog state); `apply()` runs on the
event loop and is the only place the specs change. `refresh()` does both, for start-up and tests.

Decisions:
* A `settings.job` that fails to parse keeps the last good settings of that job (its fingerprint
  does not change, so nothing restarts) and the error is logged with the file name.
* A job folder whose newest relevant file (noise excluded, upload temp files included) is younger
  than `settle_s` is *settling*: a copy is in progress, the previous spec stays and the key is
  reported so the caller looks again later. A folder that keeps changing for longer than
  `settle_cap_s` is taken as it is. Files being written are not hashed while a folder settles.
* Changes found by a periodic rescan (no event announced them) are confirmed by a second look
  before they apply: a copy that keeps the source's old mtimes (`cp -a`, unzip) is invisible to
  the mtime rule, but not to two fingerprints taken a quiet period apart.
* Problems are logged once per distinct problem, not at every rescan. A special file (FIFO,
  socket) in a job folder is skipped, with one warning naming it: it is no code, and reading it
  could block.
* The fingerprint is content, not the folder's inode: a deployment that swaps in a folder of
  identical files (a re-uploaded zip) restarts nothing, one that changes a byte under the same
  sizes and timestamps restarts the job.
* A job with a file open for writing (the watcher knows it, `apply(writing=...)`) is settling
  however long its files have been quiet: a transfer that stalls inside a file is not complete.
* Quick looks (poll mode, `observe(quick=True)`): a folder is stamped before it is read
  (`contents.folder_stamp`: the name, type and identity of every entry, from stat alone), and a
  folder whose stamp equals the last look's is taken as that look saw it: no script chosen, no
  settings.job read, no fingerprint computed again (its spec is remembered with the look). The
  stamp is taken *before* the read, so a change during the read leaves a stamp that does not
  match what was read, and the next look reads again. A file changed within the racy window
  makes no stamp (it may change again under the same identity). What stat cannot see (PATH
  gaining an interpreter, the target of a link changing) waits for the next full look.
* Only "the folder is gone" removes a job. A folder that cannot be read (out of file
  descriptors, an I/O error) keeps the last good spec and is looked at again: dropping it would
  stop a healthy job and start it again once the error passes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import stat as stat_module
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import structlog

from webjobsd.discovery.contents import (
    FolderContent,
    HashCache,
    fingerprint_of,
    folder_stamp,
    read_content,
)
from webjobsd.discovery.jobsettings import JobSettingsError, load_job_settings
from webjobsd.discovery.scripts import (
    RESOURCE_ERRNOS,
    Which,
    select_command,
)
from webjobsd.model import (
    JobKey,
    JobKind,
    JobSettings,
    JobSpec,
    ScriptCommand,
    is_valid_job_name,
)

log = structlog.get_logger("webjobsd.catalog")

NO_RUNNABLE_SCRIPT = "No runnable script file was found."
# Files whose mtime is this far in the future are not taken as "being written" (clock skew, zips
# with odd timestamps), or they would never settle.
_FUTURE_TOLERANCE_S = 2.0


# What one scan of a job folder found: its content (hashed through the catalog's cache), the
# newest mtime (settling) and the special files it skipped. See `contents.py`.
FolderScan = FolderContent


@dataclass(frozen=True, slots=True)
class Observation:
    """What one look at one job folder found. `error` set means no job (with a reason)."""

    key: JobKey
    present: bool
    settling: bool = False
    scan: FolderScan | None = None
    command: ScriptCommand | None = None
    settings: JobSettings | None = None
    settings_warnings: tuple[str, ...] = ()
    settings_error: str | None = None
    settings_path: Path | None = None
    disabled: bool = False
    error: str | None = None
    # The folder exists but could not be read (out of file descriptors, an I/O error): nothing
    # is known about the job, so whatever was known before stands.
    unreadable: bool = False
    # `folder_stamp` taken before the look, when looks are stamped (poll mode); b"": none.
    stamp: bytes = b""


@dataclass(slots=True)
class RefreshResult:
    changed: set[JobKey] = field(default_factory=set)
    settling: set[JobKey] = field(default_factory=set)


def scan_folder(
    job_dir: Path,
    cache: HashCache | None = None,
    writing_window: tuple[float, float] | None = None,
) -> FolderScan:
    """The content of a job folder: files read only when their identity changed since `cache`
    last saw them, and not while they are being written (`writing_window`)."""
    return read_content(job_dir, cache, writing_window=writing_window)


def _is_gone(job_dir: Path) -> bool:
    """No folder there (any other error, such as EMFILE or EIO, is raised: it proves nothing)."""
    try:
        return not stat_module.S_ISDIR(os.stat(job_dir).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError as error:
        if error.errno == errno.ELOOP:  # a link loop in its place: no folder, for good
            return True
        raise


def observe_job(
    job_dir: Path,
    key: JobKey,
    *,
    settle_s: float,
    now: float,
    which: Callable[[str], str | None],
    cache: HashCache | None = None,
    hash_while_settling: bool = False,
    previous: Observation | None = None,
    stamped: bool = False,
) -> Observation:
    """Look at one job folder. Reads files only; safe in any thread.

    Files still being written are not hashed unless `hash_while_settling` (the settle cap is
    reached and the folder is taken as it is). `stamped`: the folder's stamp is taken first
    (before the read: a change during the read then shows as a stamp that does not match the
    content); `previous`: the last look at this folder, taken as it is when the stamp is the
    same (a quick look, see `Catalog.observe`).
    """
    if not is_valid_job_name(key.name):
        return Observation(key, present=False)
    try:
        if _is_gone(job_dir):
            if cache is not None:
                cache.forget(os.fspath(job_dir))
            return Observation(key, present=False)
        stamp = folder_stamp(job_dir, now) if stamped or previous is not None else b""
        if _unchanged(previous, stamp):
            assert previous is not None
            return previous
        window = None if hash_while_settling else (now - settle_s, now + _FUTURE_TOLERANCE_S)
        scan = scan_folder(job_dir, cache, window if settle_s > 0 else None)
        command = select_command(job_dir, which=which)
    except OSError as error:
        with contextlib.suppress(OSError):
            if _is_gone(job_dir):  # removed while we looked
                return Observation(key, present=False)
        return Observation(
            key, present=True, error=f"cannot read job folder: {error}", unreadable=True
        )
    settling = now - settle_s < scan.newest_mtime <= now + _FUTURE_TOLERANCE_S or scan.deferred
    if command is None:
        return Observation(
            key, present=True, settling=settling, error=NO_RUNNABLE_SCRIPT, stamp=stamp
        )
    # The folder the command was chosen in, not a second look (one listing less to read).
    script_dir = job_dir / command.script_dir if command.script_dir else job_dir
    settings_path = script_dir / "settings.job"
    settings: JobSettings | None = None
    warnings: tuple[str, ...] = ()
    settings_error: str | None = None
    try:
        loaded, warning_list = load_job_settings(settings_path)
        settings, warnings = loaded, tuple(warning_list)
    except JobSettingsError as error:
        cause = error.__cause__
        if isinstance(cause, OSError) and cause.errno in RESOURCE_ERRNOS:
            return Observation(
                key, present=True, error=f"cannot read {settings_path}: {cause}", unreadable=True
            )
        settings_error = str(error)
    return Observation(
        key,
        present=True,
        settling=settling,
        scan=scan,
        command=command,
        settings=settings,
        settings_warnings=warnings,
        settings_error=settings_error,
        settings_path=settings_path,
        # Kudu's File.Exists: a regular file (links followed); a folder or FIFO of that name is not.
        disabled=(script_dir / "disable.job").is_file(),
        stamp=stamp,
    )


def _unchanged(previous: Observation | None, stamp: bytes) -> bool:
    """Every entry is as the last look found it, and that look was complete and quiet: what
    it read from the files (script, settings, disabled) stands."""
    return (
        previous is not None
        and bool(stamp)
        and previous.stamp == stamp
        and not previous.settling
        and not previous.unreadable
        and (previous.scan is None or not previous.scan.deferred)
    )


class Catalog:
    def __init__(
        self,
        jobs_root: Path,
        *,
        settle_s: float,
        settle_cap_s: float = 30.0,
        which: Callable[[str], str | None] = shutil.which,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._jobs_root = jobs_root
        self.settle_s = settle_s
        self.settle_cap_s = settle_cap_s
        self._which = which
        self._clock = clock
        self._specs: dict[JobKey, JobSpec] = {}
        self._errors: dict[JobKey, str] = {}
        self._reported: dict[object, str] = {}
        self._settling_since: dict[JobKey, float] = {}
        self._unconfirmed: dict[JobKey, tuple[str, bool]] = {}
        self.hashes = HashCache()
        # The last complete look at each folder, for quick looks (see `observe`); and the spec
        # each one made, so that a look taken as it was is not fingerprinted again.
        self._looks: dict[JobKey, Observation] = {}
        self._built: dict[JobKey, tuple[Observation, JobSpec]] = {}
        # Stamp every look (poll mode), so that the next quick one can be compared with it.
        self.stamp_looks = False
        self.generation = 0

    # -- published views ---------------------------------------------------------------------

    @property
    def specs(self) -> Mapping[JobKey, JobSpec]:
        return MappingProxyType(self._specs)

    @property
    def errors(self) -> Mapping[JobKey, str]:
        return MappingProxyType(self._errors)

    @property
    def jobs_root(self) -> Path:
        return self._jobs_root

    def job_dir(self, key: JobKey) -> Path:
        return self._jobs_root / key.kind.value / key.name

    def which_memo(self) -> Which:
        """The catalog's interpreter lookup, remembered: for the folders of one pass only (an
        interpreter installed later is found by the next pass)."""
        return functools.cache(self._which)

    # -- looking -----------------------------------------------------------------------------

    def present_keys(self) -> set[JobKey]:
        keys: set[JobKey] = set()
        for kind in JobKind:
            try:
                entries = list(os.scandir(self._jobs_root / kind.value))
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

    def targets(self, keys: Iterable[JobKey] | None) -> list[JobKey]:
        """The keys a refresh looks at: all present and known ones when `keys` is None."""
        if keys is None:
            return sorted(self.present_keys() | set(self._specs) | set(self._errors))
        return sorted(set(keys))

    def observe(
        self,
        keys: Iterable[JobKey],
        *,
        settle: bool = True,
        which: Which | None = None,
        quick: bool = False,
    ) -> list[Observation]:
        """Blocking file-system reads only: run it in a thread when the loop must not stall.

        `settle=False` for intents: the daemon itself just wrote the folder completely.
        `which`: the interpreter lookup to use instead of the catalog's (a memo of it shared by
        the folders of one pass: a hundred bash jobs need one walk of PATH, not a hundred).
        `quick`: a folder whose walk finds every entry as the last look left it (names, inodes,
        sizes, times: `folder_stamp`) is taken as that look saw it, without choosing its
        script, reading settings.job or asking PATH again (poll mode's passes between two full
        rescans: an interpreter installed meanwhile is found by the next full one). The looks
        remembered for this are the catalog's only state written here (with the hash cache),
        by one reading thread at a time.
        """
        now = self._clock()
        settle_s = self.settle_s if settle else 0.0
        observations = []
        for key in keys:
            observation = observe_job(
                self.job_dir(key),
                key,
                settle_s=settle_s,
                now=now,
                which=which or self._which,
                cache=self.hashes,
                hash_while_settling=self._settle_capped(key, now),
                previous=self._looks.get(key) if quick else None,
                stamped=self.stamp_looks,
            )
            if observation.present and observation.stamp:
                self._looks[key] = observation
            else:
                self._looks.pop(key, None)
            observations.append(observation)
        return observations

    def _settle_capped(self, key: JobKey, now: float) -> bool:
        since = self._settling_since.get(key)
        return since is not None and now - since >= self.settle_cap_s

    # -- deciding ----------------------------------------------------------------------------

    def apply(
        self,
        observations: Iterable[Observation],
        *,
        confirm: bool = False,
        writing: Collection[JobKey] = (),
    ) -> RefreshResult:
        """Update the specs from observations. With `confirm`, a change must be seen twice.

        `writing`: jobs with a file open for writing (the watcher knows, see openwrites.py):
        never settled, however long their files have been quiet.
        """
        result = RefreshResult()
        now = self._clock()
        for observation in observations:
            self._apply_one(observation, result, now, confirm, observation.key in writing)
        if result.changed:
            self.generation += 1
        return result

    def refresh(self, keys: Iterable[JobKey] | None = None) -> RefreshResult:
        return self.apply(self.observe(self.targets(keys)))

    def _apply_one(
        self,
        observation: Observation,
        result: RefreshResult,
        now: float,
        confirm: bool,
        writing: bool = False,
    ) -> None:
        key = observation.key
        if not observation.present:
            self._settling_since.pop(key, None)
            self._unconfirmed.pop(key, None)
            self._drop(key, result)
            return
        if writing:
            # A transfer that stalls inside a file is still a transfer: the quiet period (and
            # its cap) starts again once the file is closed.
            self._settling_since.pop(key, None)
            result.settling.add(key)
            return
        if self._is_current(observation):
            # A quick look found the folder as the look that made its spec (poll mode).
            self._settling_since.pop(key, None)
            self._unconfirmed.pop(key, None)
            return
        if observation.unreadable:
            # Only "the folder is gone" removes a job: a read error (EMFILE under load) keeps
            # the last good spec, and the key is looked at again.
            self._report_once(
                ("unreadable", key, observation.error),
                f"{observation.error}; keeping what was known of the job",
                folder=str(self.job_dir(key)),
            )
            result.settling.add(key)
            return
        if observation.settling:
            since = self._settling_since.setdefault(key, now)
            deferred = observation.scan is not None and observation.scan.deferred
            # Past the cap, a look that skipped files being written makes no spec: the next
            # look (soon, the key is reported settling) reads them.
            if now - since < self.settle_cap_s or deferred:
                result.settling.add(key)
                return
        self._settling_since.pop(key, None)
        self._forget_reports(key, kinds={"unreadable"})
        if observation.error is not None:
            self._drop(key, result)
            self._set_error(key, observation.error, self.job_dir(key))
            return
        spec = self._spec_from(observation)
        previous = self._specs.get(key)
        if spec == previous:
            self._unconfirmed.pop(key, None)
            return
        identity = (spec.fingerprint, spec.disabled)
        if (confirm or key in self._unconfirmed) and self._unconfirmed.get(key) != identity:
            self._unconfirmed[key] = identity
            result.settling.add(key)
            return
        self._unconfirmed.pop(key, None)
        self._errors.pop(key, None)
        self._forget_reports(key, kinds={"error"})
        self._specs[key] = spec
        result.changed.add(key)
        log.info(
            "job discovered" if previous is None else "job changed",
            job=str(key),
            run_command=spec.command.run_command,
            host=spec.command.host,
            disabled=spec.disabled,
            fingerprint=spec.fingerprint,
        )

    def in_question(self, observation: Observation) -> bool:
        """Whether `apply` would settle a change from this observation, or is waiting for its
        files to settle: what a file open for writing must hold. Reads only; a poll pass asks
        /proc about these jobs alone (an idle pass asks nothing)."""
        if not observation.present or observation.unreadable:
            return False
        if observation.settling:
            return True
        if self._is_current(observation):
            return False
        key = observation.key
        if observation.error is not None:
            return key in self._specs or self._errors.get(key) != observation.error
        return self._build_spec(observation) != self._specs.get(key)

    def _is_current(self, observation: Observation) -> bool:
        """The observation is the very look (taken as it was by a quick look) whose spec is
        the job's now: nothing to decide."""
        built = self._built.get(observation.key)
        return (
            built is not None
            and built[0] is observation
            and self._specs.get(observation.key) is built[1]
        )

    def _build_spec(self, observation: Observation) -> JobSpec:
        """The spec an observation makes (a settings.job that does not parse keeps the last
        good settings); no reporting. A look taken as it was (quick) makes the same spec: it
        is not fingerprinted again."""
        key = observation.key
        assert observation.scan is not None and observation.command is not None
        settings = observation.settings
        if settings is None:
            previous = self._specs.get(key)
            settings = previous.settings if previous is not None else JobSettings()
        built = self._built.get(key)
        if built is not None and built[0] is observation and built[1].settings is settings:
            return built[1]
        spec = JobSpec(
            key=key,
            job_dir=self.job_dir(key),
            command=observation.command,
            settings=settings,
            disabled=observation.disabled,
            fingerprint=fingerprint_of(observation.scan, settings),
        )
        self._built[key] = (observation, spec)
        return spec

    def _spec_from(self, observation: Observation) -> JobSpec:
        key = observation.key
        if observation.settings is None:
            self._report_once(
                ("settings", key, observation.settings_error),
                f"settings.job does not parse: {observation.settings_error}; "
                "keeping the last good settings",
                folder=str(observation.settings_path),
            )
        else:
            self._forget_reports(key, kinds={"settings"})
            for warning in observation.settings_warnings:
                self._report_once(
                    ("settings-warning", key, warning),
                    warning,
                    folder=str(observation.settings_path),
                )
        self._report_skipped(observation)
        return self._build_spec(observation)

    def _report_skipped(self, observation: Observation) -> None:
        """A FIFO or socket in a job folder is no job file: said once per file, not per scan."""
        assert observation.scan is not None
        key, skipped = observation.key, set(observation.scan.skipped)
        for marker in list(self._reported):
            stale = isinstance(marker, tuple) and marker[:2] == ("special", key)
            if stale and marker[2] not in skipped:  # type: ignore[index]
                del self._reported[marker]
        for entry in sorted(skipped):
            self._report_once(
                ("special", key, entry),
                f"special file {entry} is not a job file: not copied, not fingerprinted",
                folder=str(self.job_dir(key)),
            )

    def _drop(self, key: JobKey, result: RefreshResult) -> None:
        self._built.pop(key, None)
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
