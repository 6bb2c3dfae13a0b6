"""Strict, leak-proof tests: every test fails if it leaves a child process or an asyncio task."""

from __future__ import annotations

import asyncio
import compileall
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import Site, processes_with_marker


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the package once: the suite starts about 150 daemon and CLI processes, and where
    PYTHONDONTWRITEBYTECODE is set (CI images often set it) each of them would compile webjobsd
    from source again (0.13 s of CPU each). Python reads these files with the variable set."""
    import webjobsd

    compileall.compile_dir(Path(webjobsd.__file__).parent, quiet=1)

# The daemon's own log goes to stderr; keep tests quiet unless they fail.
os.environ.setdefault("WEBJOBSD_TEST", "1")


@pytest.fixture(autouse=True)
def no_leaked_processes(tmp_path: Path) -> Iterator[None]:
    """Fail a test that leaves a child, or any job process (even one that left its session)."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leaked: list[str] = []

    def gone_or_kill(proc: psutil.Process) -> None:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                leaked.append(f"zombie {proc.pid}")
                return
            leaked.append(f"{proc.pid} {' '.join(proc.cmdline())}")
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
        except psutil.Error:
            pass

    for proc in me.children(recursive=True):
        if proc.pid not in before:
            try:
                proc.wait(2)
                continue
            except psutil.TimeoutExpired:
                gone_or_kill(proc)
            except psutil.Error:
                continue
    for pid in processes_with_marker(f"@{tmp_path}".encode()):
        try:
            gone_or_kill(psutil.Process(pid))
        except psutil.Error:
            pass
    assert not leaked, f"test leaked processes: {leaked}"


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    yield
    current = asyncio.current_task()
    # Give cancelled tasks one loop turn to finish unwinding before judging.
    for _ in range(3):
        leftovers = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not leftovers:
            break
        await asyncio.sleep(0)
    leftovers = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for task in leftovers:
        task.cancel()
    assert not leftovers, f"test leaked asyncio tasks: {[t.get_name() for t in leftovers]}"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)
