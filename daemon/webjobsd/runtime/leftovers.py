"""End what a previous life of this daemon instance left running (Part A #13, #19).

Runs at start-up before anything is started. Two sources, because each misses something:
the persisted process records (group ids with start times, exact and cheap) and a scan for the owner
marker in process environments (catches descendants that left their process group). Leftovers get
SIGTERM, a short grace, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import signal
import time

import structlog

from webjobsd.runtime import proctree
from webjobsd.runtime.environment import OWNER_VARIABLE
from webjobsd.runtime.procrecords import ProcessRecords

log = structlog.get_logger("webjobsd.leftovers")

_POLL_S = 0.05


def _marker(owner: str) -> bytes:
    return f"{OWNER_VARIABLE}={owner}".encode()


def _signal_all(records: ProcessRecords, owner: str, sig: signal.Signals) -> int:
    count = 0
    for identity in records.load_all().values():
        count += proctree.signal_members(identity, sig)
    return count + proctree.signal_processes_with_marker(_marker(owner), sig)


def _remaining(records: ProcessRecords, owner: str) -> int:
    members = sum(len(proctree.find_members(i)) for i in records.load_all().values())
    return members + len(proctree.find_processes_with_marker(_marker(owner)))


async def end_leftovers(records: ProcessRecords, owner: str, grace_s: float = 3.0) -> int:
    found = await asyncio.to_thread(_signal_all, records, owner, signal.SIGTERM)
    if found:
        log.warning("ending processes left by a previous run of this daemon", processes=found)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not await asyncio.to_thread(_remaining, records, owner):
                break
            await asyncio.sleep(_POLL_S)
        await asyncio.to_thread(_signal_all, records, owner, signal.SIGKILL)
    for slot in records.load_all():
        records.remove(slot)
    return found
