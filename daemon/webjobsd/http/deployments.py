"""Kudu's deployment history API and the probes deploy clients send (Part B §3, §8; Part A #13).

Routes, each also without the `/api` prefix as Kudu maps them: `GET /api/deployments` (newest
first, an ETag, 304 on `If-None-Match`; `?warmup=true` is the same list), `GET
/api/deployments/{id}` (`latest` is the poll target), `GET …/{id}/log`, `GET …/{id}/log/{logId}`,
`PUT /api/deployments/{id}` (a finished record from CI, §3.5) and `DELETE /api/deployments/{id}`.
Also `GET /api/isdeploying` (KuduLite's) and `GET /diagnostics/runtime` (the publish-profile
path of azure/webapps-deploy asks it for `system.os_name`).

Design choices:

* The records are `deploy.records`; this module only maps HTTP onto them, in a thread (file I/O).
* **`url`, `log_url` and `details_url` are absolute** and always the `/api` form, built from
  `http.context.base_url` (so `X-Forwarded-*` count only from trusted proxies), whichever alias
  was asked: the library of the GitHub action follows them verbatim.
* **`latest`** answers 202 with `Location` = the request's own absolute URI and `Retry-After`
  while a record is unfinished, else 200 with the finished record that ended last, else 404.
* **Repair on read.** A record left unfinished by a daemon that died while this one ran would
  keep `latest` at 202 forever; when a read sees an unfinished record while nobody holds the
  deployment lock, the records are repaired under the lock first (Kudu does the same on read).
* **Ids from URLs** are checked by `deploy.records.is_valid_deployment_id` before any path is
  built: an unknown or impossible id is a 404 for reads and deletes, a 400 for `PUT`.
* **Writes take the deployment lock** with zero wait, as Kudu's `PUT` and `DELETE` do: while a
  deployment runs they answer 409 with Kudu's text. `DELETE` also refuses the active record and
  an unfinished one (409); it answers 200 with the removed record (Kudu: an empty 200).
* **`PUT` differs from Kudu** in three small ways: `last_success_end_time` is set only for a
  successful record (Kudu sets it for both, which makes its retention count failures as
  successes); an existing id really is a 409 (Kudu builds that answer and drops it); any body
  that is not a finished record is a 400 (Kudu would redeploy the repository's commit `{id}`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from webjobsd import __version__
from webjobsd.deploy.lock import IN_PROGRESS, DeploymentLock, deployment_in_progress, lock_owner
from webjobsd.deploy.records import (
    DeploymentRecord,
    DeploymentStore,
    DeployStatus,
    LogEntry,
    LogType,
    format_deploy_time,
    is_valid_deployment_id,
    parse_deploy_time,
)
from webjobsd.http.context import CONTEXT, ApiContext, base_url
from webjobsd.http.errors import ApiError, Handler, bad_request, conflict, not_found, read_json_body
from webjobsd.site import SiteLayout

LATEST = "latest"
# Seconds a poller of `latest` is told to wait; the GitHub action polls every 5 s anyway.
RETRY_AFTER_S = 5
# Longest text accepted in a PUT field: records are read whole, so they stay small.
_MAX_PUT_TEXT = 64 * 1024


def _store(request: web.Request) -> DeploymentStore:
    ctx = request.app[CONTEXT]
    if ctx.deployment_store is None:
        # Built by the composition root; a test app without it still answers sensibly.
        ctx.deployment_store = DeploymentStore(ctx.layout)
    return ctx.deployment_store


def site_name(ctx: ApiContext) -> str:
    """`WEBSITE_SITE_NAME` up to its first `_` (a slot's suffix), else the site folder's name."""
    configured = ctx.app_settings.get("WEBSITE_SITE_NAME")
    if configured:
        return configured.split("_", 1)[0]
    return ctx.layout.site_root.name


def _not_found(record_id: str) -> ApiError:
    return not_found(f"Deployment '{record_id}' not found.")


@dataclass(frozen=True, slots=True)
class _View:
    """What a read of the records saw: the records (newest first) and the active id."""

    records: list[DeploymentRecord]
    active: str | None


def _read(store: DeploymentStore, layout: SiteLayout) -> _View:
    records = store.all()
    # Unfinished with nobody deploying: a daemon died mid-deployment (module docstring).
    abandoned = any(not record.finished for record in records) and not deployment_in_progress(
        layout
    )
    if abandoned and store.repair_if_lock_free():
        records = store.all()
    return _View(records, store.active_id())


async def _view(request: web.Request) -> _View:
    return await asyncio.to_thread(_read, _store(request), request.app[CONTEXT].layout)


def _record_json(request: web.Request, record: DeploymentRecord, active: str | None) -> Any:
    ctx = request.app[CONTEXT]
    return record.to_json(base_url(request), active=record.id == active, site_name=site_name(ctx))


# -- the list ---------------------------------------------------------------------------------


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _matches(if_none_match: str, etag: str) -> bool:
    """Weak comparison (RFC 9110 §13.1.2), as Kudu's; `*` matches anything."""
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


async def list_deployments(request: web.Request) -> web.StreamResponse:
    """Every record, newest first. `?warmup=true` (the clients' warm-up) gets the same list."""
    view = await _view(request)
    body = json.dumps(
        [_record_json(request, record, view.active) for record in view.records],
        separators=(",", ":"),
    ).encode()
    # The tag covers the body, which names the request's host: a proxy in between gets a tag
    # per host, and any change of any record (or of `active`) changes it.
    etag = _etag(body)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _matches(request.headers.get("If-None-Match", ""), etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type="application/json", headers=headers)


# -- one record -------------------------------------------------------------------------------


async def get_deployment(request: web.Request) -> web.StreamResponse:
    record_id = request.match_info["id"]
    view = await _view(request)
    if record_id == LATEST:
        return _latest(request, view)
    record = next((r for r in view.records if r.id == record_id), None)
    if record is None:
        raise _not_found(record_id)
    return web.json_response(_record_json(request, record, view.active))


def _latest(request: web.Request, view: _View) -> web.StreamResponse:
    for record in view.records:
        if not record.finished:
            # The poll target of every async deploy: "not yet", and where to ask again.
            return web.json_response(
                _record_json(request, record, view.active),
                status=202,
                headers={
                    "Location": base_url(request) + request.raw_path,
                    "Retry-After": str(RETRY_AFTER_S),
                },
            )
    ended = [record for record in view.records if record.end_time is not None]
    if not ended:
        raise _not_found(LATEST)
    newest = max(ended, key=lambda record: record.end_time or record.received_time)
    return web.json_response(_record_json(request, newest, view.active))


# -- logs -------------------------------------------------------------------------------------


def _log_url(request: web.Request, record_id: str) -> str:
    return f"{base_url(request)}/api/deployments/{record_id}/log"


def _entry_json(entry: LogEntry, log_url: str, *, top_level: bool) -> dict[str, Any]:
    # Kudu: top-level entries carry their GUID, children an empty id; `details_url` only when
    # there are details (null otherwise, Newtonsoft writes null members).
    shown_id = entry.id if top_level or entry.has_children else ""
    return {
        "log_time": format_deploy_time(entry.log_time),
        "id": shown_id,
        "message": entry.message,
        "type": int(entry.type),
        "details_url": f"{log_url}/{entry.id}" if entry.has_children else None,
    }


async def get_log(request: web.Request) -> web.StreamResponse:
    record_id = request.match_info["id"]
    store = _store(request)

    def read() -> list[LogEntry] | None:
        if store.get(record_id) is None:
            raise _not_found(record_id)
        deployment_log = store.log(record_id)
        return deployment_log.entries() if deployment_log.exists else None

    entries = await asyncio.to_thread(read)
    if entries is None:
        raise not_found(f"No log found for '{record_id}'.")
    log_url = _log_url(request, record_id)
    return web.json_response([_entry_json(e, log_url, top_level=True) for e in entries])


async def get_log_details(request: web.Request) -> web.StreamResponse:
    record_id, log_id = request.match_info["id"], request.match_info["log_id"]
    store = _store(request)

    def read() -> list[LogEntry] | None:
        if store.get(record_id) is None:
            raise _not_found(record_id)
        deployment_log = store.log(record_id)
        return deployment_log.children(log_id) if deployment_log.exists else None

    children = await asyncio.to_thread(read)
    if children is None:
        raise not_found(f"No log found for '{record_id}'.")
    if not children:
        raise not_found(f"LogId '{log_id}' was not found in Deployment '{record_id}'.")
    log_url = _log_url(request, record_id)
    return web.json_response([_entry_json(e, log_url, top_level=False) for e in children])


# -- writes -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _FinishedRecord:
    """A `PUT` body that describes a finished deployment (§3.5)."""

    status: DeployStatus
    message: str
    deployer: str
    author: str
    author_email: str
    start_time: datetime
    end_time: datetime
    active: bool
    details: str | None


def _required_text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise bad_request(f"'{name}' must be a non-empty string.")
    return _bounded(name, value)


def _optional_text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string.")
    return _bounded(name, value)


def _bounded(name: str, value: str) -> str:
    if len(value) > _MAX_PUT_TEXT:
        raise bad_request(f"'{name}' is longer than {_MAX_PUT_TEXT} characters.")
    return value


def _optional_time(body: dict[str, Any], name: str, default: datetime) -> datetime:
    try:
        return parse_deploy_time(body.get(name)) or default
    except ValueError as error:
        raise bad_request(f"'{name}' must be an ISO-8601 date and time.") from error


def _parse_finished(body: object) -> _FinishedRecord:
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object describing a finished deployment.")
    status = body.get("status")
    if isinstance(status, bool) or status not in (DeployStatus.FAILED, DeployStatus.SUCCESS):
        raise bad_request(
            "'status' must be 3 (Failed) or 4 (Success): only finished deployments can be "
            "recorded (redeploying a commit by id is not supported)."
        )
    status = DeployStatus(status)
    now = datetime.now(UTC)
    active = body.get("active")
    if active is not None and not isinstance(active, bool):
        raise bad_request("'active' must be true or false.")
    if active is None:
        active = status == DeployStatus.SUCCESS
    elif active and status != DeployStatus.SUCCESS:
        raise bad_request("Only successful status can be active!")  # Kudu's text
    return _FinishedRecord(
        status=status,
        message=_required_text(body, "message"),
        deployer=_required_text(body, "deployer"),
        author=_required_text(body, "author"),
        author_email=_optional_text(body, "author_email") or "N/A",
        start_time=_optional_time(body, "start_time", now),
        end_time=_optional_time(body, "end_time", now),
        active=active,
        details=_optional_text(body, "details"),
    )


def _record_finished(
    store: DeploymentStore, record_id: str, finished: _FinishedRecord
) -> DeploymentRecord:
    lock = DeploymentLock(store.layout)
    if not lock.try_acquire({"Operation": "Recording a deployment", "Deployment": record_id}):
        raise conflict(IN_PROGRESS)
    try:
        if store.get(record_id) is not None:
            raise conflict(f"Deployment with id '{record_id}' exists")  # Kudu's text
        record = store.create(
            id=record_id,
            deployer=finished.deployer,
            message=finished.message,
            author=finished.author,
            author_email=finished.author_email,
            status_text="",
        )
        record.received_time = record.start_time = finished.start_time
        record.status = finished.status
        record.end_time = finished.end_time
        record.complete = True
        if finished.status == DeployStatus.SUCCESS:
            record.last_success_end_time = finished.end_time
        deployment_log = store.log(record_id)
        if finished.status == DeployStatus.SUCCESS:
            entry = deployment_log.add("Deployment successful.")
        else:
            entry = deployment_log.add("Deployment failed.", LogType.ERROR)
        if finished.details:
            deployment_log.add(finished.details, parent=entry)
        store.save(record)
        if finished.active:
            store.set_active(record_id)
        store.purge()
        return record
    finally:
        lock.release()


async def put_deployment(request: web.Request) -> web.StreamResponse:
    record_id = request.match_info["id"]
    if not is_valid_deployment_id(record_id):
        raise bad_request(
            f"Invalid deployment id {record_id!r}: 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or a digit."
        )
    finished = _parse_finished(await read_json_body(request))
    store = _store(request)
    try:
        record = await asyncio.to_thread(_record_finished, store, record_id, finished)
    except OSError as error:
        raise ApiError(500, f"Cannot write the deployment record: {error.strerror}") from error
    active = record_id if finished.active else await asyncio.to_thread(store.active_id)
    return web.json_response(_record_json(request, record, active))


def _delete(store: DeploymentStore, record_id: str) -> DeploymentRecord:
    lock = DeploymentLock(store.layout)
    if not lock.try_acquire({"Operation": "Deleting a deployment", "Deployment": record_id}):
        raise conflict(IN_PROGRESS)
    try:
        record = store.get(record_id)
        if record is None:
            raise _not_found(record_id)
        if record_id == store.active_id():
            raise conflict(f"Deployment '{record_id}' is the active one; it cannot be deleted.")
        if not record.finished:
            raise conflict(f"Deployment '{record_id}' is in progress; it cannot be deleted.")
        try:
            store.delete(record_id)
        except FileNotFoundError as error:
            raise _not_found(record_id) from error
        return record
    finally:
        lock.release()


async def delete_deployment(request: web.Request) -> web.StreamResponse:
    record_id = request.match_info["id"]
    store = _store(request)
    if not is_valid_deployment_id(record_id):
        raise _not_found(record_id)
    record = await asyncio.to_thread(_delete, store, record_id)
    return web.json_response(_record_json(request, record, None))


# -- probes -----------------------------------------------------------------------------------


async def is_deploying(request: web.Request) -> web.StreamResponse:
    """KuduLite's `{"value": "True"|"False", "msg": ...}` (.NET's bool text), from the lock."""
    layout = request.app[CONTEXT].layout
    held = await asyncio.to_thread(deployment_in_progress, layout)
    if not held:
        return web.json_response({"value": "False", "msg": "No deployment in progress."})
    owner = await asyncio.to_thread(lock_owner, layout)
    return web.json_response({"value": "True", "msg": IN_PROGRESS, "owner": owner})


async def runtime_info(_request: web.Request) -> web.StreamResponse:
    """What `getAppRuntime` of the deploy library reads (`system.os_name`), and a few facts."""
    return web.json_response(
        {
            "system": {
                "os_name": "Unix",
                "os_version": platform.release(),
                "machine": platform.machine(),
                "processor_count": os.cpu_count(),
            },
            "python": {
                "version": platform.python_version(),
                "implementation": sys.implementation.name,
            },
            "webjobsd": {"version": __version__},
        }
    )


# By name, for the routes `http/lazy.py` registers at start (this module is imported on first use).
HANDLERS: dict[str, Handler] = {
    "list_deployments": list_deployments,
    "get_deployment": get_deployment,
    "put_deployment": put_deployment,
    "delete_deployment": delete_deployment,
    "get_log": get_log,
    "get_log_details": get_log_details,
    "is_deploying": is_deploying,
    "runtime_info": runtime_info,
}
