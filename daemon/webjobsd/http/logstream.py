"""Live logs over HTTP: a continuous job's `job_log.txt` and a run's `output_log.txt` as
Server-Sent Events.

Routes (under every Kudu prefix of `http.jobs`, behind the same Basic auth):
`GET /api/continuouswebjobs/{name}/logstream` (this daemon's site log of the job) and
`GET /api/triggeredwebjobs/{name}/history/{runId}/logstream`. File reading, rotation and
truncation belong to `records.logtail`; this module owns the wire format and the stream's life.

Decisions:

* **Event = a batch of whole lines, id = byte offset just after them** (in the file the path
  names now). Log lines are the default `message` event, so `EventSource.onmessage` gets them
  with no listener set up; control events are named: `rotated` / `truncated` (data
  `{"offset": 0}`, id 0: the stream goes on at the start of the new file) and `end` (data
  `{"reason": ..., "status": ...}`) just before the server closes the stream.
* **Where a stream starts:** `Last-Event-ID` (what `EventSource` sends when it reconnects),
  else `?offset=`, else `?tail=N` (the last N lines), else the whole output of a run or the
  lines within the last 64 KiB of a continuous log, which may be 10 MiB. The header wins
  over the query because a reconnecting `EventSource` repeats the URL it started with. An
  offset beyond the file's size means the file was rotated or truncated since: the stream
  starts with `rotated` and restarts at 0 rather than wait for bytes that will never come.
* **When it ends:** a run's stream ends (`end` with the run's status) once the run is over
  and its whole output has been sent; `?follow=false` ends any stream once the backlog has
  been sent (the CLI's `logs` without `-f`, and what keeps the schema fuzzer's calls finite);
  otherwise it follows until the client leaves or the daemon stops.
* **Waking:** this daemon's log writers wake the streams of a job at once (`LogWakeups`, fed
  by the writers' byte counters); lines written by other instances sharing the site are seen
  by a poll every `POLL_S`. A `: keep-alive` comment every `HEARTBEAT_S` of silence keeps
  proxies from timing the stream out and finds clients that left.
* **Shutdown:** the app's `on_shutdown` (run by `HttpServer.stop` before it waits for
  requests in flight) closes the wake-ups, so every stream sends `end` (reason `shutdown`)
  and returns at once instead of holding the daemon's stop for the server's timeout.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final

import structlog
from aiohttp import web

from webjobsd.http.context import CONTEXT, base_url
from webjobsd.http.errors import bad_request, not_found
from webjobsd.http.jobrequest import job_name
from webjobsd.http.numbers import TOO_LARGE, whole_number
from webjobsd.http.readmodel import JOB_LISTS
from webjobsd.model import JobKey, JobKind, RunStatus
from webjobsd.records.logtail import Chunk, ChunkKind, LogTail, LogWakeups, Start

log = structlog.get_logger("webjobsd.http.logstream")

LOG_STREAMS: Final = web.AppKey("webjobsd_log_streams", LogWakeups)

POLL_S: Final = 0.5
HEARTBEAT_S: Final = 15.0
CONTINUOUS_BACKLOG_BYTES: Final = 64 * 1024
MAX_TAIL_LINES: Final = 100_000
HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx buffers proxied answers by default, which would hold the events back.
    "X-Accel-Buffering": "no",
}
_UNFINISHED: Final = frozenset({RunStatus.INITIALIZING.value, RunStatus.RUNNING.value})

RunStatusReader = Callable[[], Awaitable[str | None]]
"""The run's shown status now (None: the run is gone, e.g. removed by retention)."""


# -- request parsing -------------------------------------------------------------------------


def _byte_offset(value: str, what: str) -> int:
    offset = whole_number(value)
    if offset is None or offset >= TOO_LARGE:
        raise bad_request(f"{what} must be a byte offset (a non-negative integer).")
    return offset


def _start(request: web.Request, default: Start) -> Start:
    last_event_id = request.headers.get("Last-Event-ID", "")
    if last_event_id.strip():
        return Start(offset=_byte_offset(last_event_id, "Last-Event-ID"))
    if "offset" in request.query:
        return Start(offset=_byte_offset(request.query["offset"], "offset"))
    if "tail" in request.query:
        lines = whole_number(request.query["tail"])
        if lines is None or lines > MAX_TAIL_LINES:
            raise bad_request(f"tail must be a number of lines from 0 to {MAX_TAIL_LINES}.")
        return Start(lines=lines)
    return default


def _follow(request: web.Request) -> bool:
    value = request.query.get("follow", "true").strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise bad_request("follow must be true or false.")
    return value in ("true", "1")


# -- the wire format -------------------------------------------------------------------------


def encode_chunk(chunk: Chunk) -> bytes:
    if chunk.kind is ChunkKind.LINES:
        data = "".join(f"data: {line}\n" for line in chunk.lines)
        return f"id: {chunk.offset}\n{data}\n".encode()
    payload = json.dumps({"offset": chunk.offset})
    return f"id: {chunk.offset}\nevent: {chunk.kind.value}\ndata: {payload}\n\n".encode()


def encode_end(offset: int, reason: str, status: str | None) -> bytes:
    payload = json.dumps({"reason": reason, "status": status})
    return f"id: {offset}\nevent: end\ndata: {payload}\n\n".encode()


HEARTBEAT: Final = b": keep-alive\n\n"


# -- handlers --------------------------------------------------------------------------------


async def continuous_logstream(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    key = JobKey(JobKind.CONTINUOUS, job_name(request))
    if key not in ctx.specs():
        raise not_found(f"No continuous job named {key.name!r}.")
    start = _start(request, Start(max_bytes=CONTINUOUS_BACKLOG_BYTES))
    follow = _follow(request)
    return await _stream(request, key.name, ctx.layout.job_log_path(key), start, follow, None)


async def run_logstream(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    name = job_name(request)
    run_id = request.match_info["run_id"]
    if JobKey(JobKind.TRIGGERED, name) not in ctx.specs():
        raise not_found(f"No triggered job named {name!r}.")
    start = _start(request, Start(offset=0))
    follow = _follow(request)
    base = base_url(request)
    if await request.app[JOB_LISTS].run(base, name, run_id) is None:
        raise not_found(f"No run {run_id!r} of job {name!r}.")

    async def status() -> str | None:
        # The read model's status: a run nobody runs any more shows as Aborted, so the
        # stream of a run whose daemon died ends too.
        body = await request.app[JOB_LISTS].run(base, name, run_id)
        return str(body["status"]) if body is not None else None

    path = ctx.run_store.output_log_path(name, run_id)
    return await _stream(request, name, path, start, follow, status)


# -- the stream ------------------------------------------------------------------------------


async def _stream(
    request: web.Request,
    name: str,
    path: Path,
    start: Start,
    follow: bool,
    run_status: RunStatusReader | None,
) -> web.StreamResponse:
    response = web.StreamResponse(headers=HEADERS)
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    wakeups = request.app[LOG_STREAMS]
    tail = LogTail(path, start)
    reason = "client left"
    try:
        with wakeups.subscribe(name) as wake:
            reason = await _pump(request, response, tail, wake, wakeups, follow, run_status)
    except ConnectionError:
        pass  # the client went away between two writes
    finally:
        tail.close()  # one close(2): no thread, so it also runs when the handler is cancelled
        log.debug("log stream closed", job=name, path=str(path), offset=tail.offset, reason=reason)
    return response


async def _pump(
    request: web.Request,
    response: web.StreamResponse,
    tail: LogTail,
    wake: asyncio.Event,
    wakeups: LogWakeups,
    follow: bool,
    run_status: RunStatusReader | None,
) -> str:
    """Send what the log has, wait for more, until an end; returns why it ended."""
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    while True:
        wake.clear()
        if wakeups.closed:
            await response.write(encode_end(tail.offset, "shutdown", None))
            return "shutdown"
        if await _send(response, tail, final=False):
            quiet_since = loop.time()
            continue
        ended = await _ended(response, tail, follow, run_status)
        if ended is not None:
            return ended
        transport = request.transport
        if transport is None or transport.is_closing():
            return "client left"
        if loop.time() - quiet_since >= HEARTBEAT_S:
            await response.write(HEARTBEAT)
            quiet_since = loop.time()
        try:
            await asyncio.wait_for(wake.wait(), POLL_S)
        except TimeoutError:
            pass  # the poll: other instances write without waking us


async def _send(response: web.StreamResponse, tail: LogTail, *, final: bool) -> bool:
    """Send one read's worth of events; whether there was anything."""
    chunks = await asyncio.to_thread(tail.read, final=final)
    for chunk in chunks:
        await response.write(encode_chunk(chunk))
    return bool(chunks)


async def _ended(
    response: web.StreamResponse,
    tail: LogTail,
    follow: bool,
    run_status: RunStatusReader | None,
) -> str | None:
    """At the end of what the log has now: send `end` and say why if the stream is over."""
    status = await run_status() if run_status is not None else None
    if run_status is not None and status not in _UNFINISHED:
        # The run is over: its log is complete, unterminated last line included.
        while await _send(response, tail, final=True):
            pass
        await response.write(encode_end(tail.offset, "finished", status))
        return "finished"
    if not follow:
        await response.write(encode_end(tail.offset, "caught up", status))
        return "caught up"
    return None


# -- wiring ----------------------------------------------------------------------------------


async def _close_streams(app: web.Application) -> None:
    streams = app[LOG_STREAMS]
    if streams.subscribers:
        log.info("closing log streams", streams=streams.subscribers)
    streams.close()


def add_logstream_routes(app: web.Application, prefixes: Mapping[JobKind, list[str]]) -> None:
    """The two routes under every prefix of their kind; `ctx.log_wakeups` (when the daemon
    feeds one from its log writers) wakes the streams, else they only poll."""
    app[LOG_STREAMS] = app[CONTEXT].log_wakeups or LogWakeups()
    app.on_shutdown.append(_close_streams)
    for prefix in prefixes[JobKind.CONTINUOUS]:
        app.router.add_get(prefix + "/{name}/logstream", continuous_logstream)
    for prefix in prefixes[JobKind.TRIGGERED]:
        app.router.add_get(prefix + "/{name}/history/{run_id}/logstream", run_logstream)
