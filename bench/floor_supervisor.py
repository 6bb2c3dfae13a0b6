"""The least a supervisor on webjobsd's stack can do: the `floor` row of scenarios 2 and 7.

    python3 bench/floor_supervisor.py SCRIPT...

Imports what webjobsd's design prescribes (aiohttp.web, watchdog's inotify observer, PyYAML,
structlog), then, in one event loop: spawns every SCRIPT with bash, one after the other, the
way a supervisor must (stdin from /dev/null, stdout and stderr on pipes, a session of its own,
no inherited descriptor), and spawns a script again the moment its process exits (the exit is
seen through a pidfd). Nothing else: no folder is read or copied, no log written, no status
kept, no API served, and the pipes are never read (the bench's sleepers print nothing).
SIGTERM ends it, with its jobs' process groups.

So no manager on this stack starts, restarts or holds jobs for less, on the same machine: a
target under this row's figure cannot be met there, and a manager's figure above it is what
its own work costs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp.web  # noqa: F401  (imported for its cost: the floor is that of the stack)
import structlog  # noqa: F401
import watchdog.observers.inotify  # noqa: F401
import yaml  # noqa: F401


def _spawn(script: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["bash", os.path.basename(script)],
        cwd=os.path.dirname(script) or ".",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


class Floor:
    def __init__(self, loop: asyncio.AbstractEventLoop, scripts: list[str]) -> None:
        self._loop = loop
        self._scripts = scripts
        self._running: dict[int, tuple[subprocess.Popen[bytes], int]] = {}  # pidfd -> (child, job)

    def start(self, index: int) -> None:
        child = _spawn(self._scripts[index])
        pidfd = os.pidfd_open(child.pid)
        self._running[pidfd] = (child, index)
        self._loop.add_reader(pidfd, self._exited, pidfd)

    def _exited(self, pidfd: int) -> None:
        self._loop.remove_reader(pidfd)
        child, index = self._running.pop(pidfd)
        os.close(pidfd)
        child.wait()
        for pipe in (child.stdout, child.stderr):
            if pipe is not None:
                pipe.close()
        self.start(index)

    def stop(self) -> None:
        for pidfd, (child, _index) in self._running.items():
            self._loop.remove_reader(pidfd)
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
            os.close(pidfd)
        self._running.clear()


async def main(scripts: list[str]) -> None:
    loop = asyncio.get_running_loop()
    stopped = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stopped.set_result, None)
    floor = Floor(loop, scripts)
    for index in range(len(scripts)):
        floor.start(index)
    await stopped
    floor.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
