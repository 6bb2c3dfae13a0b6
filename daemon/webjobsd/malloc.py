"""glibc's allocator, tuned for a process that moves job output through large byte strings.

Each chunk of captured output is read into a new bytes object of up to 256 KiB and rendered
into one of up to about 360 KiB. With glibc's defaults such sizes are served by `mmap` (the
threshold starts at 128 KiB) or from the top of the heap, which `free` hands back to the kernel
once more than 128 KiB is free there. Either way the next chunk gets fresh pages and pays a page
fault per 4 KiB: profiling the capture of 200 MiB of output showed more time in those faults
than in everything the daemon does with the bytes. Fixing both thresholds keeps up to a few MiB
of such buffers in the heap for reuse; it also turns off glibc's own adjustment of them, which
did not help here.

The same thresholds keep what a wave of job starts leaves free in the heap (each start's
environment, paths, encoded arguments, the transient objects of its status and log writes):
about 3 MB at 1000 jobs, resident for good although nothing uses it. `release_free_memory`
(glibc's `malloc_trim(0)`) hands it back; the daemon calls it once its job starts have been
quiet for a while (`runtime/heaprelease.py`), not on a timer.

`MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` in the environment do the same, but only at
process start, which the daemon does not control under every service manager; `mallopt` at
start-up does. Only for `webjobsd serve` (an embedding program keeps its own allocator
settings), and only on glibc: elsewhere (musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Final

import structlog

log = structlog.get_logger("webjobsd.malloc")

# <malloc.h>
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

MMAP_THRESHOLD_BYTES: Final = 1024 * 1024
TRIM_THRESHOLD_BYTES: Final = 4 * 1024 * 1024


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (which has `mallopt` and `malloc_trim`), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - glibc has it, musl does not
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc() -> bool:
    """Set the thresholds on glibc; False (and nothing changed) anywhere else."""
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    log.debug(
        "malloc thresholds", tuned=tuned, mmap=MMAP_THRESHOLD_BYTES, trim=TRIM_THRESHOLD_BYTES
    )
    return tuned


def release_free_memory() -> bool:
    """glibc's `malloc_trim(0)`: free memory of every arena back to the kernel. False anywhere
    but glibc, or when there was nothing to give back. Blocking: it walks the heap (a few
    milliseconds at 1000 jobs)."""
    libc = _glibc()
    if libc is None:
        return False
    trim = libc.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
