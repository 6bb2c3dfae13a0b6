"""structlog set-up for the daemon's own log: readable on a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys

import structlog
from aiohttp.http_exceptions import HttpProcessingError

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _route_standard_logging(_LEVELS[level])


class _StandardToStructlog(logging.Handler):
    """Library logs (aiohttp, watchdog) through the same renderer as ours: one format per line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        extra = {"exc_info": record.exc_info} if record.exc_info else {}
        structlog.get_logger(record.name).log(record.levelno, message, **extra)


class _RefusedRequestFilter(logging.Filter):
    """aiohttp logs a request it refused to parse with the exception, whose text quotes the
    offending bytes: for an oversized `Authorization` header, the credentials themselves. Keep
    the kind of error and the status, drop the bytes, and log it as info: a client's bad bytes
    are not the daemon's error, and any client could otherwise fill the log with tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg = "refused a malformed HTTP request: %s (status %s)"
            record.args = (type(error).__name__, error.code)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _route_standard_logging(level: int) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StandardToStructlog)]:
        root.removeHandler(handler)
    root.addHandler(_StandardToStructlog())
    root.setLevel(level)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _RefusedRequestFilter) for f in server.filters):
        server.addFilter(_RefusedRequestFilter())
