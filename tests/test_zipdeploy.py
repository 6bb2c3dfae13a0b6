"""Whole-site deployments through the API: zipdeploy, OneDeploy, wardeploy (Part A #3-#9).

A real daemon on a loopback port, real HTTP clients (aiohttp, curl with chunked bodies), real
job processes, real files. Restarts are counted from what each job's process writes when it
starts (its pid, appended to its own data folder).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from tests.helpers import Site, job_pids, wait_for
from tests.test_api_jobs import api
from webjobsd.app import Daemon
from webjobsd.deploy.lock import IN_PROGRESS
from webjobsd.deploy.records import DeploymentRecord, DeployStatus

OCTET = {"Content-Type": "application/octet-stream"}


def entry_time(content: bytes) -> tuple[int, int, int, int, int, int]:
    """An edited file gets another time, the same content the same one (as a build's zip)."""
    day = zlib.crc32(content) % 28 + 1
    return (2020, 1, day, 12, 0, 0)


def site_zip(files: Mapping[str, str | bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = zipfile.ZipInfo(name, date_time=entry_time(data))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o755 if name.endswith(".sh") else 0o644) << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def loop_job(version: str) -> str:
    return (
        "#!/usr/bin/env bash\n"
        'echo "$$" >> "$WEBJOBSD_JOB_DATA_PATH/starts"\n'
        f'echo "started version {version}"\n'
        "while true; do sleep 0.2; done\n"
    )


def jobs_site(versions: Mapping[str, str], **extra: str) -> dict[str, str]:
    files = {"index.html": "<h1>site</h1>", **extra}
    for name, version in versions.items():
        files[f"App_Data/jobs/continuous/{name}/run.sh"] = loop_job(version)
    return files


def starts(site: Site, name: str) -> list[str]:
    path = site.data_dir("continuous", name) / "job-data" / "starts"
    try:
        return path.read_text().split()
    except OSError:
        return []


def wwwroot(site: Site) -> Path:
    return site.root / "site" / "wwwroot"


def newest(daemon: Daemon) -> DeploymentRecord:
    return daemon.deployment_store.all()[0]


def log_lines(daemon: Daemon, record_id: str) -> list[str]:
    """Every message of the deployment's log, children after their parent."""
    log = daemon.deployment_store.log(record_id)
    lines = []
    for entry in log.entries():
        lines.append(entry.message)
        lines.extend(child.message for child in log.children(entry.id))
    return lines


async def settled(daemon: Daemon) -> None:
    """Discovery has nothing pending: every change it was told of has been acted on."""
    discovery = daemon.discovery
    assert discovery is not None
    await wait_for(lambda: discovery.debouncer.next_due() is None, what="discovery settled")


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str] = OCTET,
) -> tuple[int, str, Mapping[str, str]]:
    async with session.post(url, data=body, headers=dict(headers)) as response:
        return response.status, await response.text(), response.headers


async def test_zipdeploy_runs_the_jobs_and_restarts_only_the_changed_one(site: Site) -> None:
    async with api(site) as (daemon, session, base):
        first = site_zip(jobs_site({"a": "1", "b": "1", "c": "1"}, **{"old.txt": "old"}))
        status, text, _ = await post(session, f"{base}/api/zipdeploy", first)
        assert status == 200, text
        for name in ("a", "b", "c"):
            await wait_for(lambda n=name: len(starts(site, n)) == 1, what=f"{name} started")
        pids = {name: starts(site, name)[0] for name in ("b", "c")}
        record = newest(daemon)
        assert record.status == DeployStatus.SUCCESS and record.deployer == "Push-Deployer"
        assert record.changed_jobs == ["continuous/a", "continuous/b", "continuous/c"]
        runtime = wwwroot(site) / "data" / "made-at-run-time.txt"
        runtime.parent.mkdir()
        runtime.write_text("mine")

        second = site_zip(jobs_site({"a": "2", "b": "1", "c": "1"}))
        status, text, _ = await post(session, f"{base}/api/zipdeploy?deployer=ci", second)
        assert status == 200, text
        await wait_for(lambda: len(starts(site, "a")) == 2, what="a restarted")
        await wait_for(lambda: "started version 2" in site.job_log("a"), what="a's new version")
        await settled(daemon)
        assert len(starts(site, "a")) == 2, "one restart of the changed job"
        assert {name: starts(site, name) for name in ("b", "c")} == {
            name: [pid] for name, pid in pids.items()
        }, "unchanged jobs keep their process"
        for name, pid in pids.items():
            assert os.path.exists(f"/proc/{pid}"), f"{name}'s process is still there"
        record = newest(daemon)
        assert (record.deployer, record.changed_jobs) == ("ci", ["continuous/a"])
        assert not (wwwroot(site) / "old.txt").exists(), "deleted from the zip: deleted"
        assert runtime.read_text() == "mine", "created at run time: kept"
        assert daemon.deployment_store.active_id() == record.id

        status, text, _ = await post(session, f"{base}/api/zipdeploy?clean=true", second)
        assert status == 200, text
        assert not runtime.exists(), "clean deletes what the zip does not have"
        assert newest(daemon).changed_jobs == []
        await settled(daemon)
        assert [len(starts(site, n)) for n in ("a", "b", "c")] == [2, 1, 1]

        third = site_zip(jobs_site({"a": "2", "b": "1"}))
        status, text, _ = await post(session, f"{base}/api/zipdeploy", third)
        assert status == 200, text
        assert newest(daemon).removed_jobs == ["continuous/c"]
        assert not site.job_dir("continuous", "c").exists()
        await wait_for(lambda: not job_pids(site, "c"), what="the removed job stopped")
        await settled(daemon)
        assert [len(starts(site, n)) for n in ("a", "b")] == [2, 1]


async def test_chunked_bodies_from_curl_and_multipart(site: Site, tmp_path: Path) -> None:
    package = tmp_path / "site.zip"
    async with api(site) as (daemon, session, base):
        auth = ["-u", "deployer:s3cret-pass"]

        async def curl(*arguments: str, stdin: Path | None = None) -> tuple[int, str]:
            with open(stdin or os.devnull, "rb") as source:
                process = await asyncio.create_subprocess_exec(
                    "curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *auth, *arguments,
                    stdin=source, stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, _ = await process.communicate()
            body, _, code = out.decode().rpartition("\n")
            return int(code), body

        package.write_bytes(site_zip({"index.html": "curl -T"}))
        # Kudu's wiki form, `curl -X POST -T file`; from stdin curl sends the body chunked.
        code, body = await curl("-X", "POST", "-T", "-", f"{base}/api/zipdeploy", stdin=package)
        assert code == 200, body
        assert (wwwroot(site) / "index.html").read_text() == "curl -T"
        package.write_bytes(site_zip({"index.html": "chunked"}))
        code, body = await curl(
            "-X",
            "POST",
            "--data-binary",
            f"@{package}",
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Content-Type: application/octet-stream",
            f"{base}/zipdeploy",
        )
        assert code == 200, body
        assert (wwwroot(site) / "index.html").read_text() == "chunked"
        package.write_bytes(site_zip({"index.html": "put -T"}))
        code, body = await curl("-T", str(package), f"{base}/api/zipdeploy")
        assert code == 200, body
        assert (wwwroot(site) / "index.html").read_text() == "put -T"

        form = aiohttp.FormData()
        form.add_field("comment", "not the file")
        form.add_field(
            "file",
            site_zip({"index.html": "multipart"}),
            filename="site.zip",
            content_type="application/zip",
        )
        async with session.post(f"{base}/api/zipdeploy", data=form) as response:
            assert response.status == 200, await response.text()
        assert (wwwroot(site) / "index.html").read_text() == "multipart"

        status, text, _ = await post(
            session,
            f"{base}/api/zipdeploy",
            b'{"packageUri": "https://example.com/a.zip"}',
            {"Content-Type": "application/json"},
        )
        assert status == 400 and "packageUri" in json.loads(text)["message"]
        status, text, _ = await post(session, f"{base}/api/zipdeploy", b"not a zip")
        assert status == 400 and json.loads(text)["message"] == "Not a valid zip archive."
        assert newest(daemon).status == DeployStatus.FAILED
        assert (wwwroot(site) / "index.html").read_text() == "multipart"


async def test_async_answers_202_with_a_location_and_tracks_the_id(site: Site) -> None:
    async with api(site) as (daemon, session, base):
        body = site_zip(jobs_site({"a": "1"}))
        query = "isAsync=true&deployer=GITHUB_ZIP_DEPLOY&trackDeploymentProgress=true"
        url = f"{base}/api/zipdeploy?{query}"
        status, text, headers = await post(session, url, body)
        assert status == 202, text
        location = headers["Location"]
        assert location.startswith(
            f"{base}/api/deployments/latest?deployer=GITHUB_ZIP_DEPLOY&time="
        )
        assert headers["Retry-After"] == "30"
        tracked = headers["SCM-DEPLOYMENT-ID"]
        assert len(tracked) == 36 and tracked.count("-") == 4
        record = daemon.deployment_store.get(tracked)
        assert record is not None, "the record exists before the 202"
        seen: list[tuple[int, int]] = []

        async def poll() -> bool:
            async with session.get(location) as response:
                body = await response.json()
                seen.append((response.status, body["status"]))
                assert body["id"] == tracked
                return bool(body["status"] in (3, 4))

        deadline = asyncio.get_running_loop().time() + 20
        while not await poll():
            assert asyncio.get_running_loop().time() < deadline, seen
            await asyncio.sleep(0.05)
        assert seen[-1] == (200, 4), seen
        assert all(code == 202 for code, status in seen[:-1]), seen
        await wait_for(lambda: len(starts(site, "a")) == 1, what="a started")
        assert log_lines(daemon, tracked)[:2] == [
            "Fetching changes.",
            log_lines(daemon, tracked)[1],
        ]
        assert log_lines(daemon, tracked)[1].startswith(
            "Cleaning up temp folders from previous zip deployments and extracting pushed zip"
        )
        assert log_lines(daemon, tracked)[-1] == "Deployment successful."


def action(path: Path, text: str, *, executable: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755 if executable else 0o644)


async def test_post_deployment_actions_log_their_output_and_a_failing_one_fails(
    site: Site,
) -> None:
    actions = site.root / "site" / "deployments" / "tools" / "PostDeploymentActions"
    action(actions / "01-hello.sh", '#!/bin/sh\necho "hello $DEPLOYMENT_ID $GREETING"\n')
    action(actions / "README.txt", "not a script", executable=False)
    async with api(site, settings={"GREETING": "from-settings"}) as (
        daemon,
        session,
        base,
    ):
        status, text, _ = await post(session, f"{base}/api/zipdeploy", site_zip({"a.txt": "a"}))
        assert status == 200, text
        record = newest(daemon)
        lines = log_lines(daemon, record.id)
        assert "Running post deployment command(s)..." in lines
        assert f"hello {record.id} from-settings" in lines
        assert "Skipped 'README.txt': not executable." in lines

        action(actions / "02-fail.sh", '#!/bin/sh\necho "about to fail"\nexit 3\n')
        action(actions / "03-never.sh", '#!/bin/sh\necho "never runs"\n')
        status, text, _ = await post(session, f"{base}/api/zipdeploy", site_zip({"a.txt": "b"}))
        failure = "PostDeploymentAction '02-fail.sh' failed with exit code 3."
        assert (status, json.loads(text)["message"]) == (500, failure)
        record = newest(daemon)
        assert record.status == DeployStatus.FAILED
        lines = log_lines(daemon, record.id)
        assert "about to fail" in lines and failure in lines
        assert "never runs" not in lines and lines[-1] == "Deployment Failed."
        assert daemon.deployment_store.active_id() != record.id

        # restart=false (OneDeploy) skips them.
        status, text, _ = await post(
            session, f"{base}/api/publish?type=zip&restart=false", site_zip({"a.txt": "c"})
        )
        assert status == 200, text


async def test_a_second_deployment_while_one_runs_is_409(site: Site) -> None:
    actions = site.root / "site" / "deployments" / "tools" / "PostDeploymentActions"
    gate = site.root / "gate"
    action(actions / "wait.sh", f'#!/bin/sh\nwhile [ ! -e "{gate}" ]; do sleep 0.05; done\n')
    async with api(site) as (daemon, session, base):
        status, text, _ = await post(
            session, f"{base}/api/zipdeploy?isAsync=true", site_zip({"a.txt": "1"})
        )
        assert status == 202, text
        running = newest(daemon)
        await wait_for(lambda: daemon.deployments.is_deploying(), what="deploying")
        for url in (f"{base}/api/zipdeploy", f"{base}/api/publish?type=zip"):
            status, text, _ = await post(session, url, site_zip({"a.txt": "2"}))
            assert (status, json.loads(text)["message"]) == (409, IN_PROGRESS)
        gate.write_text("go")
        await wait_for(
            lambda: (r := daemon.deployment_store.get(running.id)) is not None and r.complete,
            what="first deployment done",
        )
        status, text, _ = await post(session, f"{base}/api/zipdeploy", site_zip({"a.txt": "3"}))
        assert status == 200, text


async def test_a_sync_failure_is_500_and_leaves_the_jobs_whole(site: Site) -> None:
    async with api(site) as (daemon, session, base):
        status, text, _ = await post(
            session, f"{base}/api/zipdeploy", site_zip(jobs_site({"a": "1"}))
        )
        assert status == 200, text
        broken = site_zip({"index.html": "x", "App_Data/jobs": "a file where the jobs are"})
        status, text, _ = await post(session, f"{base}/api/zipdeploy", broken)
        assert status == 500
        assert "where the jobs folder" in json.loads(text)["message"]
        assert newest(daemon).status == DeployStatus.FAILED
        assert (site.job_dir("continuous", "a") / "run.sh").read_text() == loop_job("1")


async def test_onedeploy_places_each_type_and_refuses_bad_paths(site: Site) -> None:
    root = site.root
    async with api(site) as (daemon, session, base):
        publish = f"{base}/api/publish"

        async def refused(query: str, message: str) -> None:
            status, text, _ = await post(session, f"{publish}?{query}", b"x")
            assert (status, json.loads(text)["message"]) == (400, message), query

        await refused("", "type='' not recognized")
        await refused("type=foo", "type='foo' not recognized")
        await refused("type=static", "Path must be defined for type=static")
        await refused("type=static&path=dir/", "Path cannot end with a '/'")
        await refused(
            "type=zip&path=../up", "Path cannot contain '..' Please provide an absolute path."
        )
        await refused(
            "type=static&path=a/../../b.txt",
            "Path cannot contain '..' Please provide an absolute path.",
        )
        await refused(
            "type=war&path=webapps/..", "Path cannot contain '..' Please provide an absolute path."
        )
        await refused("type=lib", "Path must be defined for type='Lib'")
        await refused("type=script", "Path must be defined for type='Script'")
        await refused(
            "type=lib&path=/etc/passwd",
            "Absolute path = '/etc/passwd' for artifact type = 'Lib' is invalid. Either use a "
            "relative path or use an absolute path that start with prefix '/home/site/libs/'",
        )
        await refused(
            "type=war&path=other/place",
            "path='other/place' is invalid. When type=War, the only allowed paths are "
            "webapps/<directory-name> or /home/site/wwwroot/webapps/<directory-name>. "
            "Example: path=webapps/ROOT or path=/home/site/wwwroot/webapps/ROOT",
        )
        await refused(
            "type=zip&path=/home/site",
            "Clean deployments cannot be performed in the requested directory: /home/site. "
            "Please perform an incremental deployment (clean = false) or deploy to a "
            "subdirectory.",
        )
        assert daemon.deployment_store.all() == [], "refused before any record"

        async def placed(query: str, body: bytes) -> DeploymentRecord:
            status, text, _ = await post(session, f"{publish}?{query}", body)
            assert status == 200, (query, text)
            return newest(daemon)

        www = wwwroot(site)
        (www / "keep").mkdir(parents=True)
        (www / "keep" / "file.txt").write_text("kept")
        record = await placed("type=static&path=static/a.txt&deployer=me&message=hi", b"A")
        assert (www / "static" / "a.txt").read_text() == "A"
        assert (record.deployer, record.message) == ("me", "hi")
        record = await placed("type=zip&path=sub/dir", site_zip({"z.txt": "z"}))
        assert (record.deployer, record.message) == ("OneDeploy", "OneDeploy")
        assert (www / "sub" / "dir" / "z.txt").read_text() == "z"
        await placed("type=zip&path=/home/site/wwwroot/abs&clean=false", site_zip({"y": "y"}))
        assert (www / "abs" / "y").read_text() == "y"
        await placed("type=script&path=tools/do.sh", b"#!/bin/sh\necho do\n")
        assert os.access(root / "site" / "scripts" / "tools" / "do.sh", os.X_OK)
        await placed("type=startup&path=ignored.sh", b"#!/bin/sh\n")
        assert (root / "site" / "scripts" / "startup.sh").exists()
        await placed("type=lib&path=/home/site/libs/x/lib.jar", b"jar")
        assert (root / "site" / "libs" / "x" / "lib.jar").read_bytes() == b"jar"
        await placed("type=jar", b"jar")
        await placed("type=ear", b"ear")
        await placed("type=war", b"war")
        await placed("type=war&path=custom.war", b"custom")
        assert (www / "app.jar").exists() and (www / "app.ear").exists()
        assert (www / "app.war").read_bytes() == b"war"
        assert (www / "custom.war").read_bytes() == b"custom"
        await placed("type=WAR&path=webapps/ROOT", site_zip({"WEB-INF/web.xml": "<web/>"}))
        assert (www / "webapps" / "ROOT" / "WEB-INF" / "web.xml").read_text() == "<web/>"
        status, text, _ = await post(
            session, f"{base}/api/wardeploy?name=shop", site_zip({"index.jsp": "shop"})
        )
        assert status == 200, text
        assert (www / "webapps" / "shop" / "index.jsp").read_text() == "shop"
        assert (www / "keep" / "file.txt").read_text() == "kept", "nothing clean touched it"

        # type=zip defaults to clean, into its target only.
        await placed("type=zip&path=sub", site_zip({"only.txt": "o"}))
        assert sorted(p.name for p in (www / "sub").iterdir()) == ["only.txt"]
        assert (www / "keep" / "file.txt").exists()
        # A OneDeploy never rewrites the manifest: a later zipdeploy deletes nothing it placed.
        status, text, _ = await post(session, f"{base}/api/zipdeploy", site_zip({"i": "i"}))
        assert status == 200, text
        assert (www / "static" / "a.txt").exists() and (www / "app.war").exists()


async def test_onedeploy_of_a_zip_into_a_job_folder_rebuilds_that_job(site: Site) -> None:
    async with api(site) as (daemon, session, base):
        status, text, _ = await post(
            session, f"{base}/api/zipdeploy", site_zip(jobs_site({"a": "1", "b": "1"}))
        )
        assert status == 200, text
        for name in ("a", "b"):
            await wait_for(lambda n=name: len(starts(site, n)) == 1, what=f"{name} started")
        status, text, _ = await post(
            session,
            f"{base}/api/publish?type=zip&clean=false&path=App_Data/jobs/continuous/a",
            site_zip({"run.sh": loop_job("2")}),
        )
        assert status == 200, text
        assert newest(daemon).changed_jobs == ["continuous/a"]
        await wait_for(lambda: "started version 2" in site.job_log("a"), what="a's new version")
        await settled(daemon)
        assert (len(starts(site, "a")), len(starts(site, "b"))) == (2, 1)


async def test_a_daemon_that_stops_lets_the_running_deployment_finish(site: Site) -> None:
    actions = site.root / "site" / "deployments" / "tools" / "PostDeploymentActions"
    gate = site.root / "gate"
    action(actions / "wait.sh", f'#!/bin/sh\nwhile [ ! -e "{gate}" ]; do sleep 0.05; done\n')
    async with api(site) as (daemon, session, base):
        status, text, headers = await post(
            session,
            f"{base}/api/zipdeploy?isAsync=true&trackDeploymentProgress=true",
            site_zip({"a.txt": "1"}),
        )
        assert status == 202, text
        deployment = headers["SCM-DEPLOYMENT-ID"]
        await wait_for(lambda: "Running 'wait.sh'." in log_lines(daemon, deployment))
        daemon.request_shutdown("test: stop during a deployment")
        await wait_for(lambda: daemon.deployments.closing, what="the stop waits")
        record = daemon.deployment_store.get(deployment)
        assert record is not None and not record.complete
        gate.write_text("go")
        await wait_for(
            lambda: (r := daemon.deployment_store.get(deployment)) is not None and r.complete,
            what="the deployment finished during the stop",
        )
        record = daemon.deployment_store.get(deployment)
        assert record is not None and record.status == DeployStatus.SUCCESS


async def test_bodies_past_the_limit_or_without_a_file_part_are_refused(site: Site) -> None:
    async with api(site, max_upload_bytes=64 * 1024) as (daemon, session, base):
        big = site_zip({"big.bin": os.urandom(128 * 1024)})
        status, text, _ = await post(session, f"{base}/api/zipdeploy", big)
        assert status == 413, text
        record = newest(daemon)
        assert record.status == DeployStatus.FAILED
        assert log_lines(daemon, record.id)[-2].startswith("Receiving the package failed:")
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("comment", "no file here")
        form.add_field("other", "nor here")
        async with session.post(f"{base}/api/zipdeploy", data=form) as response:
            assert response.status == 400
            assert (await response.json())["message"] == (
                "The multipart/form-data body has no file part."
            )
        # The lock was released each time: a good deployment goes through.
        status, text, _ = await post(session, f"{base}/api/zipdeploy", site_zip({"a": "a"}))
        assert status == 200, text
