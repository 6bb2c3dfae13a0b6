"""A request the daemon refuses, with the HTTP status that says why.

Below the API (archives, deployments) nothing knows about HTTP, yet a refused zip or a deployment
already in progress has exactly one right answer (400, 409, 413). Those parts raise `Refusal`;
the API's error middleware answers with its status and message, and callers that are not
requests (a dropped zip) log the message instead.
"""

from __future__ import annotations


class Refusal(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
