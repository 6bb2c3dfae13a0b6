"""git push deployments with the system `git` against a real daemon on a loopback port.

1. The smart protocol: info/refs with the service header, receive-pack into the site's
   repository, upload-pack (clone, fetch with a gzip body), the 401 challenge that makes git send
   credentials, the dumb protocol refused with 501, `/{site}.git` and `/git`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.helpers import Site, running_daemon, wait_for
from tests.test_api_jobs import CREDENTIALS, basic
from webjobsd.app import Daemon
from webjobsd.deploy import git as git_module
from webjobsd.deploy.git import DEPLOYMENT_FAILED
from webjobsd.deploy.lock import IN_PROGRESS, DeploymentLock, deployment_in_progress
from webjobsd.deploy.records import DeploymentStore, DeployStatus

USER = CREDENTIALS["WEBJOBSD_USERNAME"]
PASSWORD = CREDENTIALS["WEBJOBSD_PASSWORD"]


@dataclass
class Git:
    """The system git, isolated from the user's configuration and never prompting."""

    home: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update(
            HOME=str(self.home),
            GIT_CONFIG_NOSYSTEM="1",
            GIT_TERMINAL_PROMPT="0",
            GIT_AUTHOR_NAME="Ada Author",
            GIT_AUTHOR_EMAIL="ada@example.com",
            GIT_COMMITTER_NAME="Ada Author",
            GIT_COMMITTER_EMAIL="ada@example.com",
        )
        return env

    def run(self, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["git", "-c", "credential.helper=", "-c", "init.defaultBranch=master", *args],
            cwd=cwd,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"git {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result

    async def __call__(
        self, *args: str, cwd: Path, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        # In a thread: the daemon under test answers on this very event loop.
        return await asyncio.to_thread(self.run, *args, cwd=cwd, check=check)


def write_files(root: Path, files: dict[str, str]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        if rel.endswith(".sh"):
            path.chmod(0o755)


@dataclass
class Remote:
    daemon: Daemon
    base: str  # http://127.0.0.1:PORT

    def url(self, path: str, *, credentials: bool = True) -> str:
        host = self.base.removeprefix("http://")
        user = f"{USER}:{PASSWORD}@" if credentials else ""
        return f"http://{user}{host}{path}"


@asynccontextmanager
async def serving(site: Site, **config: object) -> AsyncIterator[Remote]:
    environ = {**config.pop("environ", {}), **CREDENTIALS}  # type: ignore[dict-item]
    async with running_daemon(site, auth=True, environ=environ, **config) as daemon:
        assert daemon.http is not None
        yield Remote(daemon, f"http://127.0.0.1:{daemon.http.port}")


async def new_work_tree(git: Git, tmp_path: Path, files: dict[str, str]) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    await git("init", "--quiet", cwd=work)
    write_files(work, files)
    await git("add", "-A", cwd=work)
    await git("commit", "--quiet", "-m", "First version", cwd=work)
    return work


async def test_push_needs_credentials_then_clone_and_fetch_return_the_commits(
    site: Site, tmp_path: Path
) -> None:
    git = Git(tmp_path / "home")
    git.home.mkdir()
    work = await new_work_tree(git, tmp_path, {"index.html": "<p>one</p>\n"})
    async with serving(site) as remote:
        # Anonymous: the challenge git needs, and git fails without credentials to send.
        async with aiohttp.ClientSession() as session:
            url = f"{remote.base}/site-root.git/info/refs?service=git-receive-pack"
            async with session.get(url) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"].startswith("Basic ")
        refused = await git(
            "push", remote.url("/site-root.git", credentials=False), "master", cwd=work, check=False
        )
        assert refused.returncode != 0
        assert "terminal prompts disabled" in refused.stderr, refused.stderr
        wrong = remote.url("/site-root.git").replace(PASSWORD, "wrong")
        refused = await git("push", wrong, "master", cwd=work, check=False)
        assert refused.returncode != 0
        assert "Authentication failed" in refused.stderr, refused.stderr
        repository = site.root / "site" / "repository"
        assert not (repository / ".git" / "refs" / "heads" / "master").exists()

        pushed = await git("push", remote.url("/site-root.git"), "master", cwd=work)
        first = (await git("rev-parse", "HEAD", cwd=work)).stdout.strip()
        assert "master -> master" in pushed.stderr
        in_repository = await git("rev-parse", "refs/heads/master", cwd=repository)
        assert in_repository.stdout.strip() == first

        (work / "index.html").write_text("<p>two</p>\n")
        # Incompressible and over git's postBuffer (1 MiB): git probes with a tiny POST, then
        # sends the pack chunked; it streams through, never whole in memory.
        (work / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024))
        await git("add", "blob.bin", cwd=work)
        await git("commit", "--quiet", "-am", "Second version", cwd=work)
        await git("push", remote.url("/git"), "master", cwd=work)  # the other route
        second = (await git("rev-parse", "HEAD", cwd=work)).stdout.strip()

        clone = tmp_path / "clone"
        await git("clone", "--quiet", remote.url("/site-root.git"), str(clone), cwd=tmp_path)
        history = (await git("log", "--format=%H %s", "master", cwd=clone)).stdout.split("\n")
        assert history[:2] == [f"{second} Second version", f"{first} First version"]
        assert (clone / "index.html").read_text() == "<p>two</p>\n"
        assert (clone / "blob.bin").read_bytes() == (work / "blob.bin").read_bytes()

        # upload-pack with a gzip body (git gzips large negotiations): the pack comes back.
        request = f"0032want {second}\n".encode() + b"0000" + b"0009done\n"
        auth = basic(USER, PASSWORD)
        async with (
            aiohttp.ClientSession(headers={"Authorization": auth}) as session,
            session.post(
                f"{remote.base}/git/git-upload-pack",
                data=gzip.compress(request),
                headers={
                    "Content-Type": "application/x-git-upload-pack-request",
                    "Content-Encoding": "gzip",
                },
            ) as response,
        ):
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/x-git-upload-pack-result"
            body = await response.read()
            assert body.startswith(b"0008NAK\n")
            assert b"PACK" in body


async def test_advertisement_headers_dumb_protocol_and_unknown_names(
    site: Site, tmp_path: Path
) -> None:
    auth = basic(USER, PASSWORD)
    async with (
        serving(site, environ={"WEBSITE_SITE_NAME": "shop_staging"}) as remote,
        aiohttp.ClientSession(headers={"Authorization": auth}) as session,
    ):
        for service in ("git-upload-pack", "git-receive-pack"):
            url = f"{remote.base}/shop.git/info/refs?service={service}"
            async with session.get(url) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == f"application/x-{service}-advertisement"
                assert response.headers["Cache-Control"] == "no-cache, max-age=0, must-revalidate"
                assert response.headers["Pragma"] == "no-cache"
                body = await response.read()
                header = f"# service={service}\n".encode()
                assert body.startswith(f"{len(header) + 4:04x}".encode() + header + b"0000")
                if service == "git-receive-pack":  # git's advertisement of an empty repository
                    assert b"capabilities^{}" in body
        async with session.get(f"{remote.base}/shop.git/info/refs") as response:
            assert response.status == 501
            assert response.content_type == "text/plain"
            assert (await response.text()).strip() == "The dumb protocol is not supported."
        async with session.get(f"{remote.base}/git/info/refs") as response:
            assert response.status == 501
        url = f"{remote.base}/info/refs?service=git-upload-pack"  # the host root, as Kudu
        async with session.get(url) as response:
            assert response.status == 200
        url = f"{remote.base}/site-root.git/info/refs?service=git-upload-pack"
        async with session.get(url) as response:
            assert response.status == 404
            assert "shop.git" in await response.text()
        url = f"{remote.base}/git/info/refs?service=git-frobnicate"
        async with session.get(url) as response:
            assert response.status == 403


async def test_a_push_while_a_deployment_holds_the_lock_fails_with_kudus_text(
    site: Site, tmp_path: Path
) -> None:
    git = Git(tmp_path / "home")
    git.home.mkdir()
    work = await new_work_tree(git, tmp_path, {"index.html": "<p>one</p>\n"})
    async with serving(site) as remote:
        # Another deployment (any daemon of the site) holds the site's lock.
        layout = remote.daemon.layout
        holder = DeploymentLock(layout)
        assert await asyncio.to_thread(holder.try_acquire, {"deployer": "someone else"})
        try:
            refused = await git(
                "push", remote.url("/site-root.git"), "master", cwd=work, check=False
            )
            # Reading is not a deployment: fetches and clones go on meanwhile.
            await git("ls-remote", remote.url("/site-root.git"), cwd=work)
        finally:
            holder.release()
        assert refused.returncode != 0
        assert f"remote: {IN_PROGRESS}" in refused.stderr, refused.stderr
        assert "409" in refused.stderr
        assert not (layout.repository_dir / ".git" / "refs" / "heads" / "master").exists()
        await git("push", remote.url("/site-root.git"), "master", cwd=work)


# --- deployments ------------------------------------------------------------------------------


def job_script(starts: Path, name: str, version: str) -> str:
    """A continuous job that writes its pid to `starts/name` each time it starts."""
    return f'echo "$$" >> "{starts / name}"\n# {version}\nwhile true; do sleep 0.2; done\n'


def starts_of(starts: Path, name: str) -> list[int]:
    try:
        return [int(line) for line in (starts / name).read_text().split()]
    except (OSError, ValueError):
        return []


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def settled(remote: Remote) -> bool:
    """No deployment running and nothing the watcher still has to act on."""
    daemon = remote.daemon
    assert daemon.discovery is not None
    return (
        not deployment_in_progress(daemon.layout) and daemon.discovery.debouncer.next_due() is None
    )


async def test_a_push_deploys_its_jobs_and_a_second_push_restarts_only_the_changed_job(
    site: Site, tmp_path: Path
) -> None:
    """1. A site with two continuous jobs is pushed: both run; the record is the commit's.
    2. A push changing one job restarts that job once; the other keeps its process.
    3. The pusher saw the deployment's progress as `remote:` lines."""
    starts = tmp_path / "starts"
    starts.mkdir()
    git = Git(tmp_path / "home")
    git.home.mkdir()
    jobs = "App_Data/jobs/continuous"
    work = await new_work_tree(
        git,
        tmp_path,
        {
            "index.html": "<p>one</p>\n",
            f"{jobs}/alpha/run.sh": job_script(starts, "alpha", "v1"),
            f"{jobs}/beta/run.sh": job_script(starts, "beta", "v1"),
        },
    )
    async with serving(site) as remote:
        store = DeploymentStore(remote.daemon.layout)
        pushed = await git("push", remote.url("/site-root.git"), "master", cwd=work)
        first = (await git("rev-parse", "HEAD", cwd=work)).stdout.strip()
        assert "remote: Updating branch 'master'." in pushed.stderr, pushed.stderr
        assert "remote: Deployment successful." in pushed.stderr
        assert DEPLOYMENT_FAILED not in pushed.stderr
        await wait_for(lambda: starts_of(starts, "alpha") and starts_of(starts, "beta"), 20)
        wwwroot = remote.daemon.layout.wwwroot
        assert (wwwroot / "index.html").read_text() == "<p>one</p>\n"
        assert not (wwwroot / ".git").exists()

        record = store.get(first)
        assert record is not None
        assert record.status == DeployStatus.SUCCESS
        assert (record.deployer, record.author, record.author_email, record.message) == (
            USER,
            "Ada Author",
            "ada@example.com",
            "First version",
        )
        assert not record.is_temp
        assert store.active_id() == first
        assert [r.id for r in store.all()] == [first]

        await wait_for(lambda: settled(remote), 20, what="first deployment settled")
        beta_pid = starts_of(starts, "beta")[0]
        (work / jobs / "alpha" / "run.sh").write_text(job_script(starts, "alpha", "v2"))
        (work / "index.html").write_text("<p>two</p>\n")
        await git("commit", "--quiet", "-am", "Second version", cwd=work)
        pushed = await git("push", remote.url("/site-root.git"), "master", cwd=work)
        second = (await git("rev-parse", "HEAD", cwd=work)).stdout.strip()
        assert "remote: Updating branch 'master'." in pushed.stderr, pushed.stderr

        await wait_for(lambda: len(starts_of(starts, "alpha")) >= 2, 20, what="alpha restarted")
        await wait_for(lambda: settled(remote), 20, what="second deployment settled")
        await wait_for(lambda: site.status("alpha") == "Running", 20, what="alpha running")
        assert len(starts_of(starts, "alpha")) == 2, "the changed job restarts exactly once"
        assert starts_of(starts, "beta") == [beta_pid], "the unchanged job was restarted"
        assert pid_alive(beta_pid)
        assert (wwwroot / "index.html").read_text() == "<p>two</p>\n"
        assert [r.id for r in store.all()] == [second, first]
        assert store.active_id() == second
        # The history API shows the push as Kudu does: the sha, the pusher, the commit.
        auth = basic(USER, PASSWORD)
        async with (
            aiohttp.ClientSession(headers={"Authorization": auth}) as session,
            session.get(f"{remote.base}/api/deployments/latest") as response,
        ):
            assert response.status == 200
            latest = await response.json()
        assert (latest["id"], latest["status"], latest["deployer"], latest["message"]) == (
            second,
            4,
            USER,
            "Second version",
        )
        assert latest["active"] is True
        assert latest["site_name"] == "site-root"


async def test_the_deployment_branch_rules(site: Site, tmp_path: Path) -> None:
    """1. Only `main` pushed (no setting): `main` deploys.
    2. Another branch: nothing deployed, and the pusher is told so; no record.
    3. `deployment_branch` set (settings store) to a branch never pushed: nothing deployed.
    4. Pushing that branch deploys it."""
    git = Git(tmp_path / "home")
    git.home.mkdir()
    work = await new_work_tree(git, tmp_path, {"index.html": "<p>main</p>\n"})
    await git("branch", "-m", "master", "main", cwd=work)
    async with serving(site) as remote:
        store = DeploymentStore(remote.daemon.layout)
        url = remote.url("/site-root.git")
        pushed = await git("push", url, "main", cwd=work)
        main = (await git("rev-parse", "main", cwd=work)).stdout.strip()
        assert "remote: Updating branch 'main'." in pushed.stderr, pushed.stderr
        assert [(r.id, r.status) for r in store.all()] == [(main, DeployStatus.SUCCESS)]
        wwwroot = remote.daemon.layout.wwwroot
        assert (wwwroot / "index.html").read_text() == "<p>main</p>\n"

        await git("checkout", "--quiet", "-b", "feature", cwd=work)
        (work / "index.html").write_text("<p>feature</p>\n")
        await git("commit", "--quiet", "-am", "Feature", cwd=work)
        pushed = await git("push", url, "feature", cwd=work)
        assert (
            "remote: Pushed feature; the deployment branch is 'main' (setting "
            "deployment_branch): nothing was deployed." in pushed.stderr
        ), pushed.stderr
        assert [r.id for r in store.all()] == [main]
        assert (wwwroot / "index.html").read_text() == "<p>main</p>\n"

        auth = basic(USER, PASSWORD)
        async with (
            aiohttp.ClientSession(headers={"Authorization": auth}) as session,
            session.post(
                f"{remote.base}/api/settings", json={"deployment_branch": "release"}
            ) as response,
        ):
            assert response.status == 200
        await git("checkout", "--quiet", "main", cwd=work)
        (work / "index.html").write_text("<p>main 2</p>\n")
        await git("commit", "--quiet", "-am", "Main again", cwd=work)
        pushed = await git("push", url, "main", cwd=work)
        assert (
            "remote: The current deployment branch is 'release', but nothing has been pushed "
            "to it: nothing was deployed." in pushed.stderr
        ), pushed.stderr
        assert [r.id for r in store.all()] == [main]

        pushed = await git("push", url, "main:release", cwd=work)
        release = (await git("rev-parse", "main", cwd=work)).stdout.strip()
        assert "remote: Updating branch 'release'." in pushed.stderr, pushed.stderr
        assert [r.id for r in store.all()] == [release, main]
        assert (wwwroot / "index.html").read_text() == "<p>main 2</p>\n"


async def test_a_failed_deployment_keeps_the_push_and_says_why(site: Site, tmp_path: Path) -> None:
    """A checkout that fails (an index.lock a crashed git left behind) fails the deployment:
    the push is kept, the pusher reads Kudu's error line, the record says why; the next push
    deploys."""
    git = Git(tmp_path / "home")
    git.home.mkdir()
    work = await new_work_tree(git, tmp_path, {"index.html": "<p>one</p>\n"})
    async with serving(site) as remote:
        layout = remote.daemon.layout
        store = DeploymentStore(layout)
        url = remote.url("/site-root.git")
        async with aiohttp.ClientSession() as session:  # creates the repository
            info = f"{remote.base}/git/info/refs?service=git-receive-pack"
            async with session.get(info, headers={"Authorization": basic(USER, PASSWORD)}):
                pass
        stale_lock = layout.repository_dir / ".git" / "index.lock"
        stale_lock.write_text("")
        pushed = await git("push", url, "master", cwd=work)
        first = (await git("rev-parse", "HEAD", cwd=work)).stdout.strip()
        assert (
            "remote: Error - Changes committed to remote repository but deployment to website "
            "failed." in pushed.stderr
        ), pushed.stderr
        assert "master -> master" in pushed.stderr
        record = store.get(first)
        assert record is not None
        assert record.status == DeployStatus.FAILED
        messages = [entry.message for entry in store.log(first).entries()]
        assert any("index.lock" in message for message in messages), messages
        assert not (layout.wwwroot / "index.html").exists()

        stale_lock.unlink()
        (work / "index.html").write_text("<p>two</p>\n")
        await git("commit", "--quiet", "-am", "Second version", cwd=work)
        pushed = await git("push", url, "master", cwd=work)
        assert "remote: Deployment successful." in pushed.stderr, pushed.stderr
        assert DEPLOYMENT_FAILED not in pushed.stderr
        assert (layout.wwwroot / "index.html").read_text() == "<p>two</p>\n"


async def test_a_receive_pack_while_a_deployment_holds_the_lock_is_409(
    site: Site, tmp_path: Path
) -> None:
    """The push that lost the race between info/refs and its POST: 409, no record, git not run."""
    async with serving(site) as remote:
        layout = remote.daemon.layout
        holder = DeploymentLock(layout)
        assert await asyncio.to_thread(holder.try_acquire, {"deployer": "someone else"})
        try:
            async with (
                aiohttp.ClientSession(headers={"Authorization": basic(USER, PASSWORD)}) as s,
                s.post(f"{remote.base}/git/git-receive-pack", data=b"0000") as response,
            ):
                assert response.status == 409
                assert response.content_type == "text/plain"
                assert (await response.text()).strip() == IN_PROGRESS
        finally:
            holder.release()
        assert DeploymentStore(layout).all() == []


async def test_without_authentication_the_deployer_is_anonymous_and_app_settings_count(
    site: Site, tmp_path: Path
) -> None:
    git = Git(tmp_path / "home")
    git.home.mkdir()
    work = await new_work_tree(git, tmp_path, {"index.html": "<p>one</p>\n"})
    environ = {"APPSETTING_deployment_branch": "prod"}
    async with running_daemon(site, auth=False, environ=environ) as daemon:
        assert daemon.http is not None
        url = f"http://127.0.0.1:{daemon.http.port}/git"
        pushed = await git("push", url, "master:prod", cwd=work)
        sha = (await git("rev-parse", "HEAD", cwd=work)).stdout.strip()
        assert "remote: Updating branch 'prod'." in pushed.stderr, pushed.stderr
        record = DeploymentStore(daemon.layout).get(sha)
        assert record is not None
        assert record.deployer == "anonymous"
        assert record.status == DeployStatus.SUCCESS


async def test_a_stalled_push_gives_the_lock_back(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pusher whose body stops mid-way cannot hold the site's deployment lock for ever: after
    the idle timeout git's stdin ends, nothing is kept, the temporary record goes, and the
    daemon closes the connection (it will not wait for the rest of the body).

    The pusher is a plain socket: aiohttp's client, left with a request body still open when
    the server closes, now and then never ends the response it is reading."""
    monkeypatch.setattr(git_module, "IDLE_TIMEOUT_S", 0.5)
    command = f"{'0' * 40} {'1' * 40} refs/heads/master\0report-status side-band-64k"
    first_part = f"{len(command) + 4:04x}{command}0000".encode() + b"PACK"
    async with serving(site) as remote:
        layout = remote.daemon.layout
        host, port = remote.base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(
                b"POST /git/git-receive-pack HTTP/1.1\r\n"
                + f"Host: {host}:{port}\r\n".encode()
                + f"Authorization: {basic(USER, PASSWORD)}\r\n".encode()
                + b"Content-Type: application/x-git-receive-pack-request\r\n"
                + b"Transfer-Encoding: chunked\r\n\r\n"
                + f"{len(first_part):x}\r\n".encode()
                + first_part
                + b"\r\n"
            )
            await writer.drain()
            await wait_for(lambda: deployment_in_progress(layout), what="the push holds the lock")
            await wait_for(
                lambda: not deployment_in_progress(layout), 15, what="the lock given back"
            )
            assert DeploymentStore(layout).all() == []
            # git's answer, cut short: the daemon ends the connection.
            async with asyncio.timeout(10):
                answer = await reader.read()
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        # And the site takes the next push.
        git = Git(tmp_path / "home")
        git.home.mkdir()
        work = await new_work_tree(git, tmp_path, {"index.html": "<p>one</p>\n"})
        pushed = await git("push", remote.url("/git"), "master", cwd=work)
        assert "remote: Deployment successful." in pushed.stderr, pushed.stderr
