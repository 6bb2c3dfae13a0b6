"""The package's parts depend one way: `lint-imports` checks the contracts in pyproject.toml
(the API and the webhooks above the daemon's parts, above its model; no import cycles between
the modules of any package), on the source tree this test run imports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import webjobsd

ROOT = Path(__file__).resolve().parent.parent


def lint_imports() -> str:
    beside = Path(sys.executable).with_name("lint-imports")
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert found, "lint-imports is missing: install the test extra (pip install -e '.[test]')"
    return found


def test_import_contracts_hold() -> None:
    package_root = Path(webjobsd.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    done = subprocess.run(
        [lint_imports(), "--no-cache"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "broken" in done.stdout and " 0 broken" in done.stdout, done.stdout[-2000:]
