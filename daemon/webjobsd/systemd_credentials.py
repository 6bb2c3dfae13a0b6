"""Secrets passed by systemd's credential mechanism (`LoadCredential=` / `SetCredential=`).

This module owns one lookup: `$CREDENTIALS_DIRECTORY/<name>`. systemd copies each credential into
a private, non-swappable directory readable only by the service's user and exports its path in
`CREDENTIALS_DIRECTORY`; the source file (e.g. /etc/webjobsd/password, mode 0600 root) never needs
to be readable by the `webjobsd` user, and the secret never appears in the environment, where
`/proc/<pid>/environ` and every child job would see it.

Decisions:

* The credential name is a single path component: anything with `/` or `..` is refused, so a
  configurable name cannot read outside the directory.
* One trailing newline is stripped (`echo secret > file` is how people write these files); any
  other whitespace is part of the secret.
* Absent directory or absent file → None (the caller falls back to its other sources). A file
  that exists but cannot be read or decoded raises `ValueError` with the path: silently ignoring a
  configured secret would start the daemon with the wrong credentials.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

ENV_CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"

# The name used by systemd/webjobsd.service: LoadCredential=webjobsd-password:/etc/webjobsd/password
PASSWORD_CREDENTIAL = "webjobsd-password"


def credential_from_systemd(name: str, environ: Mapping[str, str]) -> str | None:
    """The text of credential `name`, or None when systemd passed no such credential."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"invalid credential name {name!r}")
    directory = environ.get(ENV_CREDENTIALS_DIRECTORY)
    if not directory:
        return None
    path = Path(directory) / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ValueError(f"cannot read systemd credential {path}: {error.strerror}") from error
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"systemd credential {path} is not UTF-8") from error
    return text.removesuffix("\n")
