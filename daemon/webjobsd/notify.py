"""systemd's notify protocol (sd_notify(3)) with the standard library only.

This module owns the daemon's side of the conversation with its service manager:

* **`SystemdNotifier`** sends `READY=1`, `STATUS=`, `STOPPING=1`, `RELOADING=1` and `WATCHDOG=1`
  as datagrams to `$NOTIFY_SOCKET`. It is built once from the environment (`from_environ`) and is
  a silent no-op when `NOTIFY_SOCKET` is unset (run by hand, in a container, in tests), so callers
  never branch on "am I under systemd".
* **`watchdog_loop`** pings the watchdog every `watchdog_interval_s` *only while a health callback
  says the daemon is making progress*. The daemon passes "the reconciler's last pass is recent"
  (`heartbeat_is_recent`), so a wedged event loop or a stuck reconciler stops the pings and
  systemd restarts the service (`WatchdogSec=` + `Restart=on-failure`). A loop that pinged
  unconditionally would only prove that the event loop runs, not that the daemon does its job.

Decisions:

* **No libsystemd / python-systemd.** The protocol is one datagram of `KEY=VALUE` lines to an
  AF_UNIX socket; a C binding would add a build dependency for ~20 lines of code.
* **Abstract addresses.** `NOTIFY_SOCKET=@name` means the Linux abstract namespace: the leading
  `@` becomes a NUL byte (what sd_notify does). Any other value is a filesystem path.
* **Never block, never raise.** The socket is non-blocking: if systemd's queue is full the
  message is dropped rather than stalling the event loop (a missed `STATUS=` is harmless; a missed
  `WATCHDOG=1` is re-sent at the next period, which is half the timeout). Send errors are logged
  once (then at debug level) so a broken socket cannot flood the journal every few seconds, and
  never propagate: telling systemd about our state must not be a way for the daemon to die.
* **Watchdog ownership.** `WATCHDOG_USEC` applies only when `WATCHDOG_PID` is unset or is our
  pid (sd_watchdog_enabled(3)): a job that inherited the variables must not ping for us. The
  variables are left in `os.environ` (we do not own the process environment); the supervisor
  scrubs `NOTIFY_SOCKET` / `WATCHDOG_*` from job environments.
* **Ping period = half of `WATCHDOG_USEC`**, systemd's recommendation, so one late or dropped
  ping never trips the timeout.
* **RELOADING=1 carries `MONOTONIC_USEC=`** (CLOCK_MONOTONIC, µs) as systemd >= 253 requires for
  `Type=notify-reload`; older managers and `Type=notify` accept and ignore the extra field. After
  a reload the daemon must send `READY=1` again (`ready()`), which ends the reloading state.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("webjobsd.notify")

ENV_NOTIFY_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"


def socket_address(value: str) -> str:
    """`NOTIFY_SOCKET`'s value as an AF_UNIX address: `@name` is abstract (leading NUL)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    return value


def _one_line(text: str) -> str:
    # The protocol is newline-separated KEY=VALUE: a newline in a status would start a new
    # (bogus, possibly meaningful, e.g. "READY=1") assignment.
    return " ".join(text.splitlines())


class SystemdNotifier:
    """Send state changes and watchdog pings to systemd; a no-op without `NOTIFY_SOCKET`."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        """`address` is the raw `NOTIFY_SOCKET` value (`@` for abstract); None disables sends.

        `watchdog_usec` is the watchdog timeout that applies to *this* process (already checked
        against `WATCHDOG_PID`), or None when there is no watchdog.
        """
        self._address = socket_address(address) if address else None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._error_logged = False

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> SystemdNotifier:
        """Build from `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (default: os.environ)."""
        env = os.environ if environ is None else environ
        address = env.get(ENV_NOTIFY_SOCKET) or None
        return cls(address, watchdog_usec=_watchdog_usec(env, os.getpid() if pid is None else pid))

    # -- state -------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when there is a socket to talk to."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Recommended ping period (half the watchdog timeout), None when no watchdog applies."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    # -- messages ----------------------------------------------------------------------------

    def ready(self, status: str) -> None:
        """Start-up (or a reload) is complete: `Type=notify` units become active now."""
        self.send(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> None:
        """Free-form one-line status shown by `systemctl status`."""
        self.send(f"STATUS={_one_line(text)}")

    def stopping(self, status: str = "stopping jobs") -> None:
        """Shutdown began: systemd shows `deactivating` instead of guessing we hung."""
        self.send(f"STOPPING=1\nSTATUS={_one_line(status)}")

    def reloading(self, status: str = "reloading configuration") -> None:
        """A reload began; call `ready()` when it is done (required by Type=notify-reload)."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}\nSTATUS={_one_line(status)}")

    def watchdog(self) -> None:
        """One keep-alive ping; only meaningful when `watchdog_interval_s` is not None."""
        self.send("WATCHDOG=1")

    def send(self, message: str) -> bool:
        """Send one datagram; True if it left. Never raises, never blocks."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(message.encode("utf-8"), self._address)
        except OSError as error:
            # Logged loudly once: a misconfigured socket would otherwise repeat every ping.
            level = log.debug if self._error_logged else log.warning
            level(
                "cannot notify systemd",
                socket=self._address.replace("\0", "@"),
                message=message.split("\n", 1)[0],
                error=str(error),
            )
            self._error_logged = True
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    raw = environ.get(ENV_WATCHDOG_USEC)
    if not raw:
        return None
    owner = environ.get(ENV_WATCHDOG_PID)
    if owner:
        try:
            if int(owner) != pid:
                # Inherited from a parent that systemd watches: not our watchdog to feed.
                return None
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_PID", value=owner)
            return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC", value=raw)
        return None
    return usec if usec > 0 else None


def heartbeat_is_recent(
    last: Callable[[], float | None],
    max_age_s: float | Callable[[], float],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[], bool]:
    """A health callback for `watchdog_loop`: `last()` (a `clock` reading) is within `max_age_s`.

    `max_age_s` may be a callable so that it follows a period changed by a reload (for example
    `lambda: 3 * reconciler.tick_s`). `last()` returning None (no pass yet) counts as unhealthy:
    the first pass happens before READY=1, so None after start-up means something is wrong.
    """

    def healthy() -> bool:
        stamp = last()
        limit = max_age_s() if callable(max_age_s) else max_age_s
        return stamp is not None and clock() - stamp <= limit

    return healthy


async def watchdog_loop(
    notifier: SystemdNotifier,
    is_healthy: Callable[[], bool],
    *,
    interval_s: float | None = None,
) -> None:
    """Ping the watchdog every `interval_s` (default: `notifier.watchdog_interval_s`) while healthy.

    Returns at once when there is no watchdog (the caller may start it unconditionally or only
    when `watchdog_interval_s` is not None); otherwise runs until cancelled. An unhealthy check
    skips the ping (and logs on the transition, not every period), so systemd's timeout fires if
    the daemon stays wedged; pings resume by themselves if it recovers in time.
    """
    period = notifier.watchdog_interval_s if interval_s is None else interval_s
    if period is None or period <= 0:
        return
    was_healthy = True
    while True:
        try:
            healthy = is_healthy()
        except Exception:
            # A broken health check must not look healthy, nor kill the watchdog task.
            log.exception("watchdog health check failed")
            healthy = False
        if healthy:
            notifier.watchdog()
            if not was_healthy:
                log.info("watchdog pings resumed")
        elif was_healthy:
            log.error("daemon not healthy: withholding watchdog pings; systemd will restart it")
        was_healthy = healthy
        await asyncio.sleep(period)
