"""Interoperability of deployments: `azure-actions-appservice-rest` (npm), the library of the
GitHub `azure/webapps-deploy` action, deploys whole sites to a real daemon over HTTPS.

The library runs unchanged in Node (tests/interop/appservice_deploy.js): `KuduServiceUtility`'s
`deployUsingZipDeploy` (the action's v2) and `deployUsingOneDeploy` (v3) post the zip, follow the
202's Location with their own polling, read the record and, when it failed, print its log. The
daemon serves native TLS with a certificate made here, trusted by Node through
NODE_EXTRA_CA_CERTS, because the action only ever speaks `https://<publishUrl>`.

The library sleeps 5 s between two polls and has no option to change that (its first poll follows
the 202 at once): each deployment through it costs about 5 s, so only the step under test goes
through it, and a site a test starts from is deployed with one synchronous POST /api/zipdeploy.

A continuous job's starts are counted in its log ("Status changed to Running"); each job prints
the content of its version.txt when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import ssl
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import Site, leaders, running_daemon, wait_for
from tests.test_api_jobs import basic
from tests.test_tls import client_context, install, make_certificate
from webjobsd.app import Daemon
from webjobsd.deploy.archive import NOT_A_ZIP
from webjobsd.deploy.lock import IN_PROGRESS

INTEROP = Path(__file__).with_name("interop")
DRIVER = INTEROP / "appservice_deploy.js"
JOBS = "App_Data/jobs/continuous"
# Zip entries carry DOS times; KuduSync copies a file whose size or time differs, so a rebuilt
# file gets a later time, and an unchanged one keeps its time from one build to the next.
BUILT = (2026, 1, 1, 12, 0, 0)
REBUILT = (2026, 1, 2, 12, 0, 0)
SCRIPT = 'echo "start $(cat version.txt)"\nwhile true; do sleep 0.2; done\n'
# A publish profile's user name is `$APP` (the action drops the first character and compares the
# rest with its `app-name` input), sent as it is in Basic authentication.
CREDENTIALS = {"WEBJOBSD_USERNAME": "$interop", "WEBJOBSD_PASSWORD": "publish-profile-pwd"}
# What the action's environment holds (the library puts them in the record's message).
ACTION_ENV = {
    "GITHUB_SHA": "0123456789abcdef0123456789abcdef01234567",
    "GITHUB_REPOSITORY": "example/site",
    "GITHUB_ACTOR": "octocat",
    "AZURE_HTTP_USER_AGENT": "GITHUBACTIONS_DeployWebAppToAzure_interop",
}

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY")

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")


def site_zip(
    path: Path, versions: Mapping[str, str], *, rebuilt: frozenset[str] = frozenset()
) -> Path:
    """A site: an index page and one continuous job per entry of `versions` (name -> version);
    the jobs in `rebuilt` carry a later time on their version.txt."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:

        def add(name: str, data: str, when: tuple[int, ...] = BUILT, mode: int = 0o644) -> None:
            info = zipfile.ZipInfo(name, date_time=when)
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)

        add("index.html", "<h1>site</h1>\n")
        for job, version in versions.items():
            add(f"{JOBS}/{job}/run.sh", SCRIPT, mode=0o755)
            add(f"{JOBS}/{job}/version.txt", version, REBUILT if job in rebuilt else BUILT)
    return path


def starts(site: Site, name: str) -> int:
    return site.job_log(name).count("Status changed to Running")


def start_lines(site: Site, name: str) -> list[str]:
    return [line for line in site.job_log(name).splitlines() if "start v" in line]


@dataclass(frozen=True)
class Scm:
    """The daemon as the action sees it: an https SCM URL, credentials, a CA to trust."""

    daemon: Daemon
    url: str
    ca_file: Path
    tls: ssl.SSLContext
    site: Site

    def session(self) -> aiohttp.ClientSession:
        auth = basic(CREDENTIALS["WEBJOBSD_USERNAME"], CREDENTIALS["WEBJOBSD_PASSWORD"])
        return aiohttp.ClientSession(
            headers={"Authorization": auth}, connector=aiohttp.TCPConnector(ssl=self.tls)
        )

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session() as session, session.get(self.url + path) as response:
            return response.status, await response.json(content_type=None)

    async def seed(self, archive: Path) -> dict[str, Any]:
        """Deploy `archive` synchronously (the starting point of a test, not under test)."""
        async with (
            self.session() as session,
            session.post(
                f"{self.url}/api/zipdeploy?deployer=seed",
                data=archive.read_bytes(),
                headers={"Content-Type": "application/octet-stream"},
            ) as response,
        ):
            assert response.status == 200, await response.text()
        status, record = await self.get("/api/deployments/latest")
        assert status == 200 and record["status"] == 4, record
        return dict(record)

    def settled(self) -> bool:
        """Discovery has nothing pending and every job folder on disk is applied."""
        discovery, catalog = self.daemon.discovery, self.daemon.catalog
        assert discovery is not None and catalog is not None
        known = set(catalog.specs) | set(catalog.errors)
        return discovery.debouncer.next_due() is None and catalog.present_keys() <= known


@dataclass(frozen=True)
class Outcome:
    """What the library did: its result line, and every line it printed before it."""

    result: dict[str, Any]
    lines: list[str]
    returncode: int

    @property
    def ok(self) -> bool:
        return bool(self.result["ok"])

    def debug(self, prefix: str) -> list[str]:
        """The library's `core.debug` messages starting with `prefix`, unescaped (workflow
        commands escape %, CR and LF)."""
        found = []
        for line in self.lines:
            if line.startswith("::debug::"):
                message = line[len("::debug::") :]
                message = message.replace("%0D", "\r").replace("%0A", "\n").replace("%25", "%")
                if message.startswith(prefix):
                    found.append(message[len(prefix) :])
        return found

    def requests(self) -> list[str]:
        """The URL of every request the library sent ("[METHOD] URL" in its debug output)."""
        return [text.split("] ", 1)[1] for text in self.debug("[") if "] " in text]

    def polls(self) -> list[dict[str, Any]]:
        """Each answer to a poll of the Location URL: {statusCode, body, ...}."""
        return [json.loads(text) for text in self.debug("POLL URL RESULT: ")]


@contextlib.asynccontextmanager
async def scm_daemon(site: Site) -> AsyncIterator[Scm]:
    """The daemon with Basic credentials and native TLS (a certificate for 127.0.0.1)."""
    certificate = make_certificate(4242)
    cert_path, key_path = site.root.parent / "scm.crt", site.root.parent / "scm.key"
    install(certificate, cert_path, key_path)
    async with running_daemon(
        site,
        auth=True,
        environ=CREDENTIALS,
        tls_certificate=str(cert_path),
        tls_key=str(key_path),
    ) as daemon:
        assert daemon.http is not None
        url = f"https://127.0.0.1:{daemon.http.port}"
        yield Scm(daemon, url, cert_path, client_context(certificate), site)


async def library(
    scm: Scm,
    *args: str,
    timeout: float = 120,
    on_line: Callable[[str], Awaitable[None]] | None = None,
) -> Outcome:
    """Run the driver: the library against the daemon, as the action would run it.
    `on_line` sees each line of its output as it comes (to act while the library waits)."""
    assert (INTEROP / "node_modules" / "azure-actions-appservice-rest").is_dir(), (
        "run `npm ci --prefix tests/interop` (part of the README's test command)"
    )
    process = await asyncio.create_subprocess_exec(
        "node",
        str(DRIVER),
        *args,
        env={
            # The library's HTTP client honours HTTP(S)_PROXY: the daemon is on loopback.
            **{key: value for key, value in os.environ.items() if key not in PROXY_VARIABLES},
            **ACTION_ENV,
            "SCM_URL": scm.url,
            "SCM_USERNAME": CREDENTIALS["WEBJOBSD_USERNAME"],
            "SCM_PASSWORD": CREDENTIALS["WEBJOBSD_PASSWORD"],
            "NODE_EXTRA_CA_CERTS": str(scm.ca_file),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 20,  # a debug line carries a whole answer
    )
    assert process.stdout is not None and process.stderr is not None

    async def output() -> bytes:
        assert process.stdout is not None
        collected = []
        while raw := await process.stdout.readline():
            collected.append(raw)
            if on_line is not None:
                await on_line(raw.decode(errors="replace").rstrip("\n"))
        return b"".join(collected)

    try:
        stdout, stderr = await asyncio.wait_for(
            asyncio.gather(output(), process.stderr.read()), timeout=timeout
        )
        await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    lines = stdout.decode(errors="replace").splitlines()
    assert lines and lines[-1].startswith("{"), (stdout + stderr).decode(errors="replace")
    result = json.loads(lines[-1])
    assert (process.returncode == 0) == result["ok"], result
    outcome = Outcome(result, lines[:-1], process.returncode or 0)
    # The library talks to the SCM URL it was given and to nothing else.
    assert outcome.requests(), outcome.lines
    assert all(url.startswith(scm.url + "/") for url in outcome.requests()), outcome.requests()
    return outcome


async def running(scm: Scm, *names: str) -> dict[str, int]:
    """Each job's one process, once every job runs."""

    def pids() -> dict[str, int] | None:
        found = {name: leaders(scm.site, name) for name in names}
        if all(len(found[name]) == 1 for name in names):
            return {name: found[name][0] for name in names}
        return None

    result: dict[str, int] = await wait_for(pids, timeout=30, what=f"jobs {names} running")
    return result


def assert_library_succeeded(outcome: Outcome, scm: Scm, deployer: str) -> dict[str, Any]:
    """The library polled the absolute https Location to Success and read the record back."""
    assert outcome.ok, "\n".join([*outcome.lines, str(outcome.result)])
    polled = outcome.debug(f"Polling for {'ZIP' if deployer == 'GITHUB_ZIP_DEPLOY' else 'One'}")
    assert len(polled) == 1 and f" URL: {scm.url}/api/deployments/latest" in polled[0], polled
    polls = outcome.polls()
    assert polls and polls[-1]["body"]["status"] == 4, polls
    assert all(poll["statusCode"] in (200, 202) for poll in polls), polls
    assert all(poll["body"]["status"] in (0, 1, 2) for poll in polls[:-1]), polls
    record = outcome.result["record"]
    assert record["id"] == outcome.result["id"] == polls[-1]["body"]["id"]
    assert record["status"] == 4 and record["complete"] is True and record["active"] is True
    assert record["deployer"] == deployer
    message = json.loads(record["message"])  # the library's JSON, kept as the text it sent
    assert message["commitMessage"] == "deployed by the interoperability test"
    assert (message["sha"], message["actor"]) == (ACTION_ENV["GITHUB_SHA"], "octocat")
    assert record["log_url"] == f"{scm.url}/api/deployments/{record['id']}/log"
    return dict(record)


async def test_zipdeploy_through_the_library_starts_the_jobs_of_the_zip(
    site: Site, tmp_path: Path
) -> None:
    """1. An empty site. 2. deployUsingZipDeploy of a site zip with two continuous jobs and a
    page: the library polls to Success. 3. Both jobs run from the zip's files, started once; the
    page is in wwwroot; the record is the active one."""
    archive = site_zip(tmp_path / "site.zip", {"alpha": "v1", "beta": "v1"})
    async with scm_daemon(site) as scm:
        outcome = await library(scm, "zipdeploy", str(archive))
        record = assert_library_succeeded(outcome, scm, "GITHUB_ZIP_DEPLOY")
        await running(scm, "alpha", "beta")
        await wait_for(lambda: start_lines(site, "alpha") and start_lines(site, "beta"))
        assert (site.root / "site" / "wwwroot" / "index.html").read_text() == "<h1>site</h1>\n"
        assert start_lines(site, "alpha")[0].endswith("start v1")
        await wait_for(scm.settled, what="discovery settled")
        assert starts(site, "alpha") == 1 and starts(site, "beta") == 1
        status, latest = await scm.get("/api/deployments/latest")
        assert status == 200 and latest["id"] == record["id"]


async def test_a_second_zipdeploy_restarts_only_the_changed_job(site: Site, tmp_path: Path) -> None:
    """1. A site with three running jobs. 2. deployUsingZipDeploy of the same site where only
    beta's version.txt was rebuilt. 3. beta restarts exactly once, with the new file; alpha and
    gamma keep their processes and were never restarted."""
    jobs = ("alpha", "beta", "gamma")
    first = site_zip(tmp_path / "v1.zip", dict.fromkeys(jobs, "v1"))
    second = site_zip(
        tmp_path / "v2.zip",
        {"alpha": "v1", "beta": "v2", "gamma": "v1"},
        rebuilt=frozenset({"beta"}),
    )
    async with scm_daemon(site) as scm:
        await scm.seed(first)
        before = await running(scm, *jobs)
        await wait_for(lambda: all(start_lines(site, job) for job in jobs), what="first starts")

        outcome = await library(scm, "zipdeploy", str(second))
        record = assert_library_succeeded(outcome, scm, "GITHUB_ZIP_DEPLOY")
        assert (record["changed_jobs"], record["removed_jobs"]) == (["continuous/beta"], [])
        await wait_for(lambda: starts(site, "beta") == 2, timeout=30, what="beta restarted")
        after = await running(scm, *jobs)
        await wait_for(lambda: len(start_lines(site, "beta")) == 2, what="beta's new start line")
        await wait_for(scm.settled, what="discovery settled")

        assert [line[-8:] for line in start_lines(site, "beta")] == ["start v1", "start v2"]
        assert after["beta"] != before["beta"]
        assert {job: after[job] for job in ("alpha", "gamma")} == {
            job: before[job] for job in ("alpha", "gamma")
        }
        assert {job: starts(site, job) for job in jobs} == {"alpha": 1, "beta": 2, "gamma": 1}


async def test_a_clean_onedeploy_removes_the_job_that_is_not_in_the_zip(
    site: Site, tmp_path: Path
) -> None:
    """1. A site with three running jobs. 2. deployUsingOneDeploy (type zip, clean true, as the
    v3 action sends its inputs) of the site without gamma. 3. gamma's process is gone and its
    folder too; alpha and beta keep their processes, never restarted."""
    jobs = ("alpha", "beta", "gamma")
    first = site_zip(tmp_path / "v1.zip", dict.fromkeys(jobs, "v1"))
    without_gamma = site_zip(tmp_path / "v2.zip", {"alpha": "v1", "beta": "v1"})
    async with scm_daemon(site) as scm:
        await scm.seed(first)
        before = await running(scm, *jobs)

        outcome = await library(scm, "onedeploy", str(without_gamma), "zip", "true")
        record = assert_library_succeeded(outcome, scm, "GITHUB_ONE_DEPLOY")
        assert (record["changed_jobs"], record["removed_jobs"]) == ([], ["continuous/gamma"])
        await wait_for(lambda: not leaders(site, "gamma"), timeout=30, what="gamma stopped")
        assert not site.job_dir("continuous", "gamma").exists()
        await wait_for(scm.settled, what="discovery settled")
        status, listed = await scm.get("/api/continuouswebjobs")
        assert status == 200 and sorted(job["name"] for job in listed) == ["alpha", "beta"]
        assert await running(scm, "alpha", "beta") == {
            "alpha": before["alpha"],
            "beta": before["beta"],
        }
        assert starts(site, "alpha") == 1 and starts(site, "beta") == 1


async def test_a_deployment_refused_while_another_runs_is_retried_by_the_library(
    site: Site, tmp_path: Path
) -> None:
    """1. A site with two running jobs. 2. The site's deployment lock held as another daemon
    sharing the site holds it while it deploys (flock, exclusive, on its own open of the file).
    3. deployUsingZipDeploy with beta rebuilt: the daemon answers 409 with Kudu's text, and the
    library waits and sends the zip again (its policy for 409); the lock is let go after that
    first 409. 4. The retry deploys: beta restarts once, alpha keeps its process."""
    jobs = ("alpha", "beta")
    first = site_zip(tmp_path / "v1.zip", dict.fromkeys(jobs, "v1"))
    second = site_zip(
        tmp_path / "v2.zip", {"alpha": "v1", "beta": "v2"}, rebuilt=frozenset({"beta"})
    )
    async with scm_daemon(site) as scm:
        await scm.seed(first)
        before = await running(scm, *jobs)
        lock_path = site.root / "site" / "locks" / "deployments.lock"
        held = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(held, fcntl.LOCK_EX)
            async with scm.session() as session:
                url = f"{scm.url}/api/zipdeploy?isAsync=true"
                async with session.post(url, data=b"PK") as response:
                    assert response.status == 409
                    assert (await response.json())["message"] == IN_PROGRESS

            async def release_after_the_first_409(line: str) -> None:
                if "Encountered a retriable status code: 409" in line:
                    fcntl.flock(held, fcntl.LOCK_UN)

            outcome = await library(
                scm, "zipdeploy", str(second), on_line=release_after_the_first_409
            )
        finally:
            os.close(held)
        assert outcome.debug("Encountered a retriable status code: 409"), outcome.lines
        record = assert_library_succeeded(outcome, scm, "GITHUB_ZIP_DEPLOY")
        assert (record["changed_jobs"], record["removed_jobs"]) == (["continuous/beta"], [])
        await wait_for(lambda: starts(site, "beta") == 2, timeout=30, what="beta restarted")
        after = await running(scm, *jobs)
        await wait_for(scm.settled, what="discovery settled")
        assert after["alpha"] == before["alpha"] and after["beta"] != before["beta"]
        assert starts(site, "alpha") == 1 and starts(site, "beta") == 2


async def test_a_broken_zip_fails_in_the_library_and_the_jobs_keep_running(
    site: Site, tmp_path: Path
) -> None:
    """1. A site with two running jobs. 2. deployUsingOneDeploy of a truncated zip (the first
    half of a site zip: local headers, no central directory). 3. The library fails (exit 1)
    and prints the deployment's error from the record's log; the record says Failed. 4. The
    jobs keep their processes, never restarted, and wwwroot is as it was."""
    jobs = ("alpha", "beta")
    first = site_zip(tmp_path / "v1.zip", dict.fromkeys(jobs, "v1"))
    whole = site_zip(tmp_path / "v2.zip", dict.fromkeys(jobs, "v2"), rebuilt=frozenset(jobs))
    broken = tmp_path / "broken.zip"
    data = whole.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    async with scm_daemon(site) as scm:
        seeded = await scm.seed(first)
        before = await running(scm, *jobs)

        outcome = await library(scm, "onedeploy", str(broken), "zip")
        assert not outcome.ok and outcome.returncode == 1
        assert "Package deployment using ZIP Deploy failed" in outcome.result["error"], outcome
        polls = outcome.polls()
        assert polls and polls[-1]["body"]["status"] == 3, polls
        failed_id = polls[-1]["body"]["id"]
        # The library read the record's log and printed its entries: the error is among them.
        printed = [line for line in outcome.lines if not line.startswith("::")]
        assert NOT_A_ZIP in printed, printed

        status, record = await scm.get(f"/api/deployments/{failed_id}")
        assert status == 200 and record["status"] == 3 and record["complete"] is True
        status, latest = await scm.get("/api/deployments/latest")
        assert status == 200 and latest["id"] == failed_id
        status, listed = await scm.get("/api/deployments")
        active = [item["id"] for item in listed if item["active"]]
        assert active == [seeded["id"]], listed

        await wait_for(scm.settled, what="discovery settled")
        assert await running(scm, *jobs) == before
        assert starts(site, "alpha") == 1 and starts(site, "beta") == 1
        job_dir = site.job_dir("continuous", "alpha")
        assert (job_dir / "version.txt").read_text() == "v1"


async def test_the_actions_probes_answer(site: Site) -> None:
    """What the action asks before it deploys, through the library's client: its warm-up
    (GET /api/settings in 1.3.34, GET /api/deployments?warmup=true from 1.3.36 on) and
    GET /diagnostics/runtime, whose system.os_name tells the action it deploys to Linux."""
    async with scm_daemon(site) as scm:
        outcome = await library(scm, "probes")
    probes = outcome.result["probes"]
    assert outcome.ok, probes
    assert isinstance(probes["settings"]["value"], dict)
    assert probes["warmup"]["value"]["statusCode"] == 200
    assert probes["warmup"]["value"]["body"] == []
    assert probes["runtime"]["value"]["system"]["os_name"] == "Unix"


def test_the_placeholder_fs_package_is_an_empty_local_package() -> None:
    """The library depends on `fs@0.0.1-security`, npm's empty placeholder, which the registry
    we install from does not serve: package.json overrides it with tests/interop/empty-fs, and
    Node's own `fs` is what `require('fs')` loads either way."""
    manifest = json.loads((INTEROP / "package.json").read_text())
    assert manifest["dependencies"]["fs"] == "file:./empty-fs"
    assert manifest["overrides"] == {"fs": "$fs"}
    assert [p.name for p in (INTEROP / "empty-fs").iterdir()] == ["package.json"]
    lock = json.loads((INTEROP / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/fs"] == {"resolved": "empty-fs", "link": True}
    assert "fs-0.0.1-security.tgz" not in json.dumps(lock)
