"""The HTTP server: one aiohttp application on our own loop (an AppRunner behind our listener).

It is built by the composition root from an `ApiContext` and started after the daemon is ready;
stopping it closes listeners first, then waits (bounded) for requests in flight. Accepting
connections, their limits and TLS belong to `http/listener.py` (why not aiohttp's `TCPSite` is
said there); the certificate files to `http/tls.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog
from aiohttp import web

from webjobsd.http.context import CONTEXT, ApiContext, base_url
from webjobsd.http.dashboard import add_dashboard_routes
from webjobsd.http.errors import error_middleware
from webjobsd.http.jobs import add_job_routes
from webjobsd.http.lazy import (
    add_deployment_routes,
    add_file_routes,
    add_git_routes,
    add_schedule_routes,
    add_zipdeploy_routes,
)
from webjobsd.http.listener import ConnectionGuard, ConnectionLimits, Listener, track_requests
from webjobsd.http.settings import add_settings_routes
from webjobsd.http.tls import ServerTls

log = structlog.get_logger("webjobsd.http")

SHUTDOWN_TIMEOUT_S = 5.0


async def healthz(_request: web.Request) -> web.StreamResponse:
    """The process answers (liveness)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    """Readiness: the watcher, the reconciler and the scheduler are alive and recent; `notes`
    say what is going on without being a fault (a deployment holding job changes); `watch` says
    how file changes are found (`inotify`, or `poll`: no watcher, its check is true)."""
    ctx = request.app[CONTEXT]
    checks = ctx.readiness() if ctx.readiness is not None else {}
    notes = ctx.readiness_notes() if ctx.readiness_notes is not None else []
    extra: dict[str, object] = {"watch": ctx.watch}
    if notes:
        extra["notes"] = notes
    if all(checks.values()):
        return web.json_response({"ready": True, "checks": checks, **extra})
    failing = sorted(name for name, ok in checks.items() if not ok)
    return web.json_response(
        {"ready": False, "checks": checks, "message": f"not ready: {', '.join(failing)}", **extra},
        status=503,
    )


UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/readyz"})


def build_app(
    ctx: ApiContext,
    *,
    extra_middlewares: tuple[Callable[..., object], ...] = (),
) -> web.Application:
    app = web.Application(
        middlewares=[track_requests, error_middleware, *extra_middlewares],  # type: ignore[list-item]
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
    add_zipdeploy_routes(app)
    add_deployment_routes(app)
    add_file_routes(
        app,
        site_root=ctx.layout.site_root,
        limits=ctx.limits,
        temp_dir=ctx.upload_dir or ctx.layout.temp_root / "uploads",
        on_change=ctx.on_file_change,
        base_url=base_url,
    )
    add_git_routes(app)
    return app


OPENAPI = Path(__file__).with_name("openapi.yaml")


async def openapi_document(_request: web.Request) -> web.StreamResponse:
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/yaml")


class HttpServer:
    def __init__(
        self,
        app: web.Application,
        limits: ConnectionLimits | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        self.app = app
        self.limits = limits or ConnectionLimits()
        self.tls = tls
        self._runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            keepalive_timeout=self.limits.keepalive_timeout_s,
        )
        self.guard: ConnectionGuard | None = None
        self._listener: Listener | None = None
        self.port: int | None = None
        self.host: str | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    async def start(self, host: str, port: int) -> None:
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(
            server, self.limits, self.tls.context if self.tls is not None else None
        )
        try:
            self._listener = Listener.bind(host, port, self.guard)
        except OSError:
            await self._runner.cleanup()
            raise
        self._listener.start()
        self.host = host
        self.port = self._listener.port or port
        shown = f"[{host}]" if ":" in host else host
        log.info(
            "listening",
            url=f"{self.scheme}://{shown}:{self.port}",
            max_connections=self.guard.cap,
            header_timeout_s=self.limits.header_timeout_s,
            keepalive_timeout_s=self.limits.keepalive_timeout_s,
            tls_certificate=str(self.tls.certificate) if self.tls else None,
            tls_fingerprint_sha256=self.tls.fingerprint_sha256 if self.tls else None,
        )
        if self.guard.cap < self.limits.max_connections:
            log.warning(
                "max_connections lowered to half of the file limit (RLIMIT_NOFILE)",
                configured=self.limits.max_connections,
                effective=self.guard.cap,
            )

    def replace_tls(self, tls: ServerTls) -> None:
        """New connections get `tls`; open ones keep the certificate they were served."""
        self.tls = tls
        if self.guard is not None:
            self.guard.tls = tls.context

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await self._runner.cleanup()
        if self.guard is not None:
            await self.guard.close_all()
