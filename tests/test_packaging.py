"""`pip install .` gives a working daemon: the wheel carries the OpenAPI document, the type
marker and the console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.helpers import REPO_ROOT


def test_the_wheel_carries_the_package_data(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(tmp_path),
            str(REPO_ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("webjobsd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert "webjobsd/http/openapi.yaml" in names
    for static in ("index.html", "app.js", "style.css"):
        assert f"webjobsd/http/dashboard/{static}" in names
    assert "webjobsd/py.typed" in names
    assert "webjobsd = webjobsd.cli:main" in scripts


def test_python_dash_m_webjobsd_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "webjobsd", "version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip()
