"""The served OpenAPI document is valid, and routes and spec stay in step."""

from __future__ import annotations

import re

import yaml
from openapi_spec_validator import validate

from tests.helpers import Site
from tests.test_api_jobs import api
from webjobsd.http.server import OPENAPI

_METHODS = {"get", "put", "post", "delete", "patch", "head"}


def canonical(path: str) -> str:
    """Kudu's aliases map to the current form; parameter names and patterns don't matter."""
    path = re.sub(r"\{[^}:]+(:[^}]*)?\}", "{}", path)
    for old, new in (
        (r"^/api/jobs/?$", "/api/webjobs"),
        (r"^/jobs/?$", "/api/webjobs"),
        (r"^/api/(triggered|continuous)jobs(?=/|$)", r"/api/\1webjobs"),
        (r"^/(?:api/)?jobs/(triggered|continuous)(?=/|$)", r"/api/\1webjobs"),
        (r"^/(vfs|zip|settings|hooks|deployments)(?=/|$)", r"/api/\1"),
    ):
        path = re.sub(old, new, path)
    return path


def spec_operations() -> set[tuple[str, str]]:
    spec = yaml.safe_load(OPENAPI.read_text())
    return {
        (method.upper(), canonical(path))
        for path, item in spec["paths"].items()
        for method in item
        if method in _METHODS
    }


def test_the_document_is_valid_openapi() -> None:
    validate(yaml.safe_load(OPENAPI.read_text()))


async def test_every_route_is_in_the_spec_and_every_spec_path_is_routed(site: Site) -> None:
    spec = spec_operations()
    async with api(site) as (daemon, session, base):
        assert daemon.http is not None
        routed: set[tuple[str, str]] = set()
        for route in daemon.http.app.router.routes():
            info = route.resource.get_info() if route.resource else {}
            path = info.get("path") or info.get("formatter") or ""
            if not path:
                continue
            methods = {m.upper() for m in _METHODS} if route.method == "*" else {route.method}
            for method in methods:
                routed.add((method, canonical(path)))
        # aiohttp answers HEAD for every GET; the spec names HEAD only where it documents it.
        routed_without_implicit_head = {
            (m, p) for m, p in routed if m != "HEAD" or ("HEAD", p) in spec
        }
        # `/api/vfs` and `/api/zip` without a path are the site root: same operation.
        routed_without_implicit_head = {
            (m, p + "/{}" if p in ("/api/vfs", "/api/zip") else p)
            for m, p in routed_without_implicit_head
        }
        assert routed_without_implicit_head - spec == set(), "routes missing from openapi.yaml"
        assert spec - routed_without_implicit_head == set(), "spec paths with no route"
        async with session.get(f"{base}/api/openapi.yaml") as response:
            assert response.status == 200
            assert yaml.safe_load(await response.text())["openapi"].startswith("3.")
