"""Liveness and readiness over HTTP, without credentials."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.helpers import Site
from tests.test_api_jobs import api


async def test_readyz_turns_unready_when_a_core_task_dies(site: Site) -> None:
    """1. a running daemon is ready  2. its reconciler task dies  3. /readyz answers 503
    naming the reconciler, while /healthz still answers."""
    async with api(site) as (daemon, _session, base), aiohttp.ClientSession() as anonymous:
        async with anonymous.get(f"{base}/readyz") as response:
            assert response.status == 200
            body = await response.json()
        assert body["ready"] is True
        assert set(body["checks"]) == {"watcher", "discovery", "reconciler", "scheduler"}
        reconciler = daemon._tasks["reconciler"]
        reconciler.cancel()  # fault injection: a core loop is gone
        await asyncio.gather(reconciler, return_exceptions=True)
        async with anonymous.get(f"{base}/readyz") as response:
            assert response.status == 503
            body = await response.json()
        assert body["checks"]["reconciler"] is False
        assert "reconciler" in body["message"]
        async with anonymous.get(f"{base}/healthz") as response:
            assert response.status == 200
