"""Daemon configuration: the YAML file, validated once at start-up, and Kudu's app settings.

Two kinds of settings live here and must not be confused:

* `DaemonConfig` holds the daemon's own knobs (paths, debounce, log rotation...). It comes from the
  YAML file and command-line flags, is validated once (an unknown or ill-typed key stops start-up
  with the key and the file named), and is frozen. SIGHUP builds a new one.
* `AppSettings` answers Kudu's setting names (`WEBJOBS_RESTART_TIME`, `WEBJOBS_STOPPED`, ...) with
  Kudu's precedence (§8.1): the settings store (written by the API) over the environment (also
  `APPSETTING_`-prefixed names) over the YAML `settings:` map over defaults. Values are read at the
  moment of use, so a change in the store applies without a restart.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRUE_LIKE = {"1", "true"}


def is_valid_setting(name: str, value: str) -> bool:
    """A setting becomes an environment variable of every job: the name must be one."""
    return bool(name) and "=" not in name and "\0" not in name and "\0" not in value


class ConfigError(ValueError):
    """A configuration problem, with the file and key it concerns in the message."""


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    site: Path = field(default_factory=lambda: Path("/home"), metadata={"doc": "the site root"})
    jobs_root: str | None = field(
        default=None,
        metadata={"doc": "jobs root override, like WEBJOBS_ROOT_PATH (relative to wwwroot)"},
    )
    instance_id: str | None = field(
        default=None, metadata={"doc": "instance id; default WEBSITE_INSTANCE_ID or host name"}
    )
    temp_dir: Path | None = field(
        default=None, metadata={"doc": "root of working copies; default $TMPDIR/webjobsd/<id>"}
    )
    debounce_s: float = field(default=1.0, metadata={"doc": "quiet period after file events"})
    debounce_cap_s: float = field(
        default=30.0, metadata={"doc": "act after this long even under constant writes"}
    )
    rescan_s: float = field(
        default=30.0, metadata={"doc": "period of the full rescan (inotify mode)"}
    )
    watch: str = field(
        default="inotify",
        metadata={
            "doc": "how file changes are found: inotify (local disks), or poll (NFS, CephFS, "
            "EFS: writes by other hosts make no inotify event)"
        },
    )
    poll_interval_s: float = field(
        default=1.0, metadata={"doc": "poll mode: period of the full scan of jobs and drops"}
    )
    reconcile_tick_s: float = field(
        default=5.0, metadata={"doc": "period of the reconcile pass without any event"}
    )
    restart_backoff_initial_s: float = field(
        default=1.0, metadata={"doc": "first restart delay; doubles up to WEBJOBS_RESTART_TIME"}
    )
    restart_backoff_reset_s: float = field(
        default=120.0, metadata={"doc": "uptime after which the restart delay resets"}
    )
    singleton_check_s: float = field(
        default=10.0,
        metadata={"doc": "a singleton job's holder checks its lock this often (fencing)"},
    )
    singleton_fence_s: float = field(
        default=45.0,
        metadata={
            "doc": "a holder whose lock check has not succeeded for this long stops the job; "
            "set to less than the storage's lock lease minus the job's stop time"
        },
    )
    log_max_bytes: int = field(
        default=10 * 1024 * 1024, metadata={"doc": "job_log.txt rotates past this size"}
    )
    log_generations: int = field(default=3, metadata={"doc": "rotated job logs kept"})
    run_log_cap_bytes: int = field(
        default=100 * 1024 * 1024, metadata={"doc": "output_log.txt cap per triggered run"}
    )
    max_line_bytes: int = field(
        default=1024 * 1024, metadata={"doc": "longer output lines are split into pieces"}
    )
    shutdown_grace_s: float = field(
        default=5.0, metadata={"doc": "extra time the daemon allows itself after job ladders"}
    )
    log_format: str = field(
        default="auto", metadata={"doc": "daemon log format: auto, console or json"}
    )
    log_level: str = field(default="info", metadata={"doc": "debug, info, warning or error"})
    settings: Mapping[str, str] = field(
        default_factory=dict, metadata={"doc": "app settings (Kudu names) passed to every job"}
    )
    listen: str = field(
        default="127.0.0.1:8181", metadata={"doc": "HOST:PORT of the HTTP API ([::1]:PORT for v6)"}
    )
    trusted_proxies: tuple[str, ...] = field(
        default=(), metadata={"doc": "addresses/networks whose X-Forwarded-* headers are honoured"}
    )
    tls_certificate: Path | None = field(
        default=None,
        metadata={"doc": "PEM certificate (chain) to serve HTTPS with tls_key; reloaded on SIGHUP"},
    )
    tls_key: Path | None = field(
        default=None, metadata={"doc": "PEM private key of tls_certificate (not encrypted)"}
    )
    max_connections: int = field(
        default=512,
        metadata={"doc": "open HTTP connections at most (and at most half the file limit)"},
    )
    header_timeout_s: float = field(
        default=20.0,
        metadata={"doc": "a request's headers (and TLS handshake) must arrive within this"},
    )
    keepalive_timeout_s: float = field(
        default=75.0, metadata={"doc": "an idle connection (no request under way) is closed after"}
    )
    max_upload_bytes: int = field(
        default=256 * 1024 * 1024, metadata={"doc": "largest request body accepted (uploads)"}
    )
    max_extracted_bytes: int = field(
        default=1024 * 1024 * 1024, metadata={"doc": "largest total size a zip may expand to"}
    )
    max_archive_entries: int = field(
        default=20_000, metadata={"doc": "most entries accepted in an uploaded zip"}
    )
    auth_username: str | None = field(
        default=None, metadata={"doc": "API user (with auth_password_hash)"}
    )
    auth_password_hash: str | None = field(
        default=None, metadata={"doc": "scrypt hash from `webjobsd hash-password`"}
    )
    run_as_user: str | None = field(
        default=None, metadata={"doc": "jobs run as this user (the daemon must be root)"}
    )
    run_as_group: str | None = field(
        default=None, metadata={"doc": "jobs run with this group (default: the user's)"}
    )
    allow_singletons_without_locks: bool = field(
        default=False,
        metadata={
            "doc": "run singleton jobs even when the start-up check finds that the site's file"
            " locks do not exclude (they may then run on several daemons at once)"
        },
    )

    @property
    def polling(self) -> bool:
        return self.watch == "poll"

    @property
    def scan_period_s(self) -> float:
        """The period of the full scan of job folders and drop folders: in poll mode the scan
        is the source of events, otherwise it repairs what events missed."""
        return self.poll_interval_s if self.polling else self.rescan_s

    def resolved_instance_id(self, environ: Mapping[str, str]) -> str:
        """Kudu: first 6 characters of WEBSITE_INSTANCE_ID, else of the machine name."""
        if self.instance_id:
            return self.instance_id
        source = environ.get("WEBSITE_INSTANCE_ID") or socket.gethostname() or "local"
        return source[:6]

    def resolved_temp_dir(self, instance_id: str) -> Path:
        if self.temp_dir is not None:
            return self.temp_dir
        return Path(tempfile.gettempdir()) / "webjobsd" / instance_id


_LOG_FORMATS = {"auto", "console", "json"}
_LOG_LEVELS = {"debug", "info", "warning", "error"}
WATCH_MODES = ("inotify", "poll")


def _check_type(name: str, value: Any, expected: type, source: str) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is Path and isinstance(value, str):
        return Path(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(
            f"{source}: key {name!r} must be {expected.__name__}, got {type(value).__name__}"
        )
    return value


_FIELD_TYPES: dict[str, type] = {
    "site": Path,
    "jobs_root": str,
    "instance_id": str,
    "temp_dir": Path,
    "debounce_s": float,
    "debounce_cap_s": float,
    "rescan_s": float,
    "watch": str,
    "poll_interval_s": float,
    "reconcile_tick_s": float,
    "restart_backoff_initial_s": float,
    "restart_backoff_reset_s": float,
    "singleton_check_s": float,
    "singleton_fence_s": float,
    "log_max_bytes": int,
    "log_generations": int,
    "run_log_cap_bytes": int,
    "max_line_bytes": int,
    "shutdown_grace_s": float,
    "log_format": str,
    "log_level": str,
    "settings": dict,
    "listen": str,
    "trusted_proxies": list,
    "tls_certificate": Path,
    "tls_key": Path,
    "max_connections": int,
    "header_timeout_s": float,
    "keepalive_timeout_s": float,
    "max_upload_bytes": int,
    "max_extracted_bytes": int,
    "max_archive_entries": int,
    "auth_username": str,
    "auth_password_hash": str,
    "run_as_user": str,
    "run_as_group": str,
    "allow_singletons_without_locks": bool,
}


def config_from_mapping(data: Mapping[str, Any], source: str) -> DaemonConfig:
    """Validate a mapping (parsed YAML plus flags) into a DaemonConfig."""
    known = {f.name for f in dataclasses.fields(DaemonConfig)}
    values: dict[str, Any] = {}
    for name, value in data.items():
        if name not in known:
            raise ConfigError(f"{source}: unknown key {name!r}")
        if value is None and name in {
            "jobs_root",
            "instance_id",
            "temp_dir",
            "auth_username",
            "auth_password_hash",
            "run_as_user",
            "run_as_group",
            "tls_certificate",
            "tls_key",
        }:
            continue
        values[name] = _check_type(name, value, _FIELD_TYPES[name], source)
    if "settings" in values:
        values["settings"] = _validate_settings_map(values["settings"], source)
    if "trusted_proxies" in values:
        values["trusted_proxies"] = _validate_networks(values["trusted_proxies"], source)
    if "listen" in values:
        parse_listen(values["listen"], source)
    config = DaemonConfig(**values)
    _validate_ranges(config, source)
    return config


def _validate_settings_map(raw: Mapping[Any, Any], source: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not is_valid_setting(key, ""):
            raise ConfigError(f"{source}: key 'settings' has an invalid name {key!r}")
        if isinstance(value, bool):
            value = "true" if value else "false"
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{source}: key 'settings.{key}' must be a string or a number")
        result[key] = str(value)
    return result


def parse_listen(value: str, source: str = "configuration") -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` → (host, port); port 0 asks the system for a free one."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{source}: key 'listen' must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port_text)


def _validate_networks(raw: list[Any], source: str) -> tuple[str, ...]:
    networks = []
    for item in raw:
        try:
            networks.append(str(ipaddress.ip_network(str(item), strict=False)))
        except ValueError as error:
            raise ConfigError(f"{source}: key 'trusted_proxies': {error}") from error
    return tuple(networks)


def _validate_ranges(config: DaemonConfig, source: str) -> None:
    positive = (
        "debounce_cap_s",
        "rescan_s",
        "poll_interval_s",
        "reconcile_tick_s",
        "log_max_bytes",
        "max_upload_bytes",
        "max_extracted_bytes",
        "max_archive_entries",
        "max_connections",
        "header_timeout_s",
        "keepalive_timeout_s",
        "singleton_check_s",
        "singleton_fence_s",
    )
    for name in positive:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{source}: key {name!r} must be greater than 0")
    non_negative = (
        "debounce_s",
        "restart_backoff_initial_s",
        "restart_backoff_reset_s",
        "shutdown_grace_s",
    )
    for name in non_negative:
        if getattr(config, name) < 0:
            raise ConfigError(f"{source}: key {name!r} must not be negative")
    if config.singleton_fence_s <= config.singleton_check_s:
        raise ConfigError(
            f"{source}: key 'singleton_fence_s' must be greater than 'singleton_check_s'"
        )
    if (config.tls_certificate is None) != (config.tls_key is None):
        raise ConfigError(f"{source}: keys 'tls_certificate' and 'tls_key' go together")
    if config.log_generations < 1:
        raise ConfigError(f"{source}: key 'log_generations' must be at least 1")
    if config.max_line_bytes < 1024:
        raise ConfigError(f"{source}: key 'max_line_bytes' must be at least 1024")
    if config.log_format not in _LOG_FORMATS:
        raise ConfigError(f"{source}: key 'log_format' must be one of {sorted(_LOG_FORMATS)}")
    if config.watch not in WATCH_MODES:
        raise ConfigError(
            f"{source}: key 'watch' must be one of {', '.join(WATCH_MODES)}, got {config.watch!r}"
        )
    if config.log_level not in _LOG_LEVELS:
        raise ConfigError(f"{source}: key 'log_level' must be one of {sorted(_LOG_LEVELS)}")


def load_config(path: Path | None, overrides: Mapping[str, Any]) -> DaemonConfig:
    """The YAML file (if any) with command-line overrides on top."""
    data: dict[str, Any] = {}
    source = str(path) if path else "command line"
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"{path}: cannot read: {error.strerror}") from error
        # Only with a file: a daemon configured by flags alone never loads YAML (http/lazy.py).
        import yaml

        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_mapping(data, source)


class AppSettings:
    """Kudu's app settings, looked up at the moment of use (see the module docstring)."""

    def __init__(
        self,
        *,
        environ: Mapping[str, str],
        config_settings: Mapping[str, str],
        store_path: Path | None,
    ) -> None:
        self._environ = dict(environ)
        self._config_settings = dict(config_settings)
        self._store_path = store_path
        self._store_cache: tuple[int, dict[str, str]] | None = None

    def replace_config_settings(self, config_settings: Mapping[str, str]) -> None:
        self._config_settings = dict(config_settings)

    def _store(self) -> dict[str, str]:
        if self._store_path is None:
            return {}
        try:
            stamp = self._store_path.stat().st_mtime_ns
        except OSError:
            return {}
        if self._store_cache is not None and self._store_cache[0] == stamp:
            return self._store_cache[1]
        try:
            loaded = json.loads(self._store_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return self._store_cache[1] if self._store_cache else {}
        values = (
            {str(k): str(v) for k, v in loaded.items() if is_valid_setting(str(k), str(v))}
            if isinstance(loaded, dict)
            else {}
        )
        self._store_cache = (stamp, values)
        return values

    def get(self, key: str) -> str | None:
        """Empty values fall through to the next source, as in Kudu."""
        for value in (
            self._store().get(key),
            self._environ.get(f"APPSETTING_{key}"),
            self._environ.get(key),
            self._config_settings.get(key),
        ):
            if value:
                return value
        return None

    def all_for_jobs(self) -> dict[str, str]:
        """The app settings a job sees as environment variables (store wins)."""
        merged = dict(self._config_settings)
        merged.update(self._store())
        return merged

    def flag(self, key: str) -> bool:
        value = self.get(key)
        return value is not None and value.strip().lower() in TRUE_LIKE

    def seconds(self, key: str, default: int) -> int:
        """Kudu's integer-seconds parsing: negative → 0, junk → default."""
        value = self.get(key)
        if value is None:
            return default
        try:
            parsed = int(value.strip())
        except ValueError:
            return default
        return max(parsed, 0)

    @property
    def restart_time_s(self) -> int:
        return self.seconds("WEBJOBS_RESTART_TIME", 60)

    @property
    def history_size(self) -> int:
        """WEBJOBS_HISTORY_SIZE: a positive integer, else Kudu's default of 50."""
        value = self.seconds("WEBJOBS_HISTORY_SIZE", 50)
        return value if value > 0 else 50

    @property
    def idle_timeout_s(self) -> int:
        return self.seconds("WEBJOBS_IDLE_TIMEOUT", 120)

    @property
    def jobs_stopped(self) -> bool:
        return self.flag("WEBJOBS_STOPPED")


def environ_snapshot() -> dict[str, str]:
    return dict(os.environ)
