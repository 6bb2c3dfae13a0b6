"""Write-then-rename: a reader sees the old content or the new one, never half of either."""

from __future__ import annotations

import json
import os
import tempfile
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
