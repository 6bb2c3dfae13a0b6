"""Kudu's WebJobs routes (Part B §1.1) with their deprecated aliases.

Reads go through `http.readmodel`: lists are served from a rendered body (and its ETag) that is
rebuilt, in a worker thread, only when this daemon changed something or the disk facts of other
instances may have moved (see that module for the bounds); single jobs, histories and runs are
read from disk at every request. Writes are intents (Part A #6): `disable.job` or
`settings.job` written atomically, then discovery looks at the job again at once and the
reconciler acts, so stop and start take effect immediately and a new job has no 404 window.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from webjobsd.http import readmodel
from webjobsd.http.context import CONTEXT, ApiContext, base_url
from webjobsd.http.deploy import add_deploy_routes
from webjobsd.http.errors import bad_request, clean_text, conflict, not_found, read_json_body
from webjobsd.http.jobrequest import add_job_locks, job_lock, job_name
from webjobsd.http.logstream import add_logstream_routes
from webjobsd.http.readmodel import JOB_LISTS
from webjobsd.model import JobKey, JobKind, JobSpec
from webjobsd.records.atomic import write_bytes_atomic
from webjobsd.records.starts import read_start_history
from webjobsd.runtime.triggered import InvalidArguments, JobNotFound, RunConflict
from webjobsd.views import etag_of, run_url, swagger

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# How long a DELETE waits for the job's process to stop before removing its data folder.
DELETE_STOP_WAIT_S = 60.0


# -- helpers ---------------------------------------------------------------------------------


def _spec(ctx: ApiContext, kind: JobKind, name: str) -> JobSpec:
    spec = ctx.specs().get(JobKey(kind, name))
    if spec is None:
        raise not_found(f"No {kind.value} job named {name!r}.")
    return spec


def _not_modified(request: web.Request, tag: str) -> bool:
    return request.headers.get("If-None-Match", "").split(",")[0].strip() == tag


def _with_etag(request: web.Request, body: Any, tag: str) -> web.Response:
    if _not_modified(request, tag):
        return web.Response(status=304, headers={"ETag": tag})
    response = web.json_response(body)
    response.headers["ETag"] = tag
    return response


# -- lists and single jobs -------------------------------------------------------------------


def list_jobs(kinds: tuple[JobKind, ...]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        rendered = await request.app[JOB_LISTS].body(base_url(request), kinds)
        headers = {"ETag": rendered.etag}
        if _not_modified(request, rendered.etag):
            return web.Response(status=304, headers=headers)
        # The cached bytes as they are: web.json_response would encode the list again.
        return web.Response(
            body=rendered.body, content_type="application/json", charset="utf-8", headers=headers
        )

    return handler


def get_job(kind: JobKind) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        spec = _spec(request.app[CONTEXT], kind, job_name(request))
        return web.json_response(await request.app[JOB_LISTS].job(base_url(request), spec))

    return handler


def delete_job(kind: JobKind) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        ctx = request.app[CONTEXT]
        name = job_name(request)
        key = JobKey(kind, name)
        async with job_lock(request, key):
            await asyncio.to_thread(_remove_job_folder, ctx.layout.job_dir(key))
            await ctx.refresh({key})
            if key in ctx.specs():
                raise conflict(f"The job folder of {name!r} could not be removed.")
            # The data folder goes once the job's process or run has stopped, or the stop
            # would write its last status and log lines into a folder that was just removed.
            if not await ctx.wait_stopped(key, DELETE_STOP_WAIT_S):
                raise conflict(f"The job {name!r} is still stopping; its data was kept.")
            await asyncio.to_thread(shutil.rmtree, ctx.layout.data_dir(key), True)
        return web.Response(status=200)

    return handler


def _remove_job_folder(job_dir: Path) -> None:
    if job_dir.is_symlink():
        job_dir.unlink()
    else:
        shutil.rmtree(job_dir, ignore_errors=True)


# -- settings --------------------------------------------------------------------------------


def get_settings(kind: JobKind) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        spec = _spec(request.app[CONTEXT], kind, job_name(request))
        return web.json_response(dict(spec.settings.raw))

    return handler


def put_settings(kind: JobKind) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        ctx = request.app[CONTEXT]
        spec = _spec(ctx, kind, job_name(request))
        body = await read_json_body(request)
        if not isinstance(body, dict):
            raise bad_request("The settings must be a JSON object.")
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        async with job_lock(request, spec.key):
            spec = _spec(ctx, kind, spec.key.name)
            try:
                await asyncio.to_thread(
                    write_bytes_atomic, spec.script_dir / "settings.job", data.encode()
                )
            except FileNotFoundError as error:
                raise not_found(f"No {kind.value} job named {spec.key.name!r}.") from error
            await ctx.refresh({spec.key})
        return web.Response(status=200)

    return handler


# -- continuous: stop, start, passthrough ----------------------------------------------------


async def _set_disabled(request: web.Request, disabled: bool) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    name = job_name(request)
    key = JobKey(JobKind.CONTINUOUS, name)
    async with job_lock(request, key):
        spec = _spec(ctx, JobKind.CONTINUOUS, name)
        marker = spec.script_dir / "disable.job"
        try:
            if disabled:
                await asyncio.to_thread(write_bytes_atomic, marker, b"", fsync=False)
            else:
                await asyncio.to_thread(marker.unlink, True)
        except FileNotFoundError as error:
            raise not_found(f"No continuous job named {name!r}.") from error
        except OSError as error:
            raise conflict(f"Cannot change {marker.name}: {error.strerror}") from error
        await ctx.refresh({key})
    return web.Response(status=200)


async def continuous_starts(request: web.Request) -> web.StreamResponse:
    """Ours: the job's process starts on every instance (`records.starts`), oldest first."""
    ctx = request.app[CONTEXT]
    key = _spec(ctx, JobKind.CONTINUOUS, job_name(request)).key
    history = await asyncio.to_thread(
        read_start_history, ctx.layout.data_dir(key), ctx.instance_is_live
    )
    starts = [
        {"instance_id": item.instance_id, **item.start.to_json(), "restart": item.restart}
        for item in history
    ]
    restarts = sum(item.restart for item in history)
    return web.json_response(
        {"instance_id": ctx.layout.instance_id, "starts": starts, "restarts": restarts}
    )


async def stop_continuous(request: web.Request) -> web.StreamResponse:
    return await _set_disabled(request, True)


async def start_continuous(request: web.Request) -> web.StreamResponse:
    return await _set_disabled(request, False)


_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "host",
    "content-length",
}


def _hop_by_hop(headers: Mapping[str, str]) -> set[str]:
    """The fixed hop-by-hop headers plus those the sender named in `Connection`."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", [])  # type: ignore[attr-defined]
        for token in value.split(",")
    }
    return _HOP_BY_HOP | named


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Kudu's passthrough: the request, cloned to the job's WEBJOBS_PORT on loopback.

    The path and query are forwarded as the client encoded them; the daemon's own
    `Authorization` is not; the answer streams back with every header it had (repeated
    `Set-Cookie` included), minus hop-by-hop ones.
    """
    import aiohttp
    from yarl import URL

    ctx = request.app[CONTEXT]
    spec = _spec(ctx, JobKind.CONTINUOUS, job_name(request))
    port = ctx.continuous_port(spec.key)
    if port is None:
        raise not_found("The job is not running on this instance.")
    raw = request.raw_path
    # Job names are plain ASCII (validated), so the raw path spells the name as it is.
    marker = f"/{spec.key.name}/passthrough"
    tail = raw[raw.index(marker) + len(marker) :] if marker in raw else "/"
    target = URL(
        f"http://127.0.0.1:{port}{tail if tail.startswith('/') else '/' + tail}", encoded=True
    )
    skip = _hop_by_hop(request.headers) | {"authorization"}
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in skip]
    body = request.content if request.can_read_body else None
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session,
            session.request(
                request.method,
                target,
                headers=headers,
                data=body,
                allow_redirects=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            ) as upstream,
        ):
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            drop = _hop_by_hop(upstream.headers)
            for k, v in upstream.headers.items():
                if k.lower() not in drop:
                    response.headers.add(k, v)
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, TimeoutError) as error:
        raise not_found(f"The job did not answer on its port: {error}") from error


# -- triggered: run, history, swagger --------------------------------------------------------


async def run_triggered(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    name = job_name(request)
    arguments = request.query.get("arguments")
    trigger = f"External - {clean_text(request.headers.get('User-Agent', ''))}"
    try:
        record = await ctx.triggered.request_run(name, arguments=arguments, trigger=trigger)
    except JobNotFound as error:
        raise not_found(error.message) from error
    except InvalidArguments as error:
        raise bad_request(error.message) from error
    except RunConflict as error:
        raise conflict(error.message) from error
    location = run_url(base_url(request), name, record.run_id)
    return web.Response(status=202, headers={"Location": location})


async def history(request: web.Request) -> web.StreamResponse:
    name = job_name(request)
    _spec(request.app[CONTEXT], JobKind.TRIGGERED, name)
    runs = await request.app[JOB_LISTS].history(base_url(request), name)
    newest = runs[0] if runs else None
    tag = etag_of(
        [name, newest["id"], newest["status"], newest["end_time"]] if newest else [name, "EMPTY"]
    )
    return _with_etag(request, {"runs": runs}, tag)


async def one_run(request: web.Request) -> web.StreamResponse:
    name = job_name(request)
    run_id = request.match_info["run_id"]
    _spec(request.app[CONTEXT], JobKind.TRIGGERED, name)
    body = await request.app[JOB_LISTS].run(base_url(request), name, run_id)
    if body is None:
        raise not_found(f"No run {run_id!r} of job {name!r}.")
    return web.json_response(body)


async def swagger_document(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    names = sorted(k.name for k in ctx.specs() if k.kind is JobKind.TRIGGERED)
    return web.json_response(swagger(names))


# -- routing ---------------------------------------------------------------------------------


def _prefixes(kind: JobKind) -> list[str]:
    """Kudu maps each route three ways: current, deprecated and old deprecated forms."""
    t = kind.value
    return [f"/api/{t}webjobs", f"/api/{t}jobs", f"/jobs/{t}", f"/api/jobs/{t}"]


def add_job_routes(app: web.Application) -> None:
    readmodel.install(app, app[CONTEXT])
    router = app.router
    for path in ("/api/webjobs", "/api/jobs", "/jobs", "/jobs/", "/api/jobs/"):
        router.add_get(path, list_jobs((JobKind.TRIGGERED, JobKind.CONTINUOUS)))
    for kind in JobKind:
        for prefix in _prefixes(kind):
            router.add_get(prefix, list_jobs((kind,)))
            router.add_get(prefix + "/{name}", get_job(kind))
            router.add_delete(prefix + "/{name}", delete_job(kind))
            router.add_get(prefix + "/{name}/settings", get_settings(kind))
            router.add_put(prefix + "/{name}/settings", put_settings(kind))
            if kind is JobKind.CONTINUOUS:
                router.add_post(prefix + "/{name}/stop", stop_continuous)
                router.add_post(prefix + "/{name}/start", start_continuous)
                router.add_get(prefix + "/{name}/starts", continuous_starts)
                router.add_route("*", prefix + "/{name}/passthrough/{path:.*}", passthrough)
            else:
                router.add_post(prefix + "/{name}/run", run_triggered)
                router.add_get(prefix + "/{name}/history", history)
                router.add_get(prefix + "/{name}/history/{run_id}", one_run)
    router.add_get("/api/triggeredwebjobsswagger", swagger_document)
    add_job_locks(app)
    add_deploy_routes(app, {kind: _prefixes(kind) for kind in JobKind})
    add_logstream_routes(app, {kind: _prefixes(kind) for kind in JobKind})
