"""Which file of a job folder runs, and with which interpreter (spec Part B §4.1, Part A #16).

This module owns the script-folder descent, the Linux host table and Kudu's selection algorithm.
It reads directory listings, file modes and the first bytes of executable files; it never runs
anything and never reads `settings.job` (that lives in the script folder, see `find_script_dir`).

Selection, as Kudu's `FindCommandToRun`: walk the hosts in priority order, skipping a host whose
interpreter is not installed; for each of a host's slots, a file named `run{ext}` wins at once,
otherwise the first matching file is remembered as the fallback if none is remembered yet. After
all hosts the fallback (if any) is used. So every `run.*` beats every other file, and
`run` (native) > `run.exe` (native) > `run.ps1` > `run.sh` > `run.py` > `run.php` > `run.js` >
`run.jar` > first native > first `*.ps1` > `*.sh` > `*.py` > `*.php` > `*.js` > `*.jar`.
Names and extensions compare case-insensitively; only the top level of the script folder counts.

Differences from Kudu, decided here:

- Hosts: `.cmd`/`.bat` are never runnable and no DNX/F# host exists. A native executable takes the
  place of `.exe`: a regular file with any exec bit (`0o111`) whose first bytes are the ELF magic.
  Its run form is a file named `run` (no extension) or `run.exe`; any other native executable is a
  fallback candidate. Files named like shared libraries (`*.so`, `*.so.*`) are not native even
  when executable, because libraries are commonly installed with the exec bit. A non-ELF file
  with the exec bit (a shell script with a shebang, a Windows `.exe`) is not native.
- `.jar` (java -jar) is appended after `.js`: Kudu has no jar host; Microsoft's docs list one.
- Interpreters are resolved with `which` at selection time and the resolved path (whatever
  `which` returns) is `argv_prefix[0]`, so the command is independent of the runtime's PATH.
- "Directory listing order" for the fallback is made deterministic: names are sorted by their
  upper-case form (NTFS orders names that way, so Windows users get the file Kudu picked there),
  ties broken by the exact name.
- A file's extension is computed as .NET does (from the last dot, so `.sh` alone has extension
  `.sh`), which keeps Kudu's matching of dot-files.
- Files skipped: non-regular files (directories, FIFOs, sockets, dangling links), symbolic links
  whose target is outside the job folder, and, for interpreter hosts only, names starting with
  `-` (they would be read as an interpreter option, since `ScriptCommand.argv` passes the bare
  name; native files run as `./name` and are safe).
- The single-sub-folder descent never follows a symbolic link to a directory (a link to an
  ancestor would loop forever, a link elsewhere would leave the job folder); such a link is an
  entry like any other and stops the descent. Every other entry counts, editor temp files and
  dot-files included, as in Kudu.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from webjobsd.model import ScriptCommand

__all__ = [
    "HOSTS",
    "RESOURCE_ERRNOS",
    "ScriptHost",
    "ScriptSlot",
    "Which",
    "find_script_dir",
    "select_command",
]

Which: TypeAlias = Callable[[str], str | None]

_ELF_MAGIC = b"\x7fELF"
# Errors that say nothing about a file, only about the daemon's resources at that moment: they
# propagate instead of reading as "this file is not a candidate".
RESOURCE_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EIO, errno.EAGAIN, errno.EINTR}
)
_RUN = "run"


# --- the script folder ----------------------------------------------------------------------


def find_script_dir(job_dir: Path) -> Path:
    """Descend while the folder holds exactly one entry and it is a real (non-link) directory.

    Returns `job_dir` itself when there is nothing to descend into. An OSError from listing
    `job_dir` (missing, not a directory, no permission) propagates.
    """
    return _script_listing(job_dir)[0]


def _script_listing(job_dir: Path) -> tuple[Path, list[os.DirEntry[str]]]:
    """`find_script_dir` and that folder's entries, from one listing of each folder: the
    command's choice needs the entries anyway, and every listing inside the watched tree is two
    inotify events for the watcher to read."""
    current = job_dir
    while True:
        with os.scandir(current) as scan:
            entries = list(scan)
        if len(entries) != 1 or not entries[0].is_dir(follow_symlinks=False):
            return current, entries
        current = current / entries[0].name


# --- candidate files ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Candidate:
    name: str
    folded: str  # case-folded name, for Kudu's case-insensitive comparisons
    extension: str  # case-folded, .NET style: from the last dot, "" when none
    native: bool


def _dotnet_extension(name: str) -> str:
    dot = name.rfind(".")
    return "" if dot < 0 or dot == len(name) - 1 else name[dot:]


def _listing_key(name: str) -> tuple[str, str]:
    return name.upper(), name


def _is_inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):  # dangling or looping link
        return False


def _looks_like_shared_library(folded: str) -> bool:
    return folded.endswith(".so") or ".so." in folded


def _is_native(path: Path, mode: int, folded: str) -> bool:
    if not mode & 0o111 or _looks_like_shared_library(folded):
        return False
    try:
        with open(path, "rb") as stream:
            return stream.read(len(_ELF_MAGIC)) == _ELF_MAGIC
    except OSError as error:
        if error.errno in RESOURCE_ERRNOS:
            raise  # the file is fine, the daemon is short of something: not "not native"
        return False


def _candidate(entry: os.DirEntry[str], job_dir: Path) -> _Candidate | None:
    """A top-level file that may be selected, or None when it must be skipped."""
    path = Path(entry.path)
    try:
        st = entry.stat(follow_symlinks=True)
    except OSError:  # vanished since listing, or a dangling link
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    # The job folder's real path only for a link: resolving it walks every component of the
    # path (an lstat each), which was about a third of the look at a job when done for each.
    if entry.is_symlink() and not _is_inside(path, job_dir.resolve()):
        return None
    folded = entry.name.casefold()
    return _Candidate(
        name=entry.name,
        folded=folded,
        extension=_dotnet_extension(folded),
        native=_is_native(path, st.st_mode, folded),
    )


def _candidates(entries: list[os.DirEntry[str]], job_dir: Path) -> list[_Candidate]:
    ordered = sorted(entries, key=lambda entry: _listing_key(entry.name))
    found = (_candidate(entry, job_dir) for entry in ordered)
    return [candidate for candidate in found if candidate is not None]


# --- the host table -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScriptSlot:
    """One of Kudu's per-host extensions: which files match, and which names are the run form."""

    run_names: frozenset[str]  # case-folded
    extension: str | None  # case-folded; None for the native slot, which matches by content

    def matches(self, candidate: _Candidate) -> bool:
        if self.extension is None:
            return candidate.native
        # An interpreter would read a leading `-` as an option (see module docstring).
        return candidate.extension == self.extension and not candidate.name.startswith("-")


@dataclass(frozen=True, slots=True)
class ScriptHost:
    """One runnable kind of file.

    `interpreters` are the names tried with `which`, in order (empty for native executables);
    `arguments` go between the interpreter and the script name.
    """

    name: str
    slots: tuple[ScriptSlot, ...]
    interpreters: tuple[str, ...] = ()
    arguments: tuple[str, ...] = ()
    in_place_by_default: bool = False

    def argv_prefix(self, which: Which) -> tuple[str, ...] | None:
        """The interpreter part of the command line; None when no interpreter is installed."""
        if not self.interpreters:
            return ()
        for interpreter in self.interpreters:
            resolved = which(interpreter)
            if resolved:
                return (resolved, *self.arguments)
        return None


def _script_slot(extension: str) -> ScriptSlot:
    return ScriptSlot(run_names=frozenset({_RUN + extension}), extension=extension)


_NATIVE_SLOT = ScriptSlot(run_names=frozenset({_RUN, _RUN + ".exe"}), extension=None)

# Kudu's priority order (Part B §4.1), with the native slot where WindowsScriptHost's `.exe` was.
HOSTS: tuple[ScriptHost, ...] = (
    ScriptHost("native", (_NATIVE_SLOT,)),
    # -NonInteractive: a job has no console; a prompt must fail instead of hanging the run.
    # Kudu's `-ExecutionPolicy RemoteSigned` has no effect on Linux and is dropped.
    ScriptHost("pwsh", (_script_slot(".ps1"),), ("pwsh",), ("-NoLogo", "-NonInteractive", "-File")),
    ScriptHost("bash", (_script_slot(".sh"),), ("bash",)),
    ScriptHost("python", (_script_slot(".py"),), ("python3",)),
    ScriptHost("php", (_script_slot(".php"),), ("php",)),
    # Debian's old packages install Node as `nodejs` only.
    ScriptHost("node", (_script_slot(".js"),), ("node", "nodejs"), in_place_by_default=True),
    ScriptHost("java", (_script_slot(".jar"),), ("java",), ("-jar",)),
)


# --- selection ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Choice:
    host: ScriptHost
    argv_prefix: tuple[str, ...]
    candidate: _Candidate


def _choose(
    candidates: Sequence[_Candidate], hosts: Sequence[ScriptHost], which: Which
) -> _Choice | None:
    fallback: _Choice | None = None
    for host in hosts:
        # Asked only for a host with files here: `which` walks PATH (an uninstalled host's
        # interpreter costs a stat per PATH entry), and a job folder holds one kind of script.
        prefix: tuple[str, ...] | None = None
        for slot in host.slots:
            matching = [c for c in candidates if slot.matches(c)]
            if not matching:
                continue
            if prefix is None:
                prefix = host.argv_prefix(which)
                if prefix is None:
                    break
            run = next((c for c in matching if c.folded in slot.run_names), None)
            if run is not None:
                return _Choice(host, prefix, run)
            if fallback is None:
                fallback = _Choice(host, prefix, matching[0])
    return fallback


def _relative_posix(script_dir: Path, job_dir: Path) -> str:
    relative = script_dir.relative_to(job_dir).as_posix()
    return "" if relative == "." else relative


def select_command(job_dir: Path, *, which: Which = shutil.which) -> ScriptCommand | None:
    """The command that runs the job in `job_dir`, or None when it has no runnable script.

    `script_dir` in the result is relative to `job_dir` (POSIX, "" for `job_dir` itself). An
    OSError from listing the folders propagates (the job folder may have just been deleted);
    problems with a single file only skip that file.
    """
    script_dir, entries = _script_listing(job_dir)
    choice = _choose(_candidates(entries, job_dir), HOSTS, which)
    if choice is None:
        return None
    return ScriptCommand(
        script_dir=_relative_posix(script_dir, job_dir),
        script_name=choice.candidate.name,
        host=choice.host.name,
        argv_prefix=choice.argv_prefix,
        in_place_by_default=choice.host.in_place_by_default,
    )
