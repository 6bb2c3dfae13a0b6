"""watchdog's threads die by an exception like any thread, while its observer may still look alive:
events stop and only the periodic rescan would still see changes. The daemon must say so (not
ready, an error naming the thread) and recover by itself (a new observer, the watches made
again), in-process with the real daemon and the real watchdog."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.helpers import Site, run_short_of_descriptors, running_daemon, wait_for, wait_for_sync
from webjobsd.model import JobKey, JobKind

LOOP = {"run.sh": "exec sleep 600\n"}


def broken(*_args: Any, **_kwargs: Any) -> None:
    raise RuntimeError("injected: watchdog's loop raises")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("victim", ["emitter", "reader", "dispatcher"])
async def test_a_dead_watcher_thread_makes_the_daemon_unready_and_is_replaced(
    site: Site, victim: str
) -> None:
    """1. a running daemon (rescan every 30 s: only events find a job fast)  2. the loop of
    watchdog's emitter thread (or of its inotify reader, or of the observer's own dispatching
    thread) raises at its next turn; a file event makes it turn: the thread dies (the observer
    lives on, but for the dispatcher, which is the observer)  3. readiness says the watcher
    is not alive, an error names the thread  4. the daemon replaces the observer by itself: ready
    again, and a job written afterwards is found by its events within seconds."""
    site.write_job("continuous", "first", LOOP)
    async with running_daemon(site, rescan_s=30.0) as daemon:
        watcher, discovery, catalog = daemon.watcher, daemon.discovery, daemon.catalog
        assert watcher is not None and discovery is not None and catalog is not None
        observer = watcher.observer
        assert observer is not None and daemon.readiness()["watcher"]
        if victim == "emitter":
            [thread] = list(observer.emitters)  # the one watch, on the jobs root
            thread.queue_events = broken  # type: ignore[method-assign]  # looked up every turn
        elif victim == "reader":
            thread = observer._inotify_fd  # type: ignore[attr-defined]
            thread.handle_event = broken
        else:
            thread = observer
            observer.dispatch_events = broken  # type: ignore[method-assign]
        assert isinstance(thread, threading.Thread)
        rescans = discovery.rescans
        with structlog.testing.capture_logs() as logs:
            (site.job_dir("continuous", "first") / "poke.tmp").write_text("turn the loop")
            # Blocking the loop on purpose: the daemon cannot recover before we look.
            wait_for_sync(lambda: not thread.is_alive(), what="the thread died")
            assert observer.is_alive() == (victim != "dispatcher")
            assert daemon.readiness()["watcher"] is False
            assert watcher.dead_threads()
            await wait_for(lambda: daemon.readiness()["watcher"], what="the watcher replaced")
        errors = [entry for entry in logs if entry["log_level"] == "error"]
        assert len(errors) == 1, errors
        assert type(thread).__name__ in " ".join(errors[0]["threads"])
        assert watcher.restarts == 1 and watcher.observer is not observer
        # The new watch asked for a full rescan (what happened meanwhile is known to no event).
        await wait_for(
            lambda: discovery.rescans > rescans and discovery.debouncer.next_due() is None,
            what="the rescan after the new watch",
        )
        site.write_job("continuous", "second", LOOP)
        await wait_for(
            lambda: JobKey(JobKind.CONTINUOUS, "second") in catalog.specs,
            timeout=5,
            what="a new job found by events",
        )
        assert not observer.is_alive(), "the old observer was stopped"


WATCHER_WITHOUT_DESCRIPTORS = """
import asyncio, os, sys
from pathlib import Path
from webjobsd.discovery.watcher import JobsWatcher

root = Path(sys.argv[1])
loop = asyncio.new_event_loop()
fillers = use_up_descriptors()
watcher = JobsWatcher(root, loop, lambda hint: None)
watcher.start()
assert watcher.dead_threads() == ["the observer, never made"], watcher.dead_threads()
assert not watcher.is_alive()
for fd in fillers:
    os.close(fd)
assert watcher.replace_observer() is None
assert watcher.dead_threads() == [] and watcher.is_alive()
watcher.stop()
print("ok")
"""


def test_a_watcher_that_cannot_be_made_at_start_is_made_by_the_next_check(tmp_path: Path) -> None:
    """Out of descriptors when the daemon makes its watcher (a flood of connections while it
    starts): the start goes on, the watcher reads as dead, and the discovery service's check
    (`replace_observer`) makes it once descriptors are free again."""
    root = tmp_path / "jobs"
    (root / "continuous").mkdir(parents=True)
    assert "cannot make the file watcher yet" in run_short_of_descriptors(
        WATCHER_WITHOUT_DESCRIPTORS, str(root)
    )
