"""Results of the scenarios and the table printed at the end of a run."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

SUBJECT = "webjobsd"


@dataclass(frozen=True, slots=True)
class Target:
    """A goal for webjobsd's median; `check(median, reference_median)` decides PASS/MISS."""

    text: str
    check: Callable[[float, float | None], bool]


def at_most(limit: float, unit: str) -> Target:
    return Target(f"<= {limit:g} {unit}", lambda value, _ref: value <= limit)


def ratio_at_least(ratio: float, reference: str) -> Target:
    def check(value: float, ref: float | None) -> bool:
        return ref is not None and ref > 0 and value / ref >= ratio

    return Target(f">= {ratio:g}x {reference}", check)


@dataclass(slots=True)
class Result:
    """One row group of the table: a measured quantity, per system."""

    scenario: str
    unit: str
    values: dict[str, list[float]]
    reference: str = SUBJECT  # the ratio column is relative to this system's median
    target: Target | None = None
    notes: list[str] = field(default_factory=list)
    digits: int = 1
    judged_on: Callable[[list[float]], float] = statistics.median  # e.g. `max`: every sample

    def median(self, system: str) -> float | None:
        values = self.values.get(system) or []
        return statistics.median(values) if values else None

    def verdict(self) -> str:
        values = self.values.get(SUBJECT)
        if self.target is None or not values:
            return ""
        judged = self.judged_on(values)
        return "PASS" if self.target.check(judged, self.median(self.reference)) else "MISS"


HEADER = ("scenario", "system", "median", "min", "max", "n", "ratio", "target", "result")


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _rows(result: Result) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    reference = result.median(result.reference)
    for system, values in result.values.items():
        median = result.median(system)
        ratio = (
            f"{median / reference:.2f}x"
            if median is not None and reference not in (None, 0)
            else "n/a"
        )
        is_subject = system == SUBJECT
        rows.append(
            (
                result.scenario if not rows else "",
                system,
                f"{_number(median, result.digits)} {result.unit}",
                _number(min(values) if values else None, result.digits),
                _number(max(values) if values else None, result.digits),
                str(len(values)),
                ratio,
                result.target.text if is_subject and result.target else "",
                result.verdict() if is_subject else "",
            )
        )
    return rows


def table(results: Sequence[Result]) -> str:
    rows: list[tuple[str, ...]] = [HEADER]
    for result in results:
        rows.extend(_rows(result))
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    right = {2, 3, 4, 5, 6}

    def line(row: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    out = [line(rows[0]), "  ".join("-" * width for width in widths)]
    out += [line(row) for row in rows[1:]]
    return "\n".join(out)


def notes(results: Sequence[Result]) -> str:
    lines = []
    for result in results:
        lines += [f"- {result.scenario}: {note}" for note in result.notes]
    return "\n".join(lines)


def as_json(results: Sequence[Result]) -> list[dict[str, object]]:
    return [
        {
            "scenario": r.scenario,
            "unit": r.unit,
            "reference": r.reference,
            "target": r.target.text if r.target else None,
            "result": r.verdict() or None,
            "values": r.values,
            "notes": r.notes,
        }
        for r in results
    ]
