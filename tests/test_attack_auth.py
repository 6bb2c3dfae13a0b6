"""Attacks on Basic auth, against the real daemon (the CLI as a child process, with credentials
from its environment) driven by real HTTP clients on loopback.

test_http_auth.py covers the middleware's answers to malformed, wrong and missing headers on a
test server; here the daemon as shipped: every route family and alias behind auth, path tricks
around the exempt health checks, headers far over aiohttp's limits, a flood of wrong guesses,
and whether the time of a refusal tells which part of the credentials was right.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.helpers import DaemonProcess, Site, wait_for_sync

USER = "deployer"
PASSWORD = "s3cret-pass"
ENV = {"WEBJOBSD_USERNAME": USER, "WEBJOBSD_PASSWORD": PASSWORD}
HEALTHZ = {"status": "ok"}


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


GOOD = {"Authorization": basic(USER, PASSWORD)}


def daemon_port(daemon: DaemonProcess) -> int | None:
    """The port the daemon bound (it listens on port 0), from its `listening` log line."""
    for line in daemon.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "listening":
            return int(str(record["url"]).rsplit(":", 1)[1])
    return None


@contextlib.contextmanager
def daemon_with_auth(site: Site, **config: Any) -> Iterator[tuple[DaemonProcess, str]]:
    """`webjobsd serve` with Basic auth on a free loopback port; stopped (exit 0) at the end."""
    daemon = DaemonProcess(site, auth=True, log_level="info", **config).start(env=ENV)
    try:
        port = wait_for_sync(lambda: daemon_port(daemon), timeout=20, what="the daemon to listen")
        yield daemon, f"http://127.0.0.1:{port}"
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()[-3000:]


@pytest.fixture
def served(site: Site) -> Iterator[tuple[DaemonProcess, str]]:
    site.write_job("continuous", "svc", {"run.sh": "echo up\nexec sleep 600\n"})
    site.write_job("triggered", "task", {"run.sh": "echo ran\n"})
    (site.root / "site" / "wwwroot" / "keep.txt").write_text("keep")
    with daemon_with_auth(site) as running:
        yield running


async def still_serving(base: str) -> None:
    """The daemon answers its health check and an authenticated request."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/healthz") as response:
            assert (response.status, await response.json()) == (200, HEALTHZ)
        async with session.get(f"{base}/api/webjobs", headers=GOOD) as response:
            assert response.status == 200
            assert {job["name"] for job in await response.json()} == {"svc", "task"}


# --- every route, every alias, every method ----------------------------------------------------

PROTECTED = [
    ("GET", "/api/webjobs"),
    ("GET", "/jobs/"),
    ("GET", "/api/continuouswebjobs/svc"),
    ("DELETE", "/api/continuouswebjobs/svc"),
    ("DELETE", "/jobs/continuous/svc"),
    ("PUT", "/api/triggeredjobs/task"),
    ("POST", "/api/triggeredwebjobs/task/run"),
    ("POST", "/api/jobs/continuous/svc/stop"),
    ("PUT", "/api/continuouswebjobs/svc/settings"),
    ("GET", "/api/continuouswebjobs/svc/passthrough/"),
    ("GET", "/api/triggeredwebjobs/task/history"),
    ("GET", "/api/triggeredwebjobsswagger"),
    ("GET", "/api/settings"),
    ("POST", "/settings"),
    ("DELETE", "/api/settings/WEBSITE_SITE_NAME"),
    ("GET", "/api/vfs/site/wwwroot/keep.txt"),
    ("PUT", "/vfs/site/wwwroot/new.txt"),
    ("DELETE", "/api/vfs/site/wwwroot/keep.txt"),
    ("GET", "/zip/site/"),
    ("PUT", "/api/zip/site/wwwroot/"),
    ("GET", "/api/openapi.yaml"),
    ("GET", "/metrics"),
    ("OPTIONS", "/api/webjobs"),
    ("PROPFIND", "/api/vfs/"),
    ("GET", "/no/such/route"),
]
REFUSED_HEADERS: list[dict[str, str]] = [
    {},
    {"Authorization": basic(USER, "wrong")},
    {"Authorization": basic("nobody", PASSWORD)},
    {"Authorization": "Basic !!!not-base64"},
    {"Authorization": "Basic " + base64.b64encode(b"no colon").decode()},
    {"Authorization": "Bearer " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()},
]


async def test_every_route_and_alias_refuses_without_valid_credentials(
    site: Site, served: tuple[DaemonProcess, str]
) -> None:
    _daemon, base = served
    tree_before = sorted(str(p.relative_to(site.root)) for p in (site.root / "site").rglob("*"))
    async with aiohttp.ClientSession() as session:
        for method, path in PROTECTED:
            for headers in REFUSED_HEADERS:
                async with session.request(
                    method, base + path, headers=headers, data=b"x"
                ) as response:
                    body = await response.read()
                    where = (method, path, headers, response.status, body[:200])
                    assert response.status == 401, where
                    assert response.headers["WWW-Authenticate"].startswith("Basic realm="), where
                    assert set(json.loads(body)) == {"message"}, where
    tree_after = sorted(str(p.relative_to(site.root)) for p in (site.root / "site").rglob("*"))
    assert tree_after == tree_before  # no upload, delete or disable.job got through
    await still_serving(base)


PATH_TRICKS = [
    "/healthz/../api/webjobs",
    "/healthz/%2e%2e/api/webjobs",
    "/healthz%2F..%2Fapi%2Fwebjobs",
    "/readyz/../api/settings",
    "//healthz",
    "/HEALTHZ",
    "/%68ealthz/../api/webjobs",
    "/api/webjobs;/healthz",
    "/api/webjobs%00/healthz",
    "/api/vfs/../healthz",
    "/api/vfs/..%2F..%2Fhealthz",
    "/healthz?x=/api/webjobs",
]


async def test_path_tricks_do_not_borrow_the_health_check_exemption(
    served: tuple[DaemonProcess, str],
) -> None:
    """Only the health checks themselves answer without credentials, however the path is
    spelled around them (sent verbatim: `..`, `%2F` and `%00` reach the daemon as written)."""
    _daemon, base = served
    async with aiohttp.ClientSession() as session:
        for raw in PATH_TRICKS:
            async with session.get(
                URL(base + raw, encoded=True), allow_redirects=False
            ) as response:
                body = await response.read()
            if response.status == 200:
                assert json.loads(body) == HEALTHZ, (raw, body)
            else:
                assert response.status == 401, (raw, response.status, body)
    await still_serving(base)


# --- headers far over aiohttp's limits ---------------------------------------------------------


async def test_enormous_authorization_header_is_a_4xx_and_the_daemon_goes_on(
    served: tuple[DaemonProcess, str],
) -> None:
    """aiohttp refuses a header line over 8190 bytes itself (400) before our middleware runs;
    the point is that it is an answer, not a 5xx, a hang or a dead daemon."""
    _daemon, base = served
    for size in (8 * 1024, 64 * 1024, 1024 * 1024):
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode() + b"x" * size).decode()[:size]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base}/api/webjobs", headers={"Authorization": "Basic " + token}) as r,
        ):
            await r.read()
            assert r.status in (400, 401, 431), (size, r.status)
        await still_serving(base)


async def test_header_just_under_the_limit_reaches_the_middleware(
    served: tuple[DaemonProcess, str],
) -> None:
    """8000 bytes of credentials: parsed, checked (a 6 KB password through scrypt), refused."""
    _daemon, base = served
    header = basic(USER, "p" * 5900)
    assert 7800 < len(header) < 8190
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base}/api/webjobs", headers={"Authorization": header}) as r,
    ):
        assert r.status == 401
        assert (await r.json())["message"] == "Invalid username or password."
    await still_serving(base)


async def test_enormous_header_sent_without_reading_the_answer(
    served: tuple[DaemonProcess, str],
) -> None:
    """A client that pushes 1 MiB of header and never reads: the daemon may reset that
    connection, and keeps serving everybody else."""
    _daemon, base = served
    url = URL(base)
    assert url.host is not None and url.port is not None
    for _ in range(5):
        _reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(b"GET /api/webjobs HTTP/1.1\r\nHost: x\r\nAuthorization: Basic ")
        writer.write(b"A" * (1024 * 1024) + b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    await still_serving(base)


async def test_oversized_credentials_are_not_written_to_the_log(
    served: tuple[DaemonProcess, str],
) -> None:
    """aiohttp's parser error for a header line over 8190 bytes quotes the first ~100 bytes of
    the line, here the start of the base64 credentials: the daemon logs the refusal without
    them, and without a traceback per request."""
    daemon, base = served
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode() + b"x" * 9000).decode()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base}/api/webjobs", headers={"Authorization": "Basic " + token}) as r,
    ):
        assert r.status == 400
    await still_serving(base)
    log = daemon.log()
    assert token[:24] not in log, "the daemon log quotes the credentials"


# --- a flood of wrong guesses ------------------------------------------------------------------


async def test_200_concurrent_wrong_guesses_are_all_refused_and_health_stays_prompt(
    served: tuple[DaemonProcess, str],
) -> None:
    """Each wrong guess pays a full scrypt (in worker threads, a few at a time); meanwhile the
    event loop still answers /healthz at once, and the right credentials work afterwards."""
    _daemon, base = served
    flood_done = asyncio.Event()
    health_latencies: list[float] = []

    async def guess(session: aiohttp.ClientSession, index: int) -> int:
        headers = {"Authorization": basic(USER, f"guess-{index}")}
        async with session.get(f"{base}/api/webjobs", headers=headers) as response:
            await response.read()
            return response.status

    async def probe_health() -> None:
        async with aiohttp.ClientSession() as session:
            while not flood_done.is_set():
                started = time.monotonic()
                async with session.get(f"{base}/healthz") as response:
                    assert response.status == 200
                    await response.read()
                health_latencies.append(time.monotonic() - started)
                # Paced by the answer itself; the short pause only spaces the probes out.
                await asyncio.sleep(0.05)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        prober = asyncio.create_task(probe_health())
        started = time.monotonic()
        try:
            statuses = await asyncio.gather(*(guess(session, i) for i in range(200)))
        finally:
            flood_done.set()
            await prober
        flood_s = time.monotonic() - started
    assert statuses == [401] * 200
    assert len(health_latencies) >= 3, (flood_s, health_latencies)
    # Generous: a loaded 2-core machine; a health check queued behind the scrypt work would
    # take about as long as the flood itself.
    assert max(health_latencies) < max(2.0, flood_s / 3), (flood_s, health_latencies)
    await still_serving(base)


# --- timing ------------------------------------------------------------------------------------


async def test_refusal_time_does_not_tell_which_part_was_wrong(
    served: tuple[DaemonProcess, str],
) -> None:
    """A coarse timing check, on top of the structural one in test_http_auth.py
    (test_check_runs_scrypt_even_for_an_unknown_user: the scrypt runs whatever the user name).

    A short-circuit on a wrong user name would answer in about a millisecond against the
    ~30 ms of an scrypt, a factor of ten or more; a factor of 2 between medians of interleaved
    attempts leaves room for a loaded 2-core machine without letting that through. Finer
    differences (hmac.compare_digest on names of different lengths) are nanoseconds under
    milliseconds of noise: no HTTP timing test can see them, which is why the structural test
    is the one that pins the property down."""
    _daemon, base = served
    kinds = {
        "unknown user": basic("nobody-at-all", PASSWORD),
        "right user, wrong password": basic(USER, PASSWORD + "x"),
        "user name prefix": basic(USER[:4], PASSWORD),
        "empty user": basic("", PASSWORD),
    }
    timings: dict[str, list[float]] = {kind: [] for kind in kinds}
    async with aiohttp.ClientSession() as session:
        for round_ in range(25):
            order = list(kinds)[round_ % len(kinds) :] + list(kinds)[: round_ % len(kinds)]
            for kind in order:
                started = time.perf_counter()
                async with session.get(
                    f"{base}/api/webjobs", headers={"Authorization": kinds[kind]}
                ) as response:
                    await response.read()
                timings[kind].append(time.perf_counter() - started)
                assert response.status == 401
    medians = {kind: statistics.median(values) for kind, values in timings.items()}
    assert max(medians.values()) < 2 * min(medians.values()), medians
