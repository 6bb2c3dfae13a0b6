"""Basic auth: a real aiohttp server on a loopback port, driven by a real client.

Covers the 401 answers (missing, wrong, malformed in every way a client or an attacker can send),
the exempt health check, `--no-auth`, the verification cache, where credentials come from and the
password hash format.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import stat
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from yarl import URL

from webjobsd.http import auth
from webjobsd.http.auth import (
    CREDENTIALS_FILE,
    WWW_AUTHENTICATE,
    Credentials,
    basic_auth_middleware,
    hash_password,
    hash_password_command,
    load_credentials,
    verify_password,
)
from webjobsd.http.errors import error_middleware

USER = "deployer"
PASSWORD = "correct horse: battery staple"  # a colon in the password is legal in Basic auth

# One hash for the whole module: scrypt is deliberately slow.
PASSWORD_HASH = hash_password(PASSWORD)
CREDS = Credentials(USER, PASSWORD_HASH, "config")


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Holder:
    """What a SIGHUP reload swaps: the middleware asks it on every request."""

    def __init__(self, credentials: Credentials | None) -> None:
        self.credentials = credentials

    def __call__(self) -> Credentials | None:
        return self.credentials


@asynccontextmanager
async def serve(holder: Holder, **options: Any) -> AsyncIterator[str]:
    async def private(request: web.Request) -> web.Response:
        body = {"ok": True, "path": request.path}
        if (user := auth.authenticated_user(request)) is not None:
            body["user"] = user
        return web.json_response(body)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(
        middlewares=[
            error_middleware,
            basic_auth_middleware(
                holder, exempt=lambda request: request.path == "/healthz", **options
            ),
        ]
    )
    app.router.add_get("/private", private)
    app.router.add_get("/healthz", healthz)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield str(server.make_url(""))
    finally:
        await server.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    async with serve(Holder(CREDS)) as url:
        yield url


async def get(
    client: aiohttp.ClientSession, url: str, headers: Any = None
) -> tuple[int, dict[str, Any], CIMultiDict[str]]:
    async with client.get(url, headers=headers) as response:
        body = await response.json()
        return response.status, body, CIMultiDict(response.headers)


def assert_challenge(status: int, body: dict[str, Any], headers: CIMultiDict[str]) -> None:
    assert status == 401
    assert headers["WWW-Authenticate"] == WWW_AUTHENTICATE
    assert headers["Content-Type"].startswith("application/json")
    assert set(body) == {"message"}
    assert body["message"]


# --- the middleware over HTTP ----------------------------------------------------------------


async def test_no_header_is_401_with_challenge(
    client: aiohttp.ClientSession, base_url: str
) -> None:
    status, body, headers = await get(client, base_url + "/private")
    assert_challenge(status, body, headers)
    assert body["message"] == "Authentication required."


async def test_right_credentials_pass(client: aiohttp.ClientSession, base_url: str) -> None:
    status, body, _ = await get(
        client, base_url + "/private", {"Authorization": basic(USER, PASSWORD)}
    )
    # The handler sees who the request was authenticated as (git records it as the deployer).
    assert (status, body) == (200, {"ok": True, "path": "/private", "user": USER})
    # aiohttp's own encoder, as a third-party client would use it.
    header = aiohttp.encode_basic_auth(USER, PASSWORD)
    status, _, _ = await get(client, base_url + "/private", {"Authorization": header})
    assert status == 200
    # The scheme is case-insensitive (RFC 7235).
    lower = "basic " + basic(USER, PASSWORD).split(" ", 1)[1]
    status, _, _ = await get(client, base_url + "/private", {"Authorization": lower})
    assert status == 200


@pytest.mark.parametrize(
    ("username", "password"),
    [
        (USER, "wrong"),
        (USER, ""),
        (USER, PASSWORD + " "),
        ("someone", PASSWORD),
        ("", PASSWORD),
        (USER.upper(), PASSWORD),
    ],
    ids=["wrong-password", "empty-password", "trailing-space", "wrong-user", "empty-user", "case"],
)
async def test_wrong_credentials_are_401(
    client: aiohttp.ClientSession, base_url: str, username: str, password: str
) -> None:
    status, body, headers = await get(
        client, base_url + "/private", {"Authorization": basic(username, password)}
    )
    assert_challenge(status, body, headers)
    assert body["message"] == "Invalid username or password."


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "header",
    [
        "Basic",
        "Basic ",
        "Basic !!!",
        "Basic " + b64(USER.encode() + PASSWORD.encode()).rstrip("="),
        "Basic " + b64(b"no colon at all"),
        "Basic " + b64(b"deployer:\xff\xfe\xfd"),  # valid base64, not UTF-8
        "Basic " + b64(basic(USER, PASSWORD).encode()),  # double-encoded
        "Basic " + b64(f"{USER}:{PASSWORD}".encode())[:-2],  # truncated, bad padding
        "Basic " + b64(f"{USER}:{PASSWORD}".encode()) + " extra",
        "Basic ÿÿÿÿ",
        "Bearer x",
        "Digest username=deployer",
        basic(USER, PASSWORD).split(" ", 1)[1],  # token without a scheme
        "",
    ],
)
async def test_malformed_headers_are_401_not_500(
    client: aiohttp.ClientSession, base_url: str, header: str
) -> None:
    status, body, headers = await get(client, base_url + "/private", {"Authorization": header})
    assert_challenge(status, body, headers)


async def test_two_authorization_headers_are_401(
    client: aiohttp.ClientSession, base_url: str
) -> None:
    headers: CIMultiDict[str] = CIMultiDict()
    headers.add("Authorization", basic(USER, PASSWORD))
    headers.add("Authorization", basic(USER, PASSWORD))
    status, body, response_headers = await get(client, base_url + "/private", headers)
    assert_challenge(status, body, response_headers)


@pytest.mark.parametrize(
    "raw",
    [
        b"Basic \xff\xfe\xfd",
        b"Basic " + base64.b64encode(b"deployer:") + b"\xc3\x28",
        b"\xff\xfe " + base64.b64encode(f"{USER}:{PASSWORD}".encode()),
    ],
)
async def test_non_utf8_header_bytes_are_refused_not_500(base_url: str, raw: bytes) -> None:
    """Bytes no HTTP client library will send for us: a raw socket."""
    url = URL(base_url)
    assert url.host is not None and url.port is not None
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(
            b"GET /private HTTP/1.1\r\nHost: localhost\r\nAuthorization: "
            + raw
            + b"\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line = reply.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 401"), reply
    assert b'WWW-Authenticate: Basic realm="webjobsd", charset="UTF-8"' in reply


async def test_health_check_is_exempt(client: aiohttp.ClientSession, base_url: str) -> None:
    status, body, _ = await get(client, base_url + "/healthz")
    assert (status, body) == (200, {"status": "ok"})
    # Even with rubbish credentials: a load balancer's probe must never be refused.
    status, _, _ = await get(client, base_url + "/healthz", {"Authorization": "Basic !!!"})
    assert status == 200


async def test_unknown_route_needs_auth_first(client: aiohttp.ClientSession, base_url: str) -> None:
    """No probing for which routes exist without credentials."""
    status, body, headers = await get(client, base_url + "/nope")
    assert_challenge(status, body, headers)
    async with client.get(
        base_url + "/nope", headers={"Authorization": basic(USER, PASSWORD)}
    ) as response:
        assert response.status == 404
        await response.read()


async def test_auth_disabled_lets_everything_through(client: aiohttp.ClientSession) -> None:
    async with serve(Holder(None)) as url:
        status, body, _ = await get(client, url + "/private")
        assert status == 200
        assert "user" not in body  # nobody was authenticated
        status, _, _ = await get(client, url + "/private", {"Authorization": "Basic !!!"})
        assert status == 200


async def test_unicode_credentials(client: aiohttp.ClientSession) -> None:
    creds = Credentials("jürgen", hash_password("пароль✓"), "config")
    async with serve(Holder(creds)) as url:
        status, _, _ = await get(
            client, url + "/private", {"Authorization": basic("jürgen", "пароль✓")}
        )
        assert status == 200
        # The same characters sent as Latin-1 are not UTF-8: refused, not crashed.
        latin = "Basic " + b64("jürgen:x".encode("latin-1"))
        status, _, _ = await get(client, url + "/private", {"Authorization": latin})
        assert status == 401


# --- the verification cache ------------------------------------------------------------------


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count password verifications (the expensive part)."""
    calls: list[str] = []
    real = auth.verify_password

    def counting(password: str, encoded: str) -> bool:
        calls.append(password)
        return real(password, encoded)

    monkeypatch.setattr(auth, "verify_password", counting)
    return calls


async def test_cache_spares_scrypt_for_a_polling_client(
    client: aiohttp.ClientSession, scrypt_calls: list[str]
) -> None:
    clock = FakeClock()
    holder = Holder(CREDS)
    good = {"Authorization": basic(USER, PASSWORD)}
    async with serve(holder, cache_ttl_s=30.0, clock=clock) as url:
        for _ in range(5):
            assert (await get(client, url + "/private", good))[0] == 200
        assert len(scrypt_calls) == 1

        # Failures are never cached: every wrong guess pays the full price.
        bad = {"Authorization": basic(USER, "guess")}
        for _ in range(3):
            assert (await get(client, url + "/private", bad))[0] == 401
        assert len(scrypt_calls) == 4

        # The TTL runs out: verified again.
        clock.now += 31
        assert (await get(client, url + "/private", good))[0] == 200
        assert len(scrypt_calls) == 5

        # A reload swaps the credentials: the cached success of the old password is gone at once.
        holder.credentials = Credentials(USER, hash_password("new password"), "config")
        status, body, headers = await get(client, url + "/private", good)
        assert_challenge(status, body, headers)
        new_good = {"Authorization": basic(USER, "new password")}
        assert (await get(client, url + "/private", new_good))[0] == 200


async def test_concurrent_identical_requests_share_one_verification(
    client: aiohttp.ClientSession, scrypt_calls: list[str]
) -> None:
    good = {"Authorization": basic(USER, PASSWORD)}
    async with serve(Holder(CREDS), max_concurrent_checks=1) as url:
        results = await asyncio.gather(*(get(client, url + "/private", good) for _ in range(6)))
    assert [status for status, _, _ in results] == [200] * 6
    assert len(scrypt_calls) == 1


async def test_cache_disabled_verifies_every_time(
    client: aiohttp.ClientSession, scrypt_calls: list[str]
) -> None:
    good = {"Authorization": basic(USER, PASSWORD)}
    async with serve(Holder(CREDS), cache_size=0) as url:
        for _ in range(3):
            assert (await get(client, url + "/private", good))[0] == 200
    assert len(scrypt_calls) == 3


def test_cache_is_a_bounded_lru() -> None:
    clock = FakeClock()
    cache = auth._VerifiedCache(2, 60.0, clock)
    a, b, c = (cache.key(f"Basic {n}") for n in "abc")
    assert cache.key("Basic a") == a and a != b
    for key in (a, b):
        assert not cache.hit(CREDS, key)
        cache.add(CREDS, key)
    assert cache.hit(CREDS, a)  # a is now the most recent
    cache.add(CREDS, c)
    assert len(cache) == 2
    assert cache.hit(CREDS, a) and cache.hit(CREDS, c) and not cache.hit(CREDS, b)
    # Another credentials object, even an equal one, starts from an empty cache.
    other = Credentials(CREDS.username, CREDS.password_hash, CREDS.source)
    assert not cache.hit(other, a)
    assert len(cache) == 0
    # A success for credentials that were swapped out during the check is not remembered.
    cache.add(CREDS, a)
    assert not cache.hit(other, a)


# --- where credentials come from -------------------------------------------------------------


def load(
    state_dir: Path,
    environ: dict[str, str] | None = None,
    username: str | None = None,
    password_hash: str | None = None,
) -> tuple[Credentials, str | None]:
    return load_credentials(
        config_username=username,
        config_password_hash=password_hash,
        environ=environ or {},
        state_dir=state_dir,
    )


ENV = {"WEBJOBSD_USERNAME": "envuser", "WEBJOBSD_PASSWORD": "env secret"}


def test_environment_wins_over_config(tmp_path: Path) -> None:
    creds, path = load(tmp_path, ENV, "cfguser", PASSWORD_HASH)
    assert (creds.username, creds.source, path) == ("envuser", "environment", None)
    assert creds.check("envuser", "env secret")
    assert not creds.check("cfguser", PASSWORD)
    assert creds.password_hash.startswith("scrypt$")  # hashed in memory, never kept plain
    assert "env secret" not in repr(creds) and creds.password_hash not in repr(creds)
    assert not (tmp_path / CREDENTIALS_FILE).exists()


def test_config_wins_over_generated(tmp_path: Path) -> None:
    load(tmp_path)  # a generated file exists from an earlier start
    creds, path = load(tmp_path, {"HOME": "/root"}, "cfguser", PASSWORD_HASH)
    assert (creds.username, creds.password_hash, creds.source, path) == (
        "cfguser",
        PASSWORD_HASH,
        "config",
        None,
    )
    assert creds.check("cfguser", PASSWORD)


def test_generated_on_first_start_then_stable(tmp_path: Path) -> None:
    state_dir = tmp_path / "data" / "webjobsd"
    first, path = load(state_dir)
    file = state_dir / CREDENTIALS_FILE
    assert path == str(file)
    assert first.source == "generated"
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    stored = json.loads(file.read_text())
    assert stored["username"] == "webjobsd" == first.username
    assert len(stored["password"]) == 24
    assert set(stored["password"]) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    assert first.check("webjobsd", stored["password"])

    second, second_path = load(state_dir)
    assert second_path == str(file)
    assert second.check("webjobsd", stored["password"])
    assert json.loads(file.read_text()) == stored
    assert [p.name for p in state_dir.iterdir()] == [CREDENTIALS_FILE]  # no staging leftovers


def test_daemons_starting_together_agree_on_one_pair(tmp_path: Path) -> None:
    """Several daemons may share one site root: the first to publish wins, the rest read it."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: load(tmp_path), range(8)))
    stored = json.loads((tmp_path / CREDENTIALS_FILE).read_text())
    assert all(creds.check("webjobsd", stored["password"]) for creds, _ in results)
    assert [p.name for p in tmp_path.iterdir()] == [CREDENTIALS_FILE]


def test_loose_generated_file_is_tightened(tmp_path: Path) -> None:
    load(tmp_path)
    file = tmp_path / CREDENTIALS_FILE
    os.chmod(file, 0o644)
    load(tmp_path)
    assert stat.S_IMODE(file.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b"[]", b'{"username": "webjobsd"}', b'{"username": "a:b", "password": "x"}'],
)
def test_corrupt_generated_file_is_refused_not_replaced(tmp_path: Path, content: bytes) -> None:
    file = tmp_path / CREDENTIALS_FILE
    file.write_bytes(content)
    with pytest.raises(ValueError, match=CREDENTIALS_FILE):
        load(tmp_path)
    assert file.read_bytes() == content


@pytest.mark.parametrize(
    "password_hash",
    ["hunter2", "correct horse battery staple", "$2b$12$abcdefghijklmnopqrstuv"],
)
def test_plain_password_in_config_is_refused(tmp_path: Path, password_hash: str) -> None:
    with pytest.raises(ValueError, match=r"not a plain password.*webjobsd hash-password"):
        load(tmp_path, username="cfguser", password_hash=password_hash)


def test_malformed_hash_in_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="malformed password hash"):
        load(tmp_path, username="cfguser", password_hash="scrypt$n=3,r=8,p=1$AAAA$BBBB")


@pytest.mark.parametrize(
    ("environ", "username", "password_hash", "message"),
    [
        ({"WEBJOBSD_USERNAME": "u"}, None, None, "WEBJOBSD_PASSWORD is missing"),
        ({"WEBJOBSD_PASSWORD": "p"}, None, None, "WEBJOBSD_USERNAME is missing"),
        (
            {"WEBJOBSD_USERNAME": "a:b", "WEBJOBSD_PASSWORD": "p"},
            None,
            None,
            "must not contain ':'",
        ),
        ({}, "cfguser", None, "go together"),
        ({}, None, PASSWORD_HASH, "go together"),
        ({}, "", PASSWORD_HASH, "go together"),
        ({}, "a:b", PASSWORD_HASH, "must not contain ':'"),
        ({}, "tab\there", PASSWORD_HASH, "control characters"),
    ],
    # The hash has a random salt: named, so that a test's id is the same in every run.
    ids=lambda value: "password_hash" if value == PASSWORD_HASH else None,
)
def test_bad_usernames_and_half_configurations_are_refused(
    tmp_path: Path,
    environ: dict[str, str],
    username: str | None,
    password_hash: str | None,
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        load(tmp_path, environ, username, password_hash)
    assert not (tmp_path / CREDENTIALS_FILE).exists()


def test_empty_environment_values_fall_through(tmp_path: Path) -> None:
    creds, _ = load(
        tmp_path, {"WEBJOBSD_USERNAME": "", "WEBJOBSD_PASSWORD": ""}, "u", PASSWORD_HASH
    )
    assert creds.source == "config"


def test_validate_username_directly() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        auth.validate_username("", "test")
    assert auth.validate_username("ok-user", "test") == "ok-user"


# --- password hashes -------------------------------------------------------------------------


def test_hash_format_round_trip() -> None:
    encoded = hash_password("s3cret")
    scheme, params, salt, key = encoded.split("$")
    assert (scheme, params) == ("scrypt", "n=16384,r=8,p=1")
    assert len(base64.b64decode(salt + "==")) == 16
    assert len(base64.b64decode(key + "=")) == 32
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret ", encoded)
    assert not verify_password("", encoded)
    assert hash_password("s3cret") != encoded  # fresh salt every time
    # A padded variant (from another tool) is accepted too.
    assert verify_password("s3cret", f"scrypt${params}${salt}==${key}=")
    with pytest.raises(ValueError):
        hash_password("")


def test_other_parameters_are_honoured() -> None:
    import hashlib

    salt = b"0123456789abcdef"
    key = hashlib.scrypt(b"pw", salt=salt, n=1024, r=4, p=2, dklen=24)
    encoded = f"scrypt$n=1024,r=4,p=2${b64(salt)}${b64(key)}"
    assert verify_password("pw", encoded)
    assert not verify_password("pw2", encoded)


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "scrypt",
        "scrypt$",
        "hunter2",
        "bcrypt$n=16384,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
        "scrypt$n=16384,r=8$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
        "scrypt$n=16384,r=8,p=1,x=2$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
        "scrypt$n=16383,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,  # not a power of 2
        "scrypt$n=1,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
        "scrypt$n=16384,r=0,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
        "scrypt$n=16384,r=8,p=0$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
        "scrypt$n=16384,r=8,p=99$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
        "scrypt$n=1073741824,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,  # 1 TiB of memory
        "scrypt$n=16384,r=99999,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
        "scrypt$n=-16384,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
        "scrypt$n=١٦٣٨٤,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,  # non-ASCII digits
        "scrypt$n=16384,r=8,p=1$!!!!$" + "A" * 43,
        "scrypt$n=16384,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$not base64!",
        "scrypt$n=16384,r=8,p=1$AAAA$" + "A" * 43,  # salt too short
        "scrypt$n=16384,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAA",  # key too short
        "scrypt$n=16384,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43 + "$extra",
        "scrypt$n=16384,r=8,p=1$ÄÄÄÄÄÄÄÄ$" + "A" * 43,
    ],
)
def test_verify_with_malformed_hash_is_false(encoded: str) -> None:
    assert verify_password("anything", encoded) is False
    assert Credentials("u", encoded, "config").check("u", "anything") is False


def test_check_runs_scrypt_even_for_an_unknown_user(scrypt_calls: list[str]) -> None:
    assert not CREDS.check("nobody", PASSWORD)
    assert not CREDS.check(USER, "wrong")
    assert CREDS.check(USER, PASSWORD)
    assert len(scrypt_calls) == 3


# --- webjobsd hash-password ------------------------------------------------------------------


class TtyInput(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_command(
    stdin: io.StringIO, prompt: Callable[[str], str] | None = None
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    kwargs: dict[str, Any] = {"stdin": stdin, "stdout": out, "stderr": err}
    if prompt is not None:
        kwargs["prompt"] = prompt
    code = hash_password_command(**kwargs)
    return code, out.getvalue(), err.getvalue()


def test_hash_password_command_from_a_pipe() -> None:
    code, out, err = run_command(io.StringIO("piped secret\n"))
    assert (code, err) == (0, "")
    assert out.endswith("\n") and out.count("\n") == 1
    assert verify_password("piped secret", out.strip())


def test_hash_password_command_on_a_terminal() -> None:
    answers = iter(["typed", "typed"])
    code, out, _ = run_command(TtyInput(), lambda prompt: next(answers))
    assert code == 0 and verify_password("typed", out.strip())

    answers = iter(["typed", "typo"])
    code, out, err = run_command(TtyInput(), lambda prompt: next(answers))
    assert (code, out) == (1, "") and "differ" in err


def test_hash_password_command_refuses_empty() -> None:
    code, out, err = run_command(io.StringIO("\n"))
    assert (code, out) == (1, "") and "empty" in err
