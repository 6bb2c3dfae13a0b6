"""Error answers (Part A #2): JSON `{"message": ...}` with Kudu's text where Kudu has one.

Handlers raise `ApiError`; the error middleware turns it, and any aiohttp HTTP exception, into a
JSON body, and turns an unexpected exception into a logged 500 whose body reveals nothing.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from webjobsd.refusal import Refusal

# Handlers raise the same type as the parts below the API (archives, deployments).
ApiError = Refusal

log = structlog.get_logger("webjobsd.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    # clean_text: a message quoting a file name that is not UTF-8 stays valid Unicode.
    response = web.json_response({"message": clean_text(message)}, status=status)
    response.headers.update(headers or {})
    return response


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_body(request: web.Request) -> object:
    """The body as JSON, or a 400: strict UTF-8 whatever charset the client claims, no
    NaN/Infinity (they would be written out as invalid JSON), no nesting deep enough to blow
    the parser's stack."""
    raw = await request.read()
    try:
        text = raw.decode("utf-8-sig")
        return json.loads(text, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        message = "too deeply nested" if isinstance(error, RecursionError) else str(error)
        raise bad_request(f"The body is not valid JSON: {message}") from error


def clean_text(value: str) -> str:
    """Header text that may carry undecodable bytes (surrogates), made safe to store."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def not_found(message: str = "Not found.") -> ApiError:
    return ApiError(404, message)


def conflict(message: str) -> ApiError:
    return ApiError(409, message)


def too_large(message: str) -> ApiError:
    return ApiError(413, message)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return json_error(error.status, error.message, error.headers)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        message = (
            error.text
            if error.text and not error.text.startswith(str(error.status))
            else error.reason
        )
        headers = {k: v for k, v in error.headers.items() if k.lower() != "content-type"}
        return json_error(error.status, message or error.reason, headers)
    except Exception:
        log.exception("unhandled error in request", method=request.method, path=request.path)
        return json_error(500, "Internal error; see the daemon log.")
