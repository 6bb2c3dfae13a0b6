"""Whether someone holds a lock file, asked without taking it.

Owns the one probe both sides of the daemon ask: the runtime (is another instance live, is a run's
lock held: `runtime.locks.FileLock.is_locked_by_other`) and discovery (is a deployment in
progress: the site's deployment lock, Part A #4 of KUDU-DEPLOY.md). It lives here, below both,
because discovery may import neither `runtime` (where locks are taken and held) nor `deploy`
(which holds the deployment lock): the layers allow a lock's holder to sit above its readers, and
the probe is a read.

Why the probe takes a shared lock on its own read-only open, released at once: `flock` locks
belong to the open file description, so a separate open contends with every holder, even one in
this same process (a deploying daemon probing its own deployment lock sees it held, as it must).
`LOCK_SH` works on a read-only open everywhere (NFS emulates `LOCK_EX` with a write lock, which
would need a writable open) and conflicts only with an exclusive holder. While the probe holds it
(microseconds), a concurrent exclusive `try_acquire` elsewhere fails: acquirers retry briefly
(the deployment lock does, for ~200 ms) and never take one failure as proof of a live owner.

A missing file is not locked and is not created; a link or a FIFO at the lock's name is no lock
anyone holds (opened through `safeopen`, never followed, never blocking).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from webjobsd.records import safeopen


def is_locked_by_other(path: Path | str) -> bool:
    """True if some open of `path` holds an exclusive flock on it. Blocking (an open and a
    flock): on slow shared storage, call it in a thread."""
    try:
        fd = safeopen.open_file(Path(path), os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError, safeopen.UnsafeFileError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
