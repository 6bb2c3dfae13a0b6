"""The reconcile plan as a table: desired x actual → actions, stops before starts."""

from __future__ import annotations

import pytest

from webjobsd.model import JobKey, JobKind
from webjobsd.runtime.reconciler import Action, ActionKind, Actual, Desired, plan

A = JobKey(JobKind.CONTINUOUS, "a")
B = JobKey(JobKind.CONTINUOUS, "b")
C = JobKey(JobKind.CONTINUOUS, "c")


@pytest.mark.parametrize(
    ("desired", "actual", "expected"),
    [
        pytest.param({}, {}, [], id="nothing"),
        pytest.param({A: Desired("f1", True)}, {}, [Action(ActionKind.ADD, A)], id="new job"),
        pytest.param(
            {A: Desired("f1", False)}, {}, [Action(ActionKind.ADD, A)], id="new disabled job"
        ),
        pytest.param({}, {A: Actual("f1", True)}, [Action(ActionKind.RETIRE, A)], id="removed"),
        pytest.param({A: Desired("f1", True)}, {A: Actual("f1", True)}, [], id="in step"),
        pytest.param(
            {A: Desired("f2", True)},
            {A: Actual("f1", True)},
            [Action(ActionKind.REPLACE, A)],
            id="files changed",
        ),
        pytest.param(
            {A: Desired("f2", False)},
            {A: Actual("f1", True)},
            [Action(ActionKind.REPLACE, A)],
            id="changed and disabled: one replace carries both",
        ),
        pytest.param(
            {A: Desired("f1", False)},
            {A: Actual("f1", True)},
            [Action(ActionKind.STOP, A)],
            id="disabled",
        ),
        pytest.param(
            {A: Desired("f1", True)},
            {A: Actual("f1", False)},
            [Action(ActionKind.START, A)],
            id="enabled",
        ),
        pytest.param(
            {B: Desired("f", True), C: Desired("f", False)},
            {A: Actual("f", True), C: Actual("f", True)},
            [Action(ActionKind.RETIRE, A), Action(ActionKind.STOP, C), Action(ActionKind.ADD, B)],
            id="stops and removals come before starts",
        ),
    ],
)
def test_plan(
    desired: dict[JobKey, Desired], actual: dict[JobKey, Actual], expected: list[Action]
) -> None:
    assert plan(desired, actual) == expected
