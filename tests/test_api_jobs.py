"""The WebJobs REST API against a real daemon on a loopback port, with a real HTTP client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.helpers import Site, job_pids, leaders, running_daemon, wait_for
from webjobsd.app import Daemon

LOOP = {"run.sh": "echo up\nwhile true; do sleep 0.2; done\n"}
CREDENTIALS = {"WEBJOBSD_USERNAME": "deployer", "WEBJOBSD_PASSWORD": "s3cret-pass"}


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


ARGS = {"run.sh": 'echo "count=$#"\nfor a in "$@"; do echo "arg=<$a>"; done\n'}


@contextlib.asynccontextmanager
async def api(
    site: Site, **config: Any
) -> AsyncIterator[tuple[Daemon, aiohttp.ClientSession, str]]:
    environ = {**config.pop("environ", {}), **CREDENTIALS}
    async with running_daemon(site, auth=True, environ=environ, **config) as daemon:
        assert daemon.http is not None
        base = f"http://127.0.0.1:{daemon.http.port}"
        auth = basic(CREDENTIALS["WEBJOBSD_USERNAME"], CREDENTIALS["WEBJOBSD_PASSWORD"])
        async with aiohttp.ClientSession(headers={"Authorization": auth}) as session:
            yield daemon, session, base


async def poll(
    fetch: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], what: str, timeout: float = 10
) -> Any:
    """Fetch until `done` says yes, with a deadline (an API read is the condition here)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await fetch()
        if done(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}: last {value!r}")
        await asyncio.sleep(0.05)


async def get_json(session: aiohttp.ClientSession, url: str, status: int = 200) -> Any:
    async with session.get(url) as response:
        assert response.status == status, await response.text()
        return await response.json()


async def test_lists_and_jobs_in_kudu_shape_with_etags(site: Site) -> None:
    site.write_job("continuous", "worker", LOOP)
    site.write_job("triggered", "report", {"run.sh": "exit 0\n"})
    async with api(site) as (_daemon, session, base):
        await wait_for(lambda: site.status("worker") == "Running", what="worker running")
        async with session.get(f"{base}/api/webjobs") as response:
            assert response.status == 200
            tag = response.headers["ETag"]
            jobs = await response.json()
        assert [job["name"] for job in jobs] == ["report", "worker"]
        triggered, continuous = jobs
        assert triggered["type"] == "triggered"
        assert triggered["latest_run"] is None
        assert triggered["history_url"] == f"{base}/api/triggeredwebjobs/report/history"
        assert triggered["scheduler_logs_url"] is None
        assert continuous["status"] == "Running"
        assert continuous["detailed_status"] == "test01 - Running\r\n"
        assert continuous["log_url"] == f"{base}/vfs/data/jobs/continuous/worker/job_log.txt"
        assert continuous["run_command"] == continuous["runCommand"] == "run.sh"
        assert continuous["url"] == f"{base}/api/continuouswebjobs/worker"
        assert continuous["extra_info_url"] == f"{base}/dashboard/#/job/continuous/worker"
        assert triggered["extra_info_url"] == f"{base}/dashboard/#/job/triggered/report"
        for job in jobs:
            page, fragment = job["extra_info_url"].split("#", 1)
            async with session.get(page) as response:
                assert response.status == 200 and response.content_type == "text/html"
            assert fragment == f"/job/{job['type']}/{job['name']}"
        assert continuous["using_sdk"] is False
        assert continuous["settings"] == {}
        assert continuous["error"] is None
        async with session.get(f"{base}/api/webjobs", headers={"If-None-Match": tag}) as response:
            assert response.status == 304
            assert response.headers["ETag"] == tag
        for alias in ("/api/jobs", "/jobs", "/api/jobs/"):
            assert [j["name"] for j in await get_json(session, base + alias)] == [
                "report",
                "worker",
            ]
        for alias in (
            "/api/continuouswebjobs",
            "/api/continuousjobs",
            "/jobs/continuous",
            "/api/jobs/continuous",
        ):
            assert [j["name"] for j in await get_json(session, base + alias)] == ["worker"]
        assert (await get_json(session, f"{base}/api/triggeredwebjobs/report"))["name"] == "report"
        await get_json(session, f"{base}/api/triggeredwebjobs/nope", status=404)
        await get_json(session, f"{base}/api/continuouswebjobs/report", status=404)
        body = await get_json(session, f"{base}/api/continuouswebjobs/..hidden", status=400)
        assert "Invalid job name" in body["message"]


async def test_triggered_run_history_and_conflicts(site: Site) -> None:
    site.write_job("triggered", "args", ARGS)
    # A short stopping wait: the run is still going when the test ends the daemon.
    site.write_job(
        "triggered", "slow", {"run.sh": "sleep 30\n", "settings.job": '{"stopping_wait_time": 1}'}
    )
    async with api(site) as (_daemon, session, base):
        history = await get_json(session, f"{base}/api/triggeredwebjobs/args/history")
        assert history == {"runs": []}
        url = f"{base}/api/triggeredwebjobs/args/run"
        params = {"arguments": '"first arg" "second arg"'}
        headers = {"User-Agent": "kudu-test/1.0"}
        async with session.post(url, params=params, headers=headers) as response:
            assert response.status == 202
            location = response.headers["Location"]
        assert re.fullmatch(
            re.escape(base) + r"/api/triggeredwebjobs/args/history/\d{18}", location
        )

        run = await poll(
            lambda: get_json(session, location), lambda r: r["status"] == "Success", "run done"
        )
        assert run["trigger"] == "External - kudu-test/1.0"
        assert run["job_name"] == "args" and run["id"] == run["name"]
        assert re.fullmatch(r"\d\d:\d\d:\d\d(\.\d{7})?", run["duration"])
        assert run["error_url"] is None
        assert run["output_url"].endswith(
            f"/vfs/data/jobs/triggered/args/{run['id']}/output_log.txt"
        )
        async with session.get(f"{base}/api/triggeredwebjobs/args/history") as response:
            tag = response.headers["ETag"]
            runs = (await response.json())["runs"]
        assert [r["id"] for r in runs] == [run["id"]]
        async with session.get(
            f"{base}/api/triggeredwebjobs/args/history", headers={"If-None-Match": tag}
        ) as response:
            assert response.status == 304
        job = await get_json(session, f"{base}/api/triggeredwebjobs/args")
        assert job["latest_run"]["id"] == run["id"]

        async with session.post(f"{base}/api/triggeredwebjobs/slow/run") as response:
            assert response.status == 202
        async with session.post(f"{base}/api/triggeredjobs/slow/run") as response:
            assert response.status == 409
            assert (await response.json()) == {
                "message": "Cannot start a new run since job is already running."
            }
        async with session.post(url, params={"arguments": '"open'}) as response:
            assert response.status == 400
            assert "Invalid arguments" in (await response.json())["message"]
        async with session.post(f"{base}/api/triggeredwebjobs/nope/run") as response:
            assert response.status == 404
        await get_json(session, f"{base}/api/triggeredwebjobs/args/history/123", status=404)
        await get_json(session, f"{base}/jobs/triggered/nope/history", status=404)


async def test_webjobs_stopped_conflict(site: Site) -> None:
    site.write_job("triggered", "t", {"run.sh": "exit 0\n"})
    async with api(site, environ={"WEBJOBS_STOPPED": "1"}) as (_d, session, base):
        response = await session.post(f"{base}/api/triggeredwebjobs/t/run")
        async with response:
            assert response.status == 409
            message = (await response.json())["message"]
    assert message == 'WebJobs are currently in "stopped" state.'


async def test_stop_and_start_act_at_once(site: Site) -> None:
    site.write_job("continuous", "toggle", LOOP)
    async with api(site, debounce_s=5.0) as (_daemon, session, base):
        await wait_for(lambda: leaders(site, "toggle"), what="running")
        async with session.post(f"{base}/api/continuouswebjobs/toggle/stop") as response:
            assert response.status == 200
        # The watcher's quiet period is 5 s here: acting within 3 s proves the intent path.
        await wait_for(lambda: not job_pids(site, "toggle"), timeout=3, what="stopped")
        await wait_for(lambda: site.status("toggle") == "Stopped", timeout=3, what="Stopped")
        job = await get_json(session, f"{base}/api/continuouswebjobs/toggle")
        assert job["status"] == "Stopped"
        async with session.post(f"{base}/api/continuouswebjobs/toggle/start") as response:
            assert response.status == 200
        await wait_for(lambda: leaders(site, "toggle"), timeout=3, what="running again")
        async with session.post(f"{base}/api/continuouswebjobs/nope/stop") as response:
            assert response.status == 404


async def test_settings_round_trip(site: Site) -> None:
    site.write_job("continuous", "configured", LOOP)
    async with api(site, debounce_s=5.0) as (_daemon, session, base):
        url = f"{base}/api/continuouswebjobs/configured/settings"
        assert await get_json(session, url) == {}
        settings = {"stopping_wait_time": 7, "custom": {"kept": True}}
        async with session.put(url, json=settings) as response:
            assert response.status == 200
        assert await get_json(session, url) == settings
        job = await get_json(session, f"{base}/api/continuouswebjobs/configured")
        assert job["settings"] == settings
        path = site.job_dir("continuous", "configured") / "settings.job"
        assert path.read_text() == '{"stopping_wait_time":7,"custom":{"kept":true}}'
        for bad in (b"[1, 2]", b"{oops", b"\xff"):
            async with session.put(url, data=bad) as response:
                assert response.status == 400
        await get_json(session, f"{base}/api/continuouswebjobs/nope/settings", status=404)


async def test_delete_stops_and_removes(site: Site) -> None:
    site.write_job("continuous", "doomed", LOOP)
    site.write_job("triggered", "gone", {"run.sh": "exit 0\n"})
    async with api(site) as (_daemon, session, base):
        await wait_for(lambda: leaders(site, "doomed"), what="running")
        async with session.delete(f"{base}/api/continuouswebjobs/doomed") as response:
            assert response.status == 200
        assert not job_pids(site, "doomed")
        assert not site.job_dir("continuous", "doomed").exists()
        assert not site.data_dir("continuous", "doomed").exists()
        await get_json(session, f"{base}/api/continuouswebjobs/doomed", status=404)
        async with session.delete(f"{base}/api/triggeredwebjobs/gone") as response:
            assert response.status == 200
        await get_json(session, f"{base}/api/triggeredwebjobs/gone", status=404)


async def test_swagger_document(site: Site) -> None:
    site.write_job("triggered", "alpha", {"run.sh": "exit 0\n"})
    async with api(site) as (_daemon, session, base):
        doc = await get_json(session, f"{base}/api/triggeredwebjobsswagger")
        assert doc["swagger"] == "2.0"
        assert doc["host"] == "placeHolder"
        post = doc["paths"]["/api/triggeredjobs/alpha/run"]["post"]
        assert post["operationId"] == "alpha"
        assert post["parameters"][0]["name"] == "arguments"


async def test_passthrough_reaches_the_jobs_port(site: Site) -> None:
    site.write_job(
        "continuous",
        "web",
        {
            "run.py": """\
                import http.server, os
                class Handler(http.server.BaseHTTPRequestHandler):
                    def do_GET(self):
                        auth = self.headers.get("Authorization")
                        body = f"path={self.path} x={self.headers.get('X-Test')} a={auth}"
                        body = body.encode()
                        self.send_response(200)
                        self.send_header("Set-Cookie", "a=1")
                        self.send_header("Set-Cookie", "b=2")
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                    def log_message(self, *args):
                        pass
                port = int(os.environ["WEBJOBS_PORT"])
                print("serving", flush=True)
                http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
            """
        },
    )
    async with api(site) as (_daemon, session, base):
        await wait_for(lambda: "INFO] serving" in site.job_log("web"), what="job serving")
        url = f"{base}/api/continuouswebjobs/web/passthrough/some/a%3Fb/c%2Fd?q=1&q=2"
        async with session.get(URL(url, encoded=True), headers={"X-Test": "yes"}) as response:
            assert response.status == 200
            assert await response.text() == "path=/some/a%3Fb/c%2Fd?q=1&q=2 x=yes a=None"
            assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        async with session.get(f"{base}/api/continuouswebjobs/nope/passthrough/x") as response:
            assert response.status == 404


@pytest.mark.parametrize(
    ("trusted", "expected_base"),
    [(("127.0.0.1/32",), "https://jobs.example.org"), ((), None)],
)
async def test_forwarded_headers_only_from_trusted_proxies(
    site: Site, trusted: tuple[str, ...], expected_base: str | None
) -> None:
    site.write_job("triggered", "t", {"run.sh": "exit 0\n"})
    async with api(site, trusted_proxies=list(trusted)) as (_daemon, session, base):
        headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "jobs.example.org"}
        async with session.get(f"{base}/api/triggeredwebjobs/t", headers=headers) as response:
            job = await response.json()
        assert job["url"] == f"{expected_base or base}/api/triggeredwebjobs/t"


async def test_every_route_but_health_needs_credentials(site: Site) -> None:
    site.write_job("triggered", "t", {"run.sh": "exit 0\n"})
    async with api(site) as (_daemon, _session, base), aiohttp.ClientSession() as anonymous:
        async with anonymous.get(f"{base}/healthz") as response:
            assert response.status == 200
        for headers in (
            {},
            {"Authorization": basic("deployer", "wrong")},
            {"Authorization": basic("x", "y")},
        ):
            async with anonymous.get(f"{base}/api/webjobs", headers=headers) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"].startswith("Basic ")
                assert "message" in await response.json()
        async with anonymous.post(
            f"{base}/api/triggeredwebjobs/t/run", headers={"Authorization": "Basic !!!"}
        ) as response:
            assert response.status == 401
        assert not site.data_dir("triggered", "t").exists()


async def test_settings_store_applies_without_restart(site: Site) -> None:
    site.write_job("continuous", "halt", LOOP)
    async with api(site) as (_daemon, session, base):
        await wait_for(lambda: leaders(site, "halt"), what="running")
        assert await get_json(session, f"{base}/api/settings") == {}
        async with session.post(f"{base}/api/settings", json={"WEBJOBS_STOPPED": "1"}) as r:
            assert r.status == 200
        await wait_for(lambda: not job_pids(site, "halt"), timeout=5, what="stopped at once")
        async with session.post(
            f"{base}/api/settings", json={"key": "WEBJOBS_STOPPED", "value": "0"}
        ) as r:
            assert r.status == 200
        await wait_for(lambda: leaders(site, "halt"), timeout=5, what="running again")
        async with session.post(f"{base}/api/settings", json={"MY_FLAG": True, "N": 3}) as r:
            assert r.status == 200
        store = await get_json(session, f"{base}/api/settings")
        assert store == {"WEBJOBS_STOPPED": "0", "MY_FLAG": "true", "N": "3"}
        assert await get_json(session, f"{base}/api/settings/N") == "3"
        async with session.delete(f"{base}/api/settings/N") as r:
            assert r.status == 200
        await get_json(session, f"{base}/api/settings/N", status=404)
        path = site.root / "data" / "webjobsd" / "settings.json"
        assert path.stat().st_mode & 0o777 == 0o600
        for bad in ([1], {"A=B": "x"}, {"K": {"nested": 1}}):
            async with session.post(f"{base}/api/settings", json=bad) as r:
                assert r.status == 400
        async with session.post(f"{base}/api/settings", data=b"{nope") as r:
            assert r.status == 400


async def test_odd_bodies_and_headers_are_400_not_500(site: Site) -> None:
    site.write_job("continuous", "c", LOOP)
    site.write_job("triggered", "t", {"run.sh": "exit 0\n"})
    async with api(site) as (_daemon, session, base):
        deep = b"[" * 100_000 + b"]" * 100_000
        for url, method in (
            (f"{base}/api/continuouswebjobs/c/settings", "PUT"),
            (f"{base}/api/settings", "POST"),
        ):
            for body, content_type in (
                (b'{"a": 1}', "application/json; charset=bogus"),
                (deep, "application/json"),
                (b'{"x": NaN}', "application/json"),
                (b"\xff\xfe", "application/json"),
            ):
                async with session.request(
                    method, url, data=body, headers={"Content-Type": content_type}
                ) as response:
                    if content_type.endswith("bogus"):
                        assert response.status in (200, 400), await response.text()
                    else:
                        assert response.status == 400, (url, body[:10], await response.text())
        async with session.post(
            f"{base}/api/triggeredwebjobs/t/run", headers={"User-Agent": "caf\xe9/1"}
        ) as response:
            assert response.status == 202
        async with session.put(
            f"{base}/api/triggeredwebjobs/t2",
            data=b"echo\n",
            headers={"Content-Disposition": "attachment; filename=\xff\xfe.sh"},
        ) as response:
            assert response.status in (200, 400), await response.text()


async def test_every_route_needs_auth(site: Site) -> None:
    async with api(site) as (daemon, _session, base), aiohttp.ClientSession() as anonymous:
        assert daemon.http is not None
        checked = 0
        for route in daemon.http.app.router.routes():
            info = route.resource.get_info() if route.resource else {}
            path = info.get("path") or info.get("formatter") or ""
            if not path or path in ("/healthz", "/readyz"):
                continue
            url = base + path.replace("{name}", "x").replace("{run_id}", "1").replace("{key}", "K")
            url = url.replace("{path:.*}", "p").replace("{path}", "p")
            method = "GET" if route.method in ("*", "HEAD") else route.method
            async with anonymous.request(method, url) as response:
                assert response.status == 401, (method, url, response.status)
            checked += 1
        assert checked > 80


@pytest.mark.parametrize(
    "alias",
    [
        "/api/jobs",
        "/jobs",
        "/api/jobs/",
        "/jobs/",
        "/api/triggeredjobs",
        "/jobs/triggered",
        "/api/jobs/triggered",
        "/api/triggeredjobs/t",
        "/jobs/triggered/t",
        "/api/jobs/triggered/t/history",
        "/api/continuousjobs",
        "/jobs/continuous/c/settings",
        "/api/jobs/continuous/c",
        "/vfs/data/",
        "/zip/data/",
        "/settings",
    ],
)
async def test_kudu_aliases_answer(site: Site, alias: str) -> None:
    site.write_job("triggered", "t", {"run.sh": "exit 0\n"})
    site.write_job("continuous", "c", LOOP)
    async with api(site) as (_daemon, session, base):
        await wait_for(lambda: site.data_dir("continuous", "c").exists(), what="data folder")
        async with session.get(base + alias) as response:
            assert response.status == 200, await response.text()


async def test_delete_during_a_triggered_run_stops_it(site: Site) -> None:
    site.write_job("triggered", "busy", {"run.sh": "echo started\nsleep 60\n"})
    async with api(site) as (_daemon, session, base):
        async with session.post(f"{base}/api/triggeredwebjobs/busy/run") as response:
            assert response.status == 202
        await wait_for(lambda: job_pids(site, "busy"), what="run started")
        async with session.delete(f"{base}/api/triggeredwebjobs/busy") as response:
            assert response.status == 200
        assert not job_pids(site, "busy")
        assert not site.data_dir("triggered", "busy").exists()
