"""git's smart HTTP protocol at `/{site}.git/...`, `/git/...` and the host root (KUDU-DEPLOY.md
Part A #10).

Routes only: the repository, git's services and the deployment after a push are
`deploy.git`'s. `{site}` is Kudu's GitServerRoot: WEBSITE_SITE_NAME up to the first `_`, else
the site folder's name; another name is 404 (there is one repository per site).

Design choices (keep them):

* **Errors are `text/plain`**, not the API's JSON: git shows a text/plain body of a failed
  `info/refs` to the user as `remote:` lines and nothing of any other type, so a 409 "There is a
  deployment currently in progress..." reaches the pusher only this way.
* **A push that finds a deployment running is refused at `info/refs`** already (a probe of the
  site's lock), because git shows nothing of a refused POST but "RPC failed; HTTP 409". The POST
  still takes the lock with zero wait and answers 409 itself (Kudu's place for it), for the
  push that races another deployment between the two requests.
* **Authentication** is the daemon's Basic auth middleware: an anonymous request gets 401 with
  `WWW-Authenticate: Basic`, which is what makes a stock git client send credentials. The
  deployer is the authenticated user name; with authentication off (`--no-auth`) it is
  "anonymous".
* **Bodies** stream: aiohttp inflates `Content-Encoding: gzip` (git gzips large fetch
  negotiations) while we read, and the request body goes to git's stdin chunk by chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from webjobsd.deploy.git import (
    BRANCH_SETTING,
    DUMB_PROTOCOL,
    RECEIVE_PACK,
    SERVICES,
    UPLOAD_PACK,
    Repository,
    advertise,
    receive_and_deploy,
    run_service,
    server_root_name,
)
from webjobsd.deploy.lock import IN_PROGRESS, deployment_in_progress
from webjobsd.deploy.pipeline import DeployRequest
from webjobsd.http.auth import authenticated_user
from webjobsd.http.context import CONTEXT
from webjobsd.refusal import Refusal

log = structlog.get_logger("webjobsd.http.git")

ANONYMOUS = "anonymous"
_CHUNK = 64 * 1024

NO_CACHE = {
    "Expires": "Fri, 01 Jan 1980 00:00:00 GMT",
    "Pragma": "no-cache",
    "Cache-Control": "no-cache, max-age=0, must-revalidate",
}

# A body that stalls (deploy.git's idle timeout) or a client that goes away mid-body: the
# answer has begun, so there is nobody left to tell; git saw its stdin end and kept nothing.
BROKEN_OFF = (TimeoutError, ConnectionError, HttpProcessingError)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _text(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        text=message + "\n",
        content_type="text/plain",
        headers={**NO_CACHE, **(headers or {})},
    )


def _plain_errors(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Refusal as refusal:
            return _text(refusal.status, refusal.message, refusal.headers)

    return wrapped


def _closing(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Close the connection after a broken request: aiohttp would otherwise linger reading
    the rest of a body that a stalled client may never send."""
    request.protocol.force_close()
    return response


def _repository(request: web.Request) -> Repository:
    ctx = request.app[CONTEXT]
    asked = request.match_info.get("site")
    if asked is not None:
        name = server_root_name(ctx.app_settings.get("WEBSITE_SITE_NAME"), ctx.layout)
        if asked.casefold() != name.casefold():
            raise Refusal(404, f"Repository '{asked}.git' not found; this site's is '{name}.git'.")
    return Repository.of(ctx.layout)


def deployer(request: web.Request) -> str:
    return authenticated_user(request) or ANONYMOUS


async def info_refs(request: web.Request) -> web.StreamResponse:
    repository = _repository(request)
    service = request.query.get("service", "")
    if not service:
        raise Refusal(501, DUMB_PROTOCOL)
    if service not in SERVICES:
        raise Refusal(403, f"Unsupported service '{service}'.")
    ctx = request.app[CONTEXT]
    if service == RECEIVE_PACK and await asyncio.to_thread(deployment_in_progress, ctx.layout):
        raise Refusal(409, IN_PROGRESS)
    body = await advertise(repository, service)
    # No charset: jgit recognises the smart protocol only by the bare type (Kudu's note).
    return web.Response(
        body=body,
        headers={**NO_CACHE, "Content-Type": f"application/x-{service}-advertisement"},
    )


async def _stream(request: web.Request, service: str) -> web.StreamResponse:
    repository = _repository(request)
    await asyncio.to_thread(repository.ensure)
    response = web.StreamResponse(
        headers={**NO_CACHE, "Content-Type": f"application/x-{service}-result"}
    )
    await response.prepare(request)
    try:
        await run_service(repository, service, request.content.iter_chunked(_CHUNK), response.write)
    except BROKEN_OFF as error:
        log.info("git request broke off", service=service, error=repr(error))
        return _closing(request, response)
    with contextlib.suppress(ConnectionError):  # the pusher left: the deployment went on
        await response.write_eof()
    return response


async def upload_pack(request: web.Request) -> web.StreamResponse:
    return await _stream(request, UPLOAD_PACK)


async def receive_pack(request: web.Request) -> web.StreamResponse:
    """receive-pack under the deployment lock (zero wait: 409), then the push's deployment."""
    ctx = request.app[CONTEXT]
    repository = _repository(request)
    if ctx.deployments is None:
        raise Refusal(503, "Deployments are not available on this daemon.")
    await asyncio.to_thread(repository.ensure)
    deployment = await ctx.deployments.begin(DeployRequest(deployer=deployer(request), temp=True))
    try:
        response = web.StreamResponse(
            headers={**NO_CACHE, "Content-Type": f"application/x-{RECEIVE_PACK}-result"}
        )
        await response.prepare(request)
    except BaseException:
        await asyncio.shield(deployment.discard())
        raise
    try:
        await receive_and_deploy(
            repository,
            ctx.deployments,
            deployment,
            request.content.iter_chunked(_CHUNK),
            response.write,
            branch_setting=ctx.app_settings.get(BRANCH_SETTING),
        )
    except BROKEN_OFF as error:
        log.info("git push broke off", error=repr(error))
        return _closing(request, response)
    with contextlib.suppress(ConnectionError):  # the pusher left: the deployment went on
        await response.write_eof()
    return response


# By name, for the routes `http/lazy.py` registers at start (this module is imported on first use).
HANDLERS: dict[str, Handler] = {
    "info_refs": _plain_errors(info_refs),
    "upload_pack": _plain_errors(upload_pack),
    "receive_pack": _plain_errors(receive_pack),
}
