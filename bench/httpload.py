"""One HTTP client for both sides of the list API scenario (aiohttp, keep-alive connections)."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from bench.common import BenchError

WARM_UP = 5


async def _get(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as response:
        body = await response.read()
        if response.status != 200:
            raise BenchError(f"GET {url} answered {response.status}")
        return len(body)


async def _latencies(url: str, count: int) -> list[float]:
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(WARM_UP):
            await _get(session, url)
        found = []
        for _ in range(count):
            began = time.perf_counter()
            await _get(session, url)
            found.append((time.perf_counter() - began) * 1000.0)
        return found


async def _throughput(url: str, connections: int, seconds: float) -> float:
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(_get(session, url) for _ in range(connections)))
        done = 0
        began = time.perf_counter()
        deadline = began + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await _get(session, url)
                done += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
        return done / (time.perf_counter() - began)


def latencies(url: str, count: int) -> list[float]:
    """Milliseconds per request, one connection, one request at a time (whole body read)."""
    return asyncio.run(_latencies(url, count))


def throughput(url: str, connections: int, seconds: float) -> float:
    """Requests per second with `connections` connections kept busy for `seconds`."""
    return asyncio.run(_throughput(url, connections, seconds))
