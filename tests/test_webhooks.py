"""Webhooks against a real daemon (Basic auth, loopback port) and a real local HTTP receiver.

The receiver records every POST and answers by path: `/ok` 200, `/flaky` 500 then 200, `/gone`
410, `/hang` never (until the test ends). Delivery timings are shortened through the default
policy; waiting is always a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import Site, wait_for
from tests.test_api_jobs import api, get_json, poll
from webjobsd.webhooks import delivery
from webjobsd.webhooks.delivery import WebhookPolicy


@dataclass
class Received:
    path: str
    body: Any
    headers: dict[str, str]


@dataclass
class Receiver:
    base: str = ""
    requests: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    flaky_calls: int = 0

    def on(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        self.requests.append(Received(request.path, body, dict(request.headers)))
        if request.path == "/flaky":
            self.flaky_calls += 1
            return web.Response(status=500 if self.flaky_calls == 1 else 200)
        if request.path == "/gone":
            return web.Response(status=410)
        if request.path == "/hang":
            await self.release.wait()
        return web.Response(status=200)


@pytest.fixture(autouse=True)
def fast_delivery(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = WebhookPolicy(timeout_s=0.5, retry_delays_s=(0.05, 0.1), shutdown_grace_s=0.5)
    monkeypatch.setattr(delivery, "DEFAULT_POLICY", policy)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", state.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.base = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


async def subscribe(
    session: aiohttp.ClientSession, base: str, url: str, event: str, status: int = 201
) -> Any:
    async with session.post(f"{base}/api/hooks", json={"url": url, "event": event}) as response:
        assert response.status == status, await response.text()
        return await response.json()


async def run_and_finish(session: aiohttp.ClientSession, base: str, name: str) -> dict[str, Any]:
    async with session.post(f"{base}/api/triggeredwebjobs/{name}/run") as response:
        assert response.status == 202, await response.text()
        location = response.headers["Location"]
    run: dict[str, Any] = await poll(
        lambda: get_json(session, location),
        lambda run: run["status"] in ("Success", "Failed"),
        f"the run of {name} to finish",
    )
    return run


async def test_subscribe_list_get_delete_and_validation(site: Site) -> None:
    """1. subscribe → 201 with Kudu's hook shape; the same URL and event again → the same hook;
    another event for the URL → 409.
    2. list, get (also under Kudu's `/hooks`), delete, then 404.
    3. invalid bodies → 400 with a message."""
    async with api(site) as (_daemon, session, base):
        hook = await subscribe(session, base, "http://127.0.0.1:9/a", "TriggeredJobFinished")
        assert set(hook) == {
            "id",
            "url",
            "event",
            "insecure_ssl",
            "last_status",
            "last_reason",
            "last_datetime",
        }
        assert hook["url"] == "http://127.0.0.1:9/a" and hook["insecure_ssl"] is False
        again = await subscribe(session, base, " http://127.0.0.1:9/A ", "triggeredjobfinished")
        assert again == hook
        conflict = await subscribe(
            session, base, "http://127.0.0.1:9/a", "ContinuousJobStopped", status=409
        )
        assert "already subscribed" in conflict["message"]
        other = await subscribe(session, base, "https://127.0.0.1:9/b", "ContinuousJobCrashLoop")

        assert [h["id"] for h in await get_json(session, f"{base}/api/hooks")] == [
            hook["id"],
            other["id"],
        ]
        assert await get_json(session, f"{base}/hooks/{hook['id']}") == hook
        async with session.delete(f"{base}/api/hooks/{hook['id']}") as response:
            assert response.status == 200 and (await response.json())["id"] == hook["id"]
        await get_json(session, f"{base}/api/hooks/{hook['id']}", status=404)
        async with session.delete(f"{base}/api/hooks/{hook['id']}") as response:
            assert response.status == 404
        assert [h["id"] for h in await get_json(session, f"{base}/api/hooks")] == [other["id"]]

        for body in (
            {"url": "ftp://example.invalid/x", "event": "TriggeredJobFinished"},
            {"url": "/relative", "event": "TriggeredJobFinished"},
            {"url": "http://", "event": "TriggeredJobFinished"},
            {"url": "http://127.0.0.1:9/x", "event": "PostDeployment"},
            {"url": "http://127.0.0.1:9/x"},
            {"url": "http://127.0.0.1:9/x", "event": "TriggeredJobFinished", "insecure_ssl": 1},
            ["not", "an", "object"],
        ):
            async with session.post(f"{base}/api/hooks", json=body) as response:
                assert response.status == 400, body
                assert set(await response.json()) == {"message"}
        async with session.post(f"{base}/api/hooks", data=b"{nope") as response:
            assert response.status == 400


async def test_run_finish_posts_the_run_json_retries_and_410_unsubscribes(
    site: Site, receiver: Receiver
) -> None:
    """1. three hooks on TriggeredJobFinished: /ok, /flaky (500 then 200), /gone (410).
    2. a run: each receives the run JSON (Success, output_url, url with the request's base).
    3. /flaky was retried once and delivered once; /gone is unsubscribed; the others record
    their last status."""
    site.write_job("triggered", "report", {"run.sh": "echo hello from report\n"})
    async with api(site) as (_daemon, session, base):
        event = "TriggeredJobFinished"
        ok = await subscribe(session, base, f"{receiver.base}/ok", event)
        flaky = await subscribe(session, base, f"{receiver.base}/flaky", event)
        gone = await subscribe(session, base, f"{receiver.base}/gone", event)
        run = await run_and_finish(session, base, "report")

        await wait_for(lambda: len(receiver.on("/flaky")) == 2, what="the flaky retry")
        await wait_for(lambda: receiver.on("/ok") and receiver.on("/gone"), what="deliveries")
        body = receiver.on("/ok")[0].body
        assert body["status"] == "Success" and body["id"] == run["id"]
        assert body["job_name"] == "report"
        assert body["url"] == f"{base}/api/triggeredwebjobs/report/history/{run['id']}"
        assert body["output_url"] == (
            f"{base}/vfs/data/jobs/triggered/report/{run['id']}/output_log.txt"
        )
        assert "error_url" not in body  # null values are left out, as Kudu does
        assert receiver.on("/ok")[0].headers["Content-Type"].startswith("application/json")
        assert [r.body for r in receiver.on("/flaky")] == [body, body]

        async def hook(hook_id: str, status: int = 200) -> Any:
            return await get_json(session, f"{base}/api/hooks/{hook_id}", status=status)

        await poll(lambda: hook(ok["id"]), lambda h: h["last_status"] == "OK", "ok recorded")
        await poll(lambda: hook(flaky["id"]), lambda h: h["last_status"] == "OK", "flaky ok")
        await poll(lambda: hook(gone["id"], 404), lambda h: True, "gone unsubscribed")
        assert len(receiver.on("/ok")) == 1 and len(receiver.on("/gone")) == 1
        assert (await hook(ok["id"]))["last_datetime"]


async def test_a_hanging_receiver_times_out_without_delaying_runs(
    site: Site, receiver: Receiver
) -> None:
    """1. a hook whose receiver never answers.
    2. a run finishes and a second run starts and finishes while the first POST hangs.
    3. every attempt times out; the hook records Failure."""
    site.write_job("triggered", "report", {"run.sh": "echo hi\n"})
    async with api(site) as (_daemon, session, base):
        hook = await subscribe(session, base, f"{receiver.base}/hang", "TriggeredJobFinished")
        await run_and_finish(session, base, "report")
        await wait_for(lambda: receiver.on("/hang"), what="the first POST")
        await run_and_finish(session, base, "report")
        await poll(
            lambda: get_json(session, f"{base}/api/hooks/{hook['id']}"),
            lambda h: h["last_status"] == "Failure" and h["last_reason"] == "timed out",
            "the hanging deliveries to time out",
        )
        # Each run's event was tried 1 + 2 times; the second event did not wait for the first.
        await wait_for(lambda: len(receiver.on("/hang")) == 6, what="every attempt")


async def test_a_crashing_continuous_job_reports_stops_then_a_crash_loop(
    site: Site, receiver: Receiver
) -> None:
    """1. hooks on ContinuousJobStopped and ContinuousJobCrashLoop.
    2. a continuous job that exits with code 3 at once, restarted after short delays.
    3. one Stopped event per exit; one CrashLoop event when the fifth quick exit comes."""
    site.write_job("continuous", "crashy", {"run.sh": "exit 3\n"})
    async with api(site, restart_backoff_initial_s=0.02, environ={"WEBJOBS_RESTART_TIME": "1"}) as (
        _daemon,
        session,
        base,
    ):
        await subscribe(session, base, f"{receiver.base}/stopped", "ContinuousJobStopped")
        await subscribe(session, base, f"{receiver.base}/loop", "ContinuousJobCrashLoop")
        await wait_for(lambda: receiver.on("/loop"), timeout=20, what="the crash-loop event")
        loop = receiver.on("/loop")[0].body
        assert loop["event"] == "ContinuousJobCrashLoop" and loop["job_name"] == "crashy"
        assert loop["consecutive_exits"] == loop["threshold"] == 5
        stopped = [r.body for r in receiver.on("/stopped")]
        first = stopped[0]
        assert first["event"] == "ContinuousJobStopped" and first["exit_code"] == 3
        assert first["signal"] is None and first["reason"] == "exit code 3"
        assert first["job_type"] == "continuous" and first["instance_id"] == "test01"
        assert first["restart_delay_s"] > 0 and first["uptime_s"] >= 0
        assert first["url"] == f"{base}/api/continuouswebjobs/crashy"
        assert first["log_url"] == f"{base}/vfs/data/jobs/continuous/crashy/job_log.txt"
        counts = [body["consecutive_exits"] for body in stopped]
        assert counts == sorted(counts) and 5 in counts
        assert len(receiver.on("/loop")) == 1


async def test_subscriptions_survive_a_restart(site: Site) -> None:
    """1. subscribe, stop the daemon. 2. a new daemon on the same site lists the hook."""
    async with api(site) as (_daemon, session, base):
        hook = await subscribe(session, base, "http://127.0.0.1:9/kept", "TriggeredJobFinished")
    assert (site.root / "data" / "webjobsd" / "hooks.json").is_file()
    async with api(site) as (_daemon, session, base):
        assert await get_json(session, f"{base}/api/hooks") == [hook]


async def test_events_pending_at_shutdown_are_dropped_within_the_grace(
    site: Site, receiver: Receiver
) -> None:
    """1. a hook that hangs, and a run whose event is stuck in it. 2. the daemon stops anyway,
    within the grace period (the receiver is released only after)."""
    site.write_job("triggered", "report", {"run.sh": "echo hi\n"})
    async with api(site) as (daemon, session, base):
        await subscribe(session, base, f"{receiver.base}/hang", "TriggeredJobFinished")
        await run_and_finish(session, base, "report")
        await wait_for(lambda: receiver.on("/hang"), what="the POST in flight")
        started = asyncio.get_running_loop().time()
    assert daemon.webhooks.failed == 0  # still in flight when the daemon stopped
    assert asyncio.get_running_loop().time() - started < 5
