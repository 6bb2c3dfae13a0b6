"""One job process: spawn it in its own session, capture its output, walk the stop ladder.

This and `proctree` are the only modules that start or signal processes. A `JobProcess` is
used once: spawned, waited for, and either allowed to exit or stopped. Whatever the way it ends,
`close()` guarantees that no member of its tree survives and the child is reaped.

Stop ladder (Part A #11): shutdown file (continuous jobs) and SIGTERM to the process group and to
any escaped descendant, wait up to `stopping_wait_time`, then SIGKILL whatever is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import structlog

from webjobsd.records.joblog import capture_stream
from webjobsd.runtime import proctree
from webjobsd.runtime.proctree import TOKEN_VARIABLE, ProcessIdentity

log = structlog.get_logger("webjobsd.process")

# How long pipes may stay open after the leader exited (a descendant holding them) before the
# remaining members are killed and capture gives up.
_DRAIN_AFTER_EXIT_S = 1.0
_MEMBER_POLL_S = 0.05

LinesCallback = Callable[[list[bytes]], None]


class JobProcess:
    def __init__(
        self,
        process: asyncio.subprocess.Process,
        identity: ProcessIdentity,
        captures: list[asyncio.Task[None]],
        argv: Sequence[str] = (),
    ) -> None:
        self.argv = tuple(argv)
        self._process = process
        self.identity = identity
        self._captures = captures
        self.started_monotonic = time.monotonic()
        self.last_activity_monotonic = self.started_monotonic

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        token: str,
        on_stdout: LinesCallback,
        on_stderr: LinesCallback,
        max_line_bytes: int,
    ) -> JobProcess:
        """Start `argv` in a new session. Raises OSError when the program cannot be started."""
        full_env = dict(env)
        full_env[TOKEN_VARIABLE] = token
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=str(cwd),
            env=full_env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        # With start_new_session the child is its own group leader: pgid == pid. The create time
        # is read now, while the pid cannot have been reused (we have not reaped it).
        identity = proctree.identity_of(process.pid, token) or ProcessIdentity(
            pid=process.pid, pgid=process.pid, create_time=0.0, token=token
        )
        job = cls(process, identity, [], argv)
        assert process.stdout is not None and process.stderr is not None
        for reader, callback, label in (
            (process.stdout, on_stdout, "stdout"),
            (process.stderr, on_stderr, "stderr"),
        ):
            task = asyncio.create_task(
                capture_stream(
                    reader,
                    callback,
                    max_line_bytes=max_line_bytes,
                    on_activity=job._touch,
                ),
                name=f"capture-{label}-{process.pid}",
            )
            job._captures.append(task)
        return job

    def _touch(self) -> None:
        self.last_activity_monotonic = time.monotonic()

    async def wait(self) -> int:
        """Wait for the leader to exit, then end its leftovers and drain its output."""
        code = await self._process.wait()
        await self._end_leftovers()
        return code

    async def _end_leftovers(self) -> None:
        # The job is over: anything of its tree still running is an orphan-to-be.
        await asyncio.to_thread(proctree.signal_members, self.identity, signal.SIGKILL)
        _, pending = await asyncio.wait(self._captures, timeout=_DRAIN_AFTER_EXIT_S)
        for task in pending:
            task.cancel()
        for task in self._captures:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def stop(self, wait_s: float, shutdown_file: Path | None = None) -> bool:
        """Walk the ladder. Returns True if the tree ended within `wait_s` without SIGKILL."""
        if self._process.returncode is None:
            if shutdown_file is not None:
                write_shutdown_file(shutdown_file)
            await asyncio.to_thread(proctree.signal_members, self.identity, signal.SIGTERM)
        graceful = await self._wait_tree_gone(wait_s)
        if not graceful:
            await asyncio.to_thread(proctree.signal_members, self.identity, signal.SIGKILL)
        await self.wait()
        return graceful

    async def _wait_tree_gone(self, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        try:
            await asyncio.wait_for(asyncio.shield(self._process.wait()), timeout=wait_s)
        except TimeoutError:
            return False
        # The leader is gone; give its descendants the rest of the grace period.
        while time.monotonic() < deadline:
            members = await asyncio.to_thread(proctree.find_members, self.identity)
            if not members:
                return True
            await asyncio.sleep(_MEMBER_POLL_S)
        return not await asyncio.to_thread(proctree.find_members, self.identity)

    async def kill(self) -> None:
        """The forced path: SIGKILL now, reap, drain."""
        await asyncio.to_thread(proctree.signal_members, self.identity, signal.SIGKILL)
        await self.wait()

    async def close(self) -> None:
        """Guarantee: nothing of this tree survives, the child is reaped, captures finished.

        Safe to call from `finally` even after a cancellation.
        """
        if self._process.returncode is None:
            await asyncio.to_thread(proctree.signal_members, self.identity, signal.SIGKILL)
        await self.wait()


def write_shutdown_file(path: Path) -> None:
    """Kudu's shutdown notification: the file appears, its content is the current UTC time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(datetime.now(UTC).isoformat())
    except OSError as error:
        log.warning("cannot write shutdown file", file=str(path), error=str(error))


def exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def free_loopback_port() -> int:
    """Kudu's WEBJOBS_PORT: bind port 0 on loopback, read the port, close."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
