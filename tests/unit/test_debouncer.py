"""The debouncer against an injected clock: quiet period, cap under constant writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from webjobsd.discovery.watcher import Debouncer, hint_for_path
from webjobsd.model import JobKey, JobKind

A = JobKey(JobKind.CONTINUOUS, "a")
B = JobKey(JobKind.TRIGGERED, "b")


def test_due_after_quiet_period() -> None:
    debouncer = Debouncer(quiet_s=1.0, cap_s=30.0)
    debouncer.touch(A, 100.0)
    assert debouncer.pop_due(100.9) == set()
    assert debouncer.next_due() == 101.0
    assert debouncer.pop_due(101.0) == {A}
    assert debouncer.next_due() is None


def test_each_event_restarts_the_quiet_period() -> None:
    debouncer = Debouncer(quiet_s=1.0, cap_s=30.0)
    for t in (0.0, 0.5, 1.0, 1.4):
        debouncer.touch(A, t)
        assert debouncer.pop_due(t) == set()
    assert debouncer.pop_due(2.3) == set()
    assert debouncer.pop_due(2.4) == {A}


def test_constant_writes_are_capped() -> None:
    debouncer = Debouncer(quiet_s=1.0, cap_s=5.0)
    t = 0.0
    due: set[object] = set()
    while not due:
        debouncer.touch(A, t)
        t += 0.5
        due = set(debouncer.pop_due(t))
    assert t == 5.0


def test_keys_are_independent() -> None:
    debouncer = Debouncer(quiet_s=1.0, cap_s=30.0)
    debouncer.touch(A, 0.0)
    debouncer.touch(B, 0.8)
    assert debouncer.pop_due(1.0) == {A}
    assert debouncer.pop_due(1.8) == {B}


ROOT = Path("/site/jobs")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/site/jobs/continuous/app/run.sh", JobKey(JobKind.CONTINUOUS, "app")),
        ("/site/jobs/triggered/t/sub/x.py", JobKey(JobKind.TRIGGERED, "t")),
        ("/site/jobs/continuous/app", JobKey(JobKind.CONTINUOUS, "app")),
        ("/site/jobs/continuous", None),
        ("/site/jobs", None),
        ("/site/jobs/continuous/app/.run.sh.swp", False),
        ("/site/jobs/continuous/app/run.sh~", False),
        ("/site/jobs/continuous/app/upload.zip.part", False),
        ("/site/jobs/continuous/app/.git/index", False),
        ("/site/jobs/continuous/app/settings.job", JobKey(JobKind.CONTINUOUS, "app")),
        ("/site/jobs/continuous/app/disable.job", JobKey(JobKind.CONTINUOUS, "app")),
        ("/site/jobs/other/app/run.sh", False),
        ("/elsewhere/x", False),
    ],
)
def test_hint_for_path(path: str, expected: object) -> None:
    assert hint_for_path(ROOT, path) == expected
