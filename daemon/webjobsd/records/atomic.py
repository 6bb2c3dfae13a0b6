"""Write-then-rename: a reader sees the old content or the new one, never half of either.

`serialized(path)` is for the other half of a shared file: several daemons doing
read-modify-write on one file (the settings store, the hook subscriptions) would each rename
their own version into place, and the later rename erases the earlier change. Holding the
file's sidecar lock across the read and the write makes the second writer read the first one's
result. It waits (unlike `runtime.locks.FileLock`, which never does) because the critical
section is one small read and one write; the lock file `.NAME.lock` stays, like every lock file
here, because deleting a lock file is how two holders happen.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: Path, data: bytes, *, fsync: bool = True, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            if fsync:
                tmp.flush()
                os.fsync(tmp.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def write_json_atomic(path: Path, value: Any, *, fsync: bool = True, mode: int = 0o644) -> None:
    """Compact JSON, like the files Kudu writes."""
    data = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    write_bytes_atomic(path, data, fsync=fsync, mode=mode)


@contextlib.contextmanager
def serialized(path: Path) -> Iterator[None]:
    """Hold `path`'s sidecar lock, across processes, for a read-modify-write (blocking)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
