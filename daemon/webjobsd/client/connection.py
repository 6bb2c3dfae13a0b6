"""Talking to a running daemon over its HTTP API: where it is, who we are, what went wrong.

Where and who, first match wins (each piece separately):
1. flags (`--url`, `--username`, `--password`);
2. the environment: `WEBJOBSD_URL`, and the daemon's own `WEBJOBSD_USERNAME`/`WEBJOBSD_PASSWORD`;
3. the daemon's configuration file (`--config`): its `listen` address gives the URL, and the
   credentials file the daemon generated in its site (readable by the daemon's user only) gives
   the pair, so an operator on the host needs no flags at all.
The default URL is the daemon's default listen address.

A daemon configured with `tls_certificate` is reached over HTTPS, and the client trusts exactly
the certificate that file starts with (its leaf) and nothing else: the URL names a loopback
address, which no certificate has to name, so the host name is not checked; pinning the leaf is
what makes that safe (trusting the whole chain file would accept any certificate its CA signed).
Any other `https://` URL is verified the usual way (the system's CAs, `SSL_CERT_FILE`).

Decision: a synchronous client on the standard library (urllib), not aiohttp. A command does one
request at a time, a progress bar needs only a counting file object, and a command-line tool
that starts an event loop per invocation gains nothing from it.

Requests carry `User-Agent: webjobsd/VERSION`: the daemon records a run's trigger as
`External - <User-Agent>`, so the history names this client rather than Python's urllib.

Every failure becomes a `ClientError` with a message meant for a person and an exit code a script
can test (`ExitCode`), so that no traceback ever reaches the terminal for an expected failure.
"""

from __future__ import annotations

import base64
import enum
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from http.client import HTTPResponse
from pathlib import Path
from typing import IO, Any

from webjobsd import __version__

DEFAULT_URL = "http://127.0.0.1:8181"
USER_AGENT = f"webjobsd/{__version__}"
# urllib hands error statuses over as an exception that is also the response.
Response = HTTPResponse | urllib.error.HTTPError
TIMEOUT_S = 30.0


class ExitCode(enum.IntEnum):
    OK = 0
    RUN_FAILED = 1  # the command worked; the run it waited for did not succeed
    USAGE = 2
    UNREACHABLE = 3
    UNAUTHORIZED = 4
    NOT_FOUND = 5
    CONFLICT = 6
    REFUSED = 7  # any other 4xx or 5xx answer


class ClientError(Exception):
    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    username: str | None
    password: str | None
    # The daemon's own certificate (PEM), pinned when the URL came from its configuration file.
    pinned_certificate: str | None = None


def resolve_target(
    *,
    url: str | None,
    username: str | None,
    password: str | None,
    config_path: Path | None,
    environ: Mapping[str, str],
) -> Target:
    configured = _from_config(config_path)
    chosen_url = url or environ.get("WEBJOBSD_URL") or configured.url or DEFAULT_URL
    return Target(
        url=chosen_url.rstrip("/"),
        username=username or environ.get("WEBJOBSD_USERNAME") or configured.username,
        password=password or environ.get("WEBJOBSD_PASSWORD") or configured.password,
        pinned_certificate=configured.certificate if chosen_url == configured.url else None,
    )


@dataclass(frozen=True, slots=True)
class _Configured:
    url: str | None = None
    username: str | None = None
    password: str | None = None
    certificate: str | None = None


def _from_config(config_path: Path | None) -> _Configured:
    if config_path is None:
        return _Configured()
    from webjobsd.config import ConfigError, load_config, parse_listen
    from webjobsd.http.auth import CREDENTIALS_FILE

    try:
        config = load_config(config_path, {})
        host, port = parse_listen(config.listen)
    except ConfigError as error:
        raise ClientError(f"configuration error: {error}", ExitCode.USAGE) from error
    # A daemon listening on every address is reached on loopback from its own host.
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    scheme = "https" if config.tls_certificate is not None else "http"
    url = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
    certificate = None
    if config.tls_certificate is not None:
        certificate = _leaf_certificate(config.tls_certificate)
    generated = Path(config.site).absolute() / "data" / "webjobsd" / CREDENTIALS_FILE
    try:
        stored = json.loads(generated.read_text())
        return _Configured(url, str(stored["username"]), str(stored["password"]), certificate)
    except (OSError, ValueError, KeyError, TypeError):
        return _Configured(url, certificate=certificate)


_PEM_END = "-----END CERTIFICATE-----"


def _leaf_certificate(path: Path) -> str:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ClientError(f"cannot read tls_certificate {path}: {error}", ExitCode.USAGE) from None
    start = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find(_PEM_END, start)
    if start < 0 or end < 0:
        raise ClientError(f"tls_certificate {path} holds no PEM certificate", ExitCode.USAGE)
    return text[start : end + len(_PEM_END)] + "\n"


def _pinned_context(certificate: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    # The leaf alone is the trust anchor: without this flag OpenSSL wants a self-signed root.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_verify_locations(cadata=certificate)
    return context


@dataclass(slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as error:
            raise ClientError(
                "the daemon answered with something that is not JSON", ExitCode.REFUSED
            ) from error


class ApiClient:
    def __init__(self, target: Target, timeout_s: float = TIMEOUT_S) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._tls: ssl.SSLContext | None = None
        if target.pinned_certificate is not None:
            try:
                self._tls = _pinned_context(target.pinned_certificate)
            except ssl.SSLError as error:
                raise ClientError(
                    f"the configured tls_certificate does not load: {error}", ExitCode.USAGE
                ) from None
        self._auth: str | None = None
        if target.username is not None and target.password is not None:
            pair = f"{target.username}:{target.password}".encode()
            self._auth = "Basic " + base64.b64encode(pair).decode()

    def url(self, path: str) -> str:
        return self.target.url + path

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        body: bytes | IO[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> Answer:
        """One request; an answer outside `ok` becomes a ClientError with the daemon's message."""
        response = self.open(method, path_or_url, body=body, headers=headers, ok=ok)
        with response:
            return Answer(status_of(response), dict(response.headers), response.read())

    def open(
        self,
        method: str,
        path_or_url: str,
        *,
        body: bytes | IO[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> Response:
        """The response itself, for streaming reads; the caller closes it."""
        url = path_or_url if "://" in path_or_url else self.url(path_or_url)
        request = urllib.request.Request(url, data=body, method=method)
        request.add_header("User-Agent", USER_AGENT)
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        if self._auth is not None:
            request.add_header("Authorization", self._auth)
        try:
            response: Response = urllib.request.urlopen(
                request, timeout=self.timeout_s, context=self._tls
            )
        except urllib.error.HTTPError as error:
            if error.code in ok:
                return error  # an error status the caller expects (416 for a range, say)
            with error:
                raise _http_error(error.code, error.read(), url) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ClientError(
                f"cannot reach the daemon at {self.target.url}: {reason}", ExitCode.UNREACHABLE
            ) from None
        if status_of(response) not in ok:
            with response:
                raise _http_error(status_of(response), response.read(), url)
        return response


def status_of(response: Response) -> int:
    return response.code if isinstance(response, urllib.error.HTTPError) else response.status


def _http_error(status: int, body: bytes, url: str) -> ClientError:
    try:
        message = str(json.loads(body)["message"])
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace").strip()[:200] or f"HTTP {status}"
    path = urllib.parse.urlsplit(url).path
    if status == 401:
        return ClientError(
            f"the daemon refused the credentials ({message}); set WEBJOBSD_USERNAME and "
            "WEBJOBSD_PASSWORD or pass --username/--password",
            ExitCode.UNAUTHORIZED,
        )
    if status == 404:
        return ClientError(f"not found: {path} ({message})", ExitCode.NOT_FOUND)
    if status == 409:
        return ClientError(message, ExitCode.CONFLICT)
    return ClientError(f"HTTP {status}: {message}", ExitCode.REFUSED)
