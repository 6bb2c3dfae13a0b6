"""PostDeploymentActions (Part A #9): the site's own scripts, run after a successful sync.

Kudu runs the scripts in `SITE/site/deployments/tools/PostDeploymentActions/` after a deployment's
build (`ExternalCommandBuilder.PostBuild`); there is no web app for us to restart, so this is
where a user restarts theirs. Decisions:

* **Which files**: the executable regular files of that folder (links followed), in ordinal name
  order, as Kudu orders them; a file without an execute bit is logged as skipped, not run through
  a guessed interpreter (a README beside the scripts must not run).
* **Environment**: the daemon's environment without its secrets (`without_daemon_secrets`, as a
  job gets it), the site's app settings, and `DEPLOYMENT_ID`, `DEPLOYMENT_TARGET` and
  `WEBROOT_PATH`. The working folder is wwwroot. The daemon's user runs them (they belong to
  whoever may write the deployments folder: the site's administrators).
* **Output**: stdout and stderr merged, line by line into the deployment log as it comes.
* **Failure**: a non-zero exit, a script that cannot be started, or one that runs past the
  timeout (its process group is killed) fails the deployment, and the scripts after it do not
  run. Output from processes the script left in the background is read for `_DRAIN_S` after the
  script exits, then no longer (they are left alone: starting a server is a plausible action).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ACTION_TIMEOUT_S: Final = 600.0
_DRAIN_S: Final = 2.0
_LINE_LIMIT: Final = 1024 * 1024

Emit = Callable[[str, bool], object]  # (line, is_error)


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    path: Path


def find_actions(folder: Path) -> tuple[list[Action], list[str]]:
    """The scripts to run in order, and the names skipped because they are not executable."""
    try:
        entries = sorted(folder.iterdir(), key=lambda path: path.name)
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    actions, skipped = [], []
    for path in entries:
        if not path.is_file():
            continue
        if os.access(path, os.X_OK):
            actions.append(Action(path.name, path))
        else:
            skipped.append(path.name)
    return actions, skipped


async def run_action(
    action: Action,
    *,
    cwd: Path,
    environ: Mapping[str, str],
    timeout_s: float,
    emit: Emit,
) -> str | None:
    """Run one script; None when it succeeded, else why it failed."""
    try:
        process = await asyncio.create_subprocess_exec(
            str(action.path),
            cwd=cwd if cwd.is_dir() else None,
            env=dict(environ),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            limit=_LINE_LIMIT,
        )
    except OSError as error:
        return f"PostDeploymentAction '{action.name}' could not be started: {error.strerror}."
    assert process.stdout is not None
    stdout = process.stdout

    async def forward() -> None:
        while True:
            try:
                line = await stdout.readline()
            except ValueError:  # a line past the limit: pass it on in pieces
                line = await stdout.read(_LINE_LIMIT)
            if not line:
                return
            emit(line.decode("utf-8", "replace").rstrip("\r\n"), False)

    reader = asyncio.create_task(forward(), name=f"post-deployment-{action.name}")
    try:
        code = await asyncio.wait_for(process.wait(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        await _drain(reader)
        return f"PostDeploymentAction '{action.name}' timed out after {timeout_s:g} s."
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        raise
    await _drain(reader)
    if code != 0:
        return f"PostDeploymentAction '{action.name}' failed with exit code {code}."
    return None


async def _drain(reader: asyncio.Task[None]) -> None:
    done, _ = await asyncio.wait({reader}, timeout=_DRAIN_S)
    if not done:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
