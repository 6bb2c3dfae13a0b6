"""Persisted identities of the processes this daemon instance started.

One small JSON file per live job process under `data/webjobsd/processes/{instance}/`, written
atomically right after the spawn and removed once the process is gone. After a crash of the daemon,
the next start reads them to end what its previous life left behind (together with the
environment-marker scan, which catches descendants that left the process group).
"""

from __future__ import annotations

import json
from pathlib import Path

import structlog

from webjobsd.records.atomic import write_json_atomic
from webjobsd.runtime.proctree import ProcessIdentity

log = structlog.get_logger("webjobsd.procrecords")


class ProcessRecords:
    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def _path(self, slot: str) -> Path:
        return self._directory / f"{slot}.json"

    def save(self, slot: str, identity: ProcessIdentity) -> None:
        write_json_atomic(self._path(slot), identity.to_json(), fsync=False)

    def remove(self, slot: str) -> None:
        try:
            self._path(slot).unlink()
        except FileNotFoundError:
            pass

    def load_all(self) -> dict[str, ProcessIdentity]:
        found: dict[str, ProcessIdentity] = {}
        if not self._directory.is_dir():
            return found
        for path in sorted(self._directory.glob("*.json")):
            try:
                found[path.stem] = ProcessIdentity.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("unreadable process record", file=str(path), error=str(error))
        return found
