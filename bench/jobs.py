"""The programs the systems manage: small bash scripts whose first instruction is a stamp.

Every system runs the very same script text with `bash`; only where the file lives differs.
"""

from __future__ import annotations

import enum
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.common import stamp_line

WRITER = Path(__file__).resolve().with_name("writer.py")


class Kind(enum.Enum):
    CONTINUOUS = "continuous"  # started by the system, restarted when it exits
    ON_DEMAND = "on-demand"  # started only when asked (a triggered job, autostart=false, ...)


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    script: str
    kind: Kind = Kind.CONTINUOUS


def sleeper(name: str, stamps: Path) -> Job:
    """Stamps, then becomes `sleep` (cheap; dies on SIGTERM by default)."""
    return Job(name, "#!/bin/bash\n" + stamp_line(stamps, name) + "exec sleep infinity\n")


def graceful(name: str, stamps: Path) -> Job:
    """Stamps, then waits on a child; SIGTERM (or SIGINT, PM2's default) ends the child and
    exits 0, so the whole tree is gone however the system signals it (group or leader only)."""
    return Job(
        name,
        "#!/bin/bash\n"
        "trap 'kill $! 2>/dev/null; exit 0' TERM INT\n"
        + stamp_line(stamps, name)
        + "while :; do sleep infinity & wait $!; done\n",
    )


def one_shot(name: str, stamps: Path) -> Job:
    """Stamps and exits 0 (a triggered job)."""
    return Job(name, "#!/bin/bash\n" + stamp_line(stamps, name), Kind.ON_DEMAND)


def writer_command(name: str, stamps: Path, blocks: int, *, linger: bool) -> list[str]:
    args = [sys.executable, str(WRITER), "--blocks", str(blocks)]
    args += ["--stamps", str(stamps), "--name", name]
    return [*args, "--linger"] if linger else args


def log_writer(name: str, stamps: Path, blocks: int) -> Job:
    """Writes `blocks` blocks of numbered lines to stdout once, then lingers (no restart)."""
    command = shlex.join(writer_command(name, stamps, blocks, linger=True))
    return Job(name, f"#!/bin/bash\nexec {command}\n")
