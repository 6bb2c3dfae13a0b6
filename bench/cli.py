"""Entry point of the comparison: parse the flags, run the scenarios, print the table.

Normally started by `bench/run`, which installs supervisor and pm2 privately first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from bench import profiles, report
from bench.harness import QUICK, Harness, Sizes
from bench.report import Result
from bench.scenarios import HEAVY, SCENARIOS
from bench.systems import ALL, Tools

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run", description="webjobsd against supervisord and PM2, same run."
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds per scenario (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, small sizes")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(SCENARIOS),
        metavar="SCENARIO",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--systems", default=",".join(ALL), help="comma-separated subset of: " + ", ".join(ALL)
    )
    parser.add_argument(
        "--debounce", type=float, default=1.0, help="webjobsd debounce_s (default 1.0, its default)"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the webjobsd daemon with py-spy (raw stacks into DIR) and summarise",
    )
    return parser


def _tools() -> Tools:
    return Tools(
        repo=REPO,
        supervisor_venv=Path(os.environ.get("WJBENCH_SUPERVISOR_VENV", CACHE / "venv-supervisor")),
        npm_prefix=Path(os.environ.get("WJBENCH_NPM_PREFIX", CACHE / "npm")),
    )


def _missing(tools: Tools, systems: Sequence[str]) -> list[str]:
    missing = []
    if "supervisord" in systems and not tools.supervisord.exists():
        missing.append(str(tools.supervisord))
    if "pm2" in systems and not tools.pm2_module.exists():
        missing.append(str(tools.pm2_module))
    return missing


def _version(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    except OSError:
        return "?"
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


def machine(tools: Tools) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO / "daemon"))
    pm2_package = tools.pm2_module / "package.json"
    pm2 = json.loads(pm2_package.read_text())["version"] if pm2_package.exists() else "?"
    return (
        f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} cores  {platform.platform()}\n"
        f"webjobsd {_version([sys.executable, '-m', 'webjobsd', 'version'], env)}  "
        f"python {platform.python_version()}  "
        f"supervisord {_version([str(tools.supervisord), '--version'])}  "
        f"pm2 {pm2}  node {_version(['node', '--version'])}"
    )


def load_average() -> str:
    """The 1-minute load average: other work on the machine skews every figure."""
    return Path("/proc/loadavg").read_text().split()[0]


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_scenarios(harness: Harness, names: Sequence[str]) -> tuple[list[Result], list[str]]:
    results: list[Result] = []
    failures: list[str] = []
    for name in names:
        harness.scenario = name
        harness.progress(f"scenario {name}")
        try:
            results += SCENARIOS[name](harness)
        except Exception as error:
            traceback.print_exc()
            failures.append(f"{name}: {type(error).__name__}: {error}")
        finally:
            harness.close_all()
    return results, failures


def print_report(
    harness: Harness, results: list[Result], failures: list[str], elapsed: float, loads: str
) -> None:
    quick = harness.sizes == QUICK
    print()
    print(machine(harness.tools))
    print(
        f"rounds {harness.rounds} (heavy scenarios at most {harness.sizes.heavy_rounds}, "
        f"{harness.sizes.big_jobs}-job ones {harness.sizes.big_rounds}); "
        f"total {elapsed / 60:.1f} min; load average before/after {loads}"
        + ("; QUICK: reduced sizes, smoke only" if quick else "")
    )
    print()
    print(report.table(results))
    print()
    print("ratio: median / median of webjobsd, or of the baseline where the scenario has one.")
    print("result: webjobsd's median against the target (lines lost: every sample).")
    print(report.notes(results))
    for failure in failures:
        print(f"FAILED {failure}")


# The open-file limit systemd/webjobsd.service gives the daemon (LimitNOFILE). Every system is
# started under it, so that a run measures the managers as deployed, not this shell's default.
UNIT_OPEN_FILES = 65536


def _open_files_as_the_unit() -> None:
    """Raise the limit the managers inherit to the unit's, where this process may (root may
    raise the hard limit too); otherwise keep what there is: the scale row's notes name it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= UNIT_OPEN_FILES:
        return
    wanted_hard = hard if hard == resource.RLIM_INFINITY else max(hard, UNIT_OPEN_FILES)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (UNIT_OPEN_FILES, wanted_hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _open_files_as_the_unit()
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = [name for name in systems if name not in ALL]
    if unknown or "webjobsd" not in systems:
        print(f"--systems: webjobsd plus any of {', '.join(ALL)}", file=sys.stderr)
        return 2
    tools = _tools()
    if missing := _missing(tools, systems):
        print(f"not installed: {', '.join(missing)} (start the harness with bench/run)")
        return 2
    sizes: Sizes = QUICK if args.quick else Sizes()
    harness = Harness(
        tools,
        systems=systems,
        rounds=1 if args.quick else max(1, args.rounds),
        sizes=sizes,
        debounce_s=args.debounce,
        profile_dir=args.profile.resolve() if args.profile else None,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    began, load_before = time.monotonic(), load_average()
    try:
        if args.only:
            chosen = [name for name in SCENARIOS if name in args.only]
        else:
            chosen = [name for name in SCENARIOS if not (args.quick and name in HEAVY)]
        results, failures = run_scenarios(harness, chosen)
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped and removed", file=sys.stderr)
        return 130
    finally:
        harness.close_all()
    loads = f"{load_before}/{load_average()}"
    print_report(harness, results, failures, time.monotonic() - began, loads)
    if args.json:
        args.json.write_text(json.dumps(report.as_json(results), indent=2))
    if args.profile:
        for path in sorted(args.profile.glob("*.txt")):
            print()
            print(profiles.summary(path))
    return 1 if failures else 0
