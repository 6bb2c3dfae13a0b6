"""Kudu's settings API (`/api/settings`): the per-site store of app settings (Part A #20).

The store is one JSON object in `data/webjobsd/settings.json`, written atomically with mode 0600
(it holds secrets jobs receive as environment variables). `AppSettings` reads it at the moment of
use, so a change applies without a restart; after a write the reconciler is woken so that
`WEBJOBS_STOPPED` acts at once. Writes are serialized, within the daemon by an asyncio lock and
across daemons sharing the site by the file's lock (`records.atomic.serialized`), so that two
concurrent POSTs cannot lose each other's keys.

Body forms accepted by POST, as Kudu's: `{"KEY": "value", ...}` or the legacy
`{"key": "KEY", "value": "value"}`. Numbers and booleans are stored as their text; `null` removes
a key; objects and arrays are refused.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import web

from webjobsd.config import is_valid_setting
from webjobsd.http.context import CONTEXT
from webjobsd.http.errors import bad_request, conflict, not_found, read_json_body
from webjobsd.records.atomic import serialized, write_bytes_atomic

_WRITE_LOCK = web.AppKey("settings_write_lock", asyncio.Lock)


def _read_store(path: Path) -> dict[str, str]:
    """The store; a corrupt one is refused rather than read as empty (a POST would then
    overwrite every key)."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        message = f"The settings store {path} cannot be read ({error}); fix or remove it."
        raise conflict(message) from error
    if not isinstance(loaded, dict):
        raise conflict(f"The settings store {path} is not a JSON object; fix or remove it.")
    return {str(k): str(v) for k, v in loaded.items()}


def _as_text(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise bad_request(f"The value of {key!r} must be a string, a number, a boolean or null.")


def _changes(body: Any) -> dict[str, str | None]:
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object.")
    if set(body) == {"key", "value"} and isinstance(body["key"], str):
        body = {body["key"]: body["value"]}
    changes: dict[str, str | None] = {}
    for key, value in body.items():
        text = _as_text(key, value)
        if not is_valid_setting(key, text or ""):
            raise bad_request(f"Invalid setting name {key!r}.")
        changes[key] = text
    return changes


async def get_settings(request: web.Request) -> web.StreamResponse:
    path = request.app[CONTEXT].layout.settings_store_path
    return web.json_response(await asyncio.to_thread(_read_store, path))


async def get_setting(request: web.Request) -> web.StreamResponse:
    path = request.app[CONTEXT].layout.settings_store_path
    key = request.match_info["key"]
    store = await asyncio.to_thread(_read_store, path)
    if key not in store:
        raise not_found(f"No setting named {key!r}.")
    return web.json_response(store[key])


async def _update(request: web.Request, changes: dict[str, str | None]) -> None:
    ctx = request.app[CONTEXT]
    path = ctx.layout.settings_store_path
    async with request.app[_WRITE_LOCK]:
        await asyncio.to_thread(_apply, path, changes)
    ctx.wake()


def _apply(path: Path, changes: dict[str, str | None]) -> None:
    """Read, change, write, under the file's lock: another daemon's write is never lost."""
    with serialized(path):
        store = _read_store(path)
        for key, value in changes.items():
            if value is None:
                store.pop(key, None)
            else:
                store[key] = value
        data = json.dumps(store, indent=2, sort_keys=True).encode()
        write_bytes_atomic(path, data, mode=0o600)


async def post_settings(request: web.Request) -> web.StreamResponse:
    body = await read_json_body(request)
    await _update(request, _changes(body))
    return web.Response(status=200)


async def delete_setting(request: web.Request) -> web.StreamResponse:
    await _update(request, {request.match_info["key"]: None})
    return web.Response(status=200)


def add_settings_routes(app: web.Application) -> None:
    app[_WRITE_LOCK] = asyncio.Lock()
    for prefix in ("/api/settings", "/settings"):
        app.router.add_get(prefix, get_settings)
        app.router.add_post(prefix, post_settings)
        app.router.add_get(prefix + "/{key}", get_setting)
        app.router.add_delete(prefix + "/{key}", delete_setting)
