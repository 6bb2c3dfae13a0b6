"""Value types shared by every stage: job identity, job specs, settings and statuses.

This module owns no state and does no I/O. Everything here is immutable so that a spec
published by discovery can be handed to the runtime without copying.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

# Part A #3: names are validated so that no job name can be used to reach outside its folder.
JOB_NAME_PATTERN = re.compile(r"^(?!\.)[A-Za-z0-9._-]{1,64}$")


class JobKind(enum.StrEnum):
    CONTINUOUS = "continuous"
    TRIGGERED = "triggered"


@dataclass(frozen=True, order=True, slots=True)
class JobKey:
    kind: JobKind
    name: str

    def __str__(self) -> str:
        return f"{self.kind.value}/{self.name}"


INVALID_JOB_NAME: Final = (
    "Invalid job name: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'."
)


def is_valid_job_name(name: str) -> bool:
    return bool(JOB_NAME_PATTERN.fullmatch(name))


class ContinuousStatus(enum.StrEnum):
    """Kudu's statuses of one continuous job instance (Part B §5.1)."""

    INITIALIZING = "Initializing"
    STARTING = "Starting"
    RUNNING = "Running"
    SUCCESS = "Success"
    PENDING_RESTART = "PendingRestart"
    INACTIVE_INSTANCE = "InactiveInstance"
    DISABLING = "Disabling"
    STOPPING = "Stopping"
    STOPPED = "Stopped"


class RunStatus(enum.StrEnum):
    """Kudu's statuses of one triggered run (Part B §5.1)."""

    INITIALIZING = "Initializing"
    RUNNING = "Running"
    SUCCESS = "Success"
    FAILED = "Failed"
    STOPPED = "Stopped"
    ABORTED = "Aborted"


@dataclass(frozen=True, slots=True)
class JobSettings:
    """`settings.job` as Kudu reads it: a value counts only when it has the expected JSON type.

    `raw` keeps every key, known or not, so that the API can round-trip the file.
    """

    raw: Mapping[str, Any] = field(default_factory=dict)
    is_singleton: bool = False
    stopping_wait_time_s: float | None = None
    is_in_place: bool | None = None
    schedule: str | None = None

    def stopping_wait_s(self, kind: JobKind) -> float:
        if self.stopping_wait_time_s is not None:
            return self.stopping_wait_time_s
        return 5.0 if kind is JobKind.CONTINUOUS else 30.0


@dataclass(frozen=True, slots=True)
class ScriptCommand:
    """Which file runs and how.

    `script_dir` is the script folder relative to the job folder (after the single-sub-folder
    descent), `script_name` the chosen file inside it; `argv_prefix` is the interpreter part of
    the command line (empty for a native executable, which runs as `./name`).
    """

    script_dir: str
    script_name: str
    host: str
    argv_prefix: tuple[str, ...]
    in_place_by_default: bool = False

    @property
    def run_command(self) -> str:
        """Kudu's `run_command`: the script path relative to the job folder, `/`-separated."""
        return f"{self.script_dir}/{self.script_name}" if self.script_dir else self.script_name

    def argv(self, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
        target = self.script_name if self.argv_prefix else f"./{self.script_name}"
        return (*self.argv_prefix, target, *extra)


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What discovery says should exist for one job folder.

    `fingerprint` changes whenever a file that matters changes (code or `settings.job`, never
    `disable.job` nor editor/FTP temp files); the runtime restarts a job only when it changes.
    """

    key: JobKey
    job_dir: Path
    command: ScriptCommand
    settings: JobSettings
    disabled: bool
    fingerprint: str

    @property
    def script_dir(self) -> Path:
        return self.job_dir / self.command.script_dir if self.command.script_dir else self.job_dir

    @property
    def is_in_place(self) -> bool:
        if self.settings.is_in_place is not None:
            return self.settings.is_in_place
        return self.command.in_place_by_default
