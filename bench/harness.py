"""Opens and closes system instances for the scenarios, alternates samples, keeps the sizes.

Every instance opened here is closed by `close_all()`, which the entry point calls in a
`finally`, so a failure or a Ctrl-C still stops every manager and removes every folder.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.jobs import Job
from bench.systems import Options, System, Tools, system_class
from bench.systems.base import DEFAULT_ROTATE_BYTES

JobsFor = Callable[[System], Sequence[Job]]


@dataclass(frozen=True, slots=True)
class Sizes:
    """How big each scenario is (full run vs --quick)."""

    bulk_jobs: int = 100  # burst, shutdown, idle CPU, memory (middle point)
    big_jobs: int = 1000  # memory (top point), list API
    scale_jobs: int = 5000  # scale (not in --quick unless named with --only)
    big_rounds: int = 2  # rounds of the scenarios that start `big_jobs` jobs per sample
    heavy_rounds: int = 3  # rounds of the scenarios that start a fresh instance per sample
    samples_per_round: int = 4  # restart and run: samples taken per round and system
    log_mib: int = 200
    idle_window_s: float = 10.0
    settle_s: float = 1.0  # after all jobs are running, before reading RSS or CPU
    list_requests: int = 100  # sequential requests per round (latency)
    list_connections: int = 8
    list_seconds: float = 4.0  # duration of each throughput sample
    failover_kills: int = 20  # hosts: kills of the singleton's host per watch mode
    host_deployments: int = 5  # hosts: deployments per watch mode


QUICK = Sizes(
    bulk_jobs=20,
    big_jobs=100,
    scale_jobs=200,
    big_rounds=1,
    heavy_rounds=1,
    samples_per_round=3,
    log_mib=20,
    idle_window_s=2.0,
    settle_s=0.5,
    list_requests=20,
    list_seconds=1.0,
    failover_kills=3,
    host_deployments=1,
)


_held_signals: list[int] = []  # received while clean-up ran
_holding = [0]  # nesting depth of _signals_held


def _hold(signum: int, _frame: object) -> None:
    _held_signals.append(signum)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Clean-up runs to its end: Ctrl-C and SIGTERM arriving meanwhile are held, then raised as
    KeyboardInterrupt once the outermost clean-up is done (main thread only)."""
    previous = {sig: signal.signal(sig, _hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    _holding[0] += 1
    try:
        yield
    finally:
        _holding[0] -= 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if _held_signals and not _holding[0]:
        signum = _held_signals.pop()
        _held_signals.clear()
        raise KeyboardInterrupt(f"signal {signum}")


class Harness:
    def __init__(
        self,
        tools: Tools,
        *,
        systems: Sequence[str],
        rounds: int,
        sizes: Sizes,
        debounce_s: float,
        profile_dir: Path | None = None,
    ) -> None:
        self.tools = tools
        self.systems = list(systems)
        self.rounds = rounds
        self.sizes = sizes
        self.debounce_s = debounce_s
        self.profile_dir = profile_dir
        self.scenario = ""
        self._open: list[System] = []
        self._profilers: dict[int, subprocess.Popen[bytes]] = {}
        self._profiles = 0

    # -- instances -----------------------------------------------------------------------------

    def options(self, *, log_rotate_bytes: int | None = None, log_generations: int = 3) -> Options:
        """The instance options of this run, with a job-log rotation size of the scenario's."""
        return Options(
            debounce_s=self.debounce_s,
            log_rotate_bytes=log_rotate_bytes or DEFAULT_ROTATE_BYTES,
            log_generations=log_generations,
        )

    def open(
        self,
        name: str,
        jobs_for: JobsFor | None = None,
        *,
        options: Options | None = None,
        start_timeout: float = 120,
    ) -> System:
        """A started instance of system `name` with its jobs running."""
        system = system_class(name)(self.tools, options or self.options())
        self._open.append(system)
        jobs = list(jobs_for(system)) if jobs_for else []
        system.start(jobs)
        system.wait_started(jobs, start_timeout)
        self._profile(system)
        return system

    def close(self, system: System) -> None:
        with _signals_held():
            self._stop_profile(system)
            try:
                system.close()
            finally:
                if system in self._open:
                    self._open.remove(system)

    def close_all(self) -> None:
        with _signals_held():
            while self._open:
                self.close(self._open[-1])

    # -- alternation ---------------------------------------------------------------------------

    def alternate(
        self,
        sample: Callable[[str, int], list[float]],
        *,
        rounds: int | None = None,
        systems: Sequence[str] | None = None,
    ) -> dict[str, list[float]]:
        """Round 0: each system once in order, round 1: again, ...; samples per system."""
        order = list(systems or self.systems)
        values: dict[str, list[float]] = {name: [] for name in order}
        for index in range(rounds or self.rounds):
            for name in order:
                got = sample(name, index)
                values[name].extend(got)
                shown = ", ".join(f"{value:.2f}" for value in got)
                self.progress(f"{self.scenario} round {index + 1} {name}: {shown}")
        return values

    def progress(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    # -- optional profiling of the webjobsd daemon ---------------------------------------------

    def _profile(self, system: System) -> None:
        if self.profile_dir is None or system.name != "webjobsd":
            return
        self._profiles += 1
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        output = self.profile_dir / f"{self.scenario}-{self._profiles}.txt"
        py_spy = self.tools.supervisor_venv.parent / "venv-tools" / "bin" / "py-spy"
        argv = [str(py_spy), "record", "--pid", str(system.manager_pid), "--format", "raw"]
        # --gil: only the thread holding the GIL is sampled, i.e. where Python time goes
        # (threads blocked in waitpid or on a queue would otherwise dominate).
        argv += ["--rate", "100", "--gil", "--nonblocking", "--output", str(output)]
        self._profilers[id(system)] = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def _stop_profile(self, system: System) -> None:
        profiler = self._profilers.pop(id(system), None)
        if profiler is None:
            return
        profiler.send_signal(signal.SIGINT)
        try:
            profiler.wait(30)
        except subprocess.TimeoutExpired:
            profiler.kill()
            profiler.wait()
