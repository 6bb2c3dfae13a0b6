"""Routes whose handlers' modules are imported on their first request, not at start.

The rule (scenario 7 of bench/README.md counts the daemon's RSS): a module that only some
requests need, and that is heavy (its own code, or what it imports: zipfile, the deployment
pipeline, git, cron words), is not imported by the serve path. Its routes are still registered
at start, here, so the router, 404/405 answers and the OpenAPI contract are the same; each
route's handler is a thin one that imports the module on the first call and hands the request on.
tests/test_lazy_imports.py starts the daemon and fails if such a module is loaded before a
request needs it; a new heavy route module belongs here and in that test's list.

Decision, against `importlib.import_module(name)` from a table of strings: every lazy import
is a plain `from webjobsd.http import X` inside a function, so import-linter still sees the
edge (the layers contract holds for lazy imports too). The first request of a kind pays the
import once, later ones a list look-up. Measured (CPU time of the import, 2-core VM under load):
files.py with zipfile 8-12 ms, git 4-7, deployments 3-4, zipdeploy 2-4, schedules 2; the
daemon's RSS is 3.4-3.8 MB smaller (bench scenario 7) with these, psutil and YAML left out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from webjobsd.http.errors import Handler
from webjobsd.limits import UploadLimits

if TYPE_CHECKING:
    from webjobsd.http.files import FileApi


def on_first_call(load: Callable[[], Handler]) -> Handler:
    """A handler that calls `load` once, on its first request, and then serves with its result."""
    loaded: list[Handler] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        if not loaded:
            loaded.append(load())
        return await loaded[0](request)

    return handler


def add_zipdeploy_routes(app: web.Application) -> None:
    def zipdeploy() -> Handler:
        from webjobsd.http import zipdeploy

        return zipdeploy.zipdeploy

    def publish() -> Handler:
        from webjobsd.http import zipdeploy

        return zipdeploy.publish

    def wardeploy() -> Handler:
        from webjobsd.http import zipdeploy

        return zipdeploy.wardeploy

    for prefix in ("/api", ""):
        for method in ("POST", "PUT"):
            app.router.add_route(method, f"{prefix}/zipdeploy", on_first_call(zipdeploy))
            app.router.add_route(method, f"{prefix}/publish", on_first_call(publish))
        app.router.add_post(f"{prefix}/wardeploy", on_first_call(wardeploy))


def add_deployment_routes(app: web.Application) -> None:
    def pick(name: str) -> Handler:
        def load() -> Handler:
            from webjobsd.http import deployments

            handler: Handler = deployments.HANDLERS[name]
            return handler

        return on_first_call(load)

    router = app.router
    for prefix in ("/api/deployments", "/deployments"):
        router.add_get(prefix, pick("list_deployments"))
        router.add_get(prefix + "/{id}", pick("get_deployment"))
        router.add_put(prefix + "/{id}", pick("put_deployment"))
        router.add_delete(prefix + "/{id}", pick("delete_deployment"))
        router.add_get(prefix + "/{id}/log", pick("get_log"))
        router.add_get(prefix + "/{id}/log/{log_id}", pick("get_log_details"))
    router.add_get("/api/isdeploying", pick("is_deploying"))
    router.add_get("/diagnostics/runtime", pick("runtime_info"))


def add_git_routes(app: web.Application) -> None:
    def pick(name: str) -> Handler:
        def load() -> Handler:
            from webjobsd.http import git

            return git.HANDLERS[name]

        return on_first_call(load)

    # The host root too, as Kudu: `git remote add azure https://HOST/` works.
    for root in ("/{site}.git", "/git", ""):
        app.router.add_get(root + "/info/refs", pick("info_refs"))
        app.router.add_post(root + "/git-upload-pack", pick("upload_pack"))
        app.router.add_post(root + "/git-receive-pack", pick("receive_pack"))


def add_schedule_routes(app: web.Application) -> None:
    def list_schedules() -> Handler:
        from webjobsd.http import schedules

        return schedules.list_schedules

    app.router.add_get("/api/schedules", on_first_call(list_schedules))


def add_file_routes(
    app: web.Application,
    *,
    site_root: Path,
    limits: UploadLimits,
    temp_dir: Path,
    on_change: Callable[[Path], None] | None = None,
    base_url: Callable[[web.Request], str] | None = None,
) -> None:
    """The vfs and zip routes of `http/files.py` (see `add_file_routes` there)."""
    api: list[FileApi] = []

    def pick(method: Callable[[FileApi], Handler]) -> Handler:
        def load() -> Handler:
            if not api:
                from webjobsd.http import files

                api.append(
                    files.file_api(
                        site_root=site_root,
                        limits=limits,
                        temp_dir=temp_dir,
                        on_change=on_change,
                        base_url=base_url,
                    )
                )
            return method(api[0])

        return on_first_call(load)

    for prefix in ("/api/vfs", "/vfs"):
        for route in (prefix, prefix + "/{path:.*}"):
            app.router.add_get(route, pick(lambda files: files.vfs_get))  # HEAD too
            app.router.add_put(route, pick(lambda files: files.vfs_put))
            app.router.add_delete(route, pick(lambda files: files.vfs_delete))
    for prefix in ("/api/zip", "/zip"):
        for route in (prefix, prefix + "/{path:.*}"):
            app.router.add_get(route, pick(lambda files: files.zip_get))
            app.router.add_put(route, pick(lambda files: files.zip_put))
