"""The process managers under test, behind one interface (`base.System`)."""

from __future__ import annotations

from bench.systems.base import Options, System, Tools
from bench.systems.floor import NOTE as FLOOR_NOTE
from bench.systems.floor import Floor
from bench.systems.pm2 import Pm2
from bench.systems.supervisord import Supervisord
from bench.systems.webjobsd import Webjobsd

ALL: dict[str, type[System]] = {
    "webjobsd": Webjobsd,
    "supervisord": Supervisord,
    "pm2": Pm2,
}

# Baselines measured in the same run as the systems, by the scenarios that have one; never
# chosen with --systems.
FLOOR = Floor.name
BASELINES: dict[str, type[System]] = {FLOOR: Floor}


def system_class(name: str) -> type[System]:
    return ALL[name] if name in ALL else BASELINES[name]


__all__ = [
    "ALL",
    "BASELINES",
    "FLOOR",
    "FLOOR_NOTE",
    "Floor",
    "Options",
    "Pm2",
    "Supervisord",
    "System",
    "Tools",
    "Webjobsd",
    "system_class",
]
