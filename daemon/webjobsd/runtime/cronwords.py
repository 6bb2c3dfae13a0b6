"""CRON schedules in plain English for the dashboard: `describe(schedule)`.

Owns: one short sentence for a parsed `CronSchedule`, such as "At 09:30, Monday to Friday" or
"Every 5 minutes, from 09:00 to 17:59". Times are 24-hour `HH:MM`, or `HH:MM:SS` when any
allowed second is not 0. Where no pattern fits, the sentence lists the values (runs of three or
more collapsed to `3-6` or `Monday to Friday`); it may be long then, but never wrong.

Must not: read a clock, do I/O, or raise for any valid `CronSchedule`. It is a pure function of
the value sets, so it is tested by tables and by random schedules.

Why the parsed sets and not the text (or a library such as cron-descriptor): the words must say
what actually runs. A describer of the text re-parses it with its own rules: other name handling
(NCrontab reads `Ju` as June and `W` as Wednesday), Vixie cron's OR of day-of-month and
day-of-week where NCrontab requires both, five-field or Quartz assumptions (what a sixth field
means, which number is Sunday), steps such as `*/0` that `cron.py` rejects. Any of these would
make the dashboard disagree with the scheduler. Describing the sets that `cron.py` matches
against removes that class of mismatch by construction.
"""

from __future__ import annotations

import calendar
from collections.abc import Callable, Sequence
from itertools import pairwise

from webjobsd.runtime.cron import DAY_NAMES, MONTH_NAMES, CronSchedule

__all__ = ["describe"]

# A schedule with at most this many times of day is described by listing them ("At 09:00 and
# 17:00"); past that a pattern ("Every 2 hours") reads better.
_MAX_LISTED_TIMES = 3


def _day_name(day_of_week: int) -> str:
    return DAY_NAMES[day_of_week]


def _month_name(month: int) -> str:
    return MONTH_NAMES[month - 1]


def _runs(values: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive values grouped as (first, last)."""
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs


def _join(items: Sequence[str], conjunction: str = "and") -> str:
    if len(items) == 1:
        return items[0]
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}"


def _listing(
    values: Sequence[int], render: Callable[[int], str], dash: str, conjunction: str = "and"
) -> str:
    """The values in words, runs of three or more as `first{dash}last`."""
    items: list[str] = []
    for first, last in _runs(values):
        if last - first >= 2:
            items.append(f"{render(first)}{dash}{render(last)}")
        else:
            items.extend(render(value) for value in range(first, last + 1))
    return _join(items, conjunction)


def _numbers(unit: str, values: Sequence[int]) -> str:
    """`minute 5`, `minutes 5, 10 and 20`, `hours 1, 3-6 and 9`."""
    plural = "s" if len(values) > 1 else ""
    return f"{unit}{plural} {_listing(values, str, '-')}"


def _named(values: Sequence[int], render: Callable[[int], str], preposition: str) -> str:
    """`Monday to Friday` for a single run, else `on Sunday and Saturday` / `in January`."""
    runs = _runs(values)
    if len(runs) == 1 and runs[0][1] - runs[0][0] >= 2:
        return f"{render(runs[0][0])} to {render(runs[0][1])}"
    return f"{preposition} {_listing(values, render, ' to ')}"


def _step(values: Sequence[int], cycle: int) -> int | None:
    """n when the values are every n-th from 0 and n divides the cycle, else None.

    Only then is the gap n between *every* two runs, across the wrap too: minutes 0 and 45 are
    `*/45`, but the gap from :45 to the next :00 is 15, so they are not "every 45 minutes".
    """
    if len(values) < 2:
        return None
    step = values[1] - values[0]
    if values[0] == 0 and cycle % step == 0 and tuple(values) == tuple(range(0, cycle, step)):
        return step
    return None


def _every(step: int, unit: str) -> str:
    return f"Every {unit}" if step == 1 else f"Every {step} {unit}s"


def _clock(hour: int, minute: int, second: int, with_seconds: bool) -> str:
    return f"{hour:02}:{minute:02}:{second:02}" if with_seconds else f"{hour:02}:{minute:02}"


def _hour_window(hours: Sequence[int]) -> str:
    """Where a lead shorter than an hour applies: nothing, clock ranges, or a list of hours."""
    if len(hours) == 24:
        return ""
    runs = _runs(hours)
    if len(runs) > 2:
        return f", during {_numbers('hour', hours)}"
    return ", " + " and ".join(f"from {first:02}:00 to {last:02}:59" for first, last in runs)


def _past_hour(minutes: Sequence[int], seconds: Sequence[int]) -> str:
    if seconds == (0,):
        return _numbers("minute", minutes)
    return f"{_numbers('minute', minutes)}, {_numbers('second', seconds)}"


def _time_of_day(schedule: CronSchedule) -> tuple[str, bool]:
    """The time phrase, and whether it lists clock times (then "every day" reads naturally)."""
    seconds, minutes, hours = schedule.seconds, schedule.minutes, schedule.hours
    with_seconds = seconds != (0,)
    if len(seconds) * len(minutes) * len(hours) <= _MAX_LISTED_TIMES:
        times = [_clock(h, m, s, with_seconds) for h in hours for m in minutes for s in seconds]
        return f"At {_join(times)}", True
    # The lead is the finest field that repeats evenly; the coarser fields then narrow it down.
    second_step = _step(seconds, 60)
    if second_step is not None:
        lead = _every(second_step, "second")
        if len(minutes) == 60:
            return lead + _hour_window(hours), False
        of_hours = "every hour" if len(hours) == 24 else _numbers("hour", hours)
        return f"{lead} during {_numbers('minute', minutes)} of {of_hours}", False
    minute_step = _step(minutes, 60)
    if minute_step is not None:
        at_seconds = "" if seconds == (0,) else f" at {_numbers('second', seconds)}"
        return _every(minute_step, "minute") + at_seconds + _hour_window(hours), False
    hour_step = _step(hours, 24)
    if hour_step is not None:
        on_hour = minutes == (0,) and seconds == (0,)
        past = ", on the hour" if on_hour else f" at {_past_hour(minutes, seconds)}"
        return _every(hour_step, "hour") + past, False
    gaps = {later - earlier for earlier, later in pairwise(hours)}
    if len(minutes) == len(seconds) == 1 and len(gaps) == 1:
        # Evenly spaced hours that do not wrap evenly (1-23/2, 9-17): bounded by the first and
        # last run, so the gap over midnight is not claimed.
        first = _clock(hours[0], minutes[0], seconds[0], with_seconds)
        last = _clock(hours[-1], minutes[0], seconds[0], with_seconds)
        return f"{_every(gaps.pop(), 'hour')} from {first} to {last}", False
    return f"At {_past_hour(minutes, seconds)} past {_numbers('hour', hours)}", False


def describe(schedule: CronSchedule) -> str:
    """One English sentence for what `schedule` runs, e.g. "At 09:30, Monday to Friday"."""
    text, lists_times = _time_of_day(schedule)
    days, months, weekdays = schedule.days, schedule.months, schedule.days_of_week
    if len(days) < 31:
        text += f"{' ' if lists_times else ', '}on {_numbers('day', days)} of the month"
    elif len(weekdays) < 7:
        text += ", " + _named(weekdays, _day_name, "on")
    elif lists_times:
        text += " every day"
    if len(months) < 12:
        text += ", " + _named(months, _month_name, "in")
    if len(days) < 31 and len(weekdays) < 7:
        # NCrontab needs both to match (not cron's OR): say so, or "day 13" reads as every 13th.
        names = _listing(weekdays, _day_name, " to ", "or")
        text += f", if it is {'' if ' to ' in names else 'a '}{names}"
    # Year 2000 is a leap year, so February counts its 29th: such a date does come round.
    if all(days[0] > calendar.monthrange(2000, month)[1] for month in months):
        text += " (no such date, so it never runs)"
    return text
