"""One job process: spawn it in its own session, capture its output, walk the stop ladder.

This and `proctree` are the only modules that start or signal processes. A `JobProcess` is
used once: spawned, waited for, and either allowed to exit or stopped. Whatever the way it ends,
`close()` guarantees that no member of its tree that we can find survives, the child is reaped and
our ends of its pipes are closed.

Stop ladder (Part A #11): shutdown file (continuous jobs) and SIGTERM to the process group and to
any escaped descendant, wait up to `stopping_wait_time`, then SIGKILL whatever is left.

Why a protocol of our own: on Python 3.11 `asyncio.subprocess.Process.wait()` returns only once
the child's stdout and stderr are closed, so a job whose background child keeps the pipes open
would look alive forever after it exited. The exit is taken from `process_exited()` instead, and
the pipes are drained with a deadline. The protocol also hands each chunk read from a pipe
straight to its `OutputCapture` (no StreamReader and no reading task in between: every byte of
output is copied once by the read, and a chunk costs one loop turn less), and a pipe that
carries a lot is enlarged (`pipesize`), so a job that writes fast blocks less often and each
read takes more. A pipe that floods (still full when read once enlarged) is then read by a thread
of its own (`pipereader`): large reads, and no loop turn per chunk.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from webjobsd.records.joblog import OutputCapture
from webjobsd.runtime import pipereader, pipesize, proctree
from webjobsd.runtime.loopbatch import LoopBatch, Outcome
from webjobsd.runtime.pipereader import Ending, PipeReader
from webjobsd.runtime.proctree import TOKEN_VARIABLE, ProcessIdentity
from webjobsd.runtime.runas import RunAs

log = structlog.get_logger("webjobsd.process")

# How long pipes may stay open after the leader exited (a descendant holding them) before
# capture gives up on them.
_DRAIN_AFTER_EXIT_S = 1.0
# Pipes still open this long after the leftovers were killed: kill again (and at the deadline).
_SECOND_LOOK_S = 0.1
_TREE_POLL_S = 0.05
# After the leader's exit, how long `wait_exit` waits for the pipes' EOF before it decides that
# a descendant holds them.
_OUTPUT_END_GRACE_S = 0.01
# proctree's scan is a snapshot: a member may fork between the scan and the signal.
_KILL_ROUNDS = proctree.KILL_ROUNDS

# Complete lines of output as one block of bytes (`LineSplitter.feed_block`).
BlockCallback = Callable[[bytes], None]


class _Activity:
    """When the job last wrote anything: set by its captures, read for idle timeouts."""

    def __init__(self, now: float) -> None:
        self.last_monotonic = now

    def touch(self) -> None:
        self.last_monotonic = time.monotonic()


class _JobProtocol(asyncio.SubprocessProtocol):
    """The child's exit and its output pipes, as they happen."""

    def __init__(self, loop: asyncio.AbstractEventLoop, captures: dict[int, OutputCapture]) -> None:
        self._transport: asyncio.SubprocessTransport | None = None
        self._loop = loop
        self._captures = captures
        # Pipes read by a thread now (see `pipereader`); the loop does not read them meanwhile.
        self._readers: dict[int, PipeReader] = {}
        self.exited: asyncio.Future[int] = loop.create_future()
        # Completed when the pipe of that fd reaches EOF (or is closed by us).
        self.pipes_done: dict[int, asyncio.Future[None]] = {
            fd: loop.create_future() for fd in captures
        }
        # Bytes each pipe carried until it was enlarged (or could not be); see `pipesize`.
        self._carried = dict.fromkeys(captures, 0)
        self._enlarged: set[int] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self._transport = transport

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        capture = self._captures.get(fd)
        if capture is None:
            return
        carried = self._carried.get(fd)
        if carried is not None:
            carried += len(data)
            self._carried[fd] = carried
            if carried >= pipesize.ENLARGE_AFTER_BYTES:
                del self._carried[fd]  # one try per pipe
                self._enlarge(fd)
        try:
            capture.feed(bytes(data))
        except Exception:
            # A log that cannot take the output must not stop the reading: the job would
            # block on a full pipe. The writer already counts and reports its own I/O errors.
            log.exception("output capture failed", fd=fd)
        if (
            fd not in self._carried
            and len(data) >= pipereader.FLOOD_READ_BYTES
            and pipereader.available()
        ):
            self._hand_to_thread(fd, capture)

    def _hand_to_thread(self, fd: int, capture: OutputCapture) -> None:
        pipe = self._transport.get_pipe_transport(fd) if self._transport is not None else None
        if not isinstance(pipe, asyncio.ReadTransport) or pipe.is_closing():
            return
        pipe.pause_reading()
        reader = PipeReader(
            pipe.get_extra_info("pipe").fileno(),
            capture,
            self._loop,
            lambda ending: self._reader_ended(fd, ending),
        )
        self._readers[fd] = reader
        reader.start()

    def _reader_ended(self, fd: int, ending: Ending) -> None:
        del self._readers[fd]
        pipe = self._transport.get_pipe_transport(fd) if self._transport is not None else None
        if not isinstance(pipe, asyncio.ReadTransport) or pipe.is_closing():
            self._pipe_done(fd)
        elif ending is Ending.IDLE:
            pipe.resume_reading()
        else:
            pipe.close()  # pipe_connection_lost follows; the capture is already closed

    def _enlarge(self, fd: int) -> None:
        pipe = self._transport.get_pipe_transport(fd) if self._transport is not None else None
        if pipe is not None and pipesize.budget().enlarge(pipe.get_extra_info("pipe").fileno()):
            self._enlarged.add(fd)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd in self._enlarged:
            self._enlarged.discard(fd)
            pipesize.budget().give_back()
        reader = self._readers.get(fd)
        if reader is not None:  # not our doing: the reader ends and closes the capture
            reader.stop()
            return
        capture = self._captures.get(fd)
        if capture is not None:
            try:
                capture.close()
            except Exception:
                log.exception("output capture failed", fd=fd)
        self._pipe_done(fd)

    def _pipe_done(self, fd: int) -> None:
        done = self.pipes_done.get(fd)
        if done is not None and not done.done():
            done.set_result(None)

    def process_exited(self) -> None:
        transport = self._transport
        code = transport.get_returncode() if transport is not None else None
        if not self.exited.done():
            self.exited.set_result(code if code is not None else -1)

    def close_pipes(self) -> None:
        """Stop reading output (a descendant keeps a pipe open after the job ended)."""
        transport = self._transport
        for fd in self.pipes_done:
            reader = self._readers.get(fd)
            if reader is not None:
                reader.stop()  # the pipe is closed once the thread is done with it
                continue
            pipe = transport.get_pipe_transport(fd) if transport is not None else None
            if pipe is not None:
                pipe.close()  # calls pipe_connection_lost on the next loop turn
            elif not self.pipes_done[fd].done():
                self.pipes_done[fd].set_result(None)


class JobProcess:
    def __init__(
        self,
        transport: asyncio.SubprocessTransport,
        protocol: _JobProtocol,
        identity: ProcessIdentity,
        argv: Sequence[str],
        activity: _Activity,
    ) -> None:
        self.argv = tuple(argv)
        self._transport = transport
        self._protocol = protocol
        self.identity = identity
        self._activity = activity
        self._finished: asyncio.Task[int] | None = None
        self.started_monotonic = activity.last_monotonic

    @property
    def last_activity_monotonic(self) -> float:
        """When the job last wrote output (or started), for idle timeouts."""
        return self._activity.last_monotonic

    @property
    def pid(self) -> int:
        return self.identity.pid

    @property
    def finished(self) -> bool:
        """The tree was ended, the child reaped and the output drained (`wait` completed)."""
        return self._finished is not None and self._finished.done()

    @property
    def returncode(self) -> int | None:
        exited = self._protocol.exited
        return exited.result() if exited.done() else None

    @property
    def leader_exit(self) -> asyncio.Future[int]:
        """Completes with the exit code as the leader exits, before its output has ended
        (`wait_exit`). For done callbacks only: never cancel it, await `wait_exit` instead."""
        return self._protocol.exited

    @property
    def output_ended(self) -> bool:
        """Both pipes reached EOF (or were closed by us): the output has ended."""
        return all(done.done() for done in self._protocol.pipes_done.values())

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        token: str,
        on_stdout: BlockCallback,
        on_stderr: BlockCallback,
        max_line_bytes: int,
        run_as: RunAs | None = None,
    ) -> JobProcess:
        """Start `argv` in a new session. Raises OSError when the program cannot be started."""
        loop = asyncio.get_running_loop()
        full_env = dict(env)
        full_env[TOKEN_VARIABLE] = token
        identity_kwargs: dict[str, Any] = {}
        if run_as is not None:
            full_env.update(run_as.environment())
            identity_kwargs = {
                "user": run_as.uid,
                "group": run_as.gid,
                "extra_groups": list(run_as.groups),
            }
        activity = _Activity(time.monotonic())
        captures = {
            fd: OutputCapture(callback, max_line_bytes=max_line_bytes, on_activity=activity.touch)
            for fd, callback in ((1, on_stdout), (2, on_stderr))
        }
        transport, protocol = await loop.subprocess_exec(
            lambda: _JobProtocol(loop, captures),
            *argv,
            cwd=str(cwd),
            env=full_env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            **identity_kwargs,
        )
        pid = transport.get_pid()
        # With start_new_session the child leads its own group: pgid == pid. The start time is
        # read now, while the pid cannot have been reused (it has not been reaped).
        identity = proctree.identity_of(pid, token) or ProcessIdentity(
            pid=pid, pgid=pid, create_time=0.0, token=token
        )
        return cls(transport, protocol, identity, argv, activity)

    async def wait(self) -> int:
        """Wait for the leader to exit, then end its leftovers and drain its output.

        Safe to call several times and from several tasks: the work happens once.
        """
        return await asyncio.shield(self._start_finish())

    def _start_finish(self) -> asyncio.Task[int]:
        if self._finished is None:
            self._finished = asyncio.create_task(self._finish(), name=f"finish-{self.pid}")
        return self._finished

    async def wait_exit(self) -> int:
        """Wait for the leader to exit and its output to end; returns its exit code.

        Unlike `wait`, the leftovers are not looked for: the owner calls `wait` (or `close`)
        later, when the scan of `/proc` (milliseconds, proportional to the processes on the
        host) no longer delays anything. The output has ended when both pipes reached EOF,
        which for a leader alone happens as it exits; when a descendant still holds a pipe,
        the whole finish (`wait`) runs now, since ending the holders is what ends the output.
        """
        code = await asyncio.shield(self._protocol.exited)
        pending = [done for done in self._protocol.pipes_done.values() if not done.done()]
        if pending:
            # The exit and the pipes' EOF are separate events: give the EOF its loop turn.
            _, still = await asyncio.wait(pending, timeout=_OUTPUT_END_GRACE_S)
            if still:
                return await self.wait()
        return code

    async def _finish(self) -> int:
        code = await self._protocol.exited
        # The job is over: anything of its tree still running is an orphan-to-be.
        await proctree.akill_members(self.identity)
        pending = set(self._protocol.pipes_done.values())
        for wait_s in (_SECOND_LOOK_S, _DRAIN_AFTER_EXIT_S - _SECOND_LOOK_S):
            _, pending = await asyncio.wait(pending, timeout=wait_s)
            if not pending:
                break
            # Something still holds the output. A scan can miss a descendant caught between
            # fork and exec (its environ reads empty for that instant): look again.
            await proctree.akill_members(self.identity)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=_SECOND_LOOK_S)
        if pending:
            self._protocol.close_pipes()
            await asyncio.wait(pending)
        self._transport.close()
        return code

    async def stop(self, wait_s: float, shutdown_file: Path | None = None) -> bool:
        """Walk the ladder. Returns True if the tree ended within `wait_s` without SIGKILL.

        Every step that touches /proc or the disk is batched with the other jobs stopping at the
        same time (`proctree`'s `a*` coroutines, `_SHUTDOWN_FILES`): a wave of stops costs a few
        host scans and thread tasks in all, not a few per job.
        """
        if self.returncode is None and shutdown_file is not None:
            await _SHUTDOWN_FILES.submit(shutdown_file)
        await proctree.asignal_members(self.identity, signal.SIGTERM)
        graceful = await self._wait_tree_gone(wait_s)
        if not graceful:
            await proctree.akill_members(self.identity)
        await self.wait()
        return graceful

    async def _wait_tree_gone(self, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        # The leader's exit is an event: no polling for it.
        if self.returncode is None:
            try:
                await asyncio.wait_for(asyncio.shield(self._protocol.exited), timeout=wait_s)
            except TimeoutError:
                return False
        # Then the rest of the tree, group and escaped alike. Not `killpg(pgid, 0)`: it succeeds
        # while a zombie is still in the group, and an orphaned zombie waits for *its* reaper
        # (init, which may take a second): the scan counts only processes that can still run.
        while await proctree.afind_members(self.identity):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_TREE_POLL_S)
        return True

    async def kill(self) -> None:
        """The forced path: SIGKILL now, reap, drain."""
        await proctree.akill_members(self.identity)
        await self.wait()

    async def close(self) -> None:
        """Guarantee: nothing of this tree that we can find survives, the child is reaped,
        captures finished and pipes closed. Safe to call from `finally` after a cancellation."""
        if self.returncode is None:
            await proctree.akill_members(self.identity)
        await self.wait()


class StartedProcesses:
    """Every process an owner (the supervisor) started and has not seen finished.

    The owner's last word at shutdown (`end_unfinished`): whatever path its stops took (a
    cancelled stop, a kill still queued for a thread, a start that completed late), nothing it
    started outlives it.
    """

    def __init__(self) -> None:
        self._processes: list[JobProcess] = []
        self._pruned_at = 0

    def add(self, process: JobProcess) -> None:
        self._processes.append(process)
        # Amortised: the finished ones are dropped each time the list has doubled.
        if len(self._processes) > 2 * self._pruned_at + 16:
            self._processes = [known for known in self._processes if not known.finished]
            self._pruned_at = len(self._processes)

    def unfinished(self) -> list[JobProcess]:
        return [known for known in self._processes if not known.finished]

    def end_unfinished(self) -> int:
        """SIGKILL every member of every unfinished tree, in rounds (bounded) until a scan finds
        none left; returns how many processes the first round reached. Blocking: see
        `Supervisor.shutdown` for why it runs on the loop's thread."""
        identities = [known.identity for known in self.unfinished()]
        reached = 0
        for round_number in range(_KILL_ROUNDS):
            targeted = proctree.signal_jobs(identities, signal.SIGKILL)
            if round_number == 0:
                reached = targeted
            if not targeted:
                break
        return reached


def stop_tree_blocking(
    identity: ProcessIdentity, wait_s: float, shutdown_file: Path | None = None
) -> bool:
    """The stop ladder without the event loop: shutdown file, SIGTERM, wait, SIGKILL. Returns
    True if the tree ended within `wait_s` without SIGKILL.

    For a caller that must not depend on the loop (fencing, `runtime.lockguard`): a loop blocked
    on a hung share must not delay the kill. Only /proc and signals are used (and the shutdown
    file, under the local temp folder). Reaping stays the owner's: the leader, once dead, is a
    zombie that `proctree` does not count.
    """
    if shutdown_file is not None:
        write_shutdown_file(shutdown_file)
    proctree.signal_members(identity, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while proctree.find_members(identity):
        if time.monotonic() >= deadline:
            for _ in range(_KILL_ROUNDS):
                if not proctree.signal_members(identity, signal.SIGKILL):
                    break
            return False
        time.sleep(_TREE_POLL_S)
    return True


def write_shutdown_file(path: Path) -> None:
    """Kudu's shutdown notification: the file appears, its content is the current UTC time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(datetime.now(UTC).isoformat())
    except OSError as error:
        log.warning("cannot write shutdown file", file=str(path), error=str(error))


def _write_shutdown_files(paths: Sequence[Path]) -> list[Outcome[None]]:
    for path in paths:
        write_shutdown_file(path)  # logs its own failure: the ladder goes on without the file
    return [None for _ in paths]


# The shutdown files of a wave of stops, written by one thread task: a mkdir and a write each,
# about 0.3 ms on a slow disk, which at a thousand jobs would hold the loop for 0.3 s.
_SHUTDOWN_FILES: LoopBatch[Path, None] = LoopBatch(_write_shutdown_files, "shutdown files")


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
