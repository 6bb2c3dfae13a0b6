"""Zip archives from clients, unpacked without trusting them (job uploads, `/api/zip`, site
deployments and dropped zips all come through here).

`extract_zip` unpacks an archive without trusting it. Python 3.11.7's `zipfile` predates the
CVE-2024-0450 fix (entries overlapping in the archive, a quadratic zip bomb), and Kudu's own
extraction only rewrites `../` (Part B §8.2), so everything is checked here:

- names: `\\` is a separator (as Kudu treats it); absolute names, drive letters, `..`
  components, NUL characters, names over the Linux limits (255 bytes a component, 4096 in
  all) and an empty name are refused. `.` and empty components are dropped.
- types: symbolic links, devices, FIFOs and sockets (from the unix mode in `external_attr`)
  and encrypted entries are refused; only stored and deflate entries are accepted (what
  Kudu's .NET `ZipArchive` reads; bzip2/lzma could inflate a whole block in one call).
- ambiguity: the same name twice (after normalisation) is refused, except repeated folder
  entries, and so is a file that another entry needs as a folder (`a` and `a/b`). Names that
  differ only by case are distinct files on Linux and are both kept.
- size: more than `max_entries` entries is refused (413); so is an archive whose declared
  total is over `max_extracted_bytes` (413, a cheap early answer). The bytes really written
  are counted while extracting and stop at `max_extracted_bytes` (413), so the limit holds
  even if a header lies: CPython's reader happens to stop at the declared `file_size` (a
  lying size then fails its CRC check: 400), but that is its behaviour, not a contract.
  Entries whose data overlap another entry's in the archive, CVE-2024-0450's construction
  (fixed in 3.11.8, not in our 3.11.7), are refused (400) before anything is inflated.
- the destination: every folder is entered with `O_NOFOLLOW` relative to its parent's file
  descriptor, so a symbolic link already in the destination is never followed (the entry
  is refused with 409), and each file is written to a fresh temporary name (`O_EXCL |
  O_NOFOLLOW`) and renamed over the final name, so an existing link or hard link is
  replaced, never written through.
- modes: folders 0o755; files 0o644, or 0o755 when the zip's unix mode has an execute bit,
  the name ends in `.sh` or `.py`, or the content starts with `#!` or an ELF header. Scripts
  run through their interpreter (Part A #16) so the bit is not required, but a `./run.sh`
  or a native binary zipped on Windows (no unix modes) must stay runnable.
- times: each file's mtime is the entry's UTC "extended timestamp" when the archive has one,
  else its DOS date read as local time (Kudu's reading). Folder times are not restored.

Refusals are `Refusal`s with the HTTP status that says why (400, 409, 413): the API answers with
them as they are, and deployments that are not requests (a dropped zip) log their message.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import struct
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from webjobsd.limits import UploadLimits
from webjobsd.refusal import Refusal

CHUNK_SIZE = 64 * 1024
NAME_MAX = 255
PATH_MAX = 4096
_DRIVE = re.compile(r"^[A-Za-z]:")
_EXEC_SUFFIXES = (".sh", ".py")
_EXEC_MAGIC = (b"#!", b"\x7fELF")
_SUPPORTED_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_UT_EXTRA = 0x5455  # Info-ZIP "extended timestamp": UTC seconds
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length
_LOCAL_SIGNATURE = b"PK\x03\x04"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
NOT_A_ZIP = "Not a valid zip archive."


class UnsafeArchive(Refusal):
    """An archive we refuse to extract (400): unsafe, ambiguous, unsupported or corrupt."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


def too_large(message: str) -> Refusal:
    return Refusal(413, message)


@dataclass(frozen=True, slots=True)
class _Entry:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    is_dir: bool
    unix_mode: int

    @property
    def name(self) -> str:
        return "/".join(self.parts) + ("/" if self.is_dir else "")


def extract_zip(archive: Path, destination: Path, limits: UploadLimits) -> list[str]:
    """Extract `archive` into the existing folder `destination`; return the names written.

    Names are normalised (`/` separators, folders ending in `/`), in archive order. Every entry
    is checked before anything is written, so a refused archive writes nothing; an error while
    writing (size cap, corrupt data, a conflict with the destination) leaves what was already
    written, which is why callers extract into a scratch folder and move the result into place.
    Blocking: run it in a thread.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as error:
        raise UnsafeArchive(NOT_A_ZIP) from error
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_entries:
            raise too_large(
                f"The archive has {len(infos)} entries; the limit is {limits.max_entries}."
            )
        entries = _validate(infos)
        declared = _declared_size(entries)
        if declared > limits.max_extracted_bytes:
            raise too_large(
                f"The archive would expand to {declared} bytes; "
                f"the limit is {limits.max_extracted_bytes} bytes."
            )
        _check_no_overlap(zf, archive, entries)
        return _write_entries(zf, entries, destination, limits.max_extracted_bytes)


def _declared_size(entries: list[_Entry]) -> int:
    """What the headers claim: a cheap early refusal, never the limit's only guard."""
    return sum(entry.info.file_size for entry in entries if not entry.is_dir)


def _validate(infos: list[zipfile.ZipInfo]) -> list[_Entry]:
    entries: list[_Entry] = []
    kinds: dict[tuple[str, ...], bool] = {}  # normalised path -> is a folder
    for info in infos:
        entry = _parse_entry(info)
        if entry is None:
            continue
        previous = kinds.get(entry.parts)
        if previous is not None and not (previous and entry.is_dir):
            raise UnsafeArchive(f"Entry '{entry.name}' appears more than once in the archive.")
        kinds[entry.parts] = entry.is_dir
        entries.append(entry)
    # A file that another entry needs as a folder: `a` and `a/b`.
    for parts, is_dir in kinds.items():
        for depth in range(1, len(parts)):
            if kinds.get(parts[:depth]) is False:
                child = "/".join(parts) + ("/" if is_dir else "")
                raise UnsafeArchive(
                    f"Entry '{child}' needs '{'/'.join(parts[:depth])}' to be a folder, "
                    "but the archive also has a file by that name."
                )
    return entries


def _parse_entry(info: zipfile.ZipInfo) -> _Entry | None:
    raw = info.orig_filename  # zipfile cuts `filename` at a NUL; the original keeps it
    shown = raw.replace("\x00", "\\0")
    if "\x00" in raw:
        raise UnsafeArchive(f"Entry '{shown}' has a NUL character in its name.")
    name = raw.replace("\\", "/")
    if name.startswith("/"):
        raise UnsafeArchive(f"Entry '{shown}' has an absolute path.")
    if _DRIVE.match(name):
        raise UnsafeArchive(f"Entry '{shown}' starts with a drive letter.")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise UnsafeArchive(f"Entry '{shown}' has a '..' component (a path traversal).")
    unix_mode = info.external_attr >> 16
    kind = stat.S_IFMT(unix_mode)
    if kind == stat.S_IFLNK:
        raise UnsafeArchive(f"Entry '{shown}' is a symbolic link; links are not extracted.")
    if kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
        raise UnsafeArchive(f"Entry '{shown}' is a device, FIFO or socket.")
    is_dir = name.endswith("/") or kind == stat.S_IFDIR
    if not parts:
        if is_dir:
            return None  # "./": the destination itself
        raise UnsafeArchive(f"Entry '{shown}' has an empty name.")
    encoded = [os.fsencode(part) for part in parts]
    if any(len(part) > NAME_MAX for part in encoded) or sum(map(len, encoded)) > PATH_MAX:
        raise UnsafeArchive(f"Entry '{shown}' has a name longer than Linux allows.")
    if info.flag_bits & 0x1:
        raise UnsafeArchive(f"Entry '{shown}' is encrypted; encrypted archives are not supported.")
    if not is_dir and info.compress_type not in _SUPPORTED_METHODS:
        raise UnsafeArchive(
            f"Entry '{shown}' uses compression method {info.compress_type}; "
            "only stored and deflate entries are supported."
        )
    return _Entry(info, parts, is_dir, unix_mode)


def _check_no_overlap(zf: zipfile.ZipFile, archive: Path, entries: list[_Entry]) -> None:
    """Refuse entries whose data run into the next entry (CVE-2024-0450, fixed in 3.11.8)."""
    ordered = sorted(entries, key=lambda entry: entry.info.header_offset)
    with open(archive, "rb") as handle:
        for index, entry in enumerate(ordered):
            info = entry.info
            following = (
                ordered[index + 1].info.header_offset if index + 1 < len(ordered) else zf.start_dir
            )
            handle.seek(info.header_offset)
            header = handle.read(_LOCAL_HEADER.size)
            if len(header) != _LOCAL_HEADER.size:
                raise UnsafeArchive(f"{NOT_A_ZIP} Entry '{entry.name}' is truncated.")
            signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
            if signature != _LOCAL_SIGNATURE:
                raise UnsafeArchive(f"{NOT_A_ZIP} Entry '{entry.name}' has no local header.")
            end = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
            end += info.compress_size
            if end > following:
                raise UnsafeArchive(
                    f"Entry '{entry.name}' overlaps another entry in the archive "
                    "(a zip bomb construction); refused."
                )


def _write_entries(
    zf: zipfile.ZipFile, entries: list[_Entry], destination: Path, max_bytes: int
) -> list[str]:
    written: list[str] = []
    budget = [max_bytes]
    root_fd = os.open(destination, _DIR_FLAGS)
    try:
        for entry in entries:
            if entry.is_dir:
                with _enter_folders(root_fd, entry.parts, entry):
                    pass
            else:
                with _enter_folders(root_fd, entry.parts[:-1], entry) as parent_fd:
                    _write_file(zf, entry, parent_fd, budget)
            written.append(entry.name)
    finally:
        os.close(root_fd)
    return written


@contextlib.contextmanager
def _enter_folders(root_fd: int, parts: tuple[str, ...], entry: _Entry) -> Iterator[int]:
    """A descriptor for root/parts, creating folders and never following a symbolic link."""
    fd = os.dup(root_fd)
    try:
        for depth, part in enumerate(parts, start=1):
            created = False
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
                created = True
            except FileExistsError:
                pass
            try:
                child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.ENOTDIR):
                    where = "/".join(parts[:depth])
                    raise Refusal(
                        409,
                        f"Cannot extract '{entry.name}': '{where}' in the destination is a "
                        "file or a symbolic link, not a folder.",
                    ) from error
                raise
            os.close(fd)
            fd = child
            if created:
                os.fchmod(fd, 0o755)  # whatever the umask
        yield fd
    finally:
        os.close(fd)


def _write_file(zf: zipfile.ZipFile, entry: _Entry, parent_fd: int, budget: list[int]) -> None:
    final = entry.parts[-1]
    temp = f".wjd-{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, 0o600, dir_fd=parent_fd)
    try:
        with open(fd, "wb", closefd=False) as out:
            head = _copy_entry(zf, entry, out, budget)
        os.fchmod(fd, _file_mode(entry, head))
        mtime = _entry_mtime(entry.info)
        if mtime is not None:
            os.utime(fd, ns=(mtime, mtime))
        os.close(fd)
        fd = -1
        try:
            # rename(2) replaces whatever has the final name (file, link, hard link) without
            # writing through it.
            os.replace(temp, final, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        except IsADirectoryError as error:
            raise Refusal(
                409, f"Cannot extract '{entry.name}': a folder by that name is in the destination."
            ) from error
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=parent_fd)
        raise


def _copy_entry(zf: zipfile.ZipFile, entry: _Entry, out: BinaryIO, budget: list[int]) -> bytes:
    """Copy one entry's data, counting real bytes against the budget; return its first bytes."""
    head = b""
    try:
        with zf.open(entry.info) as source:
            while chunk := source.read(CHUNK_SIZE):
                budget[0] -= len(chunk)
                if budget[0] < 0:
                    raise too_large(
                        f"Entry '{entry.name}' takes the extracted size past the limit; "
                        "the archive expands to too many bytes."
                    )
                if len(head) < 4:
                    head += chunk[:4]
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError) as error:
        raise UnsafeArchive(f"{NOT_A_ZIP} Entry '{entry.name}': {error}") from error
    return head


def _file_mode(entry: _Entry, head: bytes) -> int:
    executable = (
        bool(entry.unix_mode & 0o111)
        or entry.parts[-1].lower().endswith(_EXEC_SUFFIXES)
        or head.startswith(_EXEC_MAGIC)
    )
    return 0o755 if executable else 0o644


def _entry_mtime(info: zipfile.ZipInfo) -> int | None:
    """The entry's mtime in ns: the UTC extended timestamp if present, else the DOS local time."""
    extra = info.extra
    offset = 0
    while offset + 4 <= len(extra):
        kind, size = struct.unpack_from("<HH", extra, offset)
        data = extra[offset + 4 : offset + 4 + size]
        if kind == _UT_EXTRA and len(data) >= 5 and data[0] & 0x1:
            seconds: int = struct.unpack_from("<i", data, 1)[0]
            return seconds * 1_000_000_000
        offset += 4 + size
    try:
        seconds_local = time.mktime((*info.date_time, 0, 0, -1))
    except (OverflowError, ValueError):
        return None
    return int(seconds_local) * 1_000_000_000
