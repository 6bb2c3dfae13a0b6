"""Reconciliation: compare what should run with what runs, and act on the difference.

`plan()` is pure: it sees the desired state (published by the catalog, filtered by the global
`WEBJOBS_STOPPED` switch) and the actual state (the targets the supervisor's units currently hold)
and returns actions, stops before starts. `Reconciler` is the thin loop that builds both sides and
applies the plan. It is level-triggered: a wake-up (watcher, API intent) only says *when* to look,
and a periodic tick repairs anything a lost event would have missed.

Applying an action never waits for a process: it hands a new target to the job's unit, whose own
task walks the stop ladder or starts the process. One slow stop therefore never delays other jobs.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from webjobsd.model import JobKey, JobKind, JobSpec

log = structlog.get_logger("webjobsd.reconciler")


@dataclass(frozen=True, slots=True)
class Desired:
    fingerprint: str
    run: bool


@dataclass(frozen=True, slots=True)
class Actual:
    fingerprint: str
    run: bool


class ActionKind(enum.IntEnum):
    # The order is the order of application: removals and stops free locks and ports first.
    RETIRE = 0
    REPLACE = 1
    STOP = 2
    START = 3
    ADD = 4


@dataclass(frozen=True, slots=True, order=True)
class Action:
    kind: ActionKind
    key: JobKey


def plan(desired: Mapping[JobKey, Desired], actual: Mapping[JobKey, Actual]) -> list[Action]:
    actions: list[Action] = []
    for key, current in actual.items():
        wanted = desired.get(key)
        if wanted is None:
            actions.append(Action(ActionKind.RETIRE, key))
        elif wanted.fingerprint != current.fingerprint:
            actions.append(Action(ActionKind.REPLACE, key))
        elif wanted.run != current.run:
            actions.append(Action(ActionKind.START if wanted.run else ActionKind.STOP, key))
    actions.extend(Action(ActionKind.ADD, key) for key in desired if key not in actual)
    return sorted(actions)


class ContinuousRuntime:
    """What the reconciler needs from the supervisor (kept narrow so tests can see the seam)."""

    def targets(self) -> Mapping[JobKey, Actual]:  # pragma: no cover - interface
        raise NotImplementedError

    def add(self, spec: JobSpec, run: bool) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def retarget(self, spec: JobSpec, run: bool) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def retire(self, key: JobKey) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def desired_state(specs: Mapping[JobKey, JobSpec], jobs_stopped: bool) -> dict[JobKey, Desired]:
    return {
        key: Desired(spec.fingerprint, run=not spec.disabled and not jobs_stopped)
        for key, spec in specs.items()
        if key.kind is JobKind.CONTINUOUS
    }


class Reconciler:
    def __init__(
        self,
        *,
        specs: Callable[[], Mapping[JobKey, JobSpec]],
        jobs_stopped: Callable[[], bool],
        runtime: ContinuousRuntime,
        tick_s: float,
        on_pass: Callable[[Mapping[JobKey, JobSpec]], None] | None = None,
        on_latency: Callable[[float], None] | None = None,
    ) -> None:
        self._on_latency = on_latency
        self._specs = specs
        self._jobs_stopped = jobs_stopped
        self._runtime = runtime
        self.tick_s = tick_s
        self._on_pass = on_pass
        self._wake = asyncio.Event()
        self.passes = 0
        self.last_pass_monotonic: float | None = None

    def wake(self) -> None:
        self._wake.set()

    def reconcile_once(self) -> list[Action]:
        started = time.monotonic()
        specs = self._specs()
        desired = desired_state(specs, self._jobs_stopped())
        actions = plan(desired, self._runtime.targets())
        for action in actions:
            try:
                self._apply(action, specs, desired)
            except Exception:
                # One job that cannot be set up must not stop the others from being reconciled;
                # the next pass tries it again.
                log.exception(
                    "cannot apply reconcile action", action=action.kind.name, job=str(action.key)
                )
        if self._on_pass is not None:
            self._on_pass(specs)
        self.passes += 1
        self.last_pass_monotonic = time.monotonic()
        if self._on_latency is not None:
            self._on_latency(self.last_pass_monotonic - started)
        return actions

    def _apply(
        self, action: Action, specs: Mapping[JobKey, JobSpec], desired: Mapping[JobKey, Desired]
    ) -> None:
        log.debug("reconcile action", action=action.kind.name, job=str(action.key))
        if action.kind is ActionKind.RETIRE:
            self._runtime.retire(action.key)
        elif action.kind is ActionKind.ADD:
            self._runtime.add(specs[action.key], desired[action.key].run)
        else:
            self._runtime.retarget(specs[action.key], desired[action.key].run)

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                self.reconcile_once()
            except Exception:
                log.exception("reconcile pass failed; retrying at the next tick")
            try:
                # Not wait_for: on Python 3.11 it swallows a cancellation that arrives just as
                # the event is set, and this loop would outlive the daemon's shutdown.
                async with asyncio.timeout(self.tick_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
