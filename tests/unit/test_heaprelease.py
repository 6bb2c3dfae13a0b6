"""`runtime.heaprelease`: the heap is given back once, after the starts have been quiet."""

from __future__ import annotations

import asyncio
import os
import threading
import time

from tests.helpers import wait_for

from webjobsd.malloc import release_free_memory
from webjobsd.runtime.heaprelease import QuietRelease
from webjobsd.runtime.writes import OrderedWrites

QUIET_S = 0.1


class Releases:
    """A release function that notes when, and on which thread, it ran."""

    def __init__(self) -> None:
        self.at: list[float] = []
        self.threads: list[int] = []
        self.loop = asyncio.get_running_loop()

    def __call__(self) -> bool:
        self.at.append(self.loop.time())
        self.threads.append(threading.get_ident())
        return True


async def test_the_release_waits_for_the_pokes_to_stop_and_runs_once_in_a_thread() -> None:
    releases = Releases()
    quiet = QuietRelease(releases, quiet_s=QUIET_S)
    loop = asyncio.get_running_loop()
    last_poke = loop.time()
    # Pokes every 20 ms for three quiet periods: the release keeps being deferred.
    while loop.time() - last_poke < 3 * QUIET_S:
        quiet.poke()
        poked = loop.time()
        await asyncio.sleep(0.02)
        assert releases.at == []
        if loop.time() - last_poke >= 3 * QUIET_S:
            break
    last_poke = poked
    await wait_for(lambda: quiet.releases == 1, timeout=5, what="the release")
    assert releases.at[0] >= last_poke + QUIET_S
    assert releases.threads[0] != threading.get_ident()
    # Nothing poked since: no second release.
    await asyncio.sleep(3 * QUIET_S)
    assert quiet.releases == 1
    # A later wave of starts: released again once it is quiet.
    quiet.poke()
    await wait_for(lambda: quiet.releases == 2, timeout=5, what="the second release")
    quiet.close()


async def test_the_release_runs_behind_the_writes_queued_before_it() -> None:
    """Given the records thread (as the daemon does), the release comes after the writes the
    starts queued there, and so after what they free."""
    writes = OrderedWrites()
    order: list[str] = []

    def release() -> bool:
        order.append("release")
        return True

    def slow_write() -> None:
        time.sleep(3 * QUIET_S)  # still writing when the quiet period ends
        order.append("write")

    quiet = QuietRelease(release, quiet_s=QUIET_S, run_in=writes.submit)
    quiet.poke()
    writes.submit(slow_write)
    await wait_for(lambda: quiet.releases == 1, timeout=5, what="the release")
    assert order == ["write", "release"]
    await writes.close()


async def test_a_closed_release_runs_no_more() -> None:
    releases = Releases()
    quiet = QuietRelease(releases, quiet_s=QUIET_S)
    quiet.poke()
    quiet.close()
    await asyncio.sleep(3 * QUIET_S)
    assert releases.at == [] and quiet.releases == 0


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_glibc_gives_back_free_memory_in_the_middle_of_the_heap() -> None:
    """What the daemon relies on: memory freed between live blocks, which `free` keeps."""
    blocks = [bytearray(b"x" * (64 * 1024)) for _ in range(400)]
    del blocks[::2]  # 200 holes of 64 KiB, each between two live blocks
    before = resident_bytes()
    assert release_free_memory()
    assert before - resident_bytes() >= 8 * 1024 * 1024
    assert len(blocks) == 200
