"""Delivering events to hooks: a bounded queue, one consumer task, one task per POST.

Decisions:

* `publish` only enqueues (`put_nowait`) and never raises: it is called from the end of a run and
  from the supervisor's exit path, which must not wait for any receiver. A full queue drops the
  event with a log line; events for which nobody subscribed are not queued at all (that check
  costs a `stat` of the hooks file on the loop, like Kudu's `ShouldSkipWebHooks`).
* The consumer builds the body in a worker thread (it reads the disk) and starts one task per
  hook, at most `max_concurrent` at once: a receiver that hangs holds one slot, not the queue.
* Each POST has a total timeout. A connection error, a timeout or a 5xx is retried after each of
  `retry_delays_s` (exponential by default); any other answer is final. 2xx is success; 410 Gone
  unsubscribes the hook, as in Kudu; redirects are not followed (a hook URL is exact).
* Every attempt is logged (hook id, host only, event, status, attempt); the final outcome is kept
  on the hook as Kudu does: `last_status` is the .NET name of the status code (`OK`,
  `InternalServerError`) or `Failure`, `last_reason` the reason phrase or the error.
* Shutdown: `drain` waits up to a grace period for the queue and the POSTs in flight, then the
  owner cancels the consumer, which cancels what is left; what was dropped is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import aiohttp
import structlog

from webjobsd import __version__
from webjobsd.records.runstore import format_kudu_datetime
from webjobsd.webhooks.subscriptions import HookStore, WebHook, url_host

log = structlog.get_logger("webjobsd.webhooks")


@dataclass(frozen=True, slots=True)
class WebhookPolicy:
    timeout_s: float = 10.0  # Kudu's HttpClient timeout for hooks
    retry_delays_s: tuple[float, ...] = (1.0, 2.0, 4.0)
    queue_size: int = 1000
    max_concurrent: int = 32
    shutdown_grace_s: float = 2.0


DEFAULT_POLICY = WebhookPolicy()

BodyBuilder = Callable[[str], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class _Pending:
    event: str
    build: BodyBuilder
    base: str


class BaseUrl:
    """`scheme://host` for URLs in event bodies: the last one a request came with, else the
    address the daemon listens on (set once it listens)."""

    def __init__(self) -> None:
        self.last_known: str | None = None
        self.fallback: str = "http://localhost"

    def remember(self, base: str) -> None:
        self.last_known = base

    def current(self) -> str:
        return self.last_known or self.fallback


def fallback_base(
    host: str, port: int, environ: Mapping[str, str], *, scheme: str = "http"
) -> str:
    """Before any request: Kudu's `https://{HTTP_HOST}`, else the address we listen on."""
    if environ.get("HTTP_HOST"):
        return f"https://{environ['HTTP_HOST']}"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def dotnet_status_name(status: int) -> str:
    """`HttpStatusCode.ToString()`: the enum member's name, or the number when it has none."""
    try:
        name = HTTPStatus(status).name
    except ValueError:
        return str(status)
    if name == "OK":
        return name
    return "".join(part.capitalize() for part in name.split("_"))


def _now() -> str:
    return format_kudu_datetime(datetime.now(UTC))


class WebhookDispatcher:
    def __init__(self, store: HookStore, policy: WebhookPolicy | None = None) -> None:
        self.store = store
        self.policy = policy or DEFAULT_POLICY
        self.base_url = BaseUrl()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(self.policy.queue_size)
        self._deliveries: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self.policy.max_concurrent)
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self.delivered = 0
        self.failed = 0

    # -- producers ---------------------------------------------------------------------------

    def publish(self, event: str, build: BodyBuilder) -> None:
        """Queue `event`; `build(base)` makes its body later, in a worker thread."""
        if self._closing:
            log.warning("webhook event dropped: the daemon is stopping", hook_event=event)
            return
        try:
            if not self.store.subscribed(event):
                return
        except OSError as error:
            log.error("hooks file unreadable; event dropped", hook_event=event, error=str(error))
            return
        try:
            self._queue.put_nowait(_Pending(event, build, self.base_url.current()))
        except asyncio.QueueFull:
            log.error(
                "webhook queue full; event dropped", hook_event=event, size=self._queue.qsize()
            )
            return
        self._idle.clear()

    # -- the consumer ------------------------------------------------------------------------

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.policy.max_concurrent)
        async with aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": f"webjobsd/{__version__}"},
            trust_env=False,
        ) as session:
            try:
                while True:
                    pending = await self._queue.get()
                    try:
                        await self._dispatch(session, pending)
                    except Exception:
                        log.exception("webhook event not delivered", hook_event=pending.event)
                    finally:
                        self._check_idle()
            finally:
                for task in list(self._deliveries):
                    task.cancel()
                if self._deliveries:
                    await asyncio.gather(*self._deliveries, return_exceptions=True)

    async def _dispatch(self, session: aiohttp.ClientSession, pending: _Pending) -> None:
        hooks = await asyncio.to_thread(self.store.subscribed, pending.event)
        if not hooks:
            return
        body = await asyncio.to_thread(pending.build, pending.base)
        # Kudu posts hook bodies indented.
        data = json.dumps(body, indent=2, ensure_ascii=False).encode()
        for hook in hooks:
            await self._slots.acquire()
            task = asyncio.create_task(
                self._deliver(session, hook, pending.event, data),
                name=f"webhook-{hook.id}",
            )
            self._deliveries.add(task)
            task.add_done_callback(self._delivery_done)

    def _delivery_done(self, task: asyncio.Task[None]) -> None:
        self._deliveries.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery crashed", task=task.get_name(), exc_info=task.exception())
        self._check_idle()

    def _check_idle(self) -> None:
        if self._queue.empty() and not self._deliveries:
            self._idle.set()

    async def _deliver(
        self, session: aiohttp.ClientSession, hook: WebHook, event: str, data: bytes
    ) -> None:
        delays = self.policy.retry_delays_s
        host = url_host(hook.url)
        status, reason = "Failure", "not attempted"
        for attempt in range(1, len(delays) + 2):
            started = time.monotonic()
            code: int | None = None
            try:
                async with session.post(
                    hook.url,
                    data=data,
                    headers={"Content-Type": "application/json; charset=utf-8"},
                    timeout=aiohttp.ClientTimeout(total=self.policy.timeout_s),
                    allow_redirects=False,
                    ssl=not hook.insecure_ssl,
                ) as response:
                    code = response.status
                    status, reason = dotnet_status_name(code), response.reason or ""
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as error:
                status = "Failure"
                reason = (
                    "timed out" if isinstance(error, TimeoutError) else str(error) or repr(error)
                )
            retry = (code is None or code >= 500) and attempt <= len(delays)
            log.info(
                "webhook attempt",
                hook=hook.id,
                host=host,
                hook_event=event,
                attempt=attempt,
                status=code if code is not None else "Failure",
                reason=reason,
                seconds=round(time.monotonic() - started, 3),
                retry_in_s=delays[attempt - 1] if retry else None,
            )
            if not retry:
                break
            await asyncio.sleep(delays[attempt - 1])
        if code == HTTPStatus.GONE:
            await asyncio.to_thread(self.store.remove, hook.id)
            log.info("hook unsubscribed: the receiver answered 410 Gone", hook=hook.id, host=host)
            return
        if code is not None and 200 <= code < 300:
            self.delivered += 1
        else:
            self.failed += 1
            log.warning(
                "webhook not delivered", hook=hook.id, host=host, hook_event=event, reason=reason
            )
        with contextlib.suppress(OSError):
            await asyncio.to_thread(
                self.store.record, hook.id, status=status, reason=reason, when=_now()
            )

    # -- shutdown ----------------------------------------------------------------------------

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop taking events; wait (bounded) for those queued and in flight."""
        self._closing = True
        grace = self.policy.shutdown_grace_s if grace_s is None else grace_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        queued, in_flight = self._queue.qsize(), len(self._deliveries)
        if queued or in_flight:
            log.warning(
                "webhook deliveries dropped at shutdown",
                queued_events=queued,
                deliveries_in_flight=in_flight,
                grace_s=grace,
            )
