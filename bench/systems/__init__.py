"""The process managers under test, behind one interface (`base.System`)."""

from __future__ import annotations

from bench.systems.base import Options, System, Tools
from bench.systems.pm2 import Pm2
from bench.systems.supervisord import Supervisord
from bench.systems.webjobsd import Webjobsd

ALL: dict[str, type[System]] = {
    "webjobsd": Webjobsd,
    "supervisord": Supervisord,
    "pm2": Pm2,
}

__all__ = ["ALL", "Options", "Pm2", "Supervisord", "System", "Tools", "Webjobsd"]
