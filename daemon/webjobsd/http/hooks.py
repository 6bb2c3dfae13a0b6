"""Kudu's hooks API: `POST/GET /api/hooks`, `GET/DELETE /api/hooks/{id}` (and `/hooks/...`, Kudu
maps both), plus the middleware that remembers the last request's base URL for event bodies.

Differences from Kudu, on purpose: an unknown id is a 404 for GET (Kudu answers 200 with `null`,
its NotFound response is built and dropped) and for DELETE (Kudu answers 200 whatever the id);
DELETE of a hook answers 200 with the removed hook. Kudu's `POST /hooks/publish/{event}`, which
lets any caller post arbitrary bodies to every subscriber, is not offered.

The base-URL middleware is added last, so it runs inside the authentication middleware: only a
request that was let in can change the host written into event bodies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from webjobsd.http.context import base_url
from webjobsd.http.errors import ApiError, Handler, bad_request, conflict, not_found, read_json_body
from webjobsd.webhooks.subscriptions import HookConflict, HookError, HookStore, parse_request

HOOKS = web.AppKey("webjobsd_hooks", HookStore)
# Probes must not decide which host event bodies name.
_NOT_REMEMBERED = frozenset({"/healthz", "/readyz", "/metrics"})


async def subscribe(request: web.Request) -> web.StreamResponse:
    body = await read_json_body(request)
    try:
        hook_request = parse_request(body)
        hook, _created = await asyncio.to_thread(request.app[HOOKS].add, hook_request)
    except HookConflict as error:
        raise conflict(str(error)) from error
    except HookError as error:
        raise bad_request(str(error)) from error
    except OSError as error:
        raise ApiError(500, f"Cannot save the hook: {error.strerror}") from error
    # Kudu answers 201 with the existing hook as well when the same URL and event come again.
    return web.json_response(hook.to_json(), status=201)


async def list_hooks(request: web.Request) -> web.StreamResponse:
    hooks = await asyncio.to_thread(request.app[HOOKS].hooks)
    return web.json_response([hook.to_json() for hook in hooks])


async def get_hook(request: web.Request) -> web.StreamResponse:
    hook_id = request.match_info["id"]
    hook = await asyncio.to_thread(request.app[HOOKS].get, hook_id)
    if hook is None:
        raise not_found(f"No hook with id {hook_id!r}.")
    return web.json_response(hook.to_json())


async def delete_hook(request: web.Request) -> web.StreamResponse:
    hook_id = request.match_info["id"]
    try:
        hook = await asyncio.to_thread(request.app[HOOKS].remove, hook_id)
    except OSError as error:
        raise ApiError(500, f"Cannot save the hooks: {error.strerror}") from error
    if hook is None:
        raise not_found(f"No hook with id {hook_id!r}.")
    return web.json_response(hook.to_json())


def remember_base_url(remember: Callable[[str], None]) -> Callable[..., object]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _NOT_REMEMBERED:
            remember(base_url(request))
        return await handler(request)

    return middleware


def add_hook_routes(
    app: web.Application, store: HookStore, remember: Callable[[str], None]
) -> None:
    """Call before the app starts (the middleware list freezes then)."""
    app[HOOKS] = store
    app.middlewares.append(remember_base_url(remember))  # type: ignore[arg-type]
    for prefix in ("/api/hooks", "/hooks"):
        app.router.add_post(prefix, subscribe)
        app.router.add_get(prefix, list_hooks)
        app.router.add_get(prefix + "/{id}", get_hook)
        app.router.add_delete(prefix + "/{id}", delete_hook)
