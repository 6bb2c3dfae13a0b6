"""What every route of one job reads from its request, and holds while it writes the job.

Shared by the job routes (`http.jobs`), the deploy route (`http.deploy`) and the log streams
(`http.logstream`), and below all three, so that they import it rather than each other: the
HTTP layer's imports form no circle (the import-linter contract in pyproject.toml checks it).
"""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp import web

from webjobsd.http.errors import bad_request
from webjobsd.model import INVALID_JOB_NAME, JobKey, is_valid_job_name

INVALID_NAME: Final = INVALID_JOB_NAME  # shared with a dropped zip's refusal (deploy.drops)
_LOCKS: Final = web.AppKey("job_write_locks", dict)


def job_name(request: web.Request) -> str:
    """The `{name}` of the route, or a 400 when it is not a valid job name."""
    name = request.match_info["name"]
    if not is_valid_job_name(name):
        raise bad_request(INVALID_NAME)
    return name


def add_job_locks(app: web.Application) -> None:
    """Give `app` its per-job locks (before it starts: an application's keys freeze then)."""
    app.setdefault(_LOCKS, {})


def job_lock(request: web.Request, key: JobKey) -> asyncio.Lock:
    """One lock per job for every write through the API (upload, delete, settings, stop)."""
    locks: dict[JobKey, asyncio.Lock] = request.app[_LOCKS]
    return locks.setdefault(key, asyncio.Lock())
