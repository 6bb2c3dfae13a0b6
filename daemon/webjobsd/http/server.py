"""The HTTP server: one aiohttp application on our own loop (AppRunner + TCPSite).

It is built by the composition root from an `ApiContext` and started after the daemon is ready;
stopping it closes listeners first, then waits (bounded) for requests in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog
from aiohttp import web

from webjobsd.http.context import CONTEXT, ApiContext, base_url
from webjobsd.http.dashboard import add_dashboard_routes
from webjobsd.http.errors import error_middleware
from webjobsd.http.files import add_file_routes
from webjobsd.http.jobs import add_job_routes
from webjobsd.http.schedules import add_schedule_routes
from webjobsd.http.settings import add_settings_routes

log = structlog.get_logger("webjobsd.http")

SHUTDOWN_TIMEOUT_S = 5.0


async def healthz(_request: web.Request) -> web.StreamResponse:
    """The process answers (liveness)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    """Readiness: the watcher, the reconciler and the scheduler are alive and recent."""
    readiness = request.app[CONTEXT].readiness
    checks = readiness() if readiness is not None else {}
    if all(checks.values()):
        return web.json_response({"ready": True, "checks": checks})
    failing = sorted(name for name, ok in checks.items() if not ok)
    return web.json_response(
        {"ready": False, "checks": checks, "message": f"not ready: {', '.join(failing)}"},
        status=503,
    )


UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/readyz"})


def build_app(
    ctx: ApiContext,
    *,
    extra_middlewares: tuple[Callable[..., object], ...] = (),
) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, *extra_middlewares],  # type: ignore[list-item]
        client_max_size=1024 * 1024,
    )
    app[CONTEXT] = ctx
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/openapi.yaml", openapi_document)
    add_job_routes(app)
    add_dashboard_routes(app)
    add_schedule_routes(app)
    add_settings_routes(app)
    add_file_routes(
        app,
        site_root=ctx.layout.site_root,
        limits=ctx.limits,
        temp_dir=ctx.upload_dir or ctx.layout.temp_root / "uploads",
        on_change=ctx.on_file_change,
        base_url=base_url,
    )
    return app


OPENAPI = Path(__file__).with_name("openapi.yaml")


async def openapi_document(_request: web.Request) -> web.StreamResponse:
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/yaml")


class HttpServer:
    def __init__(self, app: web.Application) -> None:
        self.app = app
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        self.port: int | None = None
        self.host: str | None = None

    async def start(self, host: str, port: int) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server  # the bound socket tells the real port when 0 was asked
        sockets = getattr(server, "sockets", None) or []
        self.host = host
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info("listening", url=f"http://{host}:{self.port}")

    async def stop(self) -> None:
        await self._runner.cleanup()
