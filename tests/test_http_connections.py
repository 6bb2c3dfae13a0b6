"""Connection limits of the HTTP listener against a real daemon, with real sockets: slow headers
are cut, idle connections are closed, the connection cap reclaims idle connections and refuses
cleanly when none is idle, while log streams and slow uploads go on; at a low file limit the
daemon's log stays small and it answers again once the clients leave."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.helpers import DaemonProcess, Site, wait_for, wait_for_sync
from tests.test_api_jobs import CREDENTIALS, api, basic
from tests.test_logstream import SseReader, has_line, numbers
from webjobsd.config import ConfigError, config_from_mapping

AUTH = basic(CREDENTIALS["WEBJOBSD_USERNAME"], CREDENTIALS["WEBJOBSD_PASSWORD"])
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> float:
    """Seconds until the server closed the connection (reads and drops whatever comes)."""
    started = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    return status, body


async def test_a_client_trickling_its_headers_is_cut_at_the_header_timeout(site: Site) -> None:
    """1. header_timeout_s 1, keepalive 30. 2. A client sends half a request, then one header
    byte every 0.2 s. 3. The daemon closes it after about 1 s, well before the idle timeout,
    and still answers others."""
    async with api(site, header_timeout_s=1.0, keepalive_timeout_s=30.0) as (daemon, session, base):
        assert daemon.http is not None and daemon.http.port is not None
        async with connection(daemon.http.port) as (reader, writer):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ")
            started = time.monotonic()

            async def trickle() -> None:
                with contextlib.suppress(OSError):
                    while True:
                        await asyncio.sleep(0.2)
                        writer.write(b"a")
                        await writer.drain()

            trickling = asyncio.create_task(trickle())
            try:
                await closed_by_server(reader, timeout=10)
            finally:
                trickling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await trickling
            elapsed = time.monotonic() - started
            assert 0.8 <= elapsed < 5, elapsed
        async with session.get(f"{base}/healthz") as response:
            assert response.status == 200


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    site: Site,
) -> None:
    """1. keepalive_timeout_s 1.5. 2. One request on a keep-alive connection, answered.
    3. Nothing more is sent: the daemon closes the connection after about 1.5 s. 4. A fresh
    connection that never sends anything is closed the same way."""
    async with api(site, keepalive_timeout_s=1.5, header_timeout_s=10.0) as (daemon, _s, _b):
        assert daemon.http is not None and daemon.http.port is not None
        async with connection(daemon.http.port) as (reader, writer):
            writer.write(HEALTHZ)
            status, _body = await read_response(reader)
            assert status == 200
            waited = await closed_by_server(reader, timeout=10)
            assert 1.0 <= waited < 6, waited
        async with connection(daemon.http.port) as (reader, _writer):
            waited = await closed_by_server(reader, timeout=10)
            assert 1.0 <= waited < 6, waited


async def start_upload(
    port: int, path: str, size: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A PUT whose headers are complete and whose body has only begun."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"PUT {path} HTTP/1.1\r\nHost: test\r\nAuthorization: {AUTH}\r\n"
        f"Content-Length: {size}\r\n\r\n".encode()
        + b"x"
    )
    await writer.drain()
    return reader, writer


async def test_at_the_cap_idle_connections_make_room_and_busy_ones_get_a_clean_503(
    site: Site,
) -> None:
    """1. max_connections 4. 2. Four idle keep-alive connections: a fifth client is served,
    and the connection idle the longest was closed for it. 3. Four uploads under way: a new
    client gets a 503 with a JSON message and Retry-After, and no upload is disturbed. 4. The
    uploads finish (they took longer than the header and idle timeouts): 201 each, and the
    daemon serves again."""
    config = {"max_connections": 4, "header_timeout_s": 1.0, "keepalive_timeout_s": 30.0}
    async with api(site, **config) as (daemon, session, base):
        assert daemon.http is not None and daemon.http.port is not None
        port = daemon.http.port
        idle = []
        for _ in range(4):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HEALTHZ)
            assert (await read_response(reader))[0] == 200
            idle.append((reader, writer))
        try:
            async with connection(port) as (reader, writer):
                writer.write(HEALTHZ)
                assert (await read_response(reader))[0] == 200
            assert await closed_by_server(idle[0][0], timeout=1) < 1
        finally:
            for _reader, writer in idle:
                writer.close()
        await wait_for(
            lambda: (
                daemon.http is not None
                and daemon.http.guard is not None
                and daemon.http.guard.count == 0
            ),
            what="idle connections gone",
        )

        size = 64 * 1024
        uploads = [await start_upload(port, f"/api/vfs/data/up{i}.bin", size) for i in range(4)]
        try:
            await wait_for(
                lambda: (
                    daemon.http is not None
                    and daemon.http.guard is not None
                    and daemon.http.guard.count == 4
                ),
                what="four uploads open",
            )
            async with connection(port) as (reader, writer):
                writer.write(HEALTHZ)
                status, body = await read_response(reader)
            assert status == 503
            assert "max_connections is 4" in json.loads(body)["message"]
            # The uploads go on for longer than both timeouts, a piece at a time.
            started = time.monotonic()
            sent = 1
            while time.monotonic() - started < 3.0:
                for _reader, writer in uploads:
                    writer.write(b"x" * 1024)
                    await writer.drain()
                sent += 1024
                await asyncio.sleep(0.1)
            for _reader, writer in uploads:
                writer.write(b"x" * (size - sent))
            for reader, _writer in uploads:
                status, _body = await read_response(reader)
                assert status in (200, 201, 204), status
        finally:
            for _reader, writer in uploads:
                writer.close()
        for i in range(4):
            assert (site.root / "data" / f"up{i}.bin").stat().st_size == size
        async with session.get(f"{base}/healthz") as response:
            assert response.status == 200


async def test_a_log_stream_outlives_the_header_and_idle_timeouts(site: Site) -> None:
    """1. header 0.5 s, idle 1 s. 2. A job prints a numbered line every 0.3 s. 3. Its log
    stream stays open for 4 s and keeps delivering new lines to the end."""
    site.write_job(
        "continuous",
        "ticker",
        {"run.sh": "i=0\nwhile true; do i=$((i+1)); echo n=$i; sleep 0.3; done\n"},
    )
    config = {"header_timeout_s": 0.5, "keepalive_timeout_s": 1.0}
    async with api(site, **config) as (_daemon, session, base):
        url = f"{base}/api/continuouswebjobs/ticker/logstream"
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
            assert response.status == 200
            sse = SseReader(response)
            await sse.until(has_line("n="))
            started = time.monotonic()
            seen: list[int] = []
            while time.monotonic() - started < 4.0:
                seen += numbers(await sse.until(has_line("n="), timeout=5))
            late = numbers(await sse.until(has_line("n="), timeout=5))
        assert late and late[0] > max(seen)
        assert len(seen) >= 5


def open_connections(port: int, count: int) -> list[socket.socket]:
    """Connect up to `count` times without sending anything (the kernel completes handshakes
    while its backlog has room, whether or not the daemon accepts; past that, stop). Past the
    backlog the kernel mostly drops the handshake (a timeout), but once in a dozen runs here it
    refused one instead (under load, while the daemon closed idle connections it had accepted):
    that ends the burst too. The callers check afterwards that the daemon still answers, so a
    refusal from a daemon that died does not pass unseen."""
    sockets = []
    for _ in range(count):
        try:
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        except (TimeoutError, ConnectionRefusedError):
            break
    return sockets


def healthz_status(port: int) -> int:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return int(answer.split(b" ", 2)[1]) if answer else 0
    except (OSError, ValueError, IndexError):
        return 0


def low_file_limit(limit: int, held: int = 0) -> str:
    """A preamble: the daemon runs with RLIMIT_NOFILE `limit`, `held` of them already used."""
    return (
        "import os, resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit}))\n"
        f"_held = [os.open('/dev/null', os.O_RDONLY) for _ in range({held})]\n"
    )


def log_lines(daemon: DaemonProcess) -> int:
    return len(daemon.log().splitlines())


def test_many_connections_at_a_low_file_limit_keep_the_log_small(site: Site) -> None:
    """1. The daemon runs with a file limit of 300. 2. 400 idle connections are opened and held
    for 4 s: the daemon still answers (idle connections make room), and its log stays a few
    lines (not one traceback per failed accept). 3. Once they are closed, it answers."""
    from webjobsd.runtime.jobprocess import free_loopback_port

    port = free_loopback_port()
    daemon = DaemonProcess(
        site, listen=f"127.0.0.1:{port}", log_level="info", preamble=low_file_limit(300)
    ).start()
    try:
        wait_for_sync(lambda: healthz_status(port) == 200, what="daemon answers")
        before = log_lines(daemon)
        sockets = open_connections(port, 400)
        try:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                time.sleep(0.1)
            assert log_lines(daemon) - before < 30, daemon.log()[-3000:]
            wait_for_sync(lambda: healthz_status(port) == 200, what="answers under the crowd")
        finally:
            for sock in sockets:
                sock.close()
        wait_for_sync(lambda: healthz_status(port) == 200, what="daemon answers afterwards")
    finally:
        daemon.kill_if_running()
        daemon.stop()


def test_accept_failing_for_want_of_descriptors_logs_a_line_per_interval(site: Site) -> None:
    """1. The daemon runs with a file limit of 200, 150 of them taken, so that accept() fails
    with EMFILE long before the connection cap (100). 2. 300 connections are held for 4 s: the
    log gets a few lines with a count (not one per failure, no traceback), the daemon does not
    spin. 3. Once they are closed, it answers again."""
    from webjobsd.runtime.jobprocess import free_loopback_port

    port = free_loopback_port()
    daemon = DaemonProcess(
        site,
        listen=f"127.0.0.1:{port}",
        log_level="info",
        preamble=low_file_limit(200, held=150),
    ).start()
    try:
        wait_for_sync(lambda: healthz_status(port) == 200, what="daemon answers")
        before = log_lines(daemon)
        sockets = open_connections(port, 300)
        try:
            wait_for_sync(lambda: "cannot accept connections" in daemon.log(), what="EMFILE logged")
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            for sock in sockets:
                sock.close()
        wait_for_sync(lambda: healthz_status(port) == 200, what="daemon answers afterwards")
        text = daemon.log()
        assert log_lines(daemon) - before < 30, text[-3000:]
        assert "Traceback" not in text
        failures = [
            json.loads(line) for line in text.splitlines() if "cannot accept connections" in line
        ]
        assert failures and failures[0]["errno"] == "EMFILE"
    finally:
        daemon.kill_if_running()
        daemon.stop()


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_connections", 0), ("header_timeout_s", 0), ("keepalive_timeout_s", -1.0)],
)
def test_connection_limits_must_be_positive(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"key '{key}' must be greater than 0"):
        config_from_mapping({key: value}, "test.yaml")
