"""Untrusted bytes and names from clients: request bodies, zip archives and URL paths.

This module owns two of the checks every upload and file route goes through (the third,
unpacking zip archives, is `deploy.archive`'s):

* `receive_to_file` streams a request body into a file under our own size cap. Clients send
  chunked bodies without `Content-Length`, so the cap is counted on the bytes received, and a
  declared length over the cap is refused before a byte is read. A failed upload leaves no file.
* `safe_child` maps a URL-decoded path (`%2F` already decoded to `/`) onto a root. Status
  choice: `..` components and NUL characters are malformed requests (400; nothing legitimate
  sends them, and a decoded `%2e%2e` is caught the same way). A well-formed path whose real
  location, after resolving symbolic links, is outside the root is 403: the path exists in the
  namespace but the API may not go there. Kudu itself has no such check (IIS rejects raw `..`
  before Kudu sees it); 404 was rejected because it would hide a misconfigured link.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from webjobsd.http.errors import ApiError, too_large

CHUNK_SIZE = 64 * 1024


# ---------------------------------------------------------------------------------------------
# request bodies


async def receive_to_file(request: web.Request, target: Path, max_bytes: int) -> int:
    """Stream the request body into `target` (created or truncated, mode 0600); return its size.

    The caller picks `target` in a folder it owns. 413 as soon as more than `max_bytes` arrive,
    or at once when `Content-Length` says so; 400 when the body breaks off. On any failure,
    cancellation included, the partial file is removed.
    """
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise too_large(f"The request body is {declared} bytes; the limit is {max_bytes} bytes.")
    received = 0
    # O_NOFOLLOW: a link planted at the target name must not redirect the write.
    fd = os.open(
        target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        with open(fd, "wb", closefd=True) as out:
            os.fchmod(out.fileno(), 0o600)  # in case the caller pre-created it wider
            try:
                async for chunk in request.content.iter_chunked(CHUNK_SIZE):
                    received += len(chunk)
                    if received > max_bytes:
                        raise too_large(
                            f"The request body is larger than the limit of {max_bytes} bytes."
                        )
                    # A blocking write of at most one chunk: it lands in the page cache.
                    out.write(chunk)
            except (ConnectionError, HttpProcessingError) as error:
                raise ApiError(400, f"The request body could not be read: {error}") from error
        if declared is not None and received != declared:
            raise ApiError(400, f"The request body ended after {received} of {declared} bytes.")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        raise
    return received


# ---------------------------------------------------------------------------------------------
# paths


_NAME_MAX = 255
_PATH_MAX = 4096


def safe_child(root: Path, relative: str) -> Path:
    """`root` joined with `relative` (a URL-decoded path), refused if it could leave `root`.

    Returns the lexical path (symbolic links inside the site kept, so deleting a link deletes
    the link); its real location has been checked to be `root` or below. 400 for `..` or NUL,
    403 when a symbolic link leads outside, 400 for a link loop.
    """
    if "\x00" in relative:
        raise ApiError(400, "Invalid path: it contains a NUL character.")
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ApiError(400, f"Invalid path '{relative}': '..' segments are not allowed.")
    # Linux's limits, checked here so that no later stat can fail with ENAMETOOLONG (a 500).
    if any(len(os.fsencode(part)) > _NAME_MAX for part in parts):
        raise ApiError(400, f"Invalid path: a name is longer than {_NAME_MAX} bytes.")
    candidate = root.joinpath(*parts)
    if len(os.fsencode(candidate)) >= _PATH_MAX:
        raise ApiError(400, f"Invalid path: longer than {_PATH_MAX - 1} bytes.")
    real_root = root.resolve()
    try:
        real = candidate.resolve()
    except (RuntimeError, OSError) as error:  # 3.11 reports a link loop as RuntimeError
        raise ApiError(400, f"Path '{relative}' cannot be resolved: {error}.") from error
    if not is_within(real, real_root):
        raise ApiError(
            403, f"Path '{relative}' leads outside the site root through a symbolic link."
        )
    return candidate


def is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def fd_path(fd: int) -> Path | None:
    """The real path of an open descriptor (Linux /proc), or None when /proc is unavailable."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None
