"""The listening sockets, and every connection's life outside of a request handler.

This module owns accepting connections, the connection cap, the header and idle time limits and
the TLS context a new connection is given. aiohttp owns what happens once a request's headers are
in (its `RequestHandler`, built by the runner's server); the request handlers own bodies and
responses.

Why our own accept loop instead of aiohttp's `TCPSite` (asyncio's `create_server`):

* **Resource errors.** asyncio 3.11's accept loop goes on calling `accept()` after `EMFILE` within
  the same tick, logs every failure with a traceback through the loop's exception handler and
  schedules one retry per failure: at the file limit it wrote 222,315 lines (112 MB) in 80 s.
  Here the loop stops at the first resource error, gives up the connection idle the longest
  (if any) to free a descriptor, stops accepting for a moment (`RECLAIMED_PAUSE_S` when it
  freed one, else `ACCEPT_PAUSE_S`; the kernel keeps queueing in the backlog), and logs one
  line per `ERROR_LOG_INTERVAL_S` with the count. The loop's exception handler is never
  involved.
* **The cap is decided at accept time**, before any protocol exists, and a refused client gets
  an answer instead of a reset.
* **TLS reload:** each accepted socket is wrapped with the context current at that moment
  (`loop.connect_accepted_socket`), so a new certificate applies to new connections at once and
  open connections keep theirs.

Decisions (keep them):

* **Past `max_connections`**, the connection idle the longest (waiting for a request, fresh or
  after a response) is closed to make room: HTTP lets a server close an idle keep-alive
  connection at any time, clients open a new one, and nginx does the same. When none is idle
  (every one is inside a request, or sending its headers), the new client gets a `503` with
  `Retry-After` and the connection is closed. Nothing is left waiting in the kernel's backlog,
  where a client would hang without an answer. The cap is also kept at most half of the
  process's file limit (`RLIMIT_NOFILE`), so that connections alone never exhaust it.
* **The header timeout** runs from the first byte of a request to the end of its headers (a
  slowloris client sending a byte now and then is cut off), and for TLS it bounds the handshake
  too. It never applies to a request body or a response: a log stream lasts hours, an upload
  minutes, and both are their handler's business.
* **The idle timeout** is aiohttp's `keepalive_timeout`: a connection waiting for a request,
  fresh or after a response, is closed once it has waited that long.
* **A request's start and end** are seen by `track_requests`, the outermost middleware: it runs
  when the headers are complete, and aiohttp runs each request, the writing of its response
  included, in a task of its own, whose end is the end of the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import resource
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

import structlog
from aiohttp import web

log = structlog.get_logger("webjobsd.http.listener")

ACCEPT_PAUSE_S: Final = 1.0
RECLAIMED_PAUSE_S: Final = 0.05
FD_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE})
ERROR_LOG_INTERVAL_S: Final = 10.0
# Accepts per readiness event: enough to drain a burst, few enough to let other work run.
ACCEPTS_PER_WAKEUP: Final = 64
# Refused clients get their 503 and this long to read it; past this many at once, the
# newest are closed without a word (a flood must not cost file descriptors).
REFUSAL_LINGER_S: Final = 1.0
MAX_REFUSING: Final = 64


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int = 512
    header_timeout_s: float = 20.0
    keepalive_timeout_s: float = 75.0
    backlog: int = 128


def effective_cap(max_connections: int) -> int:
    """`max_connections`, but at most half of the soft file limit (see the module docstring)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft // 2))


class ThrottledLog:
    """A recurring event logged once per interval, with how many happened since the last line."""

    def __init__(self, event: str, *, level: str = "warning", interval_s: float) -> None:
        self.event = event
        self.level = level
        self.interval_s = interval_s
        self.total = 0
        self._unlogged = 0
        self._last_line: float | None = None
        self._last_hit = 0.0

    def hit(self, **fields: Any) -> None:
        self.total += 1
        self._unlogged += 1
        now = time.monotonic()
        self._last_hit = now
        if self._last_line is None or now - self._last_line >= self.interval_s:
            getattr(log, self.level)(self.event, count=self._unlogged, **fields)
            self._unlogged = 0
            self._last_line = now

    def settle(self, event: str, quiet_s: float) -> None:
        """The condition ended (nothing for `quiet_s`): one line with what was not logged yet,
        and a fresh start. Successes between failures are not an end: under a flood, every
        other accept succeeds."""
        if self._last_line is None or time.monotonic() - self._last_hit < quiet_s:
            return
        log.info(event, unlogged=self._unlogged, total=self.total)
        self._unlogged = 0
        self._last_line = None


class ConnectionState(Enum):
    HANDSHAKE = "handshake"  # accepted, not yet handed to aiohttp (with TLS: the handshake)
    IDLE = "idle"  # waiting for a request (fresh, or after a response)
    HEADERS = "headers"  # a request's first bytes arrived, its headers are not complete
    BUSY = "busy"  # a request handler runs or its response is being written


class GuardedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, wrapped: it forwards everything and keeps the
    connection's state, and cuts a request whose headers take too long."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self.state = ConnectionState.HANDSHAKE
        self.idle_since = time.monotonic()
        self._transport: asyncio.Transport | None = None
        self._header_deadline: asyncio.TimerHandle | None = None

    # -- transport events, forwarded -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._become_idle()
        self._guard.opened(self)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if data and self.state is ConnectionState.IDLE:
            self.state = ConnectionState.HEADERS
            self._header_deadline = asyncio.get_running_loop().call_later(
                self._guard.limits.header_timeout_s, self._headers_too_slow
            )
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        self._guard.closed(self)
        self._transport = None
        self._inner.connection_lost(exc)

    # -- requests (from `track_requests`) ---------------------------------------------------

    def request_started(self) -> None:
        self._cancel_header_deadline()
        self.state = ConnectionState.BUSY

    def request_finished(self) -> None:
        if self.state is ConnectionState.BUSY:
            self._become_idle()

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _become_idle(self) -> None:
        self.state = ConnectionState.IDLE
        self.idle_since = time.monotonic()

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.state is ConnectionState.HEADERS:
            self._guard.header_timeouts.hit(timeout_s=self._guard.limits.header_timeout_s)
            self.close()

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None


def refusal(max_connections: int) -> bytes:
    body = (
        f'{{"message": "Too many connections (max_connections is {max_connections}); '
        'try again shortly."}'
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body


class RefusedConnection(asyncio.Protocol):
    """Past the cap: a 503, then the connection ends once read or after `REFUSAL_LINGER_S`.

    The request is read and dropped until the client closes, because closing a socket with
    unread bytes sends a reset that can destroy the answer before the client reads it.
    """

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._timer: asyncio.TimerHandle | None = None
        self._ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(refusal(self._guard.cap))
        if transport.can_write_eof():
            transport.write_eof()
            self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.abort)
        else:
            transport.close()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.ended()

    def ended(self) -> None:
        if not self._ended:
            self._ended = True
            self._guard.refusal_ended()


class ConnectionGuard:
    """The connections of one server: counts them, enforces the cap, wraps the TLS handshake."""

    def __init__(
        self,
        handler_factory: Callable[[], asyncio.Protocol],
        limits: ConnectionLimits,
        tls: ssl.SSLContext | None,
    ) -> None:
        self._handler_factory = handler_factory
        self.limits = limits
        self.tls = tls
        self.cap = effective_cap(limits.max_connections)
        self._starting: set[asyncio.Task[None]] = set()
        self._open: dict[GuardedConnection, None] = {}  # insertion-ordered set
        self._refusing = 0
        self.refused = ThrottledLog(
            "connection refused: too many connections", interval_s=ERROR_LOG_INTERVAL_S
        )
        self.header_timeouts = ThrottledLog(
            "connection closed: request headers too slow",
            level="info",
            interval_s=ERROR_LOG_INTERVAL_S,
        )
        self.handshake_failures = ThrottledLog(
            "TLS handshake failed", level="info", interval_s=ERROR_LOG_INTERVAL_S
        )

    @property
    def count(self) -> int:
        return len(self._starting) + len(self._open)

    def admit(self, sock: socket.socket) -> None:
        """A socket was accepted: hand it to aiohttp, or refuse it when full."""
        if self.count >= self.cap and not self.reclaim_idle():
            self.refused.hit(max_connections=self.cap)
            if self._refusing >= MAX_REFUSING:
                sock.close()
                return
            self._refusing += 1
            self._start(sock, RefusedConnection(self))
            return
        self._start(sock, GuardedConnection(self, self._handler_factory()))

    def reclaim_idle(self) -> bool:
        """Close the connection idle the longest, if any is idle."""
        idle = [c for c in self._open if c.state is ConnectionState.IDLE]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.idle_since)
        # Forgotten at once: its file descriptor is closed within this loop iteration.
        self._open.pop(oldest, None)
        oldest.close()
        return True

    def refusal_ended(self) -> None:
        self._refusing -= 1

    def _start(self, sock: socket.socket, protocol: asyncio.Protocol) -> None:
        task = asyncio.get_running_loop().create_task(
            self._connect(sock, protocol), name="http-connection-start"
        )
        if isinstance(protocol, GuardedConnection):
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _connect(self, sock: socket.socket, protocol: asyncio.Protocol) -> None:
        loop = asyncio.get_running_loop()
        tls = self.tls
        try:
            await loop.connect_accepted_socket(
                lambda: protocol,
                sock,
                ssl=tls,
                ssl_handshake_timeout=self.limits.header_timeout_s if tls else None,
            )
        except (OSError, ssl.SSLError, TimeoutError) as error:
            # asyncio has closed the socket. A client speaking plain HTTP to the TLS port
            # lands here too: worth a line, not one per attempt.
            self.handshake_failures.hit(error=str(error) or type(error).__name__)
            sock.close()
            if isinstance(protocol, RefusedConnection):
                protocol.ended()

    def opened(self, connection: GuardedConnection) -> None:
        self._open[connection] = None

    def closed(self, connection: GuardedConnection) -> None:
        self._open.pop(connection, None)

    async def close_all(self) -> None:
        """At stop, after aiohttp closed its connections: whatever is still starting."""
        starting = list(self._starting)
        for task in starting:
            task.cancel()
        await asyncio.gather(*starting, return_exceptions=True)
        for connection in list(self._open):
            connection.close()


@web.middleware
async def track_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Tell the connection a request started (headers complete) and when it ended (see the
    module docstring); a no-op for connections this module did not accept."""
    transport = request.transport
    connection = transport.get_protocol() if transport is not None else None
    task = asyncio.current_task()
    if isinstance(connection, GuardedConnection) and task is not None:
        connection.request_started()
        task.add_done_callback(lambda _task: connection.request_finished())
    return await handler(request)


class Listener:
    """Listening sockets and the accept loop (see the module docstring)."""

    def __init__(self, sockets: list[socket.socket], guard: ConnectionGuard) -> None:
        self.sockets = sockets
        self._guard = guard
        self._paused: dict[int, asyncio.TimerHandle] = {}
        self.accept_errors = ThrottledLog(
            "cannot accept connections", level="error", interval_s=ERROR_LOG_INTERVAL_S
        )

    @classmethod
    def bind(cls, host: str, port: int, guard: ConnectionGuard) -> Listener:
        """One socket per address of `host` (like `loop.create_server`)."""
        sockets: list[socket.socket] = []
        try:
            infos = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            for family, _type, _proto, _name, address in dict.fromkeys(infos):
                sock = socket.create_server(
                    address,
                    family=family,
                    backlog=guard.limits.backlog,
                )
                sock.setblocking(False)
                sockets.append(sock)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        return cls(sockets, guard)

    def start(self) -> None:
        for sock in self.sockets:
            self._watch(sock)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for timer in self._paused.values():
            timer.cancel()
        self._paused.clear()
        for sock in self.sockets:
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(sock.fileno())
            sock.close()

    def _watch(self, sock: socket.socket) -> None:
        self._paused.pop(sock.fileno(), None)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as error:
                self._pause(sock, error)
                return
            self.accept_errors.settle("accepting connections again", quiet_s=2 * ACCEPT_PAUSE_S)
            conn.setblocking(False)
            self._guard.admit(conn)

    def _pause(self, sock: socket.socket, error: OSError) -> None:
        """Stop accepting for a moment: at the file limit, accept fails at once again.

        An idle connection is given up to free a descriptor (the cheapest thing to give up, as
        at the cap), and then the pause is short; with nothing idle to give up, the daemon
        waits for its connections or jobs to release descriptors.
        """
        loop = asyncio.get_running_loop()
        code = errno.errorcode.get(error.errno or 0, str(error.errno))
        freed = error.errno in FD_EXHAUSTED and self._guard.reclaim_idle()
        pause_s = RECLAIMED_PAUSE_S if freed else ACCEPT_PAUSE_S
        self.accept_errors.hit(
            error=error.strerror or str(error),
            errno=code,
            open_connections=self._guard.count,
            paused_s=pause_s,
        )
        loop.remove_reader(sock.fileno())
        self._paused[sock.fileno()] = loop.call_later(pause_s, self._watch, sock)

    @property
    def port(self) -> int | None:
        if not self.sockets:
            return None
        port: int = self.sockets[0].getsockname()[1]
        return port
