"""CRON schedules in words: a table of exact sentences, then invariants over random schedules.

The invariants read the sentence back (clock times, weekday and month names, "Every n unit",
hour windows) and compare it with the parsed value sets, so a wrong claim fails the test even
where the exact wording is not pinned.
"""

from __future__ import annotations

import random
import re

import pytest

from webjobsd.runtime.cron import DAY_NAMES, MONTH_NAMES, CronSchedule
from webjobsd.runtime.cronwords import describe

MONTHS = MONTH_NAMES
DAYS = DAY_NAMES


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        # Sub-hour repetition.
        ("* * * * * *", "Every second"),
        ("*/10 * * * * *", "Every 10 seconds"),
        ("0 * * * * *", "Every minute"),
        ("30 * * * * *", "Every minute at second 30"),
        ("0,1 */5 * * * *", "Every 5 minutes at seconds 0 and 1"),
        ("0 */5 * * * *", "Every 5 minutes"),
        ("0 0,30 * * * *", "Every 30 minutes"),  # the same set as */30
        ("0 0 * * * *", "Every hour, on the hour"),
        ("0 15 * * * *", "Every hour at minute 15"),
        ("15 30 * * * *", "Every hour at minute 30, second 15"),
        ("0 5,10,20 * * * *", "Every hour at minutes 5, 10 and 20"),
        ("0 0 */2 * * *", "Every 2 hours, on the hour"),
        # 0 and 45 is */45, but :45 to :00 is 15 minutes: not "every 45 minutes".
        ("0 0,45 * * * *", "Every hour at minutes 0 and 45"),
        ("0 */7 * * * *", "Every hour at minutes 0, 7, 14, 21, 28, 35, 42, 49 and 56"),
        # Clock times.
        ("0 30 9 * * *", "At 09:30 every day"),
        ("0 0 9,17 * * *", "At 09:00 and 17:00 every day"),
        ("0 0 0,8,16 * * *", "At 00:00, 08:00 and 16:00 every day"),
        ("0 0,30 9 * * *", "At 09:00 and 09:30 every day"),
        ("30 0 0 * * *", "At 00:00:30 every day"),
        ("*/30 0 9 * * *", "At 09:00:00 and 09:00:30 every day"),
        # Windows of hours.
        ("0 */5 9-17 * * *", "Every 5 minutes, from 09:00 to 17:59"),
        ("*/15 * 9 * * *", "Every 15 seconds, from 09:00 to 09:59"),
        (
            "30 * 9-11,14-17 * * *",
            "Every minute at second 30, from 09:00 to 11:59 and from 14:00 to 17:59",
        ),
        ("0 0/5 0-2,4,9-11 * * *", "Every 5 minutes, during hours 0-2, 4 and 9-11"),
        ("* 0 0 * * *", "Every second during minute 0 of hour 0"),
        ("*/10 0-4 * * * *", "Every 10 seconds during minutes 0-4 of every hour"),
        # Hour patterns that do not wrap evenly, and plain listings.
        ("0 0 1-23/2 * * *", "Every 2 hours from 01:00 to 23:00"),
        ("0 0 0-23/5 * * *", "Every 5 hours from 00:00 to 20:00"),
        ("0 30 9-17 * * *", "Every hour from 09:30 to 17:30"),
        ("0 0 1,3,4,5,6,9,11,13,20 * * *", "At minute 0 past hours 1, 3-6, 9, 11, 13 and 20"),
        ("0 0 9-11,14-17 * * *", "At minute 0 past hours 9-11 and 14-17"),
        ("5 0,45 1,2,5 * * *", "At minutes 0 and 45, second 5 past hours 1, 2 and 5"),
        # Days of the week.
        ("0 30 9 * * 1-5", "At 09:30, Monday to Friday"),
        ("0 0 10 * * 0,6", "At 10:00, on Sunday and Saturday"),
        ("0 0 0 * * 1,3,5", "At 00:00, on Monday, Wednesday and Friday"),
        ("0 0 0 * * 1-3,5", "At 00:00, on Monday to Wednesday and Friday"),
        ("0 30 9-17 * * Mon-Fri", "Every hour from 09:30 to 17:30, Monday to Friday"),
        ("* * * * * S", "Every second, on Sunday"),  # NCrontab: S is Sunday
        ("0 0 12 * * W", "At 12:00, on Wednesday"),  # and W is Wednesday, not "weekday"
        # Days of the month, and both (NCrontab: both must match).
        ("0 0 0 1 * *", "At 00:00 on day 1 of the month"),
        ("0 0 0 1,15 * *", "At 00:00 on days 1 and 15 of the month"),
        ("0 0 0 13 * 5", "At 00:00 on day 13 of the month, if it is a Friday"),
        ("0 0 0 1-7 * 1", "At 00:00 on days 1-7 of the month, if it is a Monday"),
        ("0 0 0 1 * 0,6", "At 00:00 on day 1 of the month, if it is a Sunday or Saturday"),
        ("0 0 0 1 * 1-5", "At 00:00 on day 1 of the month, if it is Monday to Friday"),
        ("0 0 * 1 * *", "Every hour, on the hour, on day 1 of the month"),
        # Months.
        ("0 0 0 1 1 *", "At 00:00 on day 1 of the month, in January"),
        ("0 0 12 * 3-5 *", "At 12:00 every day, March to May"),
        ("0 0 0 * 1,4,7,10 *", "At 00:00 every day, in January, April, July and October"),
        ("0 0 0 1 Ju *", "At 00:00 on day 1 of the month, in June"),  # NCrontab: Ju is June
        ("0 0 0 13 Jan 5", "At 00:00 on day 13 of the month, in January, if it is a Friday"),
        ("0 */5 * * 12 0", "Every 5 minutes, on Sunday, in December"),
        # Dates that never come, and one that comes every four years.
        (
            "0 0 0 30 2 *",
            "At 00:00 on day 30 of the month, in February (no such date, so it never runs)",
        ),
        (
            "0 0 0 31 4,6 *",
            "At 00:00 on day 31 of the month, in April and June (no such date, so it never runs)",
        ),
        ("0 0 0 29 2 *", "At 00:00 on day 29 of the month, in February"),
    ],
)  # fmt: skip
def test_describe(expression: str, expected: str) -> None:
    assert describe(CronSchedule.parse(expression)) == expected


def test_describes_the_values_not_the_text() -> None:
    """Different texts for the same sets read the same: the words follow what runs."""
    same = ["0 0,15,30,45 * * * *", "0 */15 * * * *", "0 0-59/15 * * * *", "0 0/15 * * * *"]
    assert {describe(CronSchedule.parse(text)) for text in same} == {"Every 15 minutes"}


# -- random schedules --------------------------------------------------------------------------

_FIELD_RANGES = ((0, 59, ()), (0, 59, ()), (0, 23, ()), (1, 31, ()), (1, 12, MONTHS), (0, 6, DAYS))
_CLOCK = re.compile(r"\b\d\d:\d\d(?::\d\d)?\b")
_EVERY = re.compile(r"^Every (?:(\d+) )?(second|minute|hour)s?( from)?")
_WINDOW = re.compile(r"from (\d\d):00 to (\d\d):59")


def _random_value(rng: random.Random, low: int, high: int, names: tuple[str, ...]) -> str:
    value = rng.randint(low, high)
    if names and rng.random() < 0.3:
        name = names[value - low]
        return name if rng.random() < 0.5 else name[:3]
    return str(value)


def _random_field(rng: random.Random, low: int, high: int, names: tuple[str, ...]) -> str:
    draw = rng.random()
    if draw < 0.35:
        return "*"
    if draw < 0.6:
        return _random_value(rng, low, high, names)
    elements = []
    for _ in range(rng.randint(1, 3)):
        step = f"/{rng.randint(1, (high - low) // 2 + 1)}"
        shape = rng.randrange(5)
        if shape == 0:
            elements.append(f"*{step}")
        elif shape == 1:
            elements.append(_random_value(rng, low, high, names))
        elif shape == 2:
            elements.append(f"{_random_value(rng, low, high, names)}{step}")
        else:
            first = _random_value(rng, low, high, names)
            last = _random_value(rng, low, high, names)
            elements.append(f"{first}-{last}{step if shape == 4 else ''}")
    return ",".join(elements)


def _random_schedules(count: int) -> list[CronSchedule]:
    rng = random.Random(20240611)
    return [
        CronSchedule.parse(" ".join(_random_field(rng, *spec) for spec in _FIELD_RANGES))
        for _ in range(count)
    ]


def _named_values(text: str, names: tuple[str, ...]) -> set[int]:
    """The values a sentence names: single names and both ends of `X to Y` runs."""
    alternatives = "|".join(names)
    covered: set[int] = set()
    for first, last in re.findall(rf"\b({alternatives})\b(?: to ({alternatives})\b)?", text):
        start = names.index(first)
        covered.update(range(start, names.index(last or first) + 1))
    return covered


def test_random_schedules_are_described_truthfully() -> None:
    for schedule in _random_schedules(4000):
        try:
            _check_truthful(schedule)
        except AssertionError as error:
            raise AssertionError(f"{schedule.expanded()!r}: {error}") from error


def _check_truthful(schedule: CronSchedule) -> None:
    text = describe(schedule)
    assert text
    assert text == text.strip()
    seconds, minutes, hours = schedule.seconds, schedule.minutes, schedule.hours

    # A handful of times of day are listed, and exactly those.
    if len(hours) * len(minutes) * len(seconds) <= 3:
        times = [(h, m, s) for h in hours for m in minutes for s in seconds]
        with_seconds = seconds != (0,)
        expected = {
            f"{h:02}:{m:02}:{s:02}" if with_seconds else f"{h:02}:{m:02}" for h, m, s in times
        }
        assert set(_CLOCK.findall(text)) == expected

    # "Every n seconds/minutes/hours" holds for every gap, or is bounded by "from first to last".
    if match := _EVERY.match(text):
        step = int(match[1] or 1)
        values, cycle = {"second": (seconds, 60), "minute": (minutes, 60), "hour": (hours, 24)}[
            match[2]
        ]
        if match[3]:
            assert values == tuple(range(values[0], values[-1] + 1, step))
        else:
            assert values == tuple(range(0, cycle, step))

    # Hour windows cover exactly the allowed hours.
    windows = _WINDOW.findall(text)
    if windows:
        covered = {hour for first, last in windows for hour in range(int(first), int(last) + 1)}
        assert covered == set(hours)

    # Weekdays and months: named exactly when restricted, and then exactly the allowed ones.
    weekdays_restricted = len(schedule.days_of_week) < 7
    expected_days = set(schedule.days_of_week) if weekdays_restricted else set()
    assert _named_values(text, DAYS) == expected_days
    expected_months = {m - 1 for m in schedule.months} if len(schedule.months) < 12 else set()
    assert _named_values(text, MONTHS) == expected_months

    # Day-of-month AND day-of-week is spelled out whenever both are restricted.
    days_restricted = len(schedule.days) < 31
    assert ("of the month" in text) == days_restricted
    assert ("if it is" in text) == (days_restricted and weekdays_restricted)
    assert text.startswith("Every second") == (len(seconds) == 60)
