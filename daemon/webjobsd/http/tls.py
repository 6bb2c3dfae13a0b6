"""TLS for the HTTP API: a server context built from the PEM files of the configuration.

Loaded at start (a bad pair stops start-up), by `check-config`, and again on SIGHUP, where a bad
new pair keeps the context in use (the listener hands the current context to each new
connection, see `http/listener.py`). Every error names the file and the configuration key, so
that the operator knows which of the two to fix. TLS 1.2 is the oldest version offered; the
ciphers are the `ssl` module's defaults, which track what is considered safe.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL)


class TlsError(ValueError):
    """The certificate or the key cannot be used; the message names the file."""


@dataclass(frozen=True, slots=True)
class ServerTls:
    context: ssl.SSLContext
    certificate: Path
    key: Path
    fingerprint_sha256: str


def _refuse_encrypted_key() -> str:
    # Without this, OpenSSL would ask for a passphrase on the terminal and block start-up.
    raise TlsError("encrypted private keys are not supported")


def load_server_tls(certificate: Path, key: Path) -> ServerTls:
    for name, path in (("tls_certificate", certificate), ("tls_key", key)):
        try:
            path.read_bytes()
        except OSError as error:
            raise TlsError(f"{name} {path}: cannot read: {error.strerror}") from error
    fingerprint = _fingerprint(certificate)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate, key, password=_refuse_encrypted_key)
    except TlsError as error:
        raise TlsError(f"tls_key {key}: {error}") from error
    except ssl.SSLError as error:
        raise TlsError(
            f"tls_key {key}: not a PEM private key, or not the key of tls_certificate "
            f"{certificate} ({error.reason or error})"
        ) from error
    return ServerTls(context, certificate, key, fingerprint)


def _fingerprint(certificate: Path) -> str:
    """SHA-256 of the first certificate (the server's own): what `openssl x509 -fingerprint
    -sha256` prints, for the log line that says which certificate is being served."""
    text = certificate.read_text(encoding="ascii", errors="replace")
    blocks = PEM_BLOCK.findall(text)
    try:
        if not blocks:
            raise ValueError("no PEM certificate")
        der = ssl.PEM_cert_to_DER_cert(blocks[0])
        # The whole chain must parse too: the context would refuse it later, less clearly.
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        probe.load_verify_locations(cadata="\n".join(blocks))
    except (ValueError, ssl.SSLError) as error:
        raise TlsError(f"tls_certificate {certificate}: not a PEM certificate ({error})") from error
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
