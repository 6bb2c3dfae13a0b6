"""Three isolated hosts on one shared site (tests/multihost.py), in each watch mode.

One scenario per watch mode (inotify here, poll in test_multihost_poll.py) runs everything once
(starting hosts costs seconds, and the chaos part runs for a minute) and records what it saw;
each test then asserts one behaviour on that record. The hosts are gone before any test body
runs, so the leak check of conftest.py holds.

The scenario, 3 hosts (h1, h2, h3), jobs `everyhost` (continuous), `solo` (continuous,
singleton), `tick` (triggered, `*/2 * * * * *`), `manual` (triggered, runs 3 s):
1. all hosts up and the jobs running; then for 60 s, a sample every 50 ms of which hosts run
   `everyhost` and `solo` (from /proc), while the host holding `solo` is killed (a power cut of
   its whole namespace) every 12 s and brought back 5 s later;
2. `manual` is run through h1 and, while it runs, through h2 (409); once it ended, every host's
   history of `manual` and `tick`;
3. a zip deployment through h1 that changes `everyhost` only, held open by a post-deployment
   action until a second deployment sent to h2 got its answer (409); then what every host
   started;
4. h3 is killed: each read of `everyhost`'s `detailed_status` through h1 and h2 after that.
"""

from __future__ import annotations

import fcntl
import io
import statistics
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import FAST_CONFIG, Site, wait_for_sync
from tests.multihost import Cluster, Host, namespaces_unavailable

HOSTS = ("h1", "h2", "h3")
CHAOS_S = 60.0
SAMPLE_S = 0.05
KILL_EVERY_S = 12.0
DOWN_FOR_S = 5.0
FAILOVER_BOUND_S = 5.0
# A dead host's entry leaves `detailed_status` at the first read once its lock is free: with
# local locks that is at its death; the test allows this long for the read itself.
DEAD_ENTRY_BOUND_S = 2.0

LOOP_JOB = """\
#!/bin/sh
echo "$(hostname) $(cat code.txt) $$" >> "$WEBJOBSD_JOB_DATA_PATH/starts-$(hostname)"
while true; do sleep 1; done
"""
TICK_JOB = '#!/bin/sh\necho "tick on $(hostname)"\n'
MANUAL_JOB = "#!/bin/sh\necho begin\nsleep 3\necho end\n"
GATE_ACTION = '#!/bin/sh\nwhile [ ! -e "{gate}" ]; do sleep 0.05; done\n'

JOBS: dict[tuple[str, str], dict[str, str]] = {
    ("continuous", "everyhost"): {"run.sh": LOOP_JOB, "code.txt": "v1"},
    ("continuous", "solo"): {
        "run.sh": LOOP_JOB,
        "code.txt": "v1",
        "settings.job": '{"is_singleton": true}',
    },
    ("triggered", "tick"): {"run.sh": TICK_JOB, "settings.job": '{"schedule": "*/2 * * * * *"}'},
    ("triggered", "manual"): {"run.sh": MANUAL_JOB},
}

# The scenario runs about 90 s, inside the first test of its module.
pytestmark = pytest.mark.timeout(300)

WATCH_MODES: dict[str, dict[str, Any]] = {
    "inotify": {"watch": "inotify"},
    # What hosts on NFS need: no host hears of another's writes; the scan is the only source.
    "poll": {"watch": "poll", "poll_interval_s": 1.0},
}


@dataclass
class Sample:
    at: float
    solo: list[str]
    everyhost: list[str]


@dataclass
class Observed:
    mode: str
    samples: list[Sample] = field(default_factory=list)
    kills: list[tuple[float, str]] = field(default_factory=list)
    failovers: list[float] = field(default_factory=list)
    tick_runs: list[dict[str, Any]] = field(default_factory=list)
    run_answers: dict[str, int] = field(default_factory=dict)
    histories: dict[str, dict[str, list[tuple[str, str, str, str | None]]]] = field(
        default_factory=dict
    )
    deploy_answers: dict[str, int] = field(default_factory=dict)
    deploy_status: Any = None
    starts_before: dict[str, list[str]] = field(default_factory=dict)
    starts_after: dict[str, list[str]] = field(default_factory=dict)
    pickup_s: dict[str, float] = field(default_factory=dict)
    details_before_kill: dict[str, str] = field(default_factory=dict)
    details_after_kill: list[tuple[float, str, str]] = field(default_factory=list)


def _zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            data = content.encode()
            day = zlib.crc32(data) % 28 + 1
            info = zipfile.ZipInfo(name, date_time=(2020, 1, day, 12, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o755 if name.endswith(".sh") else 0o644) << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def _site_files(changes: dict[tuple[str, str], dict[str, str]]) -> dict[str, str]:
    files = {}
    for (kind, name), job in JOBS.items():
        for rel, content in {**job, **changes.get((kind, name), {})}.items():
            files[f"App_Data/jobs/{kind}/{name}/{rel}"] = content
    return files


def _starts(site: Site, name: str) -> dict[str, list[str]]:
    folder = site.data_dir("continuous", name) / "job-data"
    result = {}
    for host in HOSTS:
        try:
            result[host] = (folder / f"starts-{host}").read_text().splitlines()
        except OSError:
            result[host] = []
    return result


def _deployment_lock_held(site: Site) -> bool:
    path = site.root / "site" / "locks" / "deployments.lock"
    try:
        with open(path, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _history(host: Host, name: str) -> list[tuple[str, str, str, str | None]]:
    runs = host.get(f"/api/triggeredwebjobs/{name}/history")["runs"]
    return [(r["id"], r["status"], r["start_time"], r.get("end_time")) for r in runs]


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _chaos(cluster: Cluster, observed: Observed) -> None:
    sampler = cluster.sampler()
    began = time.monotonic()
    next_kill = began + KILL_EVERY_S / 2
    down: tuple[Host, float] | None = None
    while (now := time.monotonic()) < began + CHAOS_S:
        found = sampler.sample(["solo", "everyhost"])
        observed.samples.append(Sample(now, found["solo"], found["everyhost"]))
        if down is not None and now >= down[1]:
            down[0].start()
            sampler.refresh(cluster.hosts)
            down = None
        if down is None and now >= next_kill and len(found["solo"]) == 1:
            victim = cluster.host(found["solo"][0])
            observed.kills.append((victim.kill(), victim.name))
            sampler.refresh(cluster.hosts)
            down = (victim, time.monotonic() + DOWN_FOR_S)
            next_kill += KILL_EVERY_S
        time.sleep(max(0.0, SAMPLE_S - (time.monotonic() - now)))
    if down is not None:
        down[0].start()
    for killed_at, _ in observed.kills:
        after = [s for s in observed.samples if s.at > killed_at and s.solo]
        if after:
            observed.failovers.append(after[0].at - killed_at)


def _runs_and_histories(cluster: Cluster, observed: Observed) -> None:
    h1, h2 = cluster.host("h1"), cluster.host("h2")
    observed.run_answers["h1"], _ = h1.request("POST", "/api/triggeredwebjobs/manual/run")
    wait_for_sync(
        lambda: (
            (h2.get("/api/triggeredwebjobs/manual").get("latest_run") or {}).get("status")
            == "Running"
        ),
        timeout=30,
        interval=0.05,
        what="manual running, as h2 sees it",
    )
    observed.run_answers["h2"], _ = h2.request("POST", "/api/triggeredwebjobs/manual/run")
    wait_for_sync(
        lambda: (
            (h1.get("/api/triggeredwebjobs/manual").get("latest_run") or {}).get("status")
            == "Success"
        ),
        timeout=30,
        interval=0.05,
        what="manual finished",
    )
    for name in ("manual", "tick"):
        # `tick` keeps running: read while no run is in flight, the same moment on every host.
        for _ in range(50):
            histories = {host.name: _history(host, name) for host in cluster.hosts}
            if len({tuple(h) for h in histories.values()}) == 1:
                break
            time.sleep(0.1)
        observed.histories[name] = histories


def _deployment(cluster: Cluster, site: Site, observed: Observed) -> None:
    h1, h2 = cluster.host("h1"), cluster.host("h2")
    gate = cluster.shared_dir / "gate"
    actions = site.root / "site" / "deployments" / "tools" / "PostDeploymentActions"
    actions.mkdir(parents=True, exist_ok=True)
    (actions / "wait.sh").write_text(GATE_ACTION.format(gate=gate))
    (actions / "wait.sh").chmod(0o755)
    observed.starts_before = _starts(site, "everyhost") | {
        f"solo:{k}": v for k, v in _starts(site, "solo").items()
    }
    changed = _zip(_site_files({("continuous", "everyhost"): {"code.txt": "v2"}}))
    status, _ = h1.request("POST", "/api/zipdeploy?isAsync=true", changed)
    observed.deploy_answers["h1"] = status
    wait_for_sync(
        lambda: _deployment_lock_held(site),
        timeout=30,
        interval=0.05,
        what="the deployment running on h1",
    )
    second = _zip(_site_files({("continuous", "everyhost"): {"code.txt": "v3"}}))
    observed.deploy_answers["h2"], _ = h2.request("POST", "/api/zipdeploy", second)
    gate.write_text("go")
    observed.deploy_status = wait_for_sync(
        # 202 while it runs, 200 once it ended (Kudu's answers).
        lambda: (
            (latest := h1.request("GET", "/api/deployments/latest")[1]).get("complete") and latest
        ),
        timeout=30,
        interval=0.05,
        what="the deployment complete",
    )
    ended = time.monotonic()
    pending = set(HOSTS)
    while pending and time.monotonic() < ended + 30:
        starts = _starts(site, "everyhost")
        for host in list(pending):
            if any(" v2 " in line for line in starts[host]):
                observed.pickup_s[host] = time.monotonic() - ended
                pending.discard(host)
        time.sleep(0.02)
    # Quiet for a while after the last host took it up: a second restart would show by now.
    time.sleep(3)
    observed.starts_after = _starts(site, "everyhost") | {
        f"solo:{k}": v for k, v in _starts(site, "solo").items()
    }


def _dead_host_entry(cluster: Cluster, observed: Observed) -> None:
    def details() -> dict[str, str]:
        return {
            host.name: host.get("/api/continuouswebjobs/everyhost")["detailed_status"]
            for host in cluster.hosts
            if host.alive
        }

    observed.details_before_kill = wait_for_sync(
        lambda: (d := details()) and all(d[h].count(" - Running") == 3 for h in d) and d,
        timeout=30,
        interval=0.05,
        what="every host listed as Running by every host",
    )
    killed_at = cluster.host("h3").kill()
    while time.monotonic() < killed_at + DEAD_ENTRY_BOUND_S + 1:
        for name, text in details().items():
            observed.details_after_kill.append((time.monotonic() - killed_at, name, text))
        time.sleep(0.1)


def _run_scenario(shared: Path, mode: str) -> Observed:
    site = Site(shared)
    for (kind, name), files in JOBS.items():
        site.write_job(kind, name, files)
    config = {
        **FAST_CONFIG,
        **WATCH_MODES[mode],
        "log_level": "info",
        "settings": {"WEBJOBS_HISTORY_SIZE": "500"},
    }
    cluster = Cluster.create(shared, HOSTS, config)
    observed = Observed(mode)
    try:
        cluster.start()
        sampler = cluster.sampler()
        wait_for_sync(
            lambda: (
                (s := sampler.sample(["solo", "everyhost"]))
                and len(s["solo"]) == 1
                and sorted(s["everyhost"]) == list(HOSTS)
            ),
            timeout=30,
            interval=0.05,
            what="jobs running on every host",
        )
        wait_for_sync(
            lambda: _history(cluster.host("h1"), "tick"),
            timeout=30,
            interval=0.05,
            what="a first scheduled run",
        )
        _chaos(cluster, observed)
        for host in cluster.hosts:
            host.wait_ready()
        sampler.refresh(cluster.hosts)
        wait_for_sync(
            lambda: sorted(sampler.sample(["everyhost"])["everyhost"]) == list(HOSTS),
            timeout=30,
            interval=0.05,
            what="everyhost on every host again",
        )
        observed.tick_runs = cluster.host("h1").get("/api/triggeredwebjobs/tick/history")["runs"]
        _runs_and_histories(cluster, observed)
        _deployment(cluster, site, observed)
        _dead_host_entry(cluster, observed)
    except BaseException:
        cluster.print_logs()
        raise
    finally:
        cluster.close()
    _report(observed)
    return observed


def _report(observed: Observed) -> None:
    failovers = observed.failovers
    print(
        f"\n[{observed.mode}] singleton failover over {len(failovers)} kills: "
        + (
            f"median {statistics.median(failovers):.2f} s, max {max(failovers):.2f} s, "
            f"all {[round(f, 2) for f in failovers]}"
            if failovers
            else "none"
        )
    )
    print(f"[{observed.mode}] deployment picked up after its end: {observed.pickup_s}")


def observed_in(mode: str) -> Any:
    """The module's scenario in watch mode `mode`, run once for all its tests."""

    @pytest.fixture(scope="module")
    def observed(tmp_path_factory: pytest.TempPathFactory) -> Observed:
        reason = namespaces_unavailable()
        if reason:
            pytest.skip(reason)
        return _run_scenario(tmp_path_factory.mktemp(f"hosts-{mode}"), mode)

    return observed


# Poll mode: tests/test_multihost_poll.py (a file of its own, so that the two scenarios of a
# minute and more each can run on different workers).
observed = observed_in("inotify")


def test_a_singleton_runs_on_exactly_one_host_and_moves_within_5_s(observed: Observed) -> None:
    assert len(observed.kills) >= 4, observed.kills
    assert max(len(sample.solo) for sample in observed.samples) == 1
    # Zero only while a failover is under way: after a kill, until the next host started it.
    windows = [
        (killed, killed + failover)
        for (killed, _), failover in zip(observed.kills, observed.failovers, strict=False)
    ]
    for sample in observed.samples:
        if not sample.solo:
            assert any(start <= sample.at <= end for start, end in windows), sample
    assert len(observed.failovers) == len(observed.kills)
    assert max(observed.failovers) <= FAILOVER_BOUND_S, observed.failovers
    # It moved: after each kill it runs on another host than the dead one.
    for killed_at, victim in observed.kills:
        first = next(s for s in observed.samples if s.at > killed_at and s.solo)
        assert first.solo != [victim]


def test_a_continuous_job_runs_once_on_every_host(observed: Observed) -> None:
    for sample in observed.samples:
        counts = Counter(sample.everyhost)
        assert all(count == 1 for count in counts.values()), sample
    # Between the kills every live host runs it: the first samples, before any kill.
    first_kill = observed.kills[0][0]
    assert all(sorted(s.everyhost) == list(HOSTS) for s in observed.samples if s.at < first_kill)


def test_every_scheduled_occurrence_runs_exactly_once_across_hosts(observed: Observed) -> None:
    starts = sorted(_parse_time(run["start_time"]) for run in observed.tick_runs)
    assert len(starts) >= 25, starts
    occurrences = [
        start - timedelta(seconds=start.second % 2, microseconds=start.microsecond)
        for start in starts
    ]
    twice = [o for o, n in Counter(occurrences).items() if n > 1]
    assert not twice, f"occurrences run twice: {twice}"
    missed = []
    expected = occurrences[0]
    while expected <= occurrences[-1]:
        if expected not in occurrences:
            missed.append(expected)
        expected += timedelta(seconds=2)
    assert not missed, f"occurrences missed: {missed}"


def test_a_run_elsewhere_is_409_and_every_host_answers_the_same_history(
    observed: Observed,
) -> None:
    assert observed.run_answers == {"h1": 202, "h2": 409}
    for name, histories in observed.histories.items():
        assert len({tuple(history) for history in histories.values()}) == 1, (name, histories)
        assert histories["h1"], name
    assert [run[1] for run in observed.histories["manual"]["h3"]] == ["Success"]


def test_detailed_status_lists_live_hosts_and_drops_a_dead_one(observed: Observed) -> None:
    for text in observed.details_before_kill.values():
        for host in HOSTS:
            assert f"{host} - Running" in text, text
    assert observed.details_after_kill
    for _, _, text in observed.details_after_kill:
        assert "h3 - Running" not in text, text
    gone_at = [at for at, _, text in observed.details_after_kill if "h3" not in text]
    assert gone_at and min(gone_at) <= DEAD_ENTRY_BOUND_S
    late = [(at, text) for at, _, text in observed.details_after_kill if at > DEAD_ENTRY_BOUND_S]
    assert all("h3" not in text for _, text in late), late


def test_a_deployment_through_one_host_restarts_each_host_once(observed: Observed) -> None:
    assert observed.deploy_answers == {"h1": 202, "h2": 409}
    assert observed.deploy_status["status"] == 4, observed.deploy_status
    for host in HOSTS:
        new = observed.starts_after[host][len(observed.starts_before[host]) :]
        assert len(new) == 1 and " v2 " in new[0], (host, new)
        # The singleton, unchanged, restarted nowhere.
        assert observed.starts_after[f"solo:{host}"] == observed.starts_before[f"solo:{host}"]
    assert set(observed.pickup_s) == set(HOSTS)
