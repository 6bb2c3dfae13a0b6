"""systemd integration: the notify protocol over a real datagram socket, the watchdog loop, systemd
credentials, and the unit files checked by systemd's own tools where they are installed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from webjobsd.notify import SystemdNotifier, heartbeat_is_recent, watchdog_loop
from webjobsd.systemd_credentials import PASSWORD_CREDENTIAL, credential_from_systemd

REPO_ROOT = Path(__file__).resolve().parents[1]
SYSTEMD_DIR = REPO_ROOT / "systemd"


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket in tmp_path, standing in for systemd; (socket, address)."""
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) >= 108:  # sun_path limit
        pytest.skip(f"tmp_path too long for an AF_UNIX address: {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield sock, str(path)
    finally:
        sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    name = f"webjobsd-test-{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def recv_one(sock: socket.socket, timeout_s: float = 5.0) -> dict[str, str]:
    """The next datagram as {KEY: VALUE}, waiting at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AssertionError("no notify message within the deadline") from None
            select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
            continue
        return parse(data)


def parse(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().split("\n") if line)


def drain(sock: socket.socket) -> list[dict[str, str]]:
    messages = []
    while True:
        try:
            messages.append(parse(sock.recv(4096)))
        except BlockingIOError:
            return messages


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the deadline")
        await asyncio.sleep(0.005)


# -- the protocol ----------------------------------------------------------------------------


def test_messages_reach_a_path_socket(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address})
    try:
        assert notifier.enabled
        notifier.ready("watching 3 jobs")
        assert recv_one(sock) == {"READY": "1", "STATUS": "watching 3 jobs"}
        notifier.status("line one\nREADY=1")
        # A newline cannot smuggle a second assignment into the datagram.
        assert recv_one(sock) == {"STATUS": "line one READY=1"}
        notifier.stopping()
        message = recv_one(sock)
        assert message["STOPPING"] == "1"
        notifier.watchdog()
        assert recv_one(sock) == {"WATCHDOG": "1"}
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        message = recv_one(sock)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert message["RELOADING"] == "1"
        assert before <= int(message["MONOTONIC_USEC"]) <= after
    finally:
        notifier.close()


def test_abstract_socket_address(abstract_receiver: tuple[socket.socket, str]) -> None:
    sock, address = abstract_receiver
    assert address.startswith("@")
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address})
    try:
        notifier.ready("up")
        assert recv_one(sock) == {"READY": "1", "STATUS": "up"}
        notifier.watchdog()
        assert recv_one(sock) == {"WATCHDOG": "1"}
    finally:
        notifier.close()


def test_no_notify_socket_is_a_no_op() -> None:
    notifier = SystemdNotifier.from_environ({"WATCHDOG_USEC": "100000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert notifier.send("READY=1") is False
    notifier.ready("up")
    notifier.status("x")
    notifier.stopping()
    notifier.reloading()
    notifier.watchdog()
    notifier.close()


def test_send_errors_are_logged_once_and_never_raised(tmp_path: Path) -> None:
    notifier = SystemdNotifier(str(tmp_path / "nobody-listens.sock"))
    try:
        with capture_logs() as logs:
            assert notifier.send("READY=1") is False
            notifier.watchdog()
            notifier.status("still fine")
        warnings = [entry for entry in logs if entry["log_level"] == "warning"]
        assert len(warnings) == 1, logs
        assert warnings[0]["event"] == "cannot notify systemd"
    finally:
        notifier.close()


def test_watchdog_interval_is_half_the_timeout(receiver: tuple[socket.socket, str]) -> None:
    _, address = receiver
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000"}
    assert SystemdNotifier.from_environ(env).watchdog_interval_s == 15.0
    mine = {**env, "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier.from_environ(mine).watchdog_interval_s == 15.0
    for bad in ("0", "-5", "soon", ""):
        assert (
            SystemdNotifier.from_environ({**env, "WATCHDOG_USEC": bad}).watchdog_interval_s is None
        )


async def test_watchdog_pid_of_another_process_disables_pings(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, address = receiver
    other = os.getppid() if os.getppid() != os.getpid() else 1
    notifier = SystemdNotifier.from_environ(
        {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(other)}
    )
    try:
        assert notifier.watchdog_interval_s is None
        # No watchdog for us: the loop has nothing to do and returns at once.
        await asyncio.wait_for(watchdog_loop(notifier, lambda: True), timeout=5)
        assert drain(sock) == []
        # READY/STATUS still flow: only the watchdog belongs to WATCHDOG_PID.
        notifier.ready("up")
        assert recv_one(sock)["READY"] == "1"
    finally:
        notifier.close()


async def test_watchdog_loop_pings_only_while_healthy(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, address = receiver
    notifier = SystemdNotifier.from_environ(
        {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert notifier.watchdog_interval_s == pytest.approx(0.05)
    healthy = True
    checks = 0

    def is_healthy() -> bool:
        nonlocal checks
        checks += 1
        return healthy

    received: list[dict[str, str]] = []

    def pings() -> int:
        received.extend(drain(sock))
        return len(received)

    task = asyncio.create_task(watchdog_loop(notifier, is_healthy), name="watchdog-test")
    try:
        await wait_until(lambda: pings() >= 3)
        assert all(message == {"WATCHDOG": "1"} for message in received)

        # The loop wedges: the health check fails from now on. Pings sent before the flip are
        # already queued (sendto is synchronous, the loop is single-threaded): drain them.
        with capture_logs() as logs:
            healthy = False
            drain(sock)
            seen = checks
            await wait_until(lambda: checks >= seen + 3)
            assert drain(sock) == [], "pinged while unhealthy"
        assert [e["event"] for e in logs if e["log_level"] == "error"] == [
            "daemon not healthy: withholding watchdog pings; systemd will restart it"
        ]

        # Recovery in time resumes the pings.
        healthy = True
        received.clear()
        await wait_until(lambda: pings() >= 1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        notifier.close()


async def test_watchdog_loop_survives_a_failing_health_check(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, address = receiver
    notifier = SystemdNotifier(address, watchdog_usec=100_000)
    calls = 0

    def broken() -> bool:
        nonlocal calls
        calls += 1
        raise RuntimeError("boom")

    with capture_logs():
        task = asyncio.create_task(watchdog_loop(notifier, broken), name="watchdog-broken")
        try:
            await wait_until(lambda: calls >= 3)
            assert not task.done()
            assert drain(sock) == []
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            notifier.close()


def test_heartbeat_is_recent() -> None:
    now = 100.0
    last: float | None = None
    healthy = heartbeat_is_recent(lambda: last, 15.0, clock=lambda: now)
    assert not healthy()  # no pass yet
    last = 90.0
    assert healthy()
    now = 105.0
    assert healthy()
    now = 105.1
    assert not healthy()
    tick = 5.0
    follows_reload = heartbeat_is_recent(lambda: last, lambda: 3 * tick, clock=lambda: now)
    assert not follows_reload()
    tick = 10.0
    assert follows_reload()


# -- credentials -----------------------------------------------------------------------------


def test_credential_from_systemd(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / PASSWORD_CREDENTIAL).write_bytes(b" s3cret pass \n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    # One trailing newline stripped; other whitespace belongs to the secret.
    assert credential_from_systemd(PASSWORD_CREDENTIAL, env) == " s3cret pass "
    assert credential_from_systemd("absent", env) is None
    assert credential_from_systemd(PASSWORD_CREDENTIAL, {}) is None
    for name in ("", ".", "..", "../etc/passwd", "a/b"):
        with pytest.raises(ValueError, match="invalid credential name"):
            credential_from_systemd(name, env)
    (creds / "binary").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        credential_from_systemd("binary", env)
    (creds / "adir").mkdir()
    with pytest.raises(ValueError, match="cannot read"):
        credential_from_systemd("adir", env)


# -- unit files ------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install systemd); unit file not verified")
    return path


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = _tool("systemd-analyze")
    unit = (SYSTEMD_DIR / "webjobsd.service").read_text()
    assert "ExecStart=/usr/local/bin/webjobsd " in unit
    # verify checks that ExecStart's binary exists; point it at one that does.
    copy = tmp_path / "webjobsd.service"
    copy.write_text(
        unit.replace("ExecStart=/usr/local/bin/webjobsd ", f"ExecStart={sys.executable} ")
    )
    result = subprocess.run(
        [tool, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    # verify exits 0 on some problems (an unknown value is "ignored"), so its stderr must not
    # mention our unit at all; lines about the host's own units are not our business.
    about_us = [line for line in result.stderr.splitlines() if "webjobsd" in line]
    assert result.returncode == 0 and not about_us, result.stderr
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "KillMode=mixed",
        "TimeoutStopSec=120",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=webjobsd",
        "LoadCredential=webjobsd-password:/etc/webjobsd/password",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/webjobsd",
    ):
        assert f"\n{line}\n" in unit, line


def test_sysusers_and_tmpfiles_snippets_apply(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    tmpfiles = _tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").touch()
    (root / "etc" / "group").touch()
    subprocess.run(
        [sysusers, f"--root={root}", str(SYSTEMD_DIR / "webjobsd.sysusers")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert (root / "etc" / "passwd").read_text().startswith("webjobsd:")
    result = subprocess.run(
        [tmpfiles, f"--root={root}", "--create", str(SYSTEMD_DIR / "webjobsd.tmpfiles")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0 and os.geteuid() != 0:
        pytest.skip(f"systemd-tmpfiles needs root to chown: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    jobs = root / "var/lib/webjobsd/site/wwwroot/App_Data/jobs"
    assert (jobs / "continuous").is_dir() and (jobs / "triggered").is_dir()
    assert (root / "etc/webjobsd").is_dir()
