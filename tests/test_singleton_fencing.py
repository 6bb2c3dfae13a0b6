"""Fencing of a singleton job on one host (runtime/lockguard.py): a holder whose lock file is
replaced under it (as far as anyone else can tell, it does not hold the lock any more) stops its
job, takes the new lock and runs the job again, once.

The multi-host partition is in tests/test_multihost_partition.py.
"""

from __future__ import annotations

import os
import time

import psutil

from tests.helpers import (
    DaemonProcess,
    Site,
    json_log_records,
    leaders,
    running_daemon,
    wait_for,
    wait_for_sync,
)
from webjobsd.records.starts import read_start_history
from webjobsd.runtime.locks import FileLock

LOOP = {
    "run.sh": "echo up $$\nwhile true; do sleep 0.2; done\n",
    "settings.job": '{"is_singleton": true}',
}
CHECK_S = 0.3


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _error_lines(daemon: DaemonProcess, event: str) -> list[dict[str, object]]:
    return [
        record
        for record in json_log_records(daemon.log())
        if str(record.get("event", "")).startswith(event)
    ]


def test_a_holder_whose_lock_file_is_replaced_stops_the_job_and_takes_the_new_lock(
    site: Site,
) -> None:
    """1. a singleton job runs  2. a new file is renamed over singleton.job.lock
    3. within singleton_check_s (and the stop) the daemon logs the lost lock and the old process
    is gone  4. the daemon holds the new file and runs the job again, one process at a time."""
    site.write_job("continuous", "solo", LOOP)
    daemon = DaemonProcess(site, singleton_check_s=CHECK_S, singleton_fence_s=5.0).start()
    try:
        first = wait_for_sync(lambda: leaders(site, "solo"), what="the job running")
        assert len(first) == 1
        lock_path = site.data_dir("continuous", "solo") / "singleton.job.lock"
        wait_for_sync(lambda: FileLock.is_locked_by_other(lock_path), what="the lock held")
        replacement = lock_path.with_name("singleton.job.lock.new")
        replacement.write_text("{}")
        replaced_at = time.monotonic()
        os.rename(replacement, lock_path)

        wait_for_sync(lambda: not _alive(first[0]), timeout=CHECK_S + 5, what="old process gone")
        stopped_after = time.monotonic() - replaced_at
        lost = wait_for_sync(
            lambda: _error_lines(daemon, "singleton lock lost"), what="the error logged"
        )
        assert len(lost) == 1, lost
        assert lost[0]["job"] == "continuous/solo" and lost[0]["lock"] == str(lock_path)
        assert lost[0]["level"] == "error"
        assert "replaced" in str(lost[0]["reason"]), lost[0]

        samples: list[list[int]] = []

        def running_again() -> list[int] | None:
            now = leaders(site, "solo")
            samples.append(now)
            return now if now and now != first else None

        again = wait_for_sync(running_again, what="the job running again")
        assert all(len(sample) <= 1 for sample in samples), samples
        assert len(leaders(site, "solo")) == 1
        # The new file is the one held now, by this daemon.
        assert FileLock.is_locked_by_other(lock_path)
        owner = wait_for_sync(
            lambda: (
                (found := FileLock.read_owner(lock_path))
                and (found.get("Process") or {}).get("pid") == again[0]
                and found
            ),
            what="the new lock's owner info naming the new process",
        )
        assert owner["InstanceId"] == "test01"
        log = site.job_log("solo")
        assert "WebJob singleton lock is lost" in log
        print(f"\nlock file replaced → old process gone after {stopped_after:.2f} s")
    finally:
        daemon.stop()


async def test_the_fenced_job_is_stopped_while_the_event_loop_is_blocked(site: Site) -> None:
    """The kill must not wait for the event loop (which a hung share stops, writing the job log):
    the daemon runs in this test's loop, and the test blocks that loop from the moment the lock
    file is replaced until the job's process is gone. Once the loop runs again, the job comes
    back, once."""
    site.write_job("continuous", "solo", LOOP)
    async with running_daemon(site, singleton_check_s=CHECK_S, singleton_fence_s=5.0):
        first = await wait_for(lambda: leaders(site, "solo"), what="the job running")
        # The process exists from the fork; the daemon knows it once the spawn has returned on
        # its loop, and its start history then names the pid: only from then can a guard's
        # thread stop it (a fence before that is the loop's to act on).
        data_dir = site.data_dir("continuous", "solo")
        await wait_for(
            lambda: any(item.start.pid == first[0] for item in read_start_history(data_dir)),
            what="the spawn registered",
        )
        lock_path = site.data_dir("continuous", "solo") / "singleton.job.lock"
        replacement = lock_path.with_name("singleton.job.lock.new")
        replacement.write_text("{}")
        os.rename(replacement, lock_path)
        # Blocking, on the loop's thread: nothing of the daemon's loop runs meanwhile.
        wait_for_sync(lambda: not _alive(first[0]), timeout=CHECK_S + 5, what="old process gone")
        again = await wait_for(
            lambda: (now := leaders(site, "solo")) and now != first and now,
            what="the job running again",
        )
        assert len(again) == 1
        # The status file follows the spawn by up to LAUNCH_STATUS_DELAY_S.
        await wait_for(lambda: site.status("solo") == "Running", what="status Running")


async def test_a_slow_stop_of_one_fenced_job_does_not_hold_up_another(site: Site) -> None:
    """One pair of guard threads serves every held lock: a fenced job that ignores SIGTERM (its
    ladder waits 4 s) must not delay the fence of another."""
    deaf = {
        "run.sh": "trap '' TERM\nwhile true; do sleep 0.1; done\n",
        "settings.job": '{"is_singleton": true, "stopping_wait_time": 4}',
    }
    site.write_job("continuous", "deaf", deaf)
    site.write_job("continuous", "solo", LOOP)

    def replace_lock(name: str) -> None:
        lock_path = site.data_dir("continuous", name) / "singleton.job.lock"
        replacement = lock_path.with_name("singleton.job.lock.new")
        replacement.write_text("{}")
        os.rename(replacement, lock_path)

    async with running_daemon(site, singleton_check_s=CHECK_S, singleton_fence_s=5.0):
        deaf_first = await wait_for(lambda: leaders(site, "deaf"), what="deaf running")
        solo_first = await wait_for(lambda: leaders(site, "solo"), what="solo running")
        shutdown_dir = site.temp / "JobsShutdown" / "continuous" / "deaf"
        replace_lock("deaf")
        # The deaf job's ladder has begun (its shutdown file is written first) and will wait.
        await wait_for(
            lambda: shutdown_dir.is_dir() and any(shutdown_dir.iterdir()),
            timeout=CHECK_S + 3,
            what="the deaf job's stop begun",
        )
        replace_lock("solo")
        replaced_at = time.monotonic()
        await wait_for(
            lambda: not _alive(solo_first[0]), timeout=CHECK_S + 2, what="solo stopped at once"
        )
        assert time.monotonic() - replaced_at < 4.0
        assert _alive(deaf_first[0]), "the deaf job ignores SIGTERM: still in its 4 s wait"
        await wait_for(lambda: not _alive(deaf_first[0]), timeout=8, what="deaf killed")
        for name, first in (("solo", solo_first), ("deaf", deaf_first)):
            await wait_for(
                lambda name=name, first=first: (now := leaders(site, name)) and now != first,
                what=f"{name} running again",
            )


def test_fencing_keys_are_validated(site: Site) -> None:
    from webjobsd.config import ConfigError, config_from_mapping

    base = site.config()
    for bad, message in (
        ({"singleton_check_s": 0}, "'singleton_check_s' must be greater than 0"),
        (
            {"singleton_check_s": 10, "singleton_fence_s": 10},
            "'singleton_fence_s' must be greater than 'singleton_check_s'",
        ),
    ):
        try:
            config_from_mapping({**base, **bad}, "webjobsd.yaml")
        except ConfigError as error:
            assert message in str(error) and "webjobsd.yaml" in str(error)
        else:
            raise AssertionError(f"{bad} accepted")
    config = config_from_mapping(base, "webjobsd.yaml")
    assert (config.singleton_check_s, config.singleton_fence_s) == (10.0, 45.0)
