"""Native TLS against a real daemon process: certificates made here with `cryptography`, real
HTTPS clients (aiohttp and curl), a plain-HTTP client refused, and SIGHUP swapping the
certificate for new connections while jobs run on, or keeping it when the new one is broken."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers import DaemonProcess, Site, leaders, wait_for_sync
from webjobsd.cli import main

LOOP = {"run.sh": "echo up\nwhile true; do sleep 0.2; done\n"}


@dataclass(frozen=True)
class Certificate:
    pem: bytes
    key_pem: bytes
    fingerprint: str  # SHA-256 of the DER form, hex


def make_certificate(serial: int) -> Certificate:
    """A self-signed certificate for 127.0.0.1 and localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"webjobsd test {serial}")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    return Certificate(
        pem=certificate.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        fingerprint=hashlib.sha256(der).hexdigest(),
    )


def install(certificate: Certificate, cert_path: Path, key_path: Path) -> None:
    cert_path.write_bytes(certificate.pem)
    key_path.write_bytes(certificate.key_pem)


def client_context(*trusted: Certificate) -> ssl.SSLContext:
    return ssl.create_default_context(cadata="".join(c.pem.decode() for c in trusted))


def served_fingerprint(port: int, context: ssl.SSLContext) -> str:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


@pytest.fixture
def tls_daemon(site: Site) -> tuple[DaemonProcess, int, Certificate, Path, Path]:
    from webjobsd.runtime.jobprocess import free_loopback_port

    cert_path, key_path = site.root.parent / "server.crt", site.root.parent / "server.key"
    first = make_certificate(1001)
    install(first, cert_path, key_path)
    port = free_loopback_port()
    site.write_job("continuous", "steady", LOOP)
    daemon = DaemonProcess(
        site,
        listen=f"127.0.0.1:{port}",
        log_level="info",
        tls_certificate=str(cert_path),
        tls_key=str(key_path),
        header_timeout_s=1.0,
    )
    return daemon, port, first, cert_path, key_path


def test_https_serves_the_api_and_plain_http_is_refused(
    tls_daemon: tuple[DaemonProcess, int, Certificate, Path, Path],
) -> None:
    """1. A daemon with a certificate. 2. aiohttp (trusting it) lists the jobs over HTTPS; the
    URLs the daemon writes are https. 3. curl --cacert gets the list too. 4. Plain HTTP to the
    port gets no HTTP answer. 5. A connection that never starts its handshake is closed."""
    daemon, port, first, cert_path, _key = tls_daemon
    daemon.start()
    try:
        context = client_context(first)
        base = f"https://127.0.0.1:{port}"
        wait_for_sync(lambda: jobs_over_https(base, context), what="the job list over HTTPS")
        jobs = jobs_over_https(base, context)
        assert [job["name"] for job in jobs] == ["steady"]
        assert jobs[0]["url"].startswith(f"{base}/api/continuouswebjobs/steady")
        curl = subprocess.run(
            ["curl", "-sS", "--fail", "--cacert", str(cert_path), f"{base}/api/webjobs"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert curl.returncode == 0, curl.stderr
        assert [job["name"] for job in json.loads(curl.stdout)] == ["steady"]
        assert plain_http_answer(port) == b""
        assert served_fingerprint(port, context) == first.fingerprint
        # A client that never starts its handshake is cut at the header timeout.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
            started = time.monotonic()
            assert silent.recv(1) == b""
            assert time.monotonic() - started < 8
    finally:
        assert daemon.stop() == 0


def test_sighup_serves_a_new_certificate_and_keeps_it_when_the_next_is_broken(
    tls_daemon: tuple[DaemonProcess, int, Certificate, Path, Path],
) -> None:
    """1. A daemon serving certificate 1 and running a job. 2. The files are replaced by
    certificate 2 and SIGHUP: new connections get certificate 2, the job is the same process.
    3. The certificate file is replaced by junk and SIGHUP: an error names the file, and
    certificate 2 is still served."""
    daemon, port, first, cert_path, key_path = tls_daemon
    daemon.start()
    try:
        both = client_context(first, second := make_certificate(1002))
        wait_for_sync(lambda: fingerprint_or_none(port, both) == first.fingerprint, what="cert 1")
        pid = wait_for_sync(lambda: leaders(daemon.site, "steady"), what="job running")[0]

        install(second, cert_path, key_path)
        daemon.signal(signal.SIGHUP)
        wait_for_sync(lambda: fingerprint_or_none(port, both) == second.fingerprint, what="cert 2")
        assert leaders(daemon.site, "steady") == [pid]

        cert_path.write_text("not a certificate\n")
        daemon.signal(signal.SIGHUP)
        wait_for_sync(
            lambda: "TLS certificate not reloaded" in daemon.log(), what="the reload error"
        )
        error = next(
            json.loads(line)
            for line in daemon.log().splitlines()
            if "TLS certificate not reloaded" in line
        )
        assert str(cert_path) in error["error"]
        assert fingerprint_or_none(port, both) == second.fingerprint
        assert leaders(daemon.site, "steady") == [pid]
    finally:
        assert daemon.stop() == 0


def test_check_config_validates_the_certificate_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config accepts a matching pair, and names the file of a key that does not match."""
    cert_path, key_path = tmp_path / "a.crt", tmp_path / "a.key"
    install(make_certificate(7), cert_path, key_path)
    config = tmp_path / "webjobsd.yaml"
    config.write_text(f"tls_certificate: {cert_path}\ntls_key: {key_path}\n")
    assert main(["check-config", "--config", str(config)]) == 0
    key_path.write_bytes(make_certificate(8).key_pem)
    capsys.readouterr()
    assert main(["check-config", "--config", str(config)]) == 2
    assert f"tls_key {key_path}" in capsys.readouterr().err
    config.write_text(f"tls_certificate: {cert_path}\n")
    assert main(["check-config", "--config", str(config)]) == 2
    assert "'tls_certificate' and 'tls_key' go together" in capsys.readouterr().err


def jobs_over_https(base: str, context: ssl.SSLContext) -> list[dict[str, str]]:
    async def fetch() -> list[dict[str, str]]:
        connector = aiohttp.TCPConnector(ssl=context)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"{base}/api/continuouswebjobs") as response,
        ):
            assert response.status == 200
            return list(await response.json())

    try:
        return asyncio.run(fetch())
    except (aiohttp.ClientError, OSError):
        return []


def fingerprint_or_none(port: int, context: ssl.SSLContext) -> str | None:
    try:
        return served_fingerprint(port, context)
    except (OSError, ssl.SSLError):
        return None


def plain_http_answer(port: int) -> bytes:
    """What a plain-HTTP request to the TLS port gets back before the connection ends."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /api/webjobs HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return answer if answer.startswith(b"HTTP/") else b""


def test_the_cli_reaches_a_tls_daemon_from_its_config_and_pins_its_certificate(
    tls_daemon: tuple[DaemonProcess, int, Certificate, Path, Path],
) -> None:
    """1. `webjobsd jobs --config` of a TLS daemon lists its jobs over HTTPS, trusting the
    configured certificate. 2. With another certificate in that file (not yet reloaded), the
    daemon's certificate is no longer trusted: the client says it cannot connect."""
    daemon, port, first, cert_path, key_path = tls_daemon
    daemon.start()
    clean = {"WEBJOBSD_URL": "", "WEBJOBSD_USERNAME": "", "WEBJOBSD_PASSWORD": ""}

    def cli_jobs() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "webjobsd", "jobs", "--config", str(daemon.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **clean},
            check=False,
        )

    try:
        # Polled cheaply first: each CLI run is a Python process start, and a poll of those
        # while the daemon starts takes the CPU the daemon needs to start.
        wait_for_sync(
            lambda: jobs_over_https(f"https://127.0.0.1:{port}", client_context(first)),
            what="the job list over HTTPS",
        )
        wait_for_sync(lambda: "steady" in cli_jobs().stdout, what="the CLI lists over HTTPS")
        install(make_certificate(1003), cert_path, key_path)
        refused = cli_jobs()
        assert refused.returncode == 3, refused
        assert "certificate verify failed" in refused.stderr
    finally:
        assert daemon.stop() == 0
