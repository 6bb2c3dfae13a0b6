"""Kudu's file APIs rooted at the site: `/api/vfs/{path}`, `/api/zip/{path}`, `/vfs`, `/zip`.

This module owns raw file access over HTTP. Job log URLs (`output_url`, `log_url`, ...) point
here, and writing or deleting under `site/wwwroot/App_Data/jobs` through it is a way to create or
remove jobs: after every change `on_change(path)` wakes the daemon's watcher.

Behaviour follows Kudu's `VfsControllerBase`, `VfsController` and `ZipController`:

* GET of a folder is Kudu's listing: an array of `{"name", "size", "mtime", "crtime", "mime",
  "href", "path"}`; times in Json.NET's `DateTimeOffset` form
  (`2024-05-01T10:20:30.1234567+00:00`, trailing zeros of the fraction dropped); `mime` is
  `inode/directory` for folders; `size` 0 for folders; `href` is absolute, built from the
  request (scheme and host from the `base_url` hook, which the daemon gives its trusted-proxy
  rule; the raw path, so `%2F` survives), ends in `/` for folders and carries the request's
  query string, as Kudu's does. `path` is the on-disk path under the configured site root, as
  Kudu's (`D:\\home\\...`): the API is authenticated and the site root is no secret. `crtime` is
  the older of ctime and mtime (Linux on Python 3.11 has no birth time; .NET on Linux answers
  the same way). Entries are sorted by name.
* A folder asked for without a trailing `/` (or a file with one) is a 307 to the other form.
* GET of a file streams it with `ETag`, `Last-Modified`, `Accept-Ranges`; `If-None-Match` and
  `If-Modified-Since` give 304, a single `Range` gives 206 (honouring `If-Range`), an
  unsatisfiable one 416. Content type by extension, `application/octet-stream` otherwise, with
  Kudu's overrides (`.js`, `.json`, `.md`). Our own code, not `web.FileResponse`: that one would
  answer with a `name.gz` sibling when the client accepts gzip (a different file in a VFS) and
  its errors are not JSON.
* The ETag is `"<mtime ns hex>-<size hex>"` (Kudu uses the mtime ticks alone; any opaque value
  does). Every write through this API moves the mtime forward by at least 1 ns, so two writes
  inside one coarse kernel clock tick still get different ETags.
* PUT of a file: 201 when new, 204 when replaced, both with the new ETag. Replacing an existing
  file needs `If-Match` (412 without it, 412 plus the current ETag when it does not match; `*`
  matches), exactly like Kudu, whose own client always sends `If-Match: *`; `If-Match` is
  ignored for a new file (Kudu's behaviour, which that client relies on). The body is streamed
  under the upload cap to a temporary file in the same folder (a `.tmp` name the watcher ignores)
  and renamed over the target: readers see the old bytes or the new ones. A replaced file keeps
  its mode; a new one gets 0o644, or 0o755 for the names and contents `extract_zip` marks
  executable. Missing parent folders are created (and removed again when the upload is
  refused, so a refused upload never leaves an empty job folder). PUT through a symbolic link
  inside the site writes the file it points to, as Kudu's `FileMode.Create` does.
* PUT with a trailing `/` creates the folder (201); 409 if it exists. PUT on a folder is 409.
* DELETE of a file needs `If-Match` like PUT (Kudu); 200. DELETE of a folder: an empty one is
  removed, a non-empty one only with `?recursive=true`, else 409 with Kudu's text (Kudu deletes
  empty folders without `recursive` too). A symbolic link is removed itself, never its target.
  The site root cannot be deleted (403). 404 when missing.
* ZIP GET of a folder streams a zip of its content (entry names relative to the folder, empty
  folders as `name/` entries, unix modes kept). Regular files only; a link to a file is followed
  when it stays inside the site, links to folders are skipped (cycles), anything leading outside
  is skipped. `?fileName=` names the download, as in Kudu. ZIP GET of a file is 404 (Kudu).
* ZIP PUT extracts into the folder, adding and overwriting, never clearing it first (Kudu).
  The body goes to a file under `temp_dir`, is extracted by `extract_zip` into a scratch folder
  there, checked against the destination (a file where the archive needs a folder, a folder
  where it has a file, or a symbolic link in the way is a 409 before anything moves) and moved
  into place: whole new subtrees by one rename, files one by one by rename (copy to a `.tmp`
  name and rename when `temp_dir` is on another filesystem). A missing destination is created
  only when the path ends with `/` (Kudu: 404 otherwise). 200 with an empty body, as Kudu.
  The body is a zip whatever its `Content-Type` says, as in Kudu's zip route: the GitHub deploy
  action's library sends its zip as `application/json; charset=utf-8`. A body that is not a
  zip is a 400; one that looks like JSON (Kudu's `packageUri` form: the daemon does not fetch
  URLs) says so in the message.

Names are bytes on Linux and need not be UTF-8. URL paths are percent-decoded here, to bytes
(surrogate escapes in `str`, as `os.fsdecode`), so `%E9` is the byte 0xE9 and `%25E9` the text
`%E9`. A listing shows such a name with U+FFFD in `name` and `path` and its bytes in `href`,
which serves that file. A zip stores the name's bytes without the UTF-8 flag (what Info-ZIP's
zip does on Linux), so `unzip` recreates the name; U+FFFD would lose it and could merge two
names. A zip's status line is sent with its first bytes: a zip that fails before them is a
JSON 500, one that fails later is logged and its connection broken (never a 200 that looks
complete).

Containment: every path goes through `safe_child` (resolve, compare with the real root). Opened
files and folders are checked again through `/proc/self/fd`, and writes and deletes happen
relative to a checked folder descriptor, so a link swapped in after the check cannot take an
operation outside the site. Errors are `ApiError`s (JSON via `error_middleware`); a client's
path or body never causes a 500.

Where we differ from Kudu, on purpose: error bodies are JSON (Part A #2) and Kudu's bare 404s
carry a message; paths with `..`, NUL or a link leading outside are refused (Kudu checks
nothing, IIS filters raw `..`); PUT/DELETE of the site root and `packageUri` bodies are refused;
a zip PUT is validated whole before anything moves (Kudu writes entry by entry and rewrites
`../` into `./` instead of refusing); uploads and extraction are capped (`UploadLimits`);
no `VfsSpecialFolders` (`SystemDrive`, `LocalSiteRoot`): there is one root.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import mimetypes
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, unquote_to_bytes

import structlog
from aiohttp import hdrs, web

from webjobsd.deploy.archive import CHUNK_SIZE, NOT_A_ZIP, UnsafeArchive, extract_zip
from webjobsd.http.errors import ApiError, clean_text, conflict, not_found
from webjobsd.http.numbers import whole_number
from webjobsd.http.uploads import fd_path, is_within, receive_to_file, safe_child
from webjobsd.limits import UploadLimits

log = structlog.get_logger("webjobsd.http.files")

T = TypeVar("T")

# Kudu's texts (Kudu.Services/Resources.resx).
CANNOT_UPDATE_DIRECTORY = "The resource represents a directory which can not be updated."
ETAG_MISMATCH = "ETag does not represent the latest state of the resource."
MISSING_IF_MATCH = (
    "Updating an existing resource requires an If-Match header carrying a single, strong ETag."
)
CANNOT_DELETE_DIRECTORY = (
    "Cannot delete directory. It is either not empty or access is not allowed."
)
PACKAGE_URI_REFUSED = "A packageUri body is not supported: send the zip itself as the request body."

DIRECTORY_MIME = "inode/directory"
DEFAULT_MIME = "application/octet-stream"
_RANGE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$", re.ASCII)
_TRAILING_SLASHES = re.compile(r"(?:/|%2[fF])+$")
_HREF_SAFE = "!$&'()*+,;=:@~"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

# The interpreter's built-in table only (not /etc/mime.types): the same answer on every host.
_MIME = mimetypes.MimeTypes()
_MIME.encodings_map.clear()  # "x.tar.gz" is application/gzip, not tar plus an encoding
for _type, _ext in (
    ("application/javascript", ".js"),  # Kudu's MediaTypeMap overrides
    ("application/json", ".json"),
    ("text/plain", ".md"),
    ("text/plain", ".log"),
    ("application/gzip", ".gz"),
):
    _MIME.add_type(_type, _ext)


def file_api(
    *,
    site_root: Path,
    limits: UploadLimits,
    temp_dir: Path,
    on_change: Callable[[Path], None] | None = None,
    base_url: Callable[[web.Request], str] | None = None,
) -> FileApi:
    """The handlers of the vfs and zip routes, for `add_file_routes` or `http/lazy.py`."""
    return FileApi(
        site_root.absolute(),
        site_root.resolve(),
        limits,
        temp_dir,
        on_change,
        base_url or _origin,
    )


@dataclass(frozen=True, slots=True)
class _Target:
    relative: str  # as decoded from the URL
    path: Path  # lexical, under the site root
    slash: bool  # the URL ends with "/" (a folder is meant)


@dataclass(frozen=True, slots=True)
class FileApi:
    root: Path
    real_root: Path
    limits: UploadLimits
    temp_dir: Path
    on_change: Callable[[Path], None] | None
    base_url: Callable[[web.Request], str]

    # -- helpers ---------------------------------------------------------------------------

    def target(self, request: web.Request) -> _Target:
        if request.match_info.get("path") is None:
            # "/api/vfs" without the slash: the root, asked for as a file
            return _Target("", self.root, False)
        # Decoded here rather than by aiohttp, which leaves `%E9` (not UTF-8) as three
        # characters: bytes become the name's bytes (surrogate escapes, as os.fsdecode), so
        # the href of a listed non-UTF-8 name leads back to that file. `%2F` decodes to `/`
        # too; safe_child splits on "/" afterwards, so "..%2F.." is caught like a literal one.
        relative = os.fsdecode(unquote_to_bytes(_raw_relative(request)))
        path = safe_child(self.root, relative)
        return _Target(relative, path, relative == "" or relative.endswith("/"))

    def changed(self, path: Path, real: Path | None = None) -> None:
        """Tell the daemon; `real` too when a link made the write land somewhere else."""
        if self.on_change is None:
            return
        paths = [path]
        if real is not None and real != path and is_within(real, self.real_root):
            paths.append(self.root / real.relative_to(self.real_root))
        for changed in dict.fromkeys(paths):
            try:
                self.on_change(changed)
            except Exception:  # the write happened; a failing hook must not make it a 500
                log.exception("on_change hook failed", path=str(changed))

    def redirect(self, request: web.Request, *, add_slash: bool) -> web.StreamResponse:
        """Kudu's 307 between the folder form (trailing `/`) and the file form of a URL."""
        raw_path = request.rel_url.raw_path
        path = raw_path + "/" if add_slash else _TRAILING_SLASHES.sub("", raw_path) or "/"
        query = request.rel_url.raw_query_string
        location = self.base_url(request) + path + (f"?{query}" if query else "")
        return web.Response(status=307, headers={hdrs.LOCATION: location})

    def shown(self, target: _Target) -> str:
        return str(target.path) + ("/" if target.slash and target.relative else "")

    # -- VFS ---------------------------------------------------------------------------------

    async def vfs_get(self, request: web.Request) -> web.StreamResponse:
        target = self.target(request)
        st = await asyncio.to_thread(_stat, target.path)
        if st is None:
            raise not_found(f"'{self.shown(target)}' not found.")
        if stat.S_ISDIR(st.st_mode):
            if not target.slash:
                return self.redirect(request, add_slash=True)
            base = self.base_url(request) + request.rel_url.raw_path
            query = request.rel_url.raw_query_string
            listing = await asyncio.to_thread(
                self.listing, target.path, base, f"?{query}" if query else ""
            )
            return web.json_response(listing)
        if not stat.S_ISREG(st.st_mode):
            raise ApiError(403, f"'{self.shown(target)}' is not a regular file or folder.")
        if target.slash:
            return self.redirect(request, add_slash=False)
        return await self.send_file(request, target)

    def listing(self, folder: Path, base: str, suffix: str) -> list[dict[str, object]]:
        entries: list[dict[str, object]] = []
        with os.scandir(folder) as scan:
            items = sorted(scan, key=lambda item: (item.name.casefold(), item.name))
        for item in items:
            try:
                st = self.listed_stat(item)
            except OSError:
                continue  # vanished while listing
            is_dir = stat.S_ISDIR(st.st_mode)
            # The href carries the name's bytes (`caf%E9.txt` for b"caf\xe9.txt"); `name` and
            # `path` are text, with U+FFFD where a byte is not UTF-8.
            href_name = quote(os.fsencode(item.name), safe=_HREF_SAFE) + ("/" if is_dir else "")
            entries.append(
                {
                    "name": clean_text(item.name),
                    "size": 0 if is_dir else st.st_size,
                    "mtime": kudu_time(st.st_mtime_ns),
                    "crtime": kudu_time(min(st.st_ctime_ns, st.st_mtime_ns)),
                    "mime": DIRECTORY_MIME if is_dir else mime_type(item.name),
                    "href": base + href_name + suffix,
                    "path": clean_text(str(folder / item.name)),
                }
            )
        return entries

    def listed_stat(self, item: os.DirEntry[str]) -> os.stat_result:
        """The entry's metadata; for a link leading outside the site, the link's own."""
        if not item.is_symlink():
            return item.stat(follow_symlinks=False)
        try:
            if is_within(Path(item.path).resolve(), self.real_root):
                return item.stat()
        except (OSError, RuntimeError):
            pass
        return item.stat(follow_symlinks=False)

    async def send_file(self, request: web.Request, target: _Target) -> web.StreamResponse:
        fd = await asyncio.to_thread(self.open_checked, target.path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ApiError(403, f"'{self.shown(target)}' is not a regular file.")
            etag = etag_of(st)
            headers = {
                hdrs.ETAG: f'"{etag}"',
                hdrs.LAST_MODIFIED: http_date(st.st_mtime),
                hdrs.ACCEPT_RANGES: "bytes",
            }
            if _not_modified(request, etag, st):
                return web.Response(status=304, headers=headers)
            size = st.st_size
            start, count, status = 0, size, 200
            wanted = _wanted_range(request, etag, st)
            if wanted is not None:
                first, last = wanted
                # "bytes=-N" is the last N bytes.
                start = max(size - (last or 0), 0) if first is None else first
                if start >= size:
                    raise ApiError(
                        416,
                        f"The range asked for is outside the file's {size} bytes.",
                        {hdrs.CONTENT_RANGE: f"bytes */{size}"},
                    )
                end = size - 1 if first is None or last is None else min(last, size - 1)
                count = max(end - start + 1, 0)
                status = 206
                headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{start + count - 1}/{size}"
            response = web.StreamResponse(status=status, headers=headers)
            response.content_type = mime_type(target.path.name)
            response.content_length = count
            await response.prepare(request)
            if request.method == hdrs.METH_HEAD:
                return response
            offset, left = start, count
            try:
                while left > 0:
                    # _in_thread: the descriptor is closed below only once no read uses it.
                    data = await _in_thread(os.pread, fd, min(CHUNK_SIZE, left), offset)
                    if not data:
                        break  # truncated meanwhile; the short body tells the client
                    await response.write(data)
                    offset += len(data)
                    left -= len(data)
                await response.write_eof()
            except ConnectionError:
                pass  # the client left
            return response
        finally:
            os.close(fd)

    async def vfs_put(self, request: web.Request) -> web.StreamResponse:
        target = self.target(request)
        # Writes go to the real file: PUT through a link inside the site updates what it points
        # to (Kudu's FileMode.Create does the same); safe_child checked that this is inside.
        real = await asyncio.to_thread(_resolve, target.path)
        st = await asyncio.to_thread(_stat, real)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise conflict(CANNOT_UPDATE_DIRECTORY)
        if target.slash:
            if st is not None:
                raise conflict(f"'{self.shown(target)}' exists and is not a folder.")
            await asyncio.to_thread(self.make_folders, real, target)
            self.changed(target.path, real)
            return web.Response(status=201)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise ApiError(403, f"'{self.shown(target)}' is not a regular file.")
        if st is not None:
            _check_if_match(request, st)  # before reading a byte of the body, as Kudu
        created = await asyncio.to_thread(self.make_folders, real.parent, target)
        try:
            parent_fd = await asyncio.to_thread(self.open_checked, real.parent, _DIR_FLAGS)
        except BaseException:
            _remove_folders(created)
            raise
        name = real.name
        replaced = False
        temp_name = f".{secrets.token_hex(8)}.tmp"  # a name the watcher ignores
        # Through the checked folder's descriptor: a link swapped in for the folder after the
        # check cannot redirect the upload.
        temp_path = Path(f"/proc/self/fd/{parent_fd}/{temp_name}")
        try:
            await receive_to_file(request, temp_path, self.limits.max_upload_bytes)
            await _in_thread(_flush, temp_path)
            new_mode = 0o755 if await asyncio.to_thread(_wants_exec, name, temp_path) else 0o644
            # From here to the rename nothing awaits: no other handler of this daemon can slip
            # a write between the precondition and the replace.
            current = _stat_at(parent_fd, name, follow=True)
            if current is not None and stat.S_ISDIR(current.st_mode):
                raise conflict(CANNOT_UPDATE_DIRECTORY)
            if current is not None and st is not None:
                _check_if_match(request, current)
            mode = new_mode if current is None else stat.S_IMODE(current.st_mode) & 0o777
            os.chmod(temp_name, mode, dir_fd=parent_fd)
            written = os.stat(temp_name, dir_fd=parent_fd)
            if current is not None and written.st_mtime_ns <= current.st_mtime_ns:
                # Same coarse clock tick as the old file: move the mtime on so the ETag moves.
                bumped = current.st_mtime_ns + 1
                os.utime(temp_name, ns=(bumped, bumped), dir_fd=parent_fd)
            try:
                os.replace(temp_name, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
            except OSError as error:
                raise _write_conflict(target, error) from error
            replaced = True
            final = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name, dir_fd=parent_fd)
            os.close(parent_fd)
            if not replaced:  # a refused upload leaves no folder behind either (no empty job)
                _remove_folders(created)
        self.changed(target.path, real)
        headers = {hdrs.ETAG: f'"{etag_of(final)}"', hdrs.LAST_MODIFIED: http_date(final.st_mtime)}
        return web.Response(status=201 if current is None else 204, headers=headers)

    async def vfs_delete(self, request: web.Request) -> web.StreamResponse:
        target = self.target(request)
        recursive = _flag(request, "recursive")
        if target.path == self.root:
            raise ApiError(403, "The site root cannot be deleted.")
        try:
            parent_fd = await asyncio.to_thread(self.open_checked, target.path.parent, _DIR_FLAGS)
        except ApiError as error:
            if error.status == 404:
                raise not_found(f"'{self.shown(target)}' not found.") from error
            raise
        try:
            name = target.path.name
            own = _stat_at(parent_fd, name)
            if own is None:
                raise not_found(f"'{self.shown(target)}' not found.")
            if stat.S_ISDIR(own.st_mode):
                try:
                    if recursive:
                        # rmtree never follows links, and works relative to the checked folder.
                        await _in_thread(functools.partial(shutil.rmtree, name, dir_fd=parent_fd))
                    else:
                        os.rmdir(name, dir_fd=parent_fd)
                except OSError as error:
                    log.info("folder delete refused", path=str(target.path), error=str(error))
                    raise conflict(CANNOT_DELETE_DIRECTORY) from error
            else:
                if target.slash and not stat.S_ISLNK(own.st_mode):
                    return self.redirect(request, add_slash=False)
                # A link is deleted itself; its ETag is its target's (inside the site: checked).
                _check_if_match(request, _stat_at(parent_fd, name, follow=True) or own)
                try:
                    os.unlink(name, dir_fd=parent_fd)
                except FileNotFoundError as error:
                    raise not_found(f"'{self.shown(target)}' not found.") from error
        finally:
            os.close(parent_fd)
        self.changed(target.path)
        return web.Response(status=200)

    def make_folders(self, folder: Path, target: _Target) -> list[Path]:
        """Create `folder` and its missing parents; return those created, outermost first."""
        missing: list[Path] = []
        walk = folder
        while not os.path.lexists(walk) and walk != walk.parent:
            missing.append(walk)
            walk = walk.parent
        created: list[Path] = []
        try:
            for path in reversed(missing):
                try:
                    path.mkdir()
                    created.append(path)
                except FileExistsError:
                    if not path.is_dir():
                        raise
            # Existing links on the way were followed; make sure where it landed is still ours.
            if not is_within(folder.resolve(), self.real_root):
                raise ApiError(403, f"'{self.shown(target)}' leads outside the site root.")
        except BaseException as error:
            _remove_folders(created)
            if isinstance(error, (FileExistsError, NotADirectoryError)):
                raise _write_conflict(target, error) from error
            raise
        return created

    def open_checked(self, path: Path, flags: int) -> int:
        """Open `path` and make sure what was opened really is inside the site."""
        try:
            fd = os.open(path, flags | os.O_CLOEXEC)
        except FileNotFoundError as error:
            raise not_found(f"'{path}' not found.") from error
        except NotADirectoryError as error:
            raise not_found(f"'{path}' not found: a parent is not a folder.") from error
        except PermissionError as error:
            raise ApiError(403, f"'{path}' cannot be opened: permission denied.") from error
        real = fd_path(fd)
        if real is not None and not is_within(real, self.real_root):
            os.close(fd)
            raise ApiError(403, f"'{path}' leads outside the site root.")
        return fd

    # -- ZIP ---------------------------------------------------------------------------------

    async def zip_get(self, request: web.Request) -> web.StreamResponse:
        target = self.target(request)
        st = await asyncio.to_thread(_stat, target.path)
        if st is None:
            raise not_found(f"'{self.shown(target)}' not found.")
        if not stat.S_ISDIR(st.st_mode):
            if target.slash:
                return self.redirect(request, add_slash=False)
            raise not_found(f"'{self.shown(target)}' is a file; the zip API serves folders only.")
        if not target.slash:
            return self.redirect(request, add_slash=True)
        folder_fd = await asyncio.to_thread(self.open_checked, target.path, _DIR_FLAGS)
        os.close(folder_fd)  # only the check; the walk below re-checks every link it meets
        # Kudu reads `fileName` case-insensitively.
        asked = [value for key, value in request.query.items() if key.lower() == "filename"]
        name = (asked[0] if asked else "") or (target.path.name or "site") + ".zip"
        response = web.StreamResponse(
            headers={hdrs.CONTENT_DISPOSITION: _attachment(name)},
        )
        response.content_type = "application/zip"
        if request.method == hdrs.METH_HEAD:
            await response.prepare(request)
            return response
        await _stream_zip(request, response, target.path, self.real_root)
        return response

    async def zip_put(self, request: web.Request) -> web.StreamResponse:
        target = self.target(request)
        st = await asyncio.to_thread(_stat, target.path)
        if st is None and not target.slash:
            raise not_found(
                f"'{self.shown(target)}' not found; end the path with '/' to create the folder."
            )
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise conflict(f"'{self.shown(target)}' is a file; a zip is extracted into a folder.")
        await asyncio.to_thread(self.temp_dir.mkdir, parents=True, exist_ok=True)
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="zip-", dir=self.temp_dir))
        merging = False
        try:
            archive = work / "upload.zip"
            await receive_to_file(request, archive, self.limits.max_upload_bytes)
            staging = work / "content"
            staging.mkdir()
            try:
                await _in_thread(extract_zip, archive, staging, self.limits)
            except UnsafeArchive as error:
                if error.message == NOT_A_ZIP and await _in_thread(_looks_like_json, archive):
                    raise ApiError(400, f"{NOT_A_ZIP} {PACKAGE_URI_REFUSED}") from error
                raise
            await asyncio.to_thread(self.make_folders, target.path, target)
            merging = True
            await _in_thread(self.merge, staging, target)
        finally:
            await _in_thread(functools.partial(shutil.rmtree, work, ignore_errors=True))
            if merging:  # even a merge that failed half-way changed files
                self.changed(target.path)
        return web.Response(status=200)

    def merge(self, staging: Path, target: _Target) -> int:
        """Move the extracted tree into the destination folder; return the entries moved."""
        dest_fd = self.open_checked(target.path, _DIR_FLAGS)
        try:
            src_fd = os.open(staging, _DIR_FLAGS)
            try:
                _check_merge(src_fd, dest_fd, "")  # every conflict found before anything moves
                return _merge(src_fd, dest_fd, "")
            finally:
                os.close(src_fd)
        finally:
            os.close(dest_fd)


# ---------------------------------------------------------------------------------------------
# formats


def kudu_time(ns: int) -> str:
    """Json.NET's DateTimeOffset form: seconds, up to 7 fraction digits (ticks), `+00:00`."""
    seconds, rest = divmod(ns, 1_000_000_000)
    text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{rest // 100:07d}".rstrip("0")
    return f"{text}{'.' + fraction if fraction else ''}+00:00"


def http_date(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(int(timestamp), UTC), usegmt=True)


def etag_of(st: os.stat_result) -> str:
    """The ETag value, unquoted."""
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


def mime_type(name: str) -> str:
    return _MIME.guess_type(name, strict=False)[0] or DEFAULT_MIME


def _attachment(filename: str) -> str:
    """A Content-Disposition value that survives quotes and non-ASCII names."""
    filename = clean_text(filename)  # a folder's name may not be UTF-8
    ascii_name = filename.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    ascii_name = "".join(ch if 32 <= ord(ch) < 127 else "_" for ch in ascii_name)
    value = f'attachment; filename="{ascii_name}"'
    if ascii_name != filename:
        value += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return value


def _looks_like_json(archive: Path) -> bool:
    """A body starting with `{`: Kudu's JSON `packageUri` form, worth a hint in the refusal."""
    with open(archive, "rb") as handle:
        return handle.read(64).lstrip(b" \t\r\n\xef\xbb\xbf").startswith(b"{")


def _raw_relative(request: web.Request) -> str:
    """The still-encoded part of the request path that the route's `{path}` matched."""
    canonical = (
        request.match_info.route.resource.canonical if request.match_info.route.resource else ""
    )
    prefix_slashes = canonical.split("{", 1)[0].count("/")  # "/api/vfs/{path}": 3
    parts = request.rel_url.raw_path.split("/", prefix_slashes)
    return parts[prefix_slashes] if len(parts) > prefix_slashes else ""


def _origin(request: web.Request) -> str:
    return str(request.url.origin())


# ---------------------------------------------------------------------------------------------
# conditions


def _check_if_match(request: web.Request, st: os.stat_result) -> None:
    """Kudu's rule for changing an existing file: a matching strong ETag or `*`, else 412."""
    tags = request.if_match
    if tags is None:
        raise ApiError(412, MISSING_IF_MATCH)
    current = etag_of(st)
    if not any(tag.value == "*" or (not tag.is_weak and tag.value == current) for tag in tags):
        raise ApiError(412, ETAG_MISMATCH, {hdrs.ETAG: f'"{current}"'})


def _not_modified(request: web.Request, etag: str, st: os.stat_result) -> bool:
    tags = request.if_none_match
    if tags is not None:
        return any(tag.value in ("*", etag) for tag in tags)  # weak comparison
    since = request.if_modified_since
    return since is not None and int(st.st_mtime) <= since.timestamp()


def _wanted_range(
    request: web.Request, etag: str, st: os.stat_result
) -> tuple[int | None, int | None] | None:
    """The single byte range asked for, or None to send everything (also for ranges we do not
    parse: multiple ranges or a malformed header, which RFC 9110 lets a server ignore)."""
    header = request.headers.get(hdrs.RANGE)
    if header is None:
        return None
    if_range = request.headers.get(hdrs.IF_RANGE)
    if if_range is not None:
        if if_range.startswith('"'):
            if if_range != f'"{etag}"':
                return None
        elif if_range != http_date(st.st_mtime):
            return None
    match = _RANGE.match(header.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    # A number too long for int() reads as larger than any file: a start there is a 416, an
    # end there is the end of the file, as for any other value past the end.
    first = whole_number(match.group(1)) if match.group(1) else None
    last = whole_number(match.group(2)) if match.group(2) else None
    if first is not None and last is not None and last < first:
        return None
    return first, last


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name)
    if value is None or value.lower() in ("false", "0", ""):
        return False
    if value.lower() in ("true", "1"):
        return True
    raise ApiError(400, f"Query parameter '{name}' must be true or false, not '{value}'.")


# ---------------------------------------------------------------------------------------------
# file system


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError) as error:
        raise ApiError(400, f"'{path}' cannot be resolved: {error}.") from error


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ApiError(400, f"'{path}' cannot be resolved: symbolic link loop.") from error
        raise


def _stat_at(dir_fd: int, name: str, *, follow: bool = False) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=follow)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            return None
        raise


def _remove_folders(created: list[Path]) -> None:
    """Undo `make_folders`: innermost first, and only while they are still empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return


def _flush(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _wants_exec(name: str, path: Path) -> bool:
    if name.lower().endswith((".sh", ".py")):
        return True
    with open(path, "rb") as handle:
        return handle.read(4).startswith((b"#!", b"\x7fELF"))


def _write_conflict(target: _Target, error: OSError) -> ApiError:
    # Kudu's VfsController_WriteConflict text.
    reason = error.strerror or str(error)
    return conflict(f"Could not write to local resource '{target.path}' due to error '{reason}'.")


async def _in_thread(function: Callable[..., T], *args: object) -> T:
    """Run blocking work in a thread and, if the caller is cancelled, still wait for it to end:
    the caller's cleanup (removing a scratch folder) must not race a thread writing into it."""
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(function, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


def _check_merge(src_fd: int, dest_fd: int, prefix: str) -> None:
    for item in sorted(os.listdir(src_fd)):
        name = prefix + item
        src_is_dir = stat.S_ISDIR(os.stat(item, dir_fd=src_fd, follow_symlinks=False).st_mode)
        existing = _stat_at(dest_fd, item)
        if existing is None:
            continue
        kind = stat.S_IFMT(existing.st_mode)
        if src_is_dir:
            if kind != stat.S_IFDIR:
                what = "a symbolic link" if kind == stat.S_IFLNK else "a file"
                raise conflict(f"Cannot extract '{name}/': '{name}' in the destination is {what}.")
            child_src = os.open(item, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=src_fd)
            try:
                child_dest = _open_child_dir(dest_fd, item, name)
                try:
                    _check_merge(child_src, child_dest, name + "/")
                finally:
                    os.close(child_dest)
            finally:
                os.close(child_src)
        elif kind == stat.S_IFDIR:
            raise conflict(f"Cannot extract '{name}': a folder by that name is in the destination.")


def _merge(src_fd: int, dest_fd: int, prefix: str) -> int:
    moved = 0
    for item in sorted(os.listdir(src_fd)):
        name = prefix + item
        src_is_dir = stat.S_ISDIR(os.stat(item, dir_fd=src_fd, follow_symlinks=False).st_mode)
        existing = _stat_at(dest_fd, item)
        if src_is_dir and existing is not None:
            moved += _merge_child(src_fd, dest_fd, item, name)
            continue
        try:
            # One rename: a whole new subtree, or a file replacing whatever has its name.
            os.replace(item, item, src_dir_fd=src_fd, dst_dir_fd=dest_fd)
            moved += 1
            continue
        except OSError as error:
            if error.errno == errno.EXDEV:
                pass
            elif error.errno in (errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise conflict(
                    f"Cannot extract '{name}': the destination changed meanwhile."
                ) from error
            else:
                raise
        # temp_dir is on another filesystem: copy, then rename within the destination.
        if src_is_dir:
            os.mkdir(item, 0o755, dir_fd=dest_fd)
            moved += _merge_child(src_fd, dest_fd, item, name)
        else:
            _copy_into(src_fd, dest_fd, item)
            moved += 1
    return moved


def _merge_child(src_fd: int, dest_fd: int, item: str, name: str) -> int:
    """Merge the source sub-folder `item` into the destination's folder of the same name."""
    child_src = os.open(item, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=src_fd)
    try:
        child_dest = _open_child_dir(dest_fd, item, name)
        try:
            return _merge(child_src, child_dest, name + "/")
        finally:
            os.close(child_dest)
    finally:
        os.close(child_src)


def _open_child_dir(dest_fd: int, item: str, name: str) -> int:
    try:
        return os.open(item, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dest_fd)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise conflict(
                f"Cannot extract '{name}/': '{name}' in the destination is not a folder."
            ) from error
        raise


def _copy_into(src_fd: int, dest_fd: int, item: str) -> None:
    temp = f".{secrets.token_hex(8)}.tmp"
    source = os.open(item, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
    try:
        st = os.fstat(source)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out = os.open(temp, flags, 0o600, dir_fd=dest_fd)
        try:
            while chunk := os.read(source, CHUNK_SIZE):
                os.write(out, chunk)  # a regular file: the kernel takes it all or raises
            os.fchmod(out, stat.S_IMODE(st.st_mode))
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(out)
        os.replace(temp, item, src_dir_fd=dest_fd, dst_dir_fd=dest_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dest_fd)
        raise
    finally:
        os.close(source)


# ---------------------------------------------------------------------------------------------
# zip streaming


async def _stream_zip(
    request: web.Request, response: web.StreamResponse, folder: Path, real_root: Path
) -> None:
    """Prepare `response` and write a zip of `folder` to it as it is produced.

    A worker thread writes the zip into a pipe (zipfile handles an unseekable output with data
    descriptors); the loop reads the pipe's other end and forwards the bytes. The pipe's buffer
    is the back-pressure. When the client leaves, the read end is closed: the worker's next
    write fails with EPIPE and it ends; the handler waits for it, so no thread outlives the
    request.

    The status line goes out with the first bytes of the zip, not before: a zip that fails
    before any byte was sent (the worker drops what it buffered when it fails) is a JSON 500,
    never a 200 with an empty or cut body. A failure after that is logged and the connection
    broken, the only way left to say the body is incomplete.
    """
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    abort = threading.Event()
    reader = asyncio.StreamReader(limit=CHUNK_SIZE)
    pipe = open(read_fd, "rb", buffering=0)  # noqa: SIM115 - the transport owns and closes it
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
    except BaseException:
        pipe.close()
        os.close(write_fd)
        raise
    producer = loop.run_in_executor(None, _produce_zip, write_fd, folder, real_root, abort)
    failure: Exception | None = None
    started = False
    try:
        while chunk := await reader.read(CHUNK_SIZE):
            if not started:
                await response.prepare(request)
                started = True
            await response.write(chunk)
    except ConnectionError:
        pass  # the client left
    finally:
        abort.set()
        transport.close()
        try:
            await producer
        except Exception as error:
            failure = error
            log.exception("zip stream failed", folder=str(folder), started=started)
    if failure is not None and not started:
        raise ApiError(
            500, f"The zip of '{folder}' could not be made: {failure}; see the daemon log."
        ) from failure
    if not started:  # every zip has bytes (an empty one its end record): not expected
        await response.prepare(request)
    if failure is not None and request.transport is not None:
        # Headers are gone already: breaking the connection is the only way to say "broken".
        request.transport.close()
        return
    with contextlib.suppress(ConnectionError):
        await response.write_eof()


class _Aborted(Exception):
    pass


class _PipeWriter:
    """The zip's output: buffers up to `CHUNK_SIZE` before writing to the pipe, and drops
    what it holds when the zip fails, so that a zip failing early sends no byte at all."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = bytearray()
        self.dropped = False

    def write(self, data: bytes) -> int:
        if not self.dropped:
            self.pending += data
            if len(self.pending) >= CHUNK_SIZE:
                self.flush()
        return len(data)

    def flush(self) -> None:
        data = bytes(self.pending)
        self.pending.clear()  # first: a failed write must not leave them to a later flush
        sent = 0
        while sent < len(data):
            sent += os.write(self.fd, data[sent:])

    def drop(self) -> None:
        self.dropped = True
        self.pending.clear()

    def close(self) -> None:
        """zipfile never calls this for a file object it was given; `_produce_zip` does."""
        os.close(self.fd)


def _produce_zip(write_fd: int, folder: Path, real_root: Path, abort: threading.Event) -> None:
    out = _PipeWriter(write_fd)
    try:
        archive = zipfile.ZipFile(
            out,  # zipfile needs only write and flush (no tell: it counts itself)
            "w",
            compression=zipfile.ZIP_DEFLATED,
            compresslevel=1,
            strict_timestamps=False,
        )
        try:
            _add_folder(archive, folder, "", real_root, abort)
        except BaseException:
            # No end record after a failed entry: what is still buffered is dropped, and
            # close() (here or at garbage collection) writes nothing more.
            out.drop()
            with contextlib.suppress(Exception):
                archive.close()
            raise
        archive.close()
        out.flush()
    except (_Aborted, BrokenPipeError):
        return
    except OSError as error:
        if abort.is_set() or error.errno == errno.EPIPE:
            return
        raise
    finally:
        out.close()


def _add_folder(
    archive: zipfile.ZipFile, folder: Path, prefix: str, real_root: Path, abort: threading.Event
) -> None:
    try:
        items = sorted(os.scandir(folder), key=lambda item: item.name)
    except OSError as error:
        log.warning("folder skipped in zip", folder=str(folder), error=str(error))
        return
    if not items and prefix:
        archive.writestr(_entry_info(prefix)(prefix), b"")  # an empty folder: "name/"
        return
    for item in items:
        if abort.is_set():
            raise _Aborted
        arcname = prefix + item.name
        try:
            if item.is_symlink():
                # Links to files are followed while they stay in the site; links to folders
                # never (a link to a parent would recurse forever).
                real = Path(item.path).resolve()
                if not is_within(real, real_root) or not real.is_file():
                    continue
            elif item.is_dir(follow_symlinks=False):
                _add_folder(archive, Path(item.path), arcname + "/", real_root, abort)
                continue
            elif not item.is_file(follow_symlinks=False):
                continue  # FIFOs, sockets, devices: reading one could block or make no sense
            _add_file(archive, Path(item.path), arcname, abort)
        except (OSError, RuntimeError) as error:
            if abort.is_set() or (isinstance(error, OSError) and error.errno == errno.EPIPE):
                raise
            log.warning("file skipped in zip", file=item.path, error=str(error))


def _add_file(archive: zipfile.ZipFile, path: Path, arcname: str, abort: threading.Event) -> None:
    try:
        source = open(path, "rb")  # noqa: SIM115 - closed below, after the entry is written
    except OSError as error:
        log.warning("file skipped in zip", file=str(path), error=str(error))  # Kudu: in use
        return
    with source:
        st = os.fstat(source.fileno())
        if not stat.S_ISREG(st.st_mode):
            return
        info = _entry_info(arcname).from_file(path, arcname, strict_timestamps=False)
        info.file_size = st.st_size
        info.compress_type = zipfile.ZIP_DEFLATED
        left = st.st_size  # a file growing meanwhile (a log) is cut at the size it had
        with archive.open(info, "w") as entry:
            while left > 0:
                if abort.is_set():
                    raise _Aborted
                chunk = source.read(min(CHUNK_SIZE, left))
                if not chunk:
                    break
                entry.write(chunk)
                left -= len(chunk)


class _BytesNameInfo(zipfile.ZipInfo):
    """An entry whose name is not valid UTF-8 (surrogate escapes from os.fsdecode): written as
    the name's own bytes without the UTF-8 flag, the way Info-ZIP's zip stores a Linux name,
    so `unzip` recreates the file under exactly its name (other readers see the bytes in their
    legacy code page). Replacing the bad bytes instead would lose the name, and could give two
    files the same one. zipfile has no public hook for this, hence the override of the one
    method that encodes names (used for both the local and the central header)."""

    __slots__ = ()

    def _encodeFilenameFlags(self) -> tuple[bytes, int]:
        return os.fsencode(self.filename), self.flag_bits & ~_UTF8_NAME_FLAG


_UTF8_NAME_FLAG = 0x800  # general purpose bit 11


def _entry_info(arcname: str) -> type[zipfile.ZipInfo]:
    """The ZipInfo class for an entry name: zipfile's own unless the name is not UTF-8."""
    try:
        arcname.encode("utf-8")
    except UnicodeEncodeError:
        return _BytesNameInfo
    return zipfile.ZipInfo
