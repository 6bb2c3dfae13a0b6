"""The site-wide deployment lock: `SITE/site/locks/deployments.lock` (Part A #2, Part B §1.6).

Owns: taking and releasing the one lock that every deployment of the site holds from its pending
record to its last status write (zipdeploy, OneDeploy, a git push, a dropped site zip, a record
`PUT` by CI), and the probe "is a deployment in progress?" that the API and the jobs side ask.

Design choices:

* **flock through `runtime.locks.FileLock`**, so daemons sharing a site (and two opens in one
  process) exclude each other, and a daemon killed mid-deployment releases it at once: the lock
  itself is the truth about a live deployment; the owner JSON inside is only a hint for people.
* **Zero wait, as Kudu** (`LockOperation(..., TimeSpan.Zero)`): a second deployment gets 409
  with `IN_PROGRESS` rather than queueing behind the first. The one exception is a short retry
  (`_ACQUIRE_RETRY_S`): the jobs side and `deployment_in_progress` probe the lock with a shared
  flock for microseconds, and such a probe makes one exclusive attempt fail although nobody
  deploys. Two hundred milliseconds cover many probes and are far below any client's patience.
* **Blocking**: `try_acquire` writes and fsyncs the owner info and may sleep while it retries;
  call it through `asyncio.to_thread`. `held` and `release` are cheap.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from webjobsd.runtime.locks import FileLock
from webjobsd.site import SiteLayout

# Kudu's text (Kudu.Services Resources.resx, Error_DeploymentInProgress), byte for byte: clients
# show it to people, and some match on it.
IN_PROGRESS = "There is a deployment currently in progress. Please try again when it completes."

_ACQUIRE_RETRY_S = 0.2
_ACQUIRE_PAUSE_S = 0.01


class DeploymentLock:
    """This process's handle on the site's deployment lock (one open of the lock file).

    Not thread-safe; one deployment at a time uses one `DeploymentLock`. Two `DeploymentLock`s
    of the same site, in one process or in two, exclude each other.
    """

    def __init__(self, layout: SiteLayout) -> None:
        self.layout = layout
        self._lock = FileLock(layout.deployments_lock_path)

    def __repr__(self) -> str:
        return f"DeploymentLock({str(self._lock.path)!r}, held={self.held})"

    @property
    def held(self) -> bool:
        """True while this handle holds the lock (not: "someone holds it")."""
        return self._lock.held

    def try_acquire(self, owner: Mapping[str, Any]) -> bool:
        """Take the lock and write `owner` into it; False when another holder has it.

        Retries for about 200 ms only to ride out the shared-lock probes (module docstring); a
        real holder keeps it far longer, so False means "a deployment is in progress".
        """
        deadline = time.monotonic() + _ACQUIRE_RETRY_S
        while True:
            if self._lock.try_acquire(owner):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_ACQUIRE_PAUSE_S)

    def release(self) -> None:
        """Idempotent; the lock file stays (see `runtime.locks` on why lock files are kept)."""
        self._lock.release()

    def owner(self) -> dict[str, Any] | None:
        """The owner info last written to the lock file; a hint, possibly a dead holder's."""
        return FileLock.read_owner(self._lock.path)


def deployment_in_progress(layout: SiteLayout) -> bool:
    """Someone holds the site's deployment lock: this daemon, another one, or any process."""
    return FileLock.is_locked_by_other(layout.deployments_lock_path)


def lock_owner(layout: SiteLayout) -> dict[str, Any] | None:
    """The owner info in the lock file (who deploys, since when); stale once released."""
    return FileLock.read_owner(layout.deployments_lock_path)
