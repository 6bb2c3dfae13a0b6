"""Write-then-rename: a reader sees the old content or the new one, never half of either.

`serialized(path)` is for the other half of a shared file: several daemons doing
read-modify-write on one file (the settings store, the hook subscriptions) would each rename
their own version into place, and the later rename erases the earlier change. Holding the
file's sidecar lock across the read and the write makes the second writer read the first one's
result. It waits (unlike `runtime.locks.FileLock`, which never does) because the critical
section is one small read and one write; the lock file `.NAME.lock` stays, like every lock file
here, because deleting a lock file is how two holders happen.

Both go through `records.safeopen`: the temp file is created next to the target relative to the
folder's descriptor, without following links, given its mode with `fchmod` and renamed relative
to the same descriptor; a link put at the target's name is replaced, never written through.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from webjobsd.records import safeopen


def write_bytes_atomic(path: Path, data: bytes, *, fsync: bool = True, mode: int = 0o644) -> None:
    folder_fd = safeopen.open_folder(path.parent, create=True)
    try:
        fd, tmp_name = safeopen.create_temp_at(folder_fd, f".{path.name}.")
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, mode)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp_name, path.name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name, dir_fd=folder_fd)
            raise
    finally:
        os.close(folder_fd)


def json_bytes(value: Any) -> bytes:
    """Compact JSON, like the files Kudu writes."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def write_json_atomic(path: Path, value: Any, *, fsync: bool = True, mode: int = 0o644) -> None:
    write_bytes_atomic(path, json_bytes(value), fsync=fsync, mode=mode)


@contextlib.contextmanager
def serialized(path: Path) -> Iterator[None]:
    """Hold `path`'s sidecar lock, across processes, for a read-modify-write (blocking)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = safeopen.open_file(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
