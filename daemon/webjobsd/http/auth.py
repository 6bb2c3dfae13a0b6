"""HTTP Basic auth for the API, the way Kudu guards its REST API with publishing credentials.

This module owns three things:

* **Password hashes.** `hash_password` / `verify_password` with a self-describing string
  `scrypt$n=16384,r=8,p=1$<salt>$<key>` (standard base64 alphabet, padding omitted, 16-byte random
  salt, 32-byte key). The parameters travel with the hash so they can be raised later without
  invalidating stored hashes. A malformed hash never raises from `verify_password`, it just fails.
  `hash_password_command` is the body of `webjobsd hash-password` (the CLI only has to call it).
* **Where the credentials come from** (`load_credentials`), first match wins:
  1. `WEBJOBSD_USERNAME` + `WEBJOBSD_PASSWORD` in the environment (containers). The password is
     plain there by nature; it is hashed in memory at load so the rest of the code only ever sees
     the `Credentials` shape.
  2. The config file: a username and an scrypt hash. A plain password in the config is refused: the
     file is often world-readable, checked into configuration repos, or pasted into tickets.
  3. A pair generated on first start in `data/webjobsd/credentials.json`, mode 0600, holding the
     username and the **plain** password. Decision: one plain file rather than "hash + separate
     plain file": the operator must be able to read the password (Kudu shows publishing
     credentials in the portal), and a hash next to a plain copy with the same owner and mode
     protects nothing more. The file is published with a hard link so that several daemons sharing
     one site root (Kudu's scale-out) that start together agree on one pair instead of the last
     writer silently invalidating the others' credentials.
* **The middleware** (`basic_auth_middleware`): 401 + `WWW-Authenticate` for a missing, malformed
  or wrong `Authorization` header, never a 500 for any client bytes. Credentials are fetched per
  request, so a SIGHUP reload swaps them without rebuilding the app; `None` means auth is off
  (only `--no-auth` does that).

Why a verification cache: scrypt costs tens of milliseconds of CPU by design, and Kudu clients poll
(history, status) with the same header every second or so. Successful verifications are remembered
in a small LRU (`cache_size` entries, `cache_ttl_s` seconds each), keyed by an HMAC of the whole
header value under a per-process random key, so the cache holds no password nor a fast unkeyed
hash of one. Failures are never cached (a wrong guess always pays the full price), and the cache is
emptied whenever the credentials object changes (reload), so an old password stops working at once.
scrypt runs in a worker thread (hashlib releases the GIL) behind a small semaphore, so a burst of
bad requests delays other logins rather than freezing the event loop or the default executor.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import getpass
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from webjobsd.http.errors import json_error
from webjobsd.records.atomic import write_bytes_atomic

log = structlog.get_logger("webjobsd.http.auth")

ENV_USERNAME = "WEBJOBSD_USERNAME"
ENV_PASSWORD = "WEBJOBSD_PASSWORD"
CREDENTIALS_FILE = "credentials.json"
GENERATED_USERNAME = "webjobsd"

SOURCE_ENVIRONMENT = "environment"
SOURCE_CONFIG = "config"
SOURCE_GENERATED = "generated"

REALM = "webjobsd"
WWW_AUTHENTICATE = f'Basic realm="{REALM}", charset="UTF-8"'

# scrypt cost for new hashes: n=2**14, r=8 is the classic interactive-login setting (16 MiB,
# ~30-50 ms). verify_password honours whatever the hash says, within the bounds below.
_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
# Bounds on parameters read from a hash: a typo in a config file must not make every request
# allocate gigabytes or spin for minutes.
_MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
_MAX_SCRYPT_P = 16
_PARAMS = re.compile(r"n=([0-9]{1,10}),r=([0-9]{1,10}),p=([0-9]{1,10})")
_GENERATED_PASSWORD_BYTES = 18  # token_urlsafe(18) is exactly 24 characters


# --- password hashes -------------------------------------------------------------------------


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    # Accept the padded form too: people paste hashes made by other tools.
    stripped = text.rstrip("=")
    return base64.b64decode(stripped + "=" * (-len(stripped) % 4), validate=True)


@dataclass(frozen=True, slots=True)
class _ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @property
    def maxmem(self) -> int:
        # OpenSSL needs 128*r*(n+2) for V plus 128*r*p for B; give it a little slack on top.
        return 128 * self.r * (self.n + 2) + 128 * self.r * self.p + 1024 * 1024


def parse_password_hash(encoded: str) -> _ScryptHash:
    """Parse and bound-check a hash string; ValueError says what is wrong (never the secret)."""
    parts = encoded.split("$")
    if len(parts) != 4 or parts[0] != "scrypt":
        raise ValueError("expected 'scrypt$n=N,r=R,p=P$<salt>$<key>'")
    match = _PARAMS.fullmatch(parts[1])
    if match is None:
        raise ValueError("parameters must read 'n=N,r=R,p=P'")
    n, r, p = (int(group) for group in match.groups())
    if n < 2 or n & (n - 1):
        raise ValueError("n must be a power of 2 greater than 1")
    if r < 1 or p < 1 or p > _MAX_SCRYPT_P:
        raise ValueError(f"r must be at least 1 and p between 1 and {_MAX_SCRYPT_P}")
    try:
        salt = _b64decode(parts[2])
        key = _b64decode(parts[3])
    except (ValueError, binascii.Error):
        raise ValueError("salt and key must be base64") from None
    if len(salt) < 8:
        raise ValueError("salt must be at least 8 bytes")
    if not 16 <= len(key) <= 64:
        raise ValueError("key must be 16 to 64 bytes")
    parsed = _ScryptHash(n=n, r=r, p=p, salt=salt, key=key)
    if parsed.maxmem > _MAX_SCRYPT_MEMORY:
        raise ValueError(f"parameters need more than {_MAX_SCRYPT_MEMORY // 2**20} MiB")
    return parsed


def hash_password(password: str) -> str:
    """A new scrypt hash of `password` with a random salt, in the self-describing format."""
    if not password:
        raise ValueError("the password must not be empty")
    salt = secrets.token_bytes(_SALT_BYTES)
    key = hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        dklen=_KEY_BYTES,
    )
    return f"scrypt$n={_SCRYPT_N},r={_SCRYPT_R},p={_SCRYPT_P}${_b64encode(salt)}${_b64encode(key)}"


def verify_password(password: str, encoded: str) -> bool:
    """True when `password` matches `encoded`; False for a wrong password or a malformed hash."""
    try:
        parsed = parse_password_hash(encoded)
        candidate = hashlib.scrypt(
            # surrogateescape: a str decoded leniently from the wire must not raise here.
            password.encode("utf-8", "surrogateescape"),
            salt=parsed.salt,
            n=parsed.n,
            r=parsed.r,
            p=parsed.p,
            maxmem=parsed.maxmem,
            dklen=len(parsed.key),
        )
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate, parsed.key)


def hash_password_command(
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    prompt: Callable[[str], str] = getpass.getpass,
) -> int:
    """Body of `webjobsd hash-password`: print a hash for the config file; return the exit code.

    On a terminal the password is asked twice without echo; otherwise one line is read from
    stdin (`printf %s "$PW" | webjobsd hash-password`), so scripts never put it in argv.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        if stdin.isatty():
            password = prompt("Password: ")
            if prompt("Repeat: ") != password:
                print("webjobsd: the passwords differ", file=stderr)
                return 1
        else:
            password = stdin.readline().rstrip("\r\n")
    except (EOFError, KeyboardInterrupt):
        print("webjobsd: no password given", file=stderr)
        return 1
    if not password:
        print("webjobsd: the password must not be empty", file=stderr)
        return 1
    print(hash_password(password), file=stdout)
    return 0


# --- credentials -----------------------------------------------------------------------------


def validate_username(username: str, origin: str) -> str:
    """RFC 7617: the user-id cannot contain ':' (it ends the user-id) nor control characters."""
    if not username:
        raise ValueError(f"{origin}: the username must not be empty")
    if ":" in username:
        raise ValueError(f"{origin}: the username must not contain ':'")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in username):
        raise ValueError(f"{origin}: the username must not contain control characters")
    return username


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password_hash: str = field(repr=False)  # kept out of reprs that may end up in a log
    source: str

    def check(self, username: str, password: str) -> bool:
        """Constant-time on both parts: the scrypt runs even for a wrong username, so response
        time does not tell an attacker which usernames exist."""
        user_ok = hmac.compare_digest(
            username.encode("utf-8", "surrogateescape"), self.username.encode("utf-8")
        )
        password_ok = verify_password(password, self.password_hash)
        return user_ok & password_ok


def load_credentials(
    *,
    config_username: str | None,
    config_password_hash: str | None,
    environ: Mapping[str, str],
    state_dir: Path,
) -> tuple[Credentials, str | None]:
    """The credentials to enforce and, when they are the generated pair, the file to log.

    Blocking (file I/O and one scrypt for environment passwords): call it at start-up or from a
    thread. ValueError carries a message fit for the operator.
    """
    env_user = environ.get(ENV_USERNAME, "")
    env_password = environ.get(ENV_PASSWORD, "")
    if env_user or env_password:
        if not (env_user and env_password):
            missing = ENV_PASSWORD if env_user else ENV_USERNAME
            raise ValueError(
                f"{ENV_USERNAME} and {ENV_PASSWORD} go together: {missing} is missing or empty"
            )
        username = validate_username(env_user, ENV_USERNAME)
        return Credentials(username, hash_password(env_password), SOURCE_ENVIRONMENT), None

    if config_username is not None or config_password_hash is not None:
        if not (config_username and config_password_hash):
            raise ValueError(
                "config: the username and the password hash go together; one of them is missing"
            )
        username = validate_username(config_username, "config username")
        if not config_password_hash.startswith("scrypt$"):
            raise ValueError(
                "config: the password must be an scrypt hash, not a plain password; "
                "make one with `webjobsd hash-password`"
            )
        try:
            parse_password_hash(config_password_hash)
        except ValueError as error:
            raise ValueError(f"config: malformed password hash: {error}") from None
        return Credentials(username, config_password_hash, SOURCE_CONFIG), None

    path = state_dir / CREDENTIALS_FILE
    username, password = _load_or_generate(path)
    return Credentials(username, hash_password(password), SOURCE_GENERATED), str(path)


def _read_generated(path: Path) -> tuple[str, str] | None:
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ValueError(f"{path}: cannot read the credentials: {error.strerror}") from None
    if stat.S_IMODE(mode) & 0o077:
        # Someone copied or restored it with loose permissions: it holds a plain password.
        try:
            os.chmod(path, 0o600)
            log.warning("credentials file was readable by others; set to 0600", path=str(path))
        except OSError as error:
            log.warning("credentials file is readable by others", path=str(path), error=str(error))
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:
        data = None
    if not (
        isinstance(data, dict)
        and isinstance(data.get("username"), str)
        and isinstance(data.get("password"), str)
        and data["password"]
    ):
        # Never regenerate silently: that would lock out every client configured with the old pair.
        raise ValueError(
            f"{path}: not a valid credentials file (a JSON object with 'username' and "
            "'password'); fix it, or delete it to generate new credentials"
        )
    return validate_username(data["username"], str(path)), data["password"]


def _load_or_generate(path: Path) -> tuple[str, str]:
    existing = _read_generated(path)
    if existing is not None:
        return existing
    pair = {"username": GENERATED_USERNAME, "password": secrets.token_urlsafe(18)}
    content = (json.dumps(pair, indent=2) + "\n").encode("utf-8")
    # Complete file under a private name first, then hard-link it into place: link() never
    # replaces an existing file, so of several daemons starting together exactly one pair wins
    # and the others read it back below.
    staging = path.with_name(f".{path.name}.{secrets.token_hex(8)}.new")
    write_bytes_atomic(staging, content, mode=0o600)
    try:
        try:
            os.link(staging, path)
        except FileExistsError:
            pass
        except OSError:
            # No hard links on this file system (some network shares): best effort instead.
            if not path.exists():
                os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    published = _read_generated(path)
    if published is None:
        raise ValueError(f"{path}: the generated credentials vanished while being written")
    return published


# --- the middleware --------------------------------------------------------------------------


def _parse_basic(values: list[str]) -> tuple[str, str] | str:
    """(username, password), or the reason the header is unusable."""
    if not values:
        return "Authentication required."
    if len(values) > 1:
        return "Malformed Authorization header: more than one."
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "basic":
        return "Malformed Authorization header: only Basic authentication is supported."
    try:
        # aiohttp decodes header bytes as UTF-8 with surrogateescape; anything non-ASCII in a
        # base64 token, or bad base64, or a payload that is not UTF-8 lands in the except.
        decoded = base64.b64decode(token.strip().encode("ascii"), validate=True).decode("utf-8")
    except (ValueError, UnicodeError):
        return "Malformed Authorization header: invalid Basic credentials."
    username, colon, password = decoded.partition(":")
    if not colon:
        return "Malformed Authorization header: invalid Basic credentials."
    return username, password


class _VerifiedCache:
    """Successful verifications: HMAC(header) → expiry, LRU-bounded, tied to one credentials
    object (see the module docstring)."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float]) -> None:
        self._size = size
        self._ttl_s = ttl_s
        self._clock = clock
        self._hmac_key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self._owner: Credentials | None = None

    def key(self, header: str) -> bytes:
        data = header.encode("utf-8", "surrogateescape")
        return hmac.new(self._hmac_key, data, hashlib.sha256).digest()

    def _bind(self, credentials: Credentials) -> None:
        if credentials is not self._owner:
            self._entries.clear()
            self._owner = credentials

    def hit(self, credentials: Credentials, key: bytes) -> bool:
        self._bind(credentials)
        expiry = self._entries.get(key)
        if expiry is None:
            return False
        if self._clock() >= expiry:
            del self._entries[key]
            return False
        self._entries.move_to_end(key)
        return True

    def add(self, credentials: Credentials, key: bytes) -> None:
        # `hit` bound the cache to these credentials before the check; if a reload swapped them
        # meanwhile, this success is about the old password and must not be remembered.
        if self._size <= 0 or self._ttl_s <= 0 or credentials is not self._owner:
            return
        self._entries[key] = self._clock() + self._ttl_s
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


# The user name a request was authenticated as (git push records it as the deployer).
AUTHENTICATED_USER = web.RequestKey("webjobsd_authenticated_user", str)


def authenticated_user(request: web.Request) -> str | None:
    """Who the request was authenticated as; None for exempt requests or with auth off."""
    return request.get(AUTHENTICATED_USER)


def unauthorized(message: str) -> web.Response:
    return json_error(401, message, {hdrs.WWW_AUTHENTICATE: WWW_AUTHENTICATE})


def basic_auth_middleware(
    get_credentials: Callable[[], Credentials | None],
    *,
    exempt: Callable[[web.Request], bool],
    cache_size: int = 128,
    cache_ttl_s: float = 60.0,
    max_concurrent_checks: int = 4,
    clock: Callable[[], float] = time.monotonic,
) -> Middleware:
    """Basic auth on every request for which `exempt(request)` is false (health checks).

    The middleware belongs to one event loop (its semaphore binds to it on first contention).
    """
    cache = _VerifiedCache(cache_size, cache_ttl_s, clock)
    checks = asyncio.Semaphore(max_concurrent_checks)

    @web.middleware
    async def basic_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        credentials = get_credentials()
        if credentials is None or exempt(request):
            return await handler(request)
        values = request.headers.getall(hdrs.AUTHORIZATION, [])
        parsed = _parse_basic(values)
        if isinstance(parsed, str):
            log.info("request refused", reason=parsed, peer=request.remote, path=request.path)
            return unauthorized(parsed)
        key = cache.key(values[0])
        if not cache.hit(credentials, key):
            async with checks:
                # Requests that queued behind an identical one find its result here.
                if not cache.hit(credentials, key):
                    ok = await asyncio.to_thread(credentials.check, *parsed)
                    if not ok:
                        log.info("wrong credentials", peer=request.remote, path=request.path)
                        return unauthorized("Invalid username or password.")
                    cache.add(credentials, key)
        request[AUTHENTICATED_USER] = parsed[0]
        return await handler(request)

    return basic_auth
