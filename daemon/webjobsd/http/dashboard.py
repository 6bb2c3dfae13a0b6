"""The dashboard: three static files (HTML, JS, CSS) under `/dashboard/`, and `/` sent there.

Decisions:

* **No build step, no framework, no network beyond this daemon.** The page is vanilla JS that
  reads the same REST API and log streams any client uses; the files ship as package data next
  to `openapi.yaml` and are read at request time (small, and an edit shows on reload).
* **Same Basic auth as the API.** The routes are not in `UNAUTHENTICATED_PATHS`, so the browser
  is challenged on the first page load and then sends the cached credentials with every
  `fetch` and `EventSource` of the same origin.
* **Fixed routes, one per file,** rather than a static directory: nothing outside the three
  files can be served, and each route is an operation documented in `openapi.yaml`.
* **No caching** (`Cache-Control: no-cache`): after an upgrade the page and its script must
  not come from two versions.
* **Deploying from the page uses the clients' routes**: a site zip is posted to
  `/api/zipdeploy?isAsync=true` and a job zip put to `/api/{type}webjobs/{name}`, through
  XMLHttpRequest (only it reports upload progress); a deployment is then followed by polling
  its record and log, as Kudu's clients do, since a deployment's log has no stream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

FOLDER: Final = Path(__file__).with_name("dashboard")
PREFIX: Final = "/dashboard/"
FILES: Final = {
    "": ("index.html", "text/html"),
    "app.js": ("app.js", "text/javascript"),
    "style.css": ("style.css", "text/css"),
}


def _serve(filename: str, content_type: str) -> Handler:
    async def handler(_request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=(FOLDER / filename).read_bytes(),
            content_type=content_type,
            charset="utf-8",
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    return handler


async def to_dashboard(_request: web.Request) -> web.StreamResponse:
    return web.Response(status=302, headers={"Location": PREFIX})


def add_dashboard_routes(app: web.Application) -> None:
    app.router.add_get("/", to_dashboard)
    for route, (filename, content_type) in FILES.items():
        app.router.add_get(PREFIX + route, _serve(filename, content_type))
