"""The scenarios, by the name `--only` takes, in the order of a full run."""

from __future__ import annotations

from collections.abc import Callable

from bench.harness import Harness
from bench.report import Result
from bench.scenarios.deploy import deploy
from bench.scenarios.hosts import hosts
from bench.scenarios.latency import burst, drop, restart, run
from bench.scenarios.listapi import list_api
from bench.scenarios.logs import logs
from bench.scenarios.resources import idle_cpu, memory
from bench.scenarios.scale import scale
from bench.scenarios.shutdown import shutdown

Scenario = Callable[[Harness], list[Result]]

SCENARIOS: dict[str, Scenario] = {
    "drop": drop,
    "restart": restart,
    "burst": burst,
    "shutdown": shutdown,
    "run": run,
    "logs": logs,
    "memory": memory,
    "idle-cpu": idle_cpu,
    "list": list_api,
    "deploy": deploy,
    "scale": scale,
    "hosts": hosts,
}

# Left out of `--quick` unless named with `--only`: thousands of processes per sample.
HEAVY = frozenset({"scale"})
