"""The sync of a deployment's content into its target: KuduSync's rules, job folders swapped whole.

`sync_tree(source, target, ...)` makes `target` (wwwroot, or a folder of it) hold what `source`
holds, the way Kudu's KuduSync does (Part B §1.5.5, Part A #3):

* a file is copied only when the target has none, or its size or mtime differs; the copy gets
  the source's mtime (so the next deployment of the same content copies nothing). Where size
  and mtime are the same, we also compare the bytes (KuduSync does not): reproducible builds
  stamp every version with the same time, and a same-size change must still deploy. That reads
  both files only in that case, which is what an identical redeploy costs;
* every source path visited (folders included) goes into the *next manifest*, one relative path
  a line;
* a target path the source does not have is deleted only when the *previous manifest* lists it
  (files the app or an FTP client created survive), or always when the sync is `clean`;
* `.git`, `.hg`, `.deployment` and `deploy.sh` are never copied, and never deleted either, at any
  depth (KuduSync's ignore list matches a name anywhere);
* every file is written to a temporary name beside its target and renamed over it, so nobody
  ever reads half a file, and a symbolic link in the target is replaced, never written through.

What we add (Part A #3): **a job folder (`{jobs_root}/{continuous,triggered}/NAME`) is never
changed in place.** When anything in it changes, the whole folder is built in this instance's
staging folder (`deploy.staging.Staging`): the live folder is cloned first (hard links where the
file system allows, else copies keeping mtimes), so files a job created at run time stay; then
the changes are applied; then the folder is swapped in by renames. The watcher sees each changed
job change once; a job whose content is the same is not touched at all, so its process keeps
running; a removed job folder goes in one rename. A job whose files only got new times (a package
rebuilt with fresh timestamps, same bytes and modes) is "the same content" and is not rebuilt
either: rebuilding it would restart nothing (the catalog fingerprints content) but would list
it among `changed_jobs`, which people read as "restarted". The jobs root is found by absolute
path, so `WEBJOBS_ROOT_PATH` moving it elsewhere in wwwroot, or a sync aimed at a folder above or
inside a job folder (OneDeploy's `path`), is handled by the same rule.

Order, chosen so that a failure or a kill never leaves half a job: (1) plan everything by reading
both trees; (2) build every changed job folder in staging (a failure here has changed nothing);
(3) apply the other changes in wwwroot file by file, as KuduSync does (a kill here leaves a mix of
old and new *files*, each whole, as in Kudu); (4) swap the built job folders in and move removed
ones out. A kill in (4) leaves each job folder wholly old or wholly new: `Staging.clean_at_start`
puts back a folder parked between its two renames, and removes a half-built one. A removed job
is parked under `removed.*`, which that clean-up deletes rather than restores.

A folder that contains the jobs root (`App_Data`, the jobs root, a kind folder) is never deleted
in one piece, even when the previous manifest lists it: its children are deleted one by one
(removed jobs in one rename each), then the folder is removed if it is empty. Otherwise an
`rm -r App_Data` would delete job folders file by file and the staging folder with them.

The temporary names (`.webjobsd-sync.<random>.tmp`) of a sync killed in step (3) are removed at
the next start (`remove_sync_leftovers`, told where by a marker file the pipeline writes) and by
any later sync that meets one.

Blocking file I/O throughout: call it in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import structlog

from webjobsd.deploy.staging import STAGING, Staging
from webjobsd.model import JobKey, JobKind, is_valid_job_name

log = structlog.get_logger("webjobsd.deploy.sync")

IGNORED_NAMES: Final = frozenset({".git", ".hg", ".deployment", "deploy.sh"})
TEMP_PREFIX: Final = ".webjobsd-sync."
# Kudu's bundled first manifest (Kudu.Core/Scripts/firstDeploymentManifest): the very first
# deployment deletes the placeholder page.
BUILT_IN_FIRST_MANIFEST: Final = ("hostingstart.html",)
_KINDS: Final = frozenset(kind.value for kind in JobKind)
_COPY_CHUNK: Final = 1024 * 1024

Progress = Callable[[str], object]


class SyncError(Exception):
    """The sync cannot go on (a conflict it must not resolve by deleting); the message says why."""


# ---------------------------------------------------------------------------------------------
# manifests


def read_manifest(path: Path) -> set[str] | None:
    """The relative paths a manifest lists (`\\` read as `/`), or None when there is none."""
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except (FileNotFoundError, NotADirectoryError):
        return None
    entries = set()
    for line in text.splitlines():
        entry = line.strip().replace("\\", "/").strip("/")
        if entry:
            entries.add(entry)
    return entries


def write_manifest(path: Path, entries: Iterable[str]) -> None:
    """One relative path a line, written to a temporary name and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temp, "w", encoding="utf-8", errors="surrogateescape") as handle:
            for entry in entries:
                handle.write(entry + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def first_deployment_manifest(site_root: Path) -> set[str]:
    """Kudu's manifest for a site with no active deployment: `SITE/site/firstDeploymentManifest`
    if present, else the built-in one (`hostingstart.html`)."""
    found = read_manifest(site_root / "site" / "firstDeploymentManifest")
    return found if found is not None else set(BUILT_IN_FIRST_MANIFEST)


# ---------------------------------------------------------------------------------------------
# the plan: read both trees, decide, write nothing


@dataclass(frozen=True, slots=True)
class _Copy:
    rel: tuple[str, ...]
    source: Path


@dataclass(frozen=True, slots=True)
class _Mkdir:
    rel: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Delete:
    rel: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _RmdirIfEmpty:
    rel: tuple[str, ...]


_Action = _Copy | _Mkdir | _Delete | _RmdirIfEmpty


@dataclass(slots=True)
class _JobChange:
    key: JobKey
    live: Path  # the live job folder
    offset: tuple[str, ...]  # where the actions' root sits inside the job folder
    actions: list[_Action]
    fresh: bool  # built from nothing: no live folder to clone


@dataclass(slots=True)
class _Plan:
    manifest: list[str] = field(default_factory=list)
    actions: list[_Action] = field(default_factory=list)  # in the target, outside job folders
    jobs: list[_JobChange] = field(default_factory=list)
    removed: list[tuple[JobKey, Path]] = field(default_factory=list)
    late: list[_Action] = field(default_factory=list)  # once the jobs are swapped


@dataclass(frozen=True, slots=True)
class SyncResult:
    manifest: list[str]
    copied: int
    deleted: int
    changed_jobs: list[str]  # "continuous/name": the job folders swapped in
    removed_jobs: list[str]


def _listing(folder: Path | None) -> dict[str, os.DirEntry[str]]:
    if folder is None:
        return {}
    try:
        with os.scandir(folder) as entries:
            return {entry.name: entry for entry in entries}
    except (FileNotFoundError, NotADirectoryError):
        return {}


def _is_real_dir(entry: os.DirEntry[str] | None) -> bool:
    return entry is not None and entry.is_dir(follow_symlinks=False)


def _same_file(source: os.DirEntry[str], target: os.DirEntry[str]) -> bool:
    """KuduSync's test (same size and same mtime; a link: the same link text), and when both
    are the same, the bytes: builds with fixed timestamps (`zip -X`, SOURCE_DATE_EPOCH) give
    every version of a file the same mtime, and KuduSync would keep the old code running."""
    if source.is_symlink() or target.is_symlink():
        return (
            source.is_symlink()
            and target.is_symlink()
            and os.readlink(source.path) == os.readlink(target.path)
        )
    if target.is_dir(follow_symlinks=False):
        return False
    a, b = source.stat(follow_symlinks=False), target.stat(follow_symlinks=False)
    if a.st_size != b.st_size or a.st_mtime_ns != b.st_mtime_ns:
        return False
    if not (stat.S_ISREG(a.st_mode) and stat.S_ISREG(b.st_mode)):
        return stat.S_IFMT(a.st_mode) == stat.S_IFMT(b.st_mode)  # never open a FIFO to compare
    return _same_bytes(source.path, target.path)


def _only_the_time_differs(action: _Action, live: Path) -> bool:
    """A copy into a job folder of a file whose bytes are already there (a rebuilt package
    with new timestamps): the job's content is the same, so the job is not rebuilt, not
    restarted, and not listed as changed (its file keeps its older mtime)."""
    if not isinstance(action, _Copy):
        return False
    target = live.joinpath(*action.rel)
    try:
        a, b = os.lstat(action.source), os.lstat(target)
    except OSError:
        return False
    if not (stat.S_ISREG(a.st_mode) and stat.S_ISREG(b.st_mode)) or a.st_size != b.st_size:
        return False
    # The mode is part of a job's content (the exec bit): a change of it is a change.
    return stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode) and _same_bytes(
        str(action.source), str(target)
    )


def _same_bytes(first: str, second: str) -> bool:
    # Not filecmp.cmp: it caches its answer by (path, size, mtime), exactly what is equal here.
    with open(first, "rb") as a, open(second, "rb") as b:
        while True:
            chunk = a.read(_COPY_CHUNK)
            if chunk != b.read(_COPY_CHUNK):
                return False
            if not chunk:
                return True


class _Planner:
    def __init__(
        self, source: Path, target: Path, jobs_root: Path, previous: Collection[str] | None
    ) -> None:
        self.source = source
        self.target = target
        self.jobs_root = jobs_root
        self.previous = previous  # None: clean
        self.plan = _Plan()

    def _job_at(self, path: Path) -> JobKey | None:
        kind_dir = path.parent
        if (
            kind_dir.parent == self.jobs_root
            and kind_dir.name in _KINDS
            and is_valid_job_name(path.name)
        ):
            return JobKey(JobKind(kind_dir.name), path.name)
        return None

    def _holds_jobs(self, path: Path) -> bool:
        """The jobs root, one of its ancestors, or a kind folder."""
        return (
            path == self.jobs_root
            or path in self.jobs_root.parents
            or (path.parent == self.jobs_root and path.name in _KINDS)
        )

    def _deletable(self, rel: tuple[str, ...], force: bool) -> bool:
        return force or self.previous is None or "/".join(rel) in self.previous

    def run(self) -> _Plan:
        for folder in (self.target, *self.target.parents):
            key = self._job_at(folder)
            if key is None:
                continue
            # The whole sync lands inside one job folder (OneDeploy's `path`): that job is
            # built in staging like any other changed job.
            actions: list[_Action] = []
            live_is_dir = folder.is_dir() and not folder.is_symlink()
            self._walk(self.source, self.target, (), actions, (), jobs=False, force=False)
            if actions or not live_is_dir:
                offset = self.target.relative_to(folder).parts
                self.plan.jobs.append(_JobChange(key, folder, offset, actions, not live_is_dir))
            return self.plan
        self._walk(self.source, self.target, (), self.plan.actions, (), jobs=True, force=False)
        return self.plan

    def _walk(
        self,
        source: Path | None,
        target: Path | None,
        rel: tuple[str, ...],
        out: list[_Action],
        out_rel: tuple[str, ...],
        *,
        jobs: bool,
        force: bool,
        target_path: Path | None = None,
    ) -> None:
        """Compare `source` with `target` (None: absent or not a folder); `rel` is the path from
        the sync's root (manifest), `out_rel` from the root of `out`'s actions."""
        here = target if target is not None else target_path
        assert here is not None
        sources, targets = _listing(source), _listing(target)
        for name in sorted(sources.keys() | targets.keys()):
            if name in IGNORED_NAMES or (jobs and name == STAGING and here == self.jobs_root):
                continue
            src, tgt = sources.get(name), targets.get(name)
            child, out_child, path = (*rel, name), (*out_rel, name), here / name
            if src is None and tgt is not None and name.startswith(TEMP_PREFIX):
                out.append(_Delete(out_child))  # a killed sync's temporary file
                continue
            if jobs:
                key = self._job_at(path)
                if key is not None and (_is_real_dir(src) or (src is None and _is_real_dir(tgt))):
                    self._job(key, src, tgt, path, child, force)
                    continue
                if self._holds_jobs(path) and (_is_real_dir(src) or _is_real_dir(tgt)):
                    self._jobs_ancestor(src, tgt, path, child, out, out_child, force)
                    continue
            self._entry(src, tgt, path, child, out, out_child, jobs=jobs, force=force)

    def _entry(
        self,
        src: os.DirEntry[str] | None,
        tgt: os.DirEntry[str] | None,
        path: Path,
        rel: tuple[str, ...],
        out: list[_Action],
        out_rel: tuple[str, ...],
        *,
        jobs: bool,
        force: bool,
    ) -> None:
        if src is None:
            if tgt is not None and self._deletable(rel, force):
                out.append(_Delete(out_rel))
            return
        if not (src.is_symlink() or src.is_dir() or src.is_file()):
            raise SyncError(f"'{'/'.join(rel)}' in the package is not a file, folder or link.")
        self.plan.manifest.append("/".join(rel))
        if _is_real_dir(src):
            if tgt is not None and not _is_real_dir(tgt):
                out.append(_Delete(out_rel))  # a file or a link where a folder goes
            if not _is_real_dir(tgt):
                out.append(_Mkdir(out_rel))
            existing = path if _is_real_dir(tgt) else None
            self._walk(
                Path(src.path),
                existing,
                rel,
                out,
                out_rel,
                jobs=jobs,
                force=False,
                target_path=path,
            )
            return
        if tgt is None or not _same_file(src, tgt):
            if _is_real_dir(tgt):
                out.append(_Delete(out_rel))
            out.append(_Copy(out_rel, Path(src.path)))

    def _job(
        self,
        key: JobKey,
        src: os.DirEntry[str] | None,
        tgt: os.DirEntry[str] | None,
        live: Path,
        rel: tuple[str, ...],
        force: bool,
    ) -> None:
        if src is None:
            if self._deletable(rel, force):
                self.plan.removed.append((key, live))
            return
        self.plan.manifest.append("/".join(rel))
        fresh = not _is_real_dir(tgt)
        actions: list[_Action] = []
        self._walk(
            Path(src.path),
            None if fresh else live,
            rel,
            actions,
            (),
            jobs=False,
            force=False,
            target_path=live,
        )
        if not fresh:
            actions = [a for a in actions if not _only_the_time_differs(a, live)]
        if fresh or actions:
            self.plan.jobs.append(_JobChange(key, live, (), actions, fresh))

    def _jobs_ancestor(
        self,
        src: os.DirEntry[str] | None,
        tgt: os.DirEntry[str] | None,
        path: Path,
        rel: tuple[str, ...],
        out: list[_Action],
        out_rel: tuple[str, ...],
        force: bool,
    ) -> None:
        """A folder that holds (or will hold) the jobs: never deleted in one piece."""
        if _is_real_dir(src):
            assert src is not None
            self.plan.manifest.append("/".join(rel))
            if tgt is not None and not _is_real_dir(tgt):
                out.append(_Delete(out_rel))
            if not _is_real_dir(tgt):
                out.append(_Mkdir(out_rel))
            existing = path if _is_real_dir(tgt) else None
            self._walk(
                Path(src.path),
                existing,
                rel,
                out,
                out_rel,
                jobs=True,
                force=False,
                target_path=path,
            )
            return
        if src is not None:
            raise SyncError(
                f"The package has a file '{'/'.join(rel)}' where the jobs folder "
                f"{self.jobs_root} needs a folder; refusing to delete the jobs for it."
            )
        if self._deletable(rel, force):
            # Listed in the previous manifest (or clean): everything in it goes, as KuduSync
            # would delete it, but child by child so that jobs leave in one rename each.
            self._walk(None, path, rel, out, out_rel, jobs=True, force=True)
            self.plan.late.append(_RmdirIfEmpty(out_rel))


# ---------------------------------------------------------------------------------------------
# applying the plan


def _remove(path: Path) -> None:
    """A folder with its content, or a link or file itself (never what a link points to)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def _copy_file(source: Path, destination: Path) -> None:
    """`source` to `destination` through a temporary name: mode and mtime kept, link as link."""
    info = os.lstat(source)
    temp = destination.with_name(f"{TEMP_PREFIX}{secrets.token_hex(8)}.tmp")
    try:
        if stat.S_ISLNK(info.st_mode):
            os.symlink(os.readlink(source), temp)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with open(source, "rb") as reader, open(os.open(temp, flags, 0o600), "wb") as writer:
                shutil.copyfileobj(reader, writer, _COPY_CHUNK)
                writer.flush()
                os.fchmod(writer.fileno(), stat.S_IMODE(info.st_mode) & 0o777)
                os.utime(writer.fileno(), ns=(info.st_atime_ns, info.st_mtime_ns))
        os.replace(temp, destination)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _clone_tree(live: Path, new: Path) -> None:
    """The live job folder's content into `new`: hard links where possible (same inode, same
    mtime, no bytes copied; the sync then replaces names, never writes through them)."""
    with os.scandir(live) as entries:
        for entry in entries:
            destination = new / entry.name
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), destination)
            elif entry.is_dir(follow_symlinks=False):
                os.mkdir(destination, stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode))
                _clone_tree(Path(entry.path), destination)
            elif entry.is_file(follow_symlinks=False):
                try:
                    os.link(entry.path, destination, follow_symlinks=False)
                except OSError:
                    shutil.copy2(entry.path, destination, follow_symlinks=False)
            else:
                log.warning("not kept in the new job folder: not a file", path=entry.path)


def _apply(actions: Iterable[_Action], root: Path) -> tuple[int, int]:
    copied = deleted = 0
    for action in actions:
        path = root.joinpath(*action.rel)
        if isinstance(action, _Copy):
            _copy_file(action.source, path)
            copied += 1
        elif isinstance(action, _Mkdir):
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                if path.is_symlink() or not path.is_dir():
                    raise
        elif isinstance(action, _Delete):
            _remove(path)
            deleted += 1
        else:
            try:
                os.rmdir(path)
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise
    return copied, deleted


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def sync_tree(
    source: Path,
    target: Path,
    *,
    jobs_root: Path,
    staging: Staging,
    previous: Collection[str] | None,
    progress: Progress | None = None,
) -> SyncResult:
    """Make `target` hold `source` (KuduSync, job folders whole); `previous=None` is clean.

    See the module's docstring for the rules and the order. Raises SyncError or OSError; what
    was built in staging is removed then, and no job folder has been touched.
    """
    source, target, jobs_root = source.absolute(), target.absolute(), jobs_root.absolute()
    if _inside(source, target) or _inside(target, source):
        raise SyncError(f"The source {source} and the target {target} overlap.")
    if not source.is_dir():
        raise SyncError(f"The source {source} is not a folder.")
    tell = progress or (lambda _message: None)
    plan = _Planner(source, target, jobs_root, previous).run()
    copies = sum(isinstance(a, _Copy) for a in plan.actions)
    deletions = sum(isinstance(a, _Delete) for a in plan.actions)
    tell(
        f"Syncing into {target}: {copies} files to copy, {deletions} to delete, "
        f"{len(plan.jobs)} job folders to rebuild, {len(plan.removed)} to remove."
    )
    built: list[tuple[_JobChange, Path]] = []
    copied = deleted = 0
    try:
        if plan.jobs:
            tell("Preparing job folders: " + ", ".join(str(c.key) for c in plan.jobs) + ".")
        for change in plan.jobs:
            new = staging.new_folder()
            built.append((change, new))
            if not change.fresh:
                _clone_tree(change.live, new)
            root = new.joinpath(*change.offset)
            root.mkdir(parents=True, exist_ok=True)
            counts = _apply(change.actions, root)
            copied, deleted = copied + counts[0], deleted + counts[1]
        target.mkdir(parents=True, exist_ok=True)
        counts = _apply(plan.actions, target)
        copied, deleted = copied + counts[0], deleted + counts[1]
    except BaseException:
        for _change, new in built:
            shutil.rmtree(new, ignore_errors=True)
        staging.release()
        raise
    if built or plan.removed:
        tell("Swapping job folders in.")
    for index, (change, new) in enumerate(built):
        try:
            staging.swap_into_place(new, change.live)
        except BaseException:
            for _change, left in built[index:]:
                shutil.rmtree(left, ignore_errors=True)
            staging.release()
            raise
    for key, live in plan.removed:
        staging.folder.mkdir(parents=True, exist_ok=True)
        # Not `old.*`: a start after a kill restores those; a removed job must stay removed.
        parked = staging.folder / f"removed.{key.kind.value}.{secrets.token_hex(6)}.{key.name}"
        os.rename(live, parked)
        shutil.rmtree(parked, ignore_errors=True)
        deleted += 1
    staging.release()
    _apply(plan.late, target)
    return SyncResult(
        manifest=plan.manifest,
        copied=copied,
        deleted=deleted,
        changed_jobs=[str(change.key) for change, _new in built],
        removed_jobs=[str(key) for key, _live in plan.removed],
    )


def remove_sync_leftovers(target: Path) -> int:
    """Temporary files of a sync that was killed, anywhere under `target`; how many."""
    removed = 0
    for folder, dirs, files in os.walk(target):
        dirs[:] = [d for d in dirs if d not in (".git", STAGING)]
        for name in files:
            if name.startswith(TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
    return removed
