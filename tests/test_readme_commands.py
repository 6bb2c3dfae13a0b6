"""The two commands at the top of the README work as written, on a machine that has only Python,
git, node and npm:

- the first serves the bundled sample jobs until Ctrl-C;
- the second (the test command, which `.ci/run` runs verbatim) starts with `tests/tools/ensure`,
  which installs the system tools the suite drives (chromium, rsync, lftp, ...) with apt-get, or
  names the missing packages and the command that installs them and exits 1.

The ensure script runs for real with bash. Its PATH is a folder of the test's making: the tools
it looks for are present or absent there, and `apt-get` and `sudo` are stand-ins that record
how they were called (and "install" a package as a command of its name), because installing or
removing packages on the machine running the tests is not a test's business. `pip install -e .`
is left out of the first command's test for the same reason (it would re-point the installed
package).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, wait_for_sync
from tests.test_faults import ready
from webjobsd.runtime.jobprocess import free_loopback_port

ENSURE = REPO_ROOT / "tests" / "tools" / "ensure"
BASH = shutil.which("bash") or "/bin/bash"
IS_ROOT = os.geteuid() == 0
CREDENTIALS_FILE = ".demo-site/data/webjobsd/credentials.json"  # as the README says


def readme_commands() -> list[str]:
    """The README's `sh` blocks before its first section: the run command, the test command."""
    readme = (REPO_ROOT / "README.md").read_text()
    top = readme.split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", top, re.DOTALL)]


def tools_table() -> dict[str, str]:
    """The ensure script's own table: command -> Debian package."""
    table = re.search(r"^TOOLS=\(\n(.*?)^\)", ENSURE.read_text(), re.DOTALL | re.MULTILINE)
    assert table is not None
    return dict(re.findall(r'^\s*"(\S+) (\S+)"', table.group(1), re.MULTILINE))


# -- the test command and CI --------------------------------------------------------------------


def test_ci_runs_exactly_the_readme_test_command() -> None:
    _run, test_command = readme_commands()
    ci = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line.strip() and not line.lstrip().startswith("#")]
    assert commands[0] == "set -euo pipefail"
    assert commands[1].startswith("cd ")
    assert commands[2:] == [test_command]


def test_the_test_command_brings_its_tools_first() -> None:
    _run, test_command = readme_commands()
    first, *_rest = test_command.split(" && ")
    assert shlex.split(first) == ["bash", "tests/tools/ensure"]
    table = tools_table()
    for command in ("chromium", "rsync", "lftp", "unzip", "zip", "git", "node", "npm"):
        assert command in table, command


# -- tests/tools/ensure -------------------------------------------------------------------------


@dataclass
class FakeBin:
    """A PATH folder: present tools, and recording stand-ins for apt-get and sudo."""

    folder: Path

    @property
    def calls_file(self) -> Path:
        return self.folder / "calls.log"

    def calls(self) -> list[str]:
        return self.calls_file.read_text().splitlines()

    def script(self, name: str, body: str) -> None:
        path = self.folder / name
        path.write_text(f"#!/bin/sh\n{body}")
        path.chmod(0o755)

    def provide(self, *commands: str) -> None:
        for command in commands:
            self.script(command, "exit 0\n")

    def apt_get(self, *, install_fails: bool = False, creates: bool = True) -> None:
        """Records `uid DEBIAN_FRONTEND args`; `install` makes each package a command (unless
        it fails, or `creates` is false: a package whose command lands outside PATH)."""
        record = (
            f'echo "apt-get uid=$(/usr/bin/id -u) frontend=$DEBIAN_FRONTEND $*"'
            f" >> {self.calls_file}\n"
        )
        if install_fails:
            self.script("apt-get", record + '[ "$2" = install ] && exit 100\nexit 0\n')
            return
        if not creates:
            self.script("apt-get", record + "exit 0\n")
            return
        self.script(
            "apt-get",
            record + 'if [ "$2" = install ]; then\n'
            '  for word in "$@"; do\n'
            '    case "$word" in -*|install) ;; *)\n'
            f"      printf '#!/bin/sh\\nexit 0\\n' > {self.folder}/\"$word\"\n"
            f'      /bin/chmod 755 {self.folder}/"$word";;\n'
            "    esac\n"
            "  done\n"
            "fi\n",
        )

    def sudo(self, *, password_needed: bool = False) -> None:
        """A sudo without a password: runs the command as is (the uid does not change)."""
        refuse = 'echo "sudo: a password is required" >&2; exit 1\n' if password_needed else ""
        self.script(
            "sudo",
            f'echo "sudo $*" >> {self.calls_file}\n{refuse}[ "$1" = -n ] && shift\n"$@"\n',
        )


@pytest.fixture
def fake_bin() -> Iterator[FakeBin]:
    # Under /tmp and open to all: the script also runs as `nobody`, who cannot enter the test's
    # tmp_path.
    folder = Path(tempfile.mkdtemp(prefix="webjobsd-ensure-"))
    try:
        folder.chmod(0o777)
        bin_ = FakeBin(folder)
        bin_.calls_file.write_text("")
        bin_.calls_file.chmod(0o666)
        os.symlink(shutil.which("env") or "/usr/bin/env", folder / "env")
        yield bin_
    finally:
        shutil.rmtree(folder)


def run_ensure(bin_: FakeBin, *, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    """The script with only the fake folder on PATH; as `nobody` when we are root and asked."""
    switch = {"user": "nobody", "group": "nogroup", "extra_groups": []} if as_nobody else {}
    return subprocess.run(
        [BASH, str(ENSURE)],
        env={"PATH": str(bin_.folder)},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
        **switch,  # type: ignore[call-overload]
    )


MISSING = ("chromium", "lftp")


def all_but_missing(bin_: FakeBin) -> None:
    bin_.provide(*(command for command in tools_table() if command not in MISSING))


def test_everything_present_is_quick_and_silent_and_calls_no_apt(fake_bin: FakeBin) -> None:
    fake_bin.provide(*tools_table())
    fake_bin.apt_get()
    fake_bin.sudo()
    started = time.monotonic()
    result = run_ensure(fake_bin)
    elapsed = time.monotonic() - started
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert fake_bin.calls() == []
    assert elapsed < 2, f"{elapsed:.3f} s"


@pytest.mark.skipif(not IS_ROOT, reason="installs as root only when run by root")
def test_as_root_one_update_then_one_install_of_the_missing_packages(fake_bin: FakeBin) -> None:
    all_but_missing(fake_bin)
    fake_bin.apt_get()
    fake_bin.sudo()
    result = run_ensure(fake_bin)
    assert result.returncode == 0, result.stderr
    assert "installing chromium lftp with apt-get" in result.stderr
    assert fake_bin.calls() == [
        "apt-get uid=0 frontend=noninteractive -q update",
        "apt-get uid=0 frontend=noninteractive -q install -y --no-install-recommends chromium lftp",
    ]
    # Present now: a second run is silent and calls nothing.
    fake_bin.calls_file.write_text("")
    again = run_ensure(fake_bin)
    assert (again.returncode, again.stderr, fake_bin.calls()) == (0, "", [])


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run the script as another user")
def test_not_root_installs_through_password_less_sudo(fake_bin: FakeBin) -> None:
    all_but_missing(fake_bin)
    fake_bin.apt_get()
    fake_bin.sudo()
    result = run_ensure(fake_bin, as_nobody=True)
    assert result.returncode == 0, result.stderr
    uid = 65534  # the stand-in sudo does not change users
    assert fake_bin.calls() == [
        "sudo -n true",
        "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get -q update",
        f"apt-get uid={uid} frontend=noninteractive -q update",
        "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get -q install -y "
        "--no-install-recommends chromium lftp",
        f"apt-get uid={uid} frontend=noninteractive -q install -y --no-install-recommends "
        "chromium lftp",
    ]


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run the script as another user")
@pytest.mark.parametrize("sudo", ["absent", "wants a password"])
def test_without_root_or_sudo_it_names_the_packages_and_exits_1(
    fake_bin: FakeBin, sudo: str
) -> None:
    all_but_missing(fake_bin)
    fake_bin.apt_get()
    if sudo == "wants a password":
        fake_bin.sudo(password_needed=True)
    result = run_ensure(fake_bin, as_nobody=True)
    assert result.returncode == 1
    assert "not root, and sudo needs a password (or is not installed)" in result.stderr
    assert "the tests need these Debian packages, which are missing: chromium lftp" in (
        result.stderr
    )
    assert (
        "sudo apt-get update && sudo apt-get install -y --no-install-recommends chromium lftp"
        in result.stderr
    )
    assert [call for call in fake_bin.calls() if call.startswith("apt-get")] == []


def test_without_apt_get_it_names_the_packages_and_exits_1(fake_bin: FakeBin) -> None:
    all_but_missing(fake_bin)
    result = run_ensure(fake_bin)
    assert result.returncode == 1
    assert "there is no apt-get here to install them with" in result.stderr
    assert "which are missing: chromium lftp" in result.stderr


@pytest.mark.skipif(not IS_ROOT, reason="installs as root only when run by root")
def test_a_failed_install_is_explained_and_exits_1(fake_bin: FakeBin) -> None:
    all_but_missing(fake_bin)
    fake_bin.apt_get(install_fails=True)
    result = run_ensure(fake_bin)
    assert result.returncode == 1
    assert "apt-get install failed" in result.stderr
    assert "which are missing: chromium lftp" in result.stderr


@pytest.mark.skipif(not IS_ROOT, reason="installs as root only when run by root")
def test_a_command_still_missing_after_the_install_is_named(fake_bin: FakeBin) -> None:
    all_but_missing(fake_bin)
    fake_bin.apt_get(creates=False)
    result = run_ensure(fake_bin)
    assert result.returncode == 1
    assert (
        "apt-get installed chromium lftp, but these commands are still not on PATH "
        f"({fake_bin.folder}): chromium lftp"
    ) in result.stderr


# -- the run command ----------------------------------------------------------------------------


def test_the_run_command_serves_the_sample_jobs_until_ctrl_c(tmp_path: Path) -> None:
    run_command, _test = readme_commands()
    install, serve = run_command.split(" && ")
    assert install == "python3 -m pip install -e ."
    words = shlex.split(serve)
    assert words[0] == "webjobsd"
    shutil.copytree(REPO_ROOT / "sample_jobs", tmp_path / "sample_jobs")
    port = free_loopback_port()
    # The installed `webjobsd` script is this package's `python -m webjobsd`; the port is free
    # one rather than the default, which another daemon on this machine may hold.
    log = tmp_path / "daemon.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "webjobsd", *words[1:], "--listen", f"127.0.0.1:{port}"],
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_sync(lambda: ready(port), timeout=20, what="daemon ready")
        data = tmp_path / ".demo-site" / "data" / "jobs" / "continuous"

        def running() -> bool:
            statuses = [path.read_text() for path in data.glob("*/status_*")]
            return len(statuses) == 2 and all('"Running"' in text for text in statuses)

        wait_for_sync(running, timeout=20, what="both sample continuous jobs running")
        # "the user and password the daemon generated for it are in ...credentials.json"
        stored = json.loads((tmp_path / CREDENTIALS_FILE).read_text())
        pair = base64.b64encode(f"{stored['username']}:{stored['password']}".encode()).decode()
        dashboard = urllib.request.Request(
            f"http://127.0.0.1:{port}/dashboard/", headers={"Authorization": f"Basic {pair}"}
        )
        with urllib.request.urlopen(dashboard, timeout=10) as response:
            assert response.status == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, log.read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
