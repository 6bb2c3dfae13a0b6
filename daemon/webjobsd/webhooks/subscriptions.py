"""Hook subscriptions: the `WebHook` model (Kudu's wire shape) and the file that keeps them.

Decisions:

* Kudu keeps its hooks in `site/deployments/hooks`; ours live with the daemon's own state, in
  `data/webjobsd/hooks.json`, written with write-then-rename so that a crash leaves the old list
  or the new one. The file is re-read when it changed on disk (identity: inode, size, mtime), so
  daemons sharing a site see each other's subscriptions, as Kudu's re-read at every use does.
  Every read-modify-write holds the file's sidecar lock (`records.atomic.serialized`), so two
  daemons subscribing, unsubscribing or recording a delivery at the same instant both count.
* Kudu identifies a subscription by its address (case-insensitive): the same URL with the same
  event returns the existing hook, with another event it is a conflict (409). We keep that rule.
* Kudu accepts any event name and any absolute URI; we accept only the events this daemon emits
  (a typo would otherwise subscribe to nothing, silently) and only http/https URLs with a host.
* A corrupt file is moved aside (`hooks.json.corrupt`) and logged, not overwritten in place: a
  later subscription must not silently erase the evidence.

Blocking file I/O: call the methods of `HookStore` from a worker thread. A threading lock makes
each read-modify-write atomic within the daemon. Writers take the file lock *before* the
threading lock: a reader on the event loop (`subscribed`) takes only the threading lock, and
must never wait behind another daemon's write.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
from yarl import URL

from webjobsd.records.atomic import serialized, write_json_atomic
from webjobsd.webhooks.events import EVENTS

log = structlog.get_logger("webjobsd.webhooks")

MAX_URL_LENGTH = 2048
# Subscriptions are few in practice; the cap keeps a runaway client from making every event a
# flood of POSTs.
MAX_HOOKS = 200
# .NET ticks at the Unix epoch: Kudu's hook ids are `DateTime.UtcNow.Ticks`.
_EPOCH_TICKS = 621355968000000000


class HookError(ValueError):
    """A subscription request that cannot be accepted; the message says why."""


class HookConflict(HookError):
    """The URL is already subscribed to another event (Kudu answers 409)."""


@dataclass(frozen=True, slots=True)
class WebHook:
    id: str
    url: str
    event: str
    insecure_ssl: bool = False
    last_status: str | None = None
    last_reason: str | None = None
    last_datetime: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "event": self.event,
            "insecure_ssl": self.insecure_ssl,
            "last_status": self.last_status,
            "last_reason": self.last_reason,
            "last_datetime": self.last_datetime,
        }

    @classmethod
    def from_json(cls, value: Any) -> WebHook | None:
        """A stored hook, or None when the entry is unusable (it is then dropped)."""
        if not isinstance(value, dict):
            return None
        hook_id, url, event = value.get("id"), value.get("url"), value.get("event")
        if not all(isinstance(item, str) and item for item in (hook_id, url, event)):
            return None

        def text(key: str) -> str | None:
            item = value.get(key)
            return item if isinstance(item, str) else None

        return cls(
            id=str(hook_id),
            url=str(url),
            event=str(event),
            insecure_ssl=value.get("insecure_ssl") is True,
            last_status=text("last_status"),
            last_reason=text("last_reason"),
            last_datetime=text("last_datetime"),
        )


@dataclass(frozen=True, slots=True)
class HookRequest:
    url: str
    event: str
    insecure_ssl: bool


def parse_request(body: object) -> HookRequest:
    """The body of POST /api/hooks, validated: `{"url", "event", "insecure_ssl"?}`."""
    if not isinstance(body, dict):
        raise HookError("The body must be a JSON object with 'url' and 'event'.")
    url, event, insecure = body.get("url"), body.get("event"), body.get("insecure_ssl", False)
    if not isinstance(url, str) or not url.strip():
        raise HookError("'url' must be a non-empty string.")
    if not isinstance(event, str):
        raise HookError(f"'event' must be one of {', '.join(EVENTS)}.")
    canonical = {name.lower(): name for name in EVENTS}.get(event.lower())
    if canonical is None:
        raise HookError(f"Unsupported event {event!r}: use one of {', '.join(EVENTS)}.")
    if not isinstance(insecure, bool):
        raise HookError("'insecure_ssl' must be true or false.")
    return HookRequest(url=validate_url(url), event=canonical, insecure_ssl=insecure)


def validate_url(raw: str) -> str:
    """An absolute http/https URL with a host (trimmed, as Kudu does), or HookError."""
    url = raw.strip()
    if len(url) > MAX_URL_LENGTH:
        raise HookError(f"'url' is longer than {MAX_URL_LENGTH} characters.")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise HookError("'url' must not contain spaces or control characters.")
    try:
        parsed = URL(url)
        host, scheme, _port = parsed.host, parsed.scheme, parsed.port
    except (ValueError, TypeError, UnicodeError) as error:
        raise HookError(f"'url' is not a valid URL: {error}") from error
    if scheme not in ("http", "https") or not parsed.is_absolute() or not host:
        raise HookError("'url' must be an absolute http:// or https:// URL with a host.")
    return url


def url_host(url: str) -> str:
    """The host of a hook URL for logs: never the path, query or credentials."""
    try:
        return URL(url).host or "?"
    except (ValueError, TypeError, UnicodeError):
        return "?"


class HookStore:
    """The subscriptions: an in-memory list mirrored to one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._hooks: list[WebHook] = []
        self._identity: tuple[int, int, int] | None = None

    # -- reads -------------------------------------------------------------------------------

    def hooks(self) -> list[WebHook]:
        with self._lock:
            return list(self._load())

    def get(self, hook_id: str) -> WebHook | None:
        return next((h for h in self.hooks() if h.id == hook_id), None)

    def subscribed(self, event: str) -> list[WebHook]:
        return [h for h in self.hooks() if h.event == event]

    # -- writes ------------------------------------------------------------------------------

    def add(self, request: HookRequest) -> tuple[WebHook, bool]:
        """(hook, created): an existing hook for the same URL and event is returned as is."""
        with serialized(self.path), self._lock:
            hooks = self._load()
            existing = next((h for h in hooks if h.url.lower() == request.url.lower()), None)
            if existing is not None:
                if existing.event != request.event:
                    raise HookConflict(
                        f"The URL is already subscribed to {existing.event}; "
                        "unsubscribe it first or use another URL."
                    )
                return existing, False
            if len(hooks) >= MAX_HOOKS:
                raise HookError(f"At most {MAX_HOOKS} hooks can be subscribed.")
            hook = WebHook(
                id=self._new_id(hooks),
                url=request.url,
                event=request.event,
                insecure_ssl=request.insecure_ssl,
            )
            self._save([*hooks, hook])
            return hook, True

    def remove(self, hook_id: str) -> WebHook | None:
        with serialized(self.path), self._lock:
            hooks = self._load()
            found = next((h for h in hooks if h.id == hook_id), None)
            if found is not None:
                self._save([h for h in hooks if h.id != hook_id])
            return found

    def record(self, hook_id: str, *, status: str, reason: str | None, when: str) -> None:
        """The outcome of a delivery; nothing happens when the hook was removed meanwhile."""
        with serialized(self.path), self._lock:
            hooks = self._load()
            if not any(h.id == hook_id for h in hooks):
                return
            self._save(
                [
                    replace(h, last_status=status, last_reason=reason, last_datetime=when)
                    if h.id == hook_id
                    else h
                    for h in hooks
                ]
            )

    # -- the file ----------------------------------------------------------------------------

    @staticmethod
    def _new_id(hooks: list[WebHook]) -> str:
        ticks = _EPOCH_TICKS + time.time_ns() // 100
        taken = {h.id for h in hooks}
        while str(ticks) in taken:
            ticks += 1
        return str(ticks)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self) -> list[WebHook]:
        identity = self._stat()
        if identity == self._identity:
            return self._hooks
        if identity is None:
            self._hooks, self._identity = [], None
            return self._hooks
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(raw, list):
                raise ValueError("not a JSON list")
        except (OSError, ValueError) as error:
            aside = self.path.with_name(self.path.name + ".corrupt")
            log.error("unreadable hooks file moved aside", file=str(self.path), error=str(error))
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            self._hooks, self._identity = [], None
            return self._hooks
        self._hooks = [hook for hook in map(WebHook.from_json, raw) if hook is not None]
        self._identity = identity
        return self._hooks

    def _save(self, hooks: list[WebHook]) -> None:
        write_json_atomic(self.path, [h.to_json() for h in hooks], mode=0o600)
        self._hooks = hooks
        self._identity = self._stat()
