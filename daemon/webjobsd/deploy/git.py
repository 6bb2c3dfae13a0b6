"""git push deployments: the site's repository, git's smart protocol, and what a push deploys
(KUDU-DEPLOY.md Part A #10, KUDU-DEPLOY-SPEC.md §5).

This module owns:

* **The repository** (`Repository`): non-bare, at `SiteLayout.repository_dir`, created on first
  use as Kudu does (`receive.denyCurrentBranch ignore`, `core.autocrlf false`, a credential helper
  that always fails). It is built complete in a private folder and renamed into place, so a second
  request or a second daemon on the site never sees it half configured (a push into a repository
  without `denyCurrentBranch ignore` would be refused).
* **The protocol**, done by the system `git` and never reimplemented here: `git upload-pack` and
  `git receive-pack` with `--stateless-rpc`, the request body streamed to their stdin and their
  stdout streamed to the client in chunks (a pack is never held in memory). We add only what the
  HTTP transport needs: the `# service=...` pkt-line header of the advertisement, and side-band
  packets of our own after receive-pack's report.
* **The deployment after a push** (`receive_and_deploy`): which branch deploys
  (`deployment_branch`), the checkout, the record (id = the commit sha, author and message from
  the commit, deployer = the pusher), and the pipeline's sync into wwwroot (`deploy.pipeline`,
  whose sync never copies `.git`).

Design choices (keep them):

* **The deployment runs in the daemon, not in a post-receive hook.** A hook would be a separate
  process that has to find the daemon again (its settings, its lock, its record store) and would
  run while receive-pack still holds the request; the daemon already holds the deployment lock
  taken when receive-pack started (409 for a concurrent push, as Kudu), so it simply carries on
  when receive-pack exits. Its progress reaches the pusher as `remote:` lines because the client
  asked for `side-band-64k` (or `side-band`): receive-pack's final flush-pkt is held back, every
  deployment log line is sent as a band-2 packet as it is written, then the flush ends the
  response. git's client reads band 2 until that flush, so the lines arrive live. A client that
  asked for no side band gets receive-pack's answer unchanged, and the deployment still runs.
  The `quiet` capability is not honoured for these lines: git sends it whenever its stderr is
  not a terminal (CI logs), exactly where the outcome matters most; Kudu's hook shows them too.
* **Refs are compared before and after** receive-pack rather than parsing its report: a push that
  updated nothing (rejected, up to date, failed) deploys nothing, whatever git printed.
* **Only a push that moved the deployment branch deploys.** Kudu redeploys the deployment branch
  on every push, even of another branch; we say in a `remote:` line that nothing was deployed.
  When `deployment_branch` is not set and `master` was never pushed but `main` was, `main`
  deploys (Kudu fails there; GitHub and many git setups name the first branch `main` today).
* **The temporary record** ("Receiving changes.", taken with the lock before receive-pack runs)
  becomes the commit's record (`adopt_id`), or is discarded when nothing deploys, as Kudu's
  temporary deployment always is.
* **The deployment is a task of `Deployments`** (`run`): a pusher that goes away, or a request
  cancelled at shutdown, never leaves a sync half done; the `remote:` lines are then dropped. A
  request body that stalls for `IDLE_TIMEOUT_S` ends the push, so a stuck client cannot hold the
  site's deployment lock for ever.
* **The push succeeds even when the deployment fails** (as Kudu): receive-pack's report already
  went out; the record says why and the pusher reads "Error - Changes committed to remote
  repository but deployment to website failed."
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from webjobsd.deploy.pipeline import Deployment, DeploymentFailed, Deployments
from webjobsd.deploy.records import DeploymentRecord, DeployStatus, LogType
from webjobsd.refusal import Refusal
from webjobsd.site import SiteLayout

log = structlog.get_logger("webjobsd.deploy.git")

UPLOAD_PACK = "git-upload-pack"
RECEIVE_PACK = "git-receive-pack"
SERVICES = (UPLOAD_PACK, RECEIVE_PACK)

DUMB_PROTOCOL = "The dumb protocol is not supported."
BRANCH_SETTING = "deployment_branch"
DEFAULT_BRANCH = "master"
FALLBACK_BRANCH = "main"
DEPLOYMENT_FAILED = (
    "Error - Changes committed to remote repository but deployment to website failed."
)

FLUSH_PKT = b"0000"
# pkt-line payload bounds: side-band-64k packets hold 65520 bytes in all, side-band 1000.
_PKT_MAX = 65520
_SIDE_BAND_MAX = 1000
_CHUNK = 64 * 1024
# A stalled client must not hold the deployment lock for ever.
IDLE_TIMEOUT_S = 300.0
_STDERR_KEPT = 16 * 1024


def server_root_name(site_name: str | None, layout: SiteLayout) -> str:
    """Kudu's GitServerRoot without `.git`: WEBSITE_SITE_NAME up to the first `_` (slots),
    else the site folder's name."""
    if site_name:
        return site_name.split("_", 1)[0]
    return layout.site_root.name


# --- pkt-lines -------------------------------------------------------------------------------


def pkt_line(payload: bytes) -> bytes:
    if len(payload) + 4 > _PKT_MAX:
        raise ValueError("pkt-line payload too long")
    return f"{len(payload) + 4:04x}".encode("ascii") + payload


def advertisement_header(service: str) -> bytes:
    return pkt_line(f"# service={service}\n".encode("ascii")) + FLUSH_PKT


def progress_packets(text: str, side_band_max: int) -> bytes:
    """`text` as band-2 packets (git prints each line as `remote: ...`), split to fit."""
    packets = []
    room = side_band_max - 5  # length (4) and band (1)
    for line in text.splitlines() or [""]:
        data = (line + "\n").encode("utf-8", "replace")
        for start in range(0, len(data), room):
            packets.append(pkt_line(b"\x02" + data[start : start + room]))
    return b"".join(packets)


@dataclass(frozen=True, slots=True)
class PushCommands:
    """What the first pkt-line of a receive-pack request says about the client."""

    capabilities: frozenset[str]

    @property
    def side_band_max(self) -> int:
        """Largest packet the client reads on its side band; 0 when it asked for none."""
        if "side-band-64k" in self.capabilities:
            return _PKT_MAX
        if "side-band" in self.capabilities:
            return _SIDE_BAND_MAX
        return 0


def parse_first_command(head: bytes) -> PushCommands | None:
    """The capabilities after NUL in the first command; None until `head` holds a whole packet."""
    if len(head) < 4:
        return None
    try:
        length = int(head[:4], 16)
    except ValueError:
        return PushCommands(frozenset())
    if length < 4:  # a flush: no commands, no capabilities
        return PushCommands(frozenset())
    if len(head) < length:
        return None
    payload = head[4:length]
    _, _, caps = payload.partition(b"\0")
    return PushCommands(frozenset(caps.decode("ascii", "replace").split()))


# --- the repository --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Commit:
    sha: str
    author: str
    author_email: str
    message: str


class GitFailed(Exception):
    pass


def git_environment() -> dict[str, str]:
    """The daemon's environment without variables that would point git somewhere else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env


class Repository:
    """The site's non-bare repository. Blocking methods: call them in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of(cls, layout: SiteLayout) -> Repository:
        return cls(layout.repository_dir)

    @property
    def exists(self) -> bool:
        return (self.path / ".git" / "HEAD").is_file()

    def _git(self, *args: str, cwd: Path | None = None) -> str:
        result = subprocess.run(
            ["git", *args],
            cwd=cwd or self.path,
            env=git_environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            detail = result.stderr.decode("utf-8", "replace").strip()
            raise GitFailed(f"git {args[0]} failed: {detail or f'exit {result.returncode}'}")
        return result.stdout.decode("utf-8", "replace")

    def ensure(self) -> None:
        """Create the repository if missing: built complete beside it, then renamed in."""
        if self.exists:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        building = self.path.parent / f".repository-{secrets.token_hex(6)}"
        building.mkdir()
        try:
            self._git("init", "--quiet", str(building), cwd=self.path.parent)
            for key, value in (
                ("core.autocrlf", "false"),
                ("receive.denyCurrentBranch", "ignore"),
                # Never ask for credentials (a submodule fetch on a daemon has nobody to ask).
                ("credential.helper", "!false"),
                # receive-pack's `gc --auto` stays inside the request instead of leaving a
                # detached process behind the daemon's back.
                ("gc.autoDetach", "false"),
            ):
                self._git("config", key, value, cwd=building)
            if self.path.exists():
                # A folder someone made (or an old checkout) without .git: git's data moves in,
                # the files stay and are overwritten by the first checkout.
                os.rename(building / ".git", self.path / ".git")
            else:
                os.rename(building, self.path)
        except OSError:
            # Another request or daemon won the race: theirs is complete, ours is dropped.
            if not self.exists:
                raise
        finally:
            shutil.rmtree(building, ignore_errors=True)
        log.info("repository created", path=str(self.path))

    def refs(self) -> dict[str, str]:
        """Every ref (branches, tags) and the object it names."""
        if not self.exists:
            return {}
        out = self._git("for-each-ref", "--format=%(objectname) %(refname)")
        refs = {}
        for line in out.splitlines():
            sha, _, name = line.partition(" ")
            refs[name] = sha
        return refs

    def commit(self, sha: str) -> Commit:
        out = self._git("log", "-n", "1", "--format=%H%x00%an%x00%ae%x00%B", sha)
        full, author, email, message = ([*out.split("\x00", 3), "", "", ""])[:4]
        return Commit(
            sha=full.strip(),
            author=author or "N/A",
            author_email=email or "N/A",
            message=message.strip(),
        )

    def checkout(self, branch: str) -> None:
        """The working tree (and HEAD) at `branch`, local changes discarded, as Kudu's Update."""
        self._git("checkout", "--force", "--quiet", branch)


def deployment_branch(setting: str | None, refs: Mapping[str, str]) -> str:
    """The branch a push deploys: the setting, else `master`, else `main` when only it exists."""
    if setting and setting.strip():
        return setting.strip()
    if f"refs/heads/{DEFAULT_BRANCH}" not in refs and f"refs/heads/{FALLBACK_BRANCH}" in refs:
        return FALLBACK_BRANCH
    return DEFAULT_BRANCH


# --- running git's services ------------------------------------------------------------------

Write = Callable[[bytes], Awaitable[None]]


async def advertise(repository: Repository, service: str) -> bytes:
    """The service header and git's ref advertisement (small: one line per ref)."""
    if service not in SERVICES:
        raise Refusal(403, f"Unsupported service {service!r}.")
    await asyncio.to_thread(repository.ensure)
    process = await asyncio.create_subprocess_exec(
        "git",
        service.removeprefix("git-"),
        "--stateless-rpc",
        "--advertise-refs",
        str(repository.path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=git_environment(),
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        log.error(
            "git advertisement failed",
            service=service,
            code=process.returncode,
            stderr=err.decode("utf-8", "replace")[-2000:],
        )
        raise Refusal(500, f"{service} failed; see the daemon log.")
    return advertisement_header(service) + out


async def _with_idle_timeout(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    iterator = chunks.__aiter__()
    while True:
        try:
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return
        yield chunk


class _ClientWriter:
    """Writes to the client until it goes away; after that, output is dropped (git and the
    deployment must still finish)."""

    def __init__(self, write: Write) -> None:
        self._write = write
        self.gone = False

    async def __call__(self, data: bytes) -> None:
        if self.gone or not data:
            return
        try:
            await self._write(data)
        except (ConnectionError, RuntimeError) as error:
            log.info("git client went away", error=str(error))
            self.gone = True


@dataclass(slots=True)
class ServiceResult:
    exit_code: int
    # receive-pack's final flush-pkt, held back when the client reads a side band.
    held_flush: bool
    commands: PushCommands | None


async def run_service(
    repository: Repository,
    service: str,
    body: AsyncIterator[bytes],
    write: Write,
    *,
    hold_final_flush: bool = False,
) -> ServiceResult:
    """`git <service> --stateless-rpc` with `body` as stdin and stdout streamed to `write`.

    With `hold_final_flush`, when the client asked for a side band and git's answer ends with a
    flush-pkt, that flush is not written: the caller adds band-2 packets and then the flush.
    """
    process = await asyncio.create_subprocess_exec(
        "git",
        service.removeprefix("git-"),
        "--stateless-rpc",
        str(repository.path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=git_environment(),
    )
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None
    client = _ClientWriter(write)
    head = bytearray()
    commands: PushCommands | None = None
    stderr = bytearray()

    async def feed() -> None:
        nonlocal commands
        assert process.stdin is not None
        try:
            async for chunk in _with_idle_timeout(body):
                if commands is None:
                    head.extend(chunk[: _PKT_MAX - len(head)])
                    commands = parse_first_command(bytes(head))
                process.stdin.write(chunk)
                await process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # git stopped reading: it says why on stdout/stderr
        finally:
            process.stdin.close()

    async def keep_stderr() -> None:
        assert process.stderr is not None
        while chunk := await process.stderr.read(_CHUNK):
            stderr.extend(chunk)
            del stderr[:-_STDERR_KEPT]

    feeding = asyncio.create_task(feed(), name=f"{service}-stdin")
    errors = asyncio.create_task(keep_stderr(), name=f"{service}-stderr")
    tail = b""
    try:
        while chunk := await process.stdout.read(_CHUNK):
            data = tail + chunk
            # Keep the last 4 bytes back until the end: they may be the final flush.
            tail = data[-4:] if hold_final_flush else b""
            await client(data[: len(data) - len(tail)])
        await feeding
        await errors
        code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for task in (feeding, errors):
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    side_band = commands is not None and commands.side_band_max > 0
    held = hold_final_flush and side_band and tail == FLUSH_PKT
    if not held:
        await client(tail)
    if code != 0 or stderr:
        log.info(
            "git service ended",
            service=service,
            code=code,
            stderr=stderr.decode("utf-8", "replace")[-2000:],
        )
    return ServiceResult(exit_code=code, held_flush=held, commands=commands)


# --- the deployment after a push ---------------------------------------------------------------


class RemoteLines:
    """`remote:` lines for the pusher: band-2 packets, when the client reads a side band."""

    def __init__(self, write: Write, side_band_max: int) -> None:
        self._client = _ClientWriter(write)
        self.side_band_max = side_band_max

    async def __call__(self, text: str) -> None:
        if self.side_band_max:
            await self._client(progress_packets(text, self.side_band_max))

    async def end(self) -> None:
        """The flush-pkt held back from receive-pack's answer."""
        if self.side_band_max:
            await self._client(FLUSH_PKT)


def _moved(before: Mapping[str, str], after: Mapping[str, str]) -> set[str]:
    return {ref for ref in before.keys() | after.keys() if before.get(ref) != after.get(ref)}


def _short(ref: str) -> str:
    return ref.removeprefix("refs/heads/").removeprefix("refs/tags/")


async def receive_and_deploy(
    repository: Repository,
    deployments: Deployments,
    deployment: Deployment,
    body: AsyncIterator[bytes],
    write: Write,
    *,
    branch_setting: str | None,
) -> DeploymentRecord | None:
    """receive-pack, then the deployment of the deployment branch if the push moved it.

    `deployment` (begun with a temp record before receive-pack ran) holds the site's lock; it
    is finished (a record) or discarded (nothing to deploy) before this returns, whatever
    happens. The deployment itself runs as a task of `deployments`, so that a client that goes
    away, or a handler cancelled at shutdown, never leaves a sync half done. Returns the
    finished record, if any.
    """
    try:
        before = await asyncio.to_thread(repository.refs)
        received = await run_service(repository, RECEIVE_PACK, body, write, hold_final_flush=True)
        after = await asyncio.to_thread(repository.refs)
    except BaseException:
        await asyncio.shield(deployment.discard())
        raise
    side_band = received.commands.side_band_max if received.commands and received.held_flush else 0
    remote = RemoteLines(write, side_band)
    moved = _moved(before, after)
    branch = deployment_branch(branch_setting, after)
    ref = f"refs/heads/{branch}"
    try:
        if not moved or ref not in after or ref not in moved:
            await asyncio.shield(deployment.discard())
            if not moved:
                return None
            if ref not in after:
                await remote(
                    f"The current deployment branch is '{branch}', but nothing has been pushed "
                    "to it: nothing was deployed."
                )
            else:
                pushed = ", ".join(sorted(_short(name) for name in moved))
                await remote(
                    f"Pushed {pushed}; the deployment branch is '{branch}' (setting "
                    f"{BRANCH_SETTING}): nothing was deployed."
                )
            return None
        return await _deploy(repository, deployments, deployment, branch, after[ref], remote)
    finally:
        await remote.end()


async def _deploy(
    repository: Repository,
    deployments: Deployments,
    deployment: Deployment,
    branch: str,
    sha: str,
    remote: RemoteLines,
) -> DeploymentRecord | None:
    """Check out `branch` and sync it into wwwroot as deployment `sha`, with the log streamed
    to the pusher as it is written."""

    async def work() -> None:
        commit = await asyncio.to_thread(repository.commit, sha)
        await deployment.adopt_id(
            sha, author=commit.author, author_email=commit.author_email, message=commit.message
        )
        await asyncio.to_thread(deployment.log, f"Updating branch '{branch}'.")
        try:
            await asyncio.to_thread(repository.checkout, branch)
        except (GitFailed, OSError) as error:
            message = f"Updating branch '{branch}' failed: {error}"
            await asyncio.to_thread(deployment.log, message, LogType.ERROR)
            raise DeploymentFailed(message) from error
        await asyncio.to_thread(deployment.log, f"Preparing deployment for commit id '{sha[:10]}'.")
        await deployment.deploy_folder(repository.path)

    async def forward() -> None:
        # Replays from the first line and ends when the deployment finishes.
        async for line in deployment.subscribe():
            await remote(line)

    forwarding = asyncio.create_task(forward(), name=f"git-push-log-{sha[:8]}")
    try:
        record = await asyncio.shield(deployments.run(deployment, work))
    finally:
        try:
            async with asyncio.timeout(10):  # a client that stops reading: lines are dropped
                await asyncio.shield(forwarding)
        except TimeoutError:
            forwarding.cancel()
            await asyncio.gather(forwarding, return_exceptions=True)
    if record is None or record.status != DeployStatus.SUCCESS:
        await remote(DEPLOYMENT_FAILED)
    return record
