"""Deploying a job through the API: `PUT /api/{type}webjobs/{name}` (Part B §1.2, §8.2).

The body (a zip with `Content-Type: application/zip`, or a single script named by
`Content-Disposition: attachment; filename=...`) is streamed to a temp file under the upload cap
and handed to `deploy.jobpackage`, which makes it the job's folder whole or refuses it and changes
nothing (a dropped `NAME.zip` goes the same way). The route then asks discovery to look at the job
at once and answers with it.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from webjobsd.deploy.jobpackage import deploy_job_package
from webjobsd.discovery.catalog import NO_RUNNABLE_SCRIPT
from webjobsd.http.context import CONTEXT, base_url
from webjobsd.http.errors import bad_request, clean_text
from webjobsd.http.jobrequest import add_job_locks, job_lock, job_name
from webjobsd.http.readmodel import JOB_LISTS
from webjobsd.http.uploads import receive_to_file
from webjobsd.model import JobKey, JobKind

MISSING_DISPOSITION = "Missing Content-Disposition header."
_FILENAME = re.compile(r'(?:^|;)\s*filename\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', re.IGNORECASE)


def filename_from(disposition: str | None) -> str:
    """Kudu: the plain `filename` parameter, quotes trimmed, directory part dropped."""
    if not disposition:
        raise bad_request(MISSING_DISPOSITION)
    match = _FILENAME.search(disposition)
    raw = match.group(1).strip() if match else ""
    if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
        raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
    name = raw.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name:
        raise bad_request(MISSING_DISPOSITION)
    encoded = name.encode("utf-8", "surrogateescape")
    if name in (".", "..") or "\0" in name or len(encoded) > 255 or clean_text(name) != name:
        raise bad_request(f"Invalid file name {clean_text(name)!r}.")
    return name


def put_job(kind: JobKind) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        ctx = request.app[CONTEXT]
        name = job_name(request)
        filename = filename_from(request.headers.get("Content-Disposition"))
        is_zip = request.content_type.lower() == "application/zip"
        key = JobKey(kind, name)
        upload_dir = ctx.upload_dir or (ctx.layout.temp_root / "uploads")
        await asyncio.to_thread(upload_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
        upload = upload_dir / f"{name}-{secrets.token_hex(8)}"
        try:
            await receive_to_file(request, upload, ctx.limits.max_upload_bytes)
            # Held until the catalog has seen the new folder: a concurrent PUT, DELETE or
            # settings write of the same job waits instead of racing the swap.
            async with job_lock(request, key):
                await asyncio.to_thread(
                    deploy_job_package, ctx.layout, ctx.limits, key, upload, is_zip, filename
                )
                await ctx.refresh({key})
                spec = ctx.specs().get(key)
                if spec is None:
                    raise bad_request(NO_RUNNABLE_SCRIPT)
        finally:
            await asyncio.to_thread(upload.unlink, True)
        return web.json_response(await request.app[JOB_LISTS].job(base_url(request), spec))

    return handler


def add_deploy_routes(app: web.Application, prefixes: dict[JobKind, list[str]]) -> None:
    add_job_locks(app)
    for kind, kind_prefixes in prefixes.items():
        handler = put_job(kind)
        for prefix in kind_prefixes:
            app.router.add_put(prefix + "/{name}", handler)
