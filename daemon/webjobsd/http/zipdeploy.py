"""Site deployments over HTTP: zipdeploy, wardeploy and OneDeploy (Part B §1, §2; Part A #5-#8).

Routes: `POST`/`PUT /api/zipdeploy` and `/zipdeploy`, `POST /api/wardeploy` and `/wardeploy`,
`POST`/`PUT /api/publish` and `/publish`. This module maps a request onto a `DeployRequest` and
a target, receives the body, and answers; the deployment itself is `deploy.pipeline`'s.

Decisions:

* **Default deployer "Push-Deployer"** (zipdeploy and wardeploy), KuduLite's
  (`PushDeploymentController.DefaultDeployer`), not Windows Kudu's "ZipDeploy"/"WarDeploy": this
  is a Linux daemon, Part B's rule is to follow KuduLite where the two differ, and clients
  that compare the `deployer` of a record with what real Linux sites answer see the same value.
  OneDeploy records `deployer` and `message` as the client sent them, "OneDeploy" when absent
  (Kudu always writes "OneDeploy"; Part A #8).
* **Order** (Part A #5): the lock and the Pending record first (a 409 comes before a byte of
  the body is read), then the body, then the answer. Async: 202 with an absolute
  `Location: <base>/api/deployments/latest?deployer=..&time=yyyy-MM-dd_HH-mm-ssZ` (base from
  `http.context.base_url`, which honours `trusted_proxies`) and `Retry-After: 30` (Kudu's
  default), the deployment going on as a task owned by `Deployments`. Sync (Part A #6): 200 only
  on success; a package refused by the archive guards answers with the refusal's status (400,
  or 413 when too large); a failure after acceptance is 500 with the reason logged last. The
  sync request also runs the deployment as an owned task and waits for it, so a client that
  disconnects does not cancel a half-done sync. `trackDeploymentProgress=true` makes the id a
  dashed GUID, sent in `SCM-DEPLOYMENT-ID` on the 200 or 202.
* **Bodies** (Part A #7): any content type except JSON is the package, chunked or not, streamed
  to the instance's upload folder under `max_upload_bytes` (`http.uploads.receive_to_file`);
  `multipart/form-data` takes the first part that carries a file name (KuduLite); JSON
  (`{"packageUri": ...}`) is refused with 400: the daemon makes no outbound requests.
* **OneDeploy paths** (Part B §2.2, Kudu's texts): `..` anywhere in `path` is refused (Kudu
  refuses it for zip and static only; a `webapps/..` WAR name or a `lib` path with `..` would
  leave their folders here). Kudu's absolute forms (`/home/...`, `home/`, `%home%/`, `$home/`,
  and the site root itself) mean the site root. A leading `/` that is none of those is taken
  relative to the type's folder (Kudu's `Path.Combine` would make it an absolute path anywhere
  on the disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final
from urllib.parse import quote

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from webjobsd.deploy.pipeline import Deployment, DeployRequest
from webjobsd.deploy.records import DeployStatus
from webjobsd.http.context import CONTEXT, base_url
from webjobsd.http.errors import ApiError, bad_request, too_large
from webjobsd.http.uploads import CHUNK_SIZE, receive_to_file
from webjobsd.refusal import Refusal
from webjobsd.site import SiteLayout

DEFAULT_DEPLOYER: Final = "Push-Deployer"
DEFAULT_MESSAGE: Final = "Created via a push deployment"
ONEDEPLOY: Final = "OneDeploy"
RETRY_AFTER_S: Final = 30
DEPLOYMENT_ID_HEADER: Final = "SCM-DEPLOYMENT-ID"
NO_PACKAGE_URI: Final = (
    "Deploying from a packageUri is not supported: this daemon makes no outbound requests. "
    "Send the zip itself as the request body (Content-Type: application/octet-stream)."
)
NO_FILE_PART: Final = "The multipart/form-data body has no file part."
PATH_WITH_DOTS: Final = "Path cannot contain '..' Please provide an absolute path."
# Kudu's `ArtifactType` names, as its messages print them.
ARTIFACT_TYPES: Final = {
    name.lower(): name
    for name in ("War", "Jar", "Ear", "Lib", "Static", "Startup", "Script", "Zip")
}
_HOME_PREFIXES: Final = ("home/", "%home%/", "$home/", "/home/", "/%home%/", "/$home/")
_CLEAN_FORBIDDEN: Final = re.compile(r"(([/\\])home)([/\\]site)?[/\\]?$")
_WAR_NAME: Final = re.compile(r"^[\w-]+\.war$")
_EXECUTABLE_TYPES: Final = frozenset({"startup", "script"})


# ---------------------------------------------------------------------------------------------
# what a request asks for


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an artifact goes: a zip extracted into `target`, or one file named `file_name`
    placed in `target`. `target` None is wwwroot; `manifest` False copies the previous manifest
    unchanged (OneDeploy, wardeploy)."""

    target: Path | None
    clean: bool
    manifest: bool
    file_name: str | None = None
    executable: bool = False


def flag(request: web.Request, name: str, default: bool = False) -> bool:
    """A boolean query parameter: true/false in any case (the az CLI sends `True`), 1/0."""
    value = request.query.get(name)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise bad_request(f"Query parameter '{name}' must be true or false, not '{value}'.")


def _refuse_json(request: web.Request) -> None:
    if "application/json" in request.content_type.lower():
        raise bad_request(NO_PACKAGE_URI)


def _text(request: web.Request, name: str, default: str) -> str:
    value = request.query.get(name, "").strip()
    return value or default


def _tracking_id(request: web.Request) -> str | None:
    return str(uuid.uuid4()) if flag(request, "trackDeploymentProgress") else None


def _home_relative(path: str, site_root: Path) -> str | None:
    """Kudu's `IsAbsolutePath`: the rest of `path` after a HOME prefix, or None."""
    for prefix in (str(site_root).rstrip("/") + "/", *_HOME_PREFIXES):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return None


def _parts(relative: str) -> tuple[str, ...]:
    if "\x00" in relative:
        raise bad_request("Path cannot contain a NUL character.")
    parts = tuple(part for part in relative.split("/") if part not in ("", "."))
    if ".." in parts:
        raise bad_request(PATH_WITH_DOTS)
    return parts


def _designated(
    type_name: str, path: str | None, designated: str, site_root: Path
) -> tuple[str, ...]:
    """Kudu's `EnsureValidPath`: `path` required, no trailing `/`, absolute only under
    `/home/<designated>/`; the parts relative to that folder."""
    if path is None or not path.strip():
        raise bad_request(f"Path must be defined for type='{type_name}'")
    if path.endswith("/"):
        raise bad_request("Path cannot end with a '/'")
    if path.startswith("/"):
        root = f"/home/{designated}/"
        local_root = f"{str(site_root).rstrip('/')}/{designated}/"
        if path.startswith(root):
            path = path[len(root) :]
        elif path.startswith(local_root):
            path = path[len(local_root) :]
        else:
            raise bad_request(
                f"Absolute path = '{path}' for artifact type = '{type_name}' is invalid. "
                "Either use a relative path or use an absolute path that start with prefix "
                f"'{root}'"
            )
        if not path.strip():
            raise bad_request(
                f"Absolute path for artifact type = '{type_name}' should be of the form "
                f"{root}[directoryname/]<filename>"
            )
    parts = _parts(path)
    if not parts:
        raise bad_request(f"Path must be defined for type='{type_name}'")
    return parts


def _check_clean_path(path: str, site_root: Path) -> None:
    """Kudu's `EnsureValidCleanPath`: no clean deployment aimed at HOME or HOME/site."""
    root = str(site_root).rstrip("/")
    if _CLEAN_FORBIDDEN.search(path) or path.rstrip("/") in (root, f"{root}/site"):
        raise bad_request(
            f"Clean deployments cannot be performed in the requested directory: {path}. "
            "Please perform an incremental deployment (clean = false) or deploy to a "
            "subdirectory."
        )


def onedeploy_placement(
    layout: SiteLayout, type_value: str | None, path: str | None, clean: bool | None
) -> Placement:
    """Where a OneDeploy artifact lands (Part B §2.2), or a 400 with Kudu's text."""
    type_name = ARTIFACT_TYPES.get((type_value or "").lower())
    if type_name is None:
        raise bad_request(f"type='{type_value or ''}' not recognized")
    kind = type_name.lower()
    wwwroot, site_root = layout.wwwroot, layout.site_root
    if path is not None and not path.strip():
        path = None
    if kind == "zip":
        if path is None:
            return Placement(wwwroot, clean is not False, manifest=False)
        if ".." in path:
            raise bad_request(PATH_WITH_DOTS)
        if clean is not False:
            _check_clean_path(path, site_root)
        rest = _home_relative(path, site_root)
        target = site_root.joinpath(*_parts(rest)) if rest is not None else None
        if target is None:
            target = wwwroot.joinpath(*_parts(path))
        return Placement(target, clean is not False, manifest=False)
    if kind == "war":
        if path is None:
            return Placement(wwwroot, bool(clean), manifest=False, file_name="app.war")
        parts = _designated(type_name, path, "site/wwwroot", site_root)
        relative = "/".join(parts)
        if _WAR_NAME.match(relative):
            return Placement(wwwroot, bool(clean), manifest=False, file_name=relative)
        if len(parts) != 2 or parts[0] != "webapps":
            raise bad_request(
                f"path='{path}' is invalid. When type={type_name}, the only allowed paths are "
                "webapps/<directory-name> or /home/site/wwwroot/webapps/<directory-name>. "
                "Example: path=webapps/ROOT or path=/home/site/wwwroot/webapps/ROOT"
            )
        # The legacy form: wardeploy's extraction, always clean.
        return Placement(wwwroot.joinpath(*parts), True, manifest=False)
    if kind in ("jar", "ear"):
        return Placement(wwwroot, bool(clean), manifest=False, file_name=f"app.{kind}")
    if kind == "startup":
        return Placement(
            layout.scripts_dir, bool(clean), manifest=False, file_name="startup.sh", executable=True
        )
    if kind in ("lib", "script"):
        folder, designated = (
            (layout.libs_dir, "site/libs")
            if kind == "lib"
            else (layout.scripts_dir, "site/scripts")
        )
        parts = _designated(type_name, path, designated, site_root)
        return Placement(
            folder.joinpath(*parts[:-1]),
            bool(clean),
            manifest=False,
            file_name=parts[-1],
            executable=kind == "script",
        )
    # static
    if path is None:
        raise bad_request("Path must be defined for type=static")
    if path.endswith("/"):
        raise bad_request("Path cannot end with a '/'")
    if ".." in path:
        raise bad_request(PATH_WITH_DOTS)
    if clean:
        _check_clean_path(os.path.dirname(path), site_root)
    rest = _home_relative(path, site_root)
    parts = _parts(rest) if rest is not None else _parts(path)
    if not parts:
        raise bad_request("Path must be defined for type=static")
    base = site_root if rest is not None else wwwroot
    return Placement(base.joinpath(*parts[:-1]), bool(clean), manifest=False, file_name=parts[-1])


def _optional_flag(request: web.Request, name: str) -> bool | None:
    return flag(request, name) if request.query.get(name, "") != "" else None


# ---------------------------------------------------------------------------------------------
# the body


async def receive_package(request: web.Request, target: Path, max_bytes: int) -> int:
    """The package into `target`: the raw body, or a multipart body's first file part."""
    if request.content_type.lower() != "multipart/form-data":
        return await receive_to_file(request, target, max_bytes)
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                raise bad_request(NO_FILE_PART)
            if isinstance(part, BodyPartReader) and part.filename:
                break
        received = 0
        fd = os.open(
            target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            with open(fd, "wb") as out:
                while chunk := await part.read_chunk(CHUNK_SIZE):
                    received += len(chunk)
                    if received > max_bytes:
                        raise too_large(
                            f"The request body is larger than the limit of {max_bytes} bytes."
                        )
                    out.write(chunk)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            raise
        return received
    except (ConnectionError, HttpProcessingError, ValueError, AssertionError) as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        raise bad_request(f"The multipart body could not be read: {error}") from error


# ---------------------------------------------------------------------------------------------
# one deployment, sync or async


def _location(request: web.Request, deployer: str) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d_%H-%M-%SZ")
    return (
        f"{base_url(request)}/api/deployments/latest?deployer={quote(deployer, safe='')}&time={now}"
    )


def _place_file(upload: Path, folder: Path, name: str, executable: bool) -> None:
    folder.mkdir(mode=0o700)
    placed = folder / name
    os.rename(upload, placed)  # same folder: the upload folder
    placed.chmod(0o755 if executable or name.endswith(".sh") else 0o644)


async def deploy_request(
    request: web.Request,
    deploy: DeployRequest,
    placement: Placement,
    *,
    is_async: bool,
) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    deployments = ctx.deployments
    if deployments is None:
        raise ApiError(503, "Deployments are not available.")
    deployment = await deployments.begin(deploy)
    headers = {DEPLOYMENT_ID_HEADER: deployment.record.id} if deploy.id is not None else {}
    upload_dir = ctx.upload_dir or ctx.layout.temp_root / "uploads"
    token = secrets.token_hex(8)
    upload = upload_dir / f"deploy-{token}"
    try:
        await asyncio.to_thread(upload_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
        await receive_package(request, upload, ctx.limits.max_upload_bytes)
    except BaseException as error:
        reason = error.message if isinstance(error, Refusal) else "The upload was interrupted."
        await asyncio.shield(
            deployments.run(deployment, _fails(f"Receiving the package failed: {reason}"))
        )
        raise
    refused: list[Refusal] = []
    work = _work(deployment, upload, upload_dir / f"artifact-{token}", placement, refused)
    task = deployments.run(deployment, work)
    if is_async:
        headers.update(
            {"Location": _location(request, deploy.deployer), "Retry-After": str(RETRY_AFTER_S)}
        )
        return web.Response(status=202, headers=headers)
    record = await asyncio.shield(task)
    if record is None:
        raise ApiError(503, "The daemon stopped during the deployment; it is marked failed.")
    if record.status == DeployStatus.SUCCESS:
        return web.Response(status=200, headers=headers)
    if refused:
        raise ApiError(refused[0].status, refused[0].message, headers)
    raise ApiError(500, deployment.error or "Deployment Failed.", headers)


def _fails(reason: str) -> Callable[[], Awaitable[None]]:
    async def work() -> None:
        raise Refusal(400, reason)

    return work


def _work(
    deployment: Deployment,
    upload: Path,
    artifact_dir: Path,
    placement: Placement,
    refused: list[Refusal],
) -> Callable[[], Awaitable[None]]:
    async def work() -> None:
        try:
            if placement.file_name is None:
                await deployment.deploy_zip(
                    upload,
                    target=placement.target,
                    clean=placement.clean,
                    manifest=placement.manifest,
                )
            else:
                await asyncio.to_thread(
                    _place_file, upload, artifact_dir, placement.file_name, placement.executable
                )
                await deployment.deploy_folder(
                    artifact_dir, target=placement.target, clean=placement.clean, manifest=False
                )
        except Refusal as refusal:
            refused.append(refusal)
            raise
        finally:
            await asyncio.to_thread(upload.unlink, True)
            await asyncio.to_thread(shutil.rmtree, artifact_dir, True)

    return work


# ---------------------------------------------------------------------------------------------
# the routes


def _push_request(request: web.Request) -> DeployRequest:
    """What zipdeploy and wardeploy record from their query (Kudu's push-deployment parameters)."""
    return DeployRequest(
        deployer=_text(request, "deployer", DEFAULT_DEPLOYER),
        message=_text(request, "message", DEFAULT_MESSAGE),
        author=_text(request, "author", "N/A"),
        author_email=_text(request, "authorEmail", "N/A"),
        id=_tracking_id(request),
    )


async def zipdeploy(request: web.Request) -> web.StreamResponse:
    _refuse_json(request)
    deploy = _push_request(request)
    placement = Placement(None, flag(request, "clean"), manifest=True)
    return await deploy_request(request, deploy, placement, is_async=flag(request, "isAsync"))


async def wardeploy(request: web.Request) -> web.StreamResponse:
    _refuse_json(request)
    name = _text(request, "name", "ROOT")
    if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise bad_request(f"name='{name}' is not a folder name.")
    deploy = _push_request(request)
    ctx = request.app[CONTEXT]
    placement = Placement(ctx.layout.wwwroot / "webapps" / name, True, manifest=False)
    return await deploy_request(request, deploy, placement, is_async=flag(request, "isAsync"))


async def publish(request: web.Request) -> web.StreamResponse:
    _refuse_json(request)
    ctx = request.app[CONTEXT]
    placement = onedeploy_placement(
        ctx.layout,
        request.query.get("type"),
        request.query.get("path"),
        _optional_flag(request, "clean"),
    )
    deploy = DeployRequest(
        deployer=_text(request, "deployer", ONEDEPLOY),
        message=_text(request, "message", ONEDEPLOY),
        author=_text(request, "author", "N/A"),
        author_email=_text(request, "authorEmail", "N/A"),
        id=_tracking_id(request),
        restart=flag(request, "restart", default=True),
    )
    return await deploy_request(request, deploy, placement, is_async=flag(request, "async"))
