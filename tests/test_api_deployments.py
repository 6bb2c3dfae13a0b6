"""The deployment history API and the deploy clients' probes, against a real daemon on a loopback
port with a real HTTP client (Part B §3, §8): records written through the real store, the real
site-wide lock taken by this test process (or by a second daemon killed with SIGKILL)."""

from __future__ import annotations

import json
import re
import textwrap
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.helpers import DaemonProcess, Site, running_daemon, wait_for
from tests.test_api_jobs import api, get_json
from webjobsd.deploy.lock import IN_PROGRESS, DeploymentLock, deployment_in_progress
from webjobsd.deploy.records import (
    UNKNOWN_ERROR,
    DeploymentRecord,
    DeploymentStore,
    DeployStatus,
    LogType,
)
from webjobsd.site import SiteLayout

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
JSON_GET = {"Content-Type": "application/json; charset=utf-8"}


def layout_of(site: Site) -> SiteLayout:
    return SiteLayout.build(site.root, instance_id="tester", temp_root=site.temp / "tester")


def store_of(site: Site) -> DeploymentStore:
    return DeploymentStore(layout_of(site))


def finished(
    store: DeploymentStore,
    record_id: str,
    status: DeployStatus = DeployStatus.SUCCESS,
    *,
    received: datetime = T0,
    ended: datetime | None = None,
) -> DeploymentRecord:
    record = store.create(id=record_id, deployer="tests", message=f"message of {record_id}")
    record.received_time = record.start_time = received
    end = ended or received + timedelta(seconds=2)
    if status == DeployStatus.SUCCESS:
        record.mark_success(end)
    else:
        record.mark_failed(end)
    store.save(record)
    return record


async def fetch(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[int, Any]:
    async with session.get(url, headers=headers) as response:
        return response.status, await response.json()


@pytest.fixture
def lock(site: Site) -> Any:
    held = DeploymentLock(layout_of(site))
    yield held
    held.release()


# -- the list ---------------------------------------------------------------------------------


async def test_list_newest_first_with_etag_and_304(site: Site) -> None:
    store = store_of(site)
    async with api(site) as (_daemon, session, base):
        async with session.get(f"{base}/api/deployments") as response:
            assert response.status == 200
            assert await response.json() == []
            empty_tag = response.headers["ETag"]
        finished(store, "older", received=T0)
        finished(store, "newer", DeployStatus.FAILED, received=T0 + timedelta(minutes=1))
        store.set_active("older")
        async with session.get(f"{base}/api/deployments", headers=JSON_GET) as response:
            assert response.status == 200
            body = await response.json()
            tag = response.headers["ETag"]
        assert tag != empty_tag
        assert [item["id"] for item in body] == ["newer", "older"]
        newer, older = body
        assert newer["status"] == 3 and newer["active"] is False and newer["complete"] is True
        assert older["status"] == 4 and older["active"] is True
        assert older["url"] == f"{base}/api/deployments/older"
        assert older["log_url"] == f"{base}/api/deployments/older/log"
        assert older["received_time"] == "2026-01-02T03:04:05.6789010Z"
        assert older["site_name"] == "site-root"
        assert older["provisioningState"] == "Succeeded"
        async with session.get(
            f"{base}/api/deployments", headers={"If-None-Match": tag}
        ) as response:
            assert response.status == 304
            assert response.headers["ETag"] == tag
            assert await response.read() == b""
        async with session.get(
            f"{base}/deployments", headers={"If-None-Match": f'"other", W/{tag}'}
        ) as response:
            assert response.status == 304
        # Any change to a record changes the tag.
        store.delete("newer")
        async with session.get(
            f"{base}/api/deployments", headers={"If-None-Match": tag}
        ) as response:
            assert response.status == 200
            assert [item["id"] for item in await response.json()] == ["older"]


async def test_warmup_answers_the_list(site: Site) -> None:
    finished(store_of(site), "one")
    async with api(site) as (_daemon, session, base):
        status, body = await fetch(session, f"{base}/api/deployments?warmup=true", JSON_GET)
    assert status == 200
    assert [item["id"] for item in body] == ["one"]


async def test_site_name_from_website_site_name(site: Site) -> None:
    finished(store_of(site), "one")
    environ = {"WEBSITE_SITE_NAME": "shop_staging"}
    async with api(site, environ=environ) as (_daemon, session, base):
        body = await get_json(session, f"{base}/api/deployments/one")
        assert body["site_name"] == "shop"


async def test_urls_honour_forwarded_headers_only_from_trusted_proxies(site: Site) -> None:
    finished(store_of(site), "one")
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "site.scm.example"}
    async with api(site) as (_daemon, session, base):
        _status, body = await fetch(session, f"{base}/api/deployments/one", forwarded)
        assert body["url"] == f"{base}/api/deployments/one"
    async with api(site, trusted_proxies=["127.0.0.1/32"]) as (_daemon, session, base):
        async with session.get(f"{base}/api/deployments/one", headers=forwarded) as response:
            body = await response.json()
        assert body["url"] == "https://site.scm.example/api/deployments/one"
        assert body["log_url"] == "https://site.scm.example/api/deployments/one/log"


# -- one record, latest -----------------------------------------------------------------------


async def test_get_one_and_kudus_404(site: Site) -> None:
    finished(store_of(site), "abc")
    async with api(site) as (_daemon, session, base):
        for prefix in ("/api/deployments", "/deployments"):
            body = await get_json(session, f"{base}{prefix}/abc")
            assert body["id"] == "abc" and body["status"] == 4
            assert body["url"] == f"{base}/api/deployments/abc"
        async with session.get(f"{base}/api/deployments/nope") as response:
            assert response.status == 404
            assert await response.json() == {"message": "Deployment 'nope' not found."}


@pytest.mark.parametrize(
    "raw_id",
    ["..", "..%2F..%2Fetc", "a%00b", "active", "tools", "%2Fetc%2Fpasswd", "x" * 200, ".git"],
)
async def test_ids_that_are_no_record_name_no_path(site: Site, raw_id: str) -> None:
    # A folder that a path built from such an id could reach must stay untouched and unread.
    (site.root / "site" / "deployments" / "tools").mkdir(parents=True)
    (site.root / "site" / "deployments" / "tools" / "status.json").write_text(
        json.dumps({"id": "tools", "status": 4, "received_time": "2026-01-01T00:00:00Z"})
    )
    async with api(site) as (_daemon, session, base):
        for suffix in ("", "/log", "/log/x"):
            url = URL(f"{base}/api/deployments/{raw_id}{suffix}", encoded=True)
            async with session.get(url) as response:
                assert response.status in (400, 404), (raw_id, suffix, response.status)
                assert "message" in await response.json()
        url = URL(f"{base}/api/deployments/{raw_id}", encoded=True)
        async with session.delete(url) as response:
            assert response.status in (400, 404)
        async with session.put(url, json=put_body()) as response:
            assert response.status in (400, 404)
    assert (site.root / "site" / "deployments" / "tools" / "status.json").exists()
    assert sorted(p.name for p in (site.root / "site" / "deployments").iterdir()) == ["tools"]


async def test_latest_404_then_202_while_unfinished_then_newest_finished(
    site: Site, lock: DeploymentLock
) -> None:
    store = store_of(site)
    async with api(site) as (_daemon, session, base):
        async with session.get(f"{base}/api/deployments/latest") as response:
            assert response.status == 404
            assert await response.json() == {"message": "Deployment 'latest' not found."}
        # Received later, ended earlier: `latest` is by end time.
        finished(store, "a", received=T0, ended=T0 + timedelta(hours=1))
        finished(store, "b", DeployStatus.FAILED, received=T0 + timedelta(minutes=1))
        assert (await get_json(session, f"{base}/api/deployments/latest"))["id"] == "a"
        # A running deployment holds the lock and has a pending record.
        assert lock.try_acquire({"who": "test"})
        store.create(id="temp-0a1b2c3d", deployer="GITHUB_ZIP_DEPLOY", message="m", is_temp=True)
        poll = "/api/deployments/latest?deployer=GITHUB_ZIP_DEPLOY&time=2026-01-02_03-04-05Z"
        async with session.get(f"{base}{poll}", headers=JSON_GET) as response:
            assert response.status == 202
            assert response.headers["Location"] == f"{base}{poll}"
            assert int(response.headers["Retry-After"]) > 0
            body = await response.json()
        assert body["id"] == "temp-0a1b2c3d" and body["status"] == 0 and body["is_temp"] is True
        assert body["status_text"] == "Receiving changes."
        assert body["provisioningState"] == "InProgress"
        record = store.get("temp-0a1b2c3d")
        assert record is not None
        record.mark_success()
        store.save(record)
        lock.release()
        body = await get_json(session, f"{base}/deployments/latest")
        assert body["id"] == "temp-0a1b2c3d" and body["status"] == 4


# -- logs -------------------------------------------------------------------------------------


async def test_log_entries_details_and_404_texts(site: Site) -> None:
    store = store_of(site)
    finished(store, "d1")
    deployment_log = store.log("d1")
    deployment_log.add("Fetching changes.")
    command = deployment_log.add("Running deployment command...")
    deployment_log.add("copied run.sh", parent=command)
    deployment_log.add("slow disk", LogType.WARNING, parent=command)
    deployment_log.add("Deployment successful.")
    finished(store, "nolog")
    async with api(site) as (_daemon, session, base):
        body = await get_json(session, f"{base}/api/deployments/d1")
        entries = await get_json(session, body["log_url"])
        assert [e["message"] for e in entries] == [
            "Fetching changes.",
            "Running deployment command...",
            "Deployment successful.",
        ]
        assert [e["type"] for e in entries] == [0, 1, 0]  # raised to its child's warning
        assert list(entries[0]) == ["log_time", "id", "message", "type", "details_url"]
        assert entries[0]["details_url"] is None and entries[2]["details_url"] is None
        assert all(len(e["id"]) == 36 for e in entries)
        details_url = entries[1]["details_url"]
        assert details_url == f"{base}/api/deployments/d1/log/{entries[1]['id']}"
        children = await get_json(session, details_url)
        assert [(c["message"], c["type"], c["id"]) for c in children] == [
            ("copied run.sh", 0, ""),
            ("slow disk", 1, ""),
        ]
        assert (await get_json(session, f"{base}/deployments/d1/log"))[0]["id"] == entries[0]["id"]
        for path, message in [
            ("/api/deployments/zzz/log", "Deployment 'zzz' not found."),
            ("/api/deployments/nolog/log", "No log found for 'nolog'."),
            ("/api/deployments/nolog/log/x", "No log found for 'nolog'."),
            (
                f"/api/deployments/d1/log/{entries[0]['id']}",
                f"LogId '{entries[0]['id']}' was not found in Deployment 'd1'.",
            ),
        ]:
            async with session.get(f"{base}{path}") as response:
                assert response.status == 404, path
                assert await response.json() == {"message": message}


# -- PUT and DELETE ---------------------------------------------------------------------------


def put_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "status": 4,
        "message": "Built by CI",
        "deployer": "GitHub",
        "author": "octocat",
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


async def test_put_records_a_finished_deployment_from_ci(site: Site) -> None:
    async with api(site) as (_daemon, session, base):
        async with session.put(
            f"{base}/api/deployments/abc1700000000000",
            json=put_body(start_time="2026-01-02T03:04:05Z", details="commit abc"),
        ) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        assert body["id"] == "abc1700000000000" and body["status"] == 4
        assert body["active"] is True and body["complete"] is True and body["is_readonly"]
        assert body["url"] == f"{base}/api/deployments/abc1700000000000"
        assert body["received_time"] == body["start_time"] == "2026-01-02T03:04:05.0000000Z"
        assert body["author_email"] == "N/A"
        listed = await get_json(session, f"{base}/api/deployments")
        assert [item["id"] for item in listed] == ["abc1700000000000"]
        assert listed[0]["active"] is True
        entries = await get_json(session, body["log_url"])
        assert [e["message"] for e in entries] == ["Deployment successful."]
        details = await get_json(session, entries[0]["details_url"])
        assert [d["message"] for d in details] == ["commit abc"]
        # The same id again: 409.
        async with session.put(f"{base}/deployments/abc1700000000000", json=put_body()) as r:
            assert r.status == 409
            assert await r.json() == {"message": "Deployment with id 'abc1700000000000' exists"}
        # A failed one is not active unless asked, and cannot be asked to be.
        async with session.put(
            f"{base}/api/deployments/failed1", json=put_body(status=3)
        ) as response:
            assert response.status == 200
            assert (await response.json())["active"] is False
        async with session.put(
            f"{base}/api/deployments/failed2", json=put_body(status=3, active=True)
        ) as response:
            assert response.status == 400
            assert await response.json() == {"message": "Only successful status can be active!"}
        ids = {item["id"] for item in await get_json(session, f"{base}/api/deployments")}
        assert ids == {"abc1700000000000", "failed1"}


@pytest.mark.parametrize(
    "body",
    [
        put_body(status=1),
        put_body(status=0),
        put_body(status="4"),
        put_body(status=True),
        put_body(message=""),
        put_body(deployer=None),
        put_body(author=7),
        put_body(end_time="yesterday"),
        put_body(active="yes"),
        [1, 2],
    ],
)
async def test_put_refuses_a_bad_body(site: Site, body: Any) -> None:
    async with api(site) as (_daemon, session, base):
        async with session.put(f"{base}/api/deployments/x1", json=body) as response:
            assert response.status == 400
            assert (await response.json())["message"]
        async with session.put(f"{base}/api/deployments/x1", data=b"{not json") as response:
            assert response.status == 400
        assert await get_json(session, f"{base}/api/deployments") == []


async def test_put_and_delete_refused_while_a_deployment_holds_the_lock(
    site: Site, lock: DeploymentLock
) -> None:
    store = store_of(site)
    finished(store, "old")
    async with api(site) as (_daemon, session, base):
        assert lock.try_acquire({"who": "test"})
        async with session.put(f"{base}/api/deployments/new1", json=put_body()) as response:
            assert response.status == 409
            assert await response.json() == {"message": IN_PROGRESS}
        async with session.delete(f"{base}/api/deployments/old") as response:
            assert response.status == 409
            assert await response.json() == {"message": IN_PROGRESS}
        lock.release()
        async with session.put(f"{base}/api/deployments/new1", json=put_body()) as response:
            assert response.status == 200


async def test_delete(site: Site, lock: DeploymentLock) -> None:
    store = store_of(site)
    finished(store, "active1")
    finished(store, "old1", DeployStatus.FAILED)
    store.set_active("active1")
    async with api(site) as (_daemon, session, base):
        async with session.delete(f"{base}/api/deployments/active1") as response:
            assert response.status == 409
            assert "active" in (await response.json())["message"]
        async with session.delete(f"{base}/api/deployments/unknown") as response:
            assert response.status == 404
            assert await response.json() == {"message": "Deployment 'unknown' not found."}
        async with session.delete(f"{base}/deployments/old1") as response:
            assert response.status == 200
            assert (await response.json())["id"] == "old1"
        assert store.get("old1") is None
        assert not (site.root / "site" / "deployments" / "old1").exists()
        async with session.get(f"{base}/api/deployments/old1") as response:
            assert response.status == 404
        # An unfinished record whose deployment holds the lock: 409 too.
        assert lock.try_acquire({"who": "test"})
        store.create(id="running1", deployer="d", message="m")
        async with session.delete(f"{base}/api/deployments/running1") as response:
            assert response.status == 409
        assert store.get("running1") is not None


# -- probes -----------------------------------------------------------------------------------


async def test_isdeploying_follows_the_lock(site: Site, lock: DeploymentLock) -> None:
    async with api(site) as (_daemon, session, base):
        body = await get_json(session, f"{base}/api/isdeploying")
        assert body["value"] == "False" and body["msg"]
        assert lock.try_acquire({"who": "isdeploying test"})
        body = await get_json(session, f"{base}/api/isdeploying")
        assert body["value"] == "True" and body["msg"] == IN_PROGRESS
        assert body["owner"] == {"who": "isdeploying test"}
        lock.release()
        assert (await get_json(session, f"{base}/api/isdeploying"))["value"] == "False"


async def test_diagnostics_runtime(site: Site) -> None:
    async with api(site) as (_daemon, session, base):
        status, body = await fetch(session, f"{base}/diagnostics/runtime", JSON_GET)
    assert status == 200
    assert body["system"]["os_name"] == "Unix"
    assert body["python"]["version"].startswith("3.")
    assert body["webjobsd"]["version"]


def concrete_path(template: str, record_id: str) -> str:
    """A GET route's template with real values: the jobs, the record and its log's entry."""
    kind_job = "ticker" if "continuous" in template else "nightly"
    values = {
        "name": kind_job,
        "id": record_id,
        "log_id": "0",
        "run_id": "000000000000000000",
        "key": "SOME_SETTING",
        "path": "site/",
    }
    path = re.sub(r"\{(\w+)(?::[^}]*)?\}", lambda match: values.get(match[1], "x"), template)
    # Streams end at once instead of following the log.
    return path + ("?follow=false" if path.endswith("/logstream") else "")


async def test_gets_with_a_json_content_type_work_everywhere(site: Site) -> None:
    """The deploy library sends `Content-Type: application/json; charset=utf-8` on every GET:
    every GET route of the daemon answers it exactly as it answers a GET without it."""
    finished(store_of(site), "one")
    store_of(site).log("one").add("Deployment successful.")
    site.write_job("triggered", "nightly", {"run.sh": "echo hi\n"})
    site.write_job("continuous", "ticker", {"run.sh": "while true; do sleep 1; done\n"})
    async with api(site) as (daemon, session, base):
        assert daemon.http is not None
        templates = sorted(
            {
                route.resource.get_info().get("path")
                or route.resource.get_info().get("formatter")
                or ""
                for route in daemon.http.app.router.routes()
                if route.method == "GET" and route.resource is not None
            }
        )
        assert len(templates) > 40, templates  # the whole API, not a sample
        for template in templates:
            path = concrete_path(template, "one")
            answers = []
            for headers in ({}, JSON_GET, {"Content-Type": "application/json"}):
                async with session.get(
                    f"{base}{path}", headers=headers, allow_redirects=False
                ) as response:
                    await response.read()
                    answers.append(response.status)
            assert answers[0] < 500 and len(set(answers)) == 1, (template, answers)
        # And the ones deploy clients call answer 200.
        for path in ("/api/deployments?warmup=true", "/diagnostics/runtime", "/api/settings"):
            status, _body = await fetch(session, f"{base}{path}", JSON_GET)
            assert status == 200, path


# -- records left unfinished by a daemon that died --------------------------------------------


async def test_unfinished_record_is_failed_at_start(site: Site) -> None:
    store = store_of(site)
    record = store.create(id="stuck1", deployer="ZipDeploy", message="m")
    record.mark_building()
    store.save(record)
    async with api(site) as (_daemon, session, base):
        # Repaired before the API listened, not by the read below.
        assert store.get("stuck1").status == DeployStatus.FAILED  # type: ignore[union-attr]
        body = await get_json(session, f"{base}/api/deployments/stuck1")
        assert body["status"] == 3 and body["complete"] is True and body["end_time"]
        entries = await get_json(session, body["log_url"])
        assert [(e["message"], e["type"]) for e in entries] == [(UNKNOWN_ERROR, 2)]
        assert (await get_json(session, f"{base}/api/deployments/latest"))["id"] == "stuck1"


async def test_start_leaves_records_alone_while_another_holds_the_lock(
    site: Site, lock: DeploymentLock
) -> None:
    store = store_of(site)
    store.create(id="live1", deployer="ZipDeploy", message="m")
    assert lock.try_acquire({"who": "the other daemon"})
    async with running_daemon(site):
        record = store.get("live1")
        assert record is not None and record.status == DeployStatus.PENDING
        assert deployment_in_progress(layout_of(site))


HOLD_A_DEPLOYMENT = textwrap.dedent(
    """
    from pathlib import Path
    from webjobsd.deploy.lock import DeploymentLock
    from webjobsd.deploy.records import DeploymentStore
    from webjobsd.site import SiteLayout
    _layout = SiteLayout.build(Path({site!r}), instance_id="other", temp_root=Path({temp!r}))
    _deploying = DeploymentLock(_layout)
    assert _deploying.try_acquire({{"who": "the killed daemon"}})
    _record = DeploymentStore(_layout).create(id="killed1", deployer="ZipDeploy", message="m")
    _record.mark_building()
    DeploymentStore(_layout).save(_record)
    """
)


async def test_a_deployment_of_a_daemon_killed_mid_way_becomes_failed(site: Site) -> None:
    """A second daemon on the site dies (SIGKILL) while it holds the lock and a record in
    progress: the running daemon's `latest` says 202 while it lived, then Failed; a daemon
    started afterwards finds it Failed too."""
    other = DaemonProcess(
        site,
        "other",
        preamble=HOLD_A_DEPLOYMENT.format(site=str(site.root), temp=str(site.temp / "o")),
    )
    store = store_of(site)
    async with api(site) as (_daemon, session, base):
        other.start()
        try:
            await wait_for(
                lambda: store.get("killed1") is not None,
                what="the other daemon holds a deployment",
            )
            async with session.get(f"{base}/api/deployments/latest") as response:
                assert response.status == 202
                assert (await response.json())["status"] == 1
            other.kill()
        finally:
            other.kill_if_running()
        body = await get_json(session, f"{base}/api/deployments/latest")
        assert body["id"] == "killed1" and body["status"] == 3
        entries = await get_json(session, body["log_url"])
        assert entries[-1]["message"] == UNKNOWN_ERROR and entries[-1]["type"] == 2
    assert not deployment_in_progress(layout_of(site))
    record = store.get("killed1")
    assert record is not None and record.status == DeployStatus.FAILED


async def test_a_killed_daemons_record_is_failed_after_restart(site: Site) -> None:
    """The same death with no daemon running: the next start repairs it."""
    other = DaemonProcess(
        site,
        "other",
        preamble=HOLD_A_DEPLOYMENT.format(site=str(site.root), temp=str(site.temp / "o")),
    )
    store = store_of(site)
    other.start()
    try:
        await wait_for(
            lambda: store.get("killed1") is not None and deployment_in_progress(layout_of(site)),
            what="the other daemon holds a deployment",
        )
        other.kill()
    finally:
        other.kill_if_running()
    assert store.get("killed1").status == DeployStatus.BUILDING  # type: ignore[union-attr]
    async with running_daemon(site):
        record = store.get("killed1")
        assert record is not None and record.status == DeployStatus.FAILED
        assert [e.message for e in store.log("killed1").entries()] == [UNKNOWN_ERROR]
