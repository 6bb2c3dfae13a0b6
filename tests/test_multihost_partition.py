"""A network partition of the singleton's holder (tests/multihost.py `Host.partition`): the
holder fences itself (runtime/lockguard.py), another host takes the job over, and at no instant
do two hosts run it.

Three hosts share the site; `solo` is a continuous singleton job. Once it runs, its holder loses
the share: its lock file's path is gone for it while its descriptor still holds the lock (a lazy
unmount keeps open files), so nobody else can take the lock until the holder closes it. The
processes are sampled from /proc every 50 ms until the job has run elsewhere for a while.
"""

from __future__ import annotations

import time

import pytest

from tests.helpers import FAST_CONFIG, Site, json_log_records, wait_for_sync
from tests.multihost import Cluster, Host, namespaces_unavailable

pytestmark = pytest.mark.timeout(120)

HOSTS = ("h1", "h2", "h3")
CHECK_S = 0.3
SAMPLE_S = 0.05
# The job ends on SIGTERM at once: the holder's stop takes a check, a /proc scan or two.
STOPPED_BOUND_S = CHECK_S + 2.0
# Then another host's next try of the lock (every SINGLETON_RETRY_S, 1 s) and its start.
ELSEWHERE_BOUND_S = STOPPED_BOUND_S + 3.0
# How long the job is watched once it runs elsewhere: the partitioned host must not start it.
AFTER_S = 3.0

LOOP_JOB = "#!/bin/sh\nwhile true; do sleep 1; done\n"


def _log_records(host: Host) -> list[dict[str, object]]:
    return json_log_records(host.log())


def test_a_partitioned_holder_stops_its_singleton_before_another_host_runs_it(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    shared = tmp_path_factory.mktemp("partition")
    site = Site(shared)
    site.write_job(
        "continuous", "solo", {"run.sh": LOOP_JOB, "settings.job": '{"is_singleton": true}'}
    )
    config = {
        **FAST_CONFIG,
        "log_level": "info",
        # Discovery must not be what stops the job on the partitioned host (its jobs root is
        # gone for it): no rescan within the test.
        "rescan_s": 600.0,
        "singleton_check_s": CHECK_S,
        "singleton_fence_s": 3.0,
    }
    cluster = Cluster.create(shared, HOSTS, config)
    try:
        cluster.start()
        sampler = cluster.sampler()
        first = wait_for_sync(
            lambda: (found := sampler.sample(["solo"])["solo"]) and len(found) == 1 and found,
            timeout=30,
            interval=SAMPLE_S,
            what="solo running on one host",
        )
        holder = cluster.host(first[0])
        samples: list[tuple[float, list[str]]] = []
        partitioned_at = holder.partition()
        stopped_at = elsewhere_at = None
        while True:
            now = time.monotonic()
            found = sampler.sample(["solo"])["solo"]
            samples.append((now, found))
            if stopped_at is None and holder.name not in found:
                stopped_at = now
            if elsewhere_at is None and any(name != holder.name for name in found):
                elsewhere_at = now
            if elsewhere_at is not None and now > elsewhere_at + AFTER_S:
                break
            if now > partitioned_at + ELSEWHERE_BOUND_S + 10:
                break
            time.sleep(max(0.0, SAMPLE_S - (time.monotonic() - now)))

        assert stopped_at is not None, "the partitioned holder never stopped its job"
        assert elsewhere_at is not None, "no other host took the job over"
        to_stop, to_elsewhere = stopped_at - partitioned_at, elsewhere_at - partitioned_at
        print(
            f"\npartition of {holder.name}: its job gone after {to_stop:.2f} s, "
            f"running elsewhere after {to_elsewhere:.2f} s"
        )
        twice = [(at - partitioned_at, found) for at, found in samples if len(found) > 1]
        assert not twice, twice
        assert to_stop <= STOPPED_BOUND_S, to_stop
        assert to_elsewhere <= ELSEWHERE_BOUND_S, to_elsewhere
        # Never again on the partitioned host (it cannot see anyone's lock), once elsewhere on
        # one host only.
        assert all(holder.name not in found for at, found in samples if at >= stopped_at)
        assert all(len(found) == 1 for at, found in samples if at >= elsewhere_at), samples

        # The partitioned daemon lives on: it answers, said why it stopped the job, and no
        # unit crashed.
        assert holder.alive
        status, _ = holder.request("GET", "/healthz")
        assert status in (200, 503), status
        records = _log_records(holder)
        fenced = [r for r in records if str(r.get("event", "")).startswith("singleton lock lost")]
        assert len(fenced) == 1, fenced
        assert fenced[0]["job"] == "continuous/solo", fenced[0]
        lock = site.data_dir("continuous", "solo") / "singleton.job.lock"
        assert fenced[0]["lock"] == str(lock) and fenced[0]["level"] == "error", fenced[0]
        assert not [r for r in records if r.get("event") == "job unit crashed"]
        # As it sees the job (its own status, in the folders its writes made again): inactive,
        # with the reason it cannot take the lock.
        _, view = holder.request("GET", "/api/continuouswebjobs/solo")
        assert view["status"] == "InactiveInstance", view
        assert "Cannot take the singleton lock" in view["error"], view
    except BaseException:
        cluster.print_logs()
        raise
    finally:
        cluster.close()
