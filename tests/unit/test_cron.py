"""CRON schedules as tables: parsing, display form, next occurrence, DST, Kudu's next-interval rule.

Every instant here is a fixed datetime; nothing reads a clock. Kudu's own facts
(`Kudu.Core.Test/Jobs/ScheduleFacts.cs`) are translated first, with their test names in the ids;
NCrontab's (`NCrontab.Tests/CrontabScheduleTests.cs`, six-part cases) where they add something.
"""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

import pytest

from webjobsd.runtime import cron
from webjobsd.runtime.cron import (
    MISSED_GRACE,
    CronError,
    CronSchedule,
    NextRun,
    UnknownTimeZoneError,
    next_interval,
    resolve_timezone,
)

LA = ZoneInfo("America/Los_Angeles")  # Kudu's facts were written for Pacific time
NY = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")

H = timedelta(hours=1)
M = timedelta(minutes=1)
S = timedelta(seconds=1)
D = timedelta(days=1)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def kudu_adjusted(interval: timedelta, now: datetime) -> timedelta:
    """Kudu's `GetTimeZoneAdjustedInterval`: a wall-clock interval as elapsed time in now's zone."""
    later = (now.replace(tzinfo=None) + interval).replace(tzinfo=now.tzinfo)
    now_offset, later_offset = now.utcoffset(), later.utcoffset()
    assert now_offset is not None and later_offset is not None
    return interval + (now_offset - later_offset)


# -- Kudu ScheduleFacts ------------------------------------------------------------------------

# now is always 00:00:00 1/1/2015 local; rows are (cron, last schedule (local), expected,
# ignoreMissed). Local times are written naive and given each test's zone.
KUDU_NOW = datetime(2015, 1, 1)
KUDU_ROWS = [
    ("10 * * * * *", datetime(2015, 1, 1, 0, 0), 10 * S, False),
    ("0 1 * * * *", datetime(2015, 1, 1, 0, 0), M, False),
    ("5 1 * * * *", datetime(2015, 1, 1, 0, 0), M + 5 * S, False),
    ("0 0 2 * * *", datetime(2015, 1, 1, 0, 0), 2 * H, False),
    ("* * * 3 * *", datetime(2015, 1, 1, 0, 0), 2 * D, False),
    ("* * * * 2 *", datetime(2015, 1, 1, 0, 0), 31 * D, False),
    ("* * * * 3 *", datetime(2015, 1, 1, 0, 0), 59 * D, False),
    ("* * * * 4 *", datetime(2015, 1, 1, 0, 0), 90 * D, False),
    ("10 * * * * *", datetime(2014, 1, 1, 0, 0), 10 * S, False),
    ("0 */5 * * * *", datetime(2014, 12, 31, 23, 0), 5 * M, False),
    ("0 */2 * * * *", datetime(2014, 12, 31, 23, 57), timedelta(0), False),
    ("0 */2 * * * *", datetime(2014, 12, 31, 23, 49), timedelta(0), False),
    ("0 */2 * * * *", datetime(2014, 12, 31, 23, 47), 2 * M, False),
    ("0 */2 * * * *", datetime(2014, 12, 31, 23, 47), timedelta(0), True),
    ("10 * * * * *", datetime(2015, 1, 1, 0, 0), 10 * S, True),
]


@pytest.mark.parametrize("tz", [LA, UTC, BERLIN], ids=str)
@pytest.mark.parametrize(
    ("expression", "last", "expected", "ignore_missed"),
    [
        pytest.param(*row, id=f"ScheduleProvidesNextIntervalCorrectly[{row[0]}|{row[1]}|{row[3]}]")
        for row in KUDU_ROWS
    ],
)
def test_kudu_schedule_provides_next_interval_correctly(
    expression: str,
    last: datetime,
    expected: timedelta,
    ignore_missed: bool,
    tz: tzinfo,
) -> None:
    now = KUDU_NOW.replace(tzinfo=tz)
    last_run = last.replace(tzinfo=tz)
    result = next_interval(
        CronSchedule.parse(expression), last_run=last_run, now=now, ignore_missed=ignore_missed
    )
    assert result is not None
    assert result.delay == kudu_adjusted(expected, now)


@pytest.mark.parametrize(
    ("expression", "last", "missed", "most_recent"),
    [
        pytest.param(
            "10 * * * * *",
            datetime(2014, 1, 1, 0, 0),
            365 * 24 * 60,  # every minute of 2014, counted without walking them
            datetime(2014, 12, 31, 23, 59, 10),
            id="ScheduleProvidesNextIntervalCorrectly[10 * * * * *|2014]",
        ),
        pytest.param(
            "0 */5 * * * *",
            datetime(2014, 12, 31, 23, 0),
            11,  # 23:05 ... 23:55
            datetime(2014, 12, 31, 23, 55),
            id="ScheduleProvidesNextIntervalCorrectly[0 */5|23:00]",
        ),
        pytest.param(
            "0 */2 * * * *",
            datetime(2014, 12, 31, 23, 47),
            6,  # 23:48 ... 23:58
            datetime(2014, 12, 31, 23, 58),
            id="ScheduleProvidesNextIntervalCorrectly[0 */2|23:47]",
        ),
    ],
)
def test_kudu_missed_rows_report_the_warning_numbers(
    expression: str, last: datetime, missed: int, most_recent: datetime
) -> None:
    """The Kudu rows that log `Missed {count} schedules, most recent at {time}`."""
    now = KUDU_NOW.replace(tzinfo=LA)
    result = next_interval(
        CronSchedule.parse(expression),
        last_run=last.replace(tzinfo=LA),
        now=now,
        ignore_missed=False,
    )
    assert result is not None
    assert (result.missed, result.most_recent_missed) == (
        missed,
        most_recent.replace(tzinfo=LA),
    )


@pytest.mark.parametrize("tz", [LA, UTC, BERLIN], ids=str)
def test_kudu_get_next_interval_next_after_dst(tz: tzinfo) -> None:
    """GetNextInterval_NextAfterDST_ReturnsExpectedValue: a week is 167 h across Pacific DST."""
    now = datetime(2018, 3, 9, 18, 0, tzinfo=tz)  # a Friday
    result = next_interval(
        CronSchedule.parse("0 0 18 * * 5"), last_run=now, now=now, ignore_missed=True
    )
    assert result is not None
    assert result.delay == kudu_adjusted(168 * H, now)
    if tz is LA:
        assert result.delay == 167 * H


@pytest.mark.parametrize("tz", [LA, UTC, BERLIN], ids=str)
def test_kudu_get_next_interval_next_within_dst(tz: tzinfo) -> None:
    """GetNextInterval_NextWithinDST_ReturnsExpectedValue: 02:59 does not exist; still 1 hour."""
    now = datetime(2018, 3, 11, 1, 59, tzinfo=tz)
    result = next_interval(
        CronSchedule.parse("0 59 * * * *"), last_run=now, now=now, ignore_missed=True
    )
    assert result == NextRun(H, 0, None)


# -- parsing and the display form --------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expanded"),
    [
        # Part B §6.2 examples.
        ("*/10 * * * * *", "0,10,20,30,40,50 * * * * *"),
        ("0 */5 * * * *", "0 0,5,10,15,20,25,30,35,40,45,50,55 * * * *"),
        ("0 0 0 * * 1-5", "0 0 0 * * 1-5"),
        # NCrontab Formatting (six-part).
        ("* * * * * *", "* * * * * *"),
        ("1 * 1-2,3 * * *", "1 * 1-3 * * *"),
        ("22 * * * */2 *", "22 * * * 1,3,5,7,9,11 *"),
        ("33 10-40/15 * * * *", "33 10,25,40 * * * *"),
        ("55 * * * Mar,Jan,Aug Fri,Mon-Tue", "55 * * * 1,3,8 1-2,5"),
        # A run of two prints as a range; a full range prints as `*`, however it was written.
        ("0 1,2 * * * *", "0 1-2 * * * *"),
        ("0 1,3 * * * *", "0 1,3 * * * *"),
        ("*/1 0-59 0-23/1 1-31 jan-dec sun-sat", "* * * * * *"),
        ("0 0 0 * * 0-6", "0 0 0 * * *"),
        ("59,58,57 * * * * *", "57-59 * * * * *"),
        ("0 0 0 1,1,1 * *", "0 0 0 1 * *"),
        # Steps: `a/n` runs to the field's maximum; `a/1` too (NCrontab 2.0.0 read it as `a`).
        ("5/20 * * * * *", "5,25,45 * * * * *"),
        ("5/1 * * * * *", "5-59 * * * * *"),
        ("58/5 * * * * *", "58 * * * * *"),
        ("0 0 0 * 2/3 *", "0 0 0 * 2,5,8,11 *"),
        ("0 0 0 * * 1-5/2", "0 0 0 * * 1,3,5"),
        ("*/100 * * * * *", "0 * * * * *"),
        # A reversed range is swapped (NCrontab), not wrapped around midnight.
        ("0 0 22-2 * * *", "0 0 2-22 * * *"),
        ("0 0 0 * * fri-mon", "0 0 0 * * 1-5"),
        # Leading zeros; any whitespace between fields.
        ("00 05 007 * * *", "0 5 7 * * *"),
        ("  0\t0  0 *  * *\n", "0 0 0 * * *"),
    ],
)
def test_expanded(expression: str, expanded: str) -> None:
    schedule = CronSchedule.parse(expression)
    assert schedule.expanded() == expanded
    assert str(schedule) == expanded
    assert CronSchedule.parse(expanded) == schedule


@pytest.mark.parametrize(
    ("month", "value"),
    [
        ("Jan", 1),
        ("January", 1),
        ("JANUARY", 1),
        ("j", 1),  # the first name in calendar order that starts with it
        ("Ju", 6),
        ("Jul", 7),
        ("Ma", 3),
        ("may", 5),
        ("A", 4),
        ("Au", 8),
        ("Augu", 8),
        ("SEPT", 9),
        ("s", 9),
        ("o", 10),
        ("N", 11),
        ("DECEM", 12),
        ("F", 2),
    ],
)
def test_month_names_match_by_prefix(month: str, value: int) -> None:
    assert CronSchedule.parse(f"0 0 0 1 {month} *").months == (value,)


@pytest.mark.parametrize(
    ("weekday", "value"),
    [
        ("Sun", 0),
        ("sunday", 0),
        ("S", 0),  # Sunday comes before Saturday
        ("Sa", 6),
        ("M", 1),
        ("T", 2),  # Tuesday comes before Thursday
        ("Th", 4),
        ("W", 3),  # Wednesday: `W` is a prefix, not Quartz's "weekday"
        ("FRI", 5),
        ("F", 5),
    ],
)
def test_weekday_names_match_by_prefix(weekday: str, value: int) -> None:
    assert CronSchedule.parse(f"0 0 0 * * {weekday}").days_of_week == (value,)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        pytest.param("* * * * *", "expected 6 fields", id="5 fields"),
        pytest.param("* * * * *", "found 5", id="5 fields count"),
        pytest.param("* * * * * * *", "found 7", id="7 fields"),
        pytest.param("", "found 0", id="empty"),
        pytest.param("@hourly", "macros such as @hourly are not supported", id="macro"),
        # Out of range, per field (NCrontab OutOfRangeField and friends).
        pytest.param("60 * * * * *", "second field '60': 60 is out of range 0-59", id="sec 60"),
        pytest.param("* 1,2,3,456,7 * * * *", "minute field '1,2,3,456,7': 456", id="min 456"),
        pytest.param("* * 24 * * *", "hour field '24': 24 is out of range 0-23", id="hour 24"),
        pytest.param("* * * 0 * *", "day-of-month field '0': 0 is out of range 1-31", id="day 0"),
        pytest.param("* * * 32 * *", "day-of-month field '32'", id="day 32"),
        pytest.param("* * * * 0 *", "month field '0': 0 is out of range 1-12", id="month 0"),
        pytest.param("* * * * 13 *", "month field '13'", id="month 13"),
        pytest.param("* * * * * 7", "day-of-week field '7': 7 is out of range 0-6", id="dow 7"),
        pytest.param("* * * * * 0-7", "day-of-week field '0-7'", id="dow range to 7"),
        pytest.param("* * * 0/5 * *", "day-of-month field '0/5'", id="a/n below min"),
        pytest.param("9999999999 * * * * *", "'9999999999' is not a number", id="10 digits"),
        # Steps.
        pytest.param("*/0 * * * * *", "step '0' must be a whole number of at least 1", id="*/0"),
        pytest.param("5/0 * * * * *", "step '0'", id="a/0"),
        pytest.param("1-5/0 * * * * *", "step '0'", id="a-b/0"),
        pytest.param("*/-1 * * * * *", "step '-1'", id="negative step"),
        pytest.param("*/+5 * * * * *", "step '+5'", id="signed step"),
        pytest.param("* 1/Z * * * *", "minute field '1/Z': step 'Z'", id="NonNumericFieldInterval"),
        pytest.param("*/ * * * * *", "step ''", id="empty step"),
        pytest.param("*/5/2 * * * * *", "step '5/2'", id="two steps"),
        pytest.param("/5 * * * * *", "missing before '/'", id="no range before step"),
        # Values and names.
        pytest.param("bad * * * * *", "second field 'bad': 'bad' is not a number", id="BadSeconds"),
        pytest.param("* * 3-l2 * * *", "hour field '3-l2': 'l2'", id="NonNumericRangeComponent"),
        pytest.param("* * 1,Z,3,4 * * *", "hour field '1,Z,3,4': 'Z'", id="NonNumberValue"),
        pytest.param("* * * * Foo *", "month field 'Foo': 'Foo' is neither", id="bad month"),
        pytest.param("* * * * jan-foo *", "month field 'jan-foo': 'foo'", id="bad month range"),
        pytest.param("* * * * * Mondays", "'Mondays' is neither", id="longer than the name"),
        pytest.param("* * * * * mon,bad,wed", "day-of-week field 'mon,bad,wed'", id="BadDow"),
        pytest.param("* * * * * 1mon", "'1mon' is not a number", id="digit then letters"),
        pytest.param("1,,2 * * * * *", "empty element", id="empty list element"),
        pytest.param(",5 * * * * *", "empty element", id="leading comma"),
        pytest.param("5, * * * * *", "empty element", id="trailing comma"),
        pytest.param("5- * * * * *", "a value is missing", id="open range"),
        pytest.param("-5 * * * * *", "a value is missing", id="negative"),
        pytest.param("1-2-3 * * * * *", "'2-3' is not a number", id="double range"),
        pytest.param("*-5 * * * * *", "'*' is not a number", id="star range"),
        pytest.param("\u0663 * * * * *", "is not a number", id="non-ASCII digit"),
        # Quartz and Vixie extensions.
        pytest.param("0 0 0 ? * *", "(?, L, W and # are not supported)", id="? in day"),
        pytest.param("0 0 0 * * ?", "(?, L, W and # are not supported)", id="? in weekday"),
        pytest.param("0 0 0 L * *", "(?, L, W and # are not supported)", id="L"),
        pytest.param("0 0 0 15W * *", "(?, L, W and # are not supported)", id="15W"),
        pytest.param("0 0 0 * * 5L", "(?, L, W and # are not supported)", id="5L"),
        pytest.param("0 0 0 * * 5#3", "(?, L, W and # are not supported)", id="5#3"),
    ],
)
def test_parse_errors(expression: str, message: str) -> None:
    with pytest.raises(CronError) as caught:
        CronSchedule.parse(expression)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param(((), (0,), (0,), (1,), (1,), (0,)), "second field: no values", id="empty"),
        pytest.param(((1, 0), (0,), (0,), (1,), (1,), (0,)), "sorted", id="unsorted"),
        pytest.param(((0,), (0,), (0,), (0,), (1,), (0,)), "in 1-31", id="day 0"),
        pytest.param(((0,), (0,), (0,), (1,), (1,), (7,)), "in 0-6", id="dow 7"),
    ],
)
def test_constructor_checks_values(fields: tuple[tuple[int, ...], ...], message: str) -> None:
    with pytest.raises(CronError, match=message):
        CronSchedule(*fields)


# -- next occurrence (UTC: no DST) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "base", "expected"),
    [
        # Strictly after, one-second resolution: the fraction is dropped, then one second added.
        pytest.param("10 * * * * *", utc(2003, 1, 1, 0, 0, 10), utc(2003, 1, 1, 0, 1, 10), id="on"),
        pytest.param(
            "10 * * * * *",
            utc(2003, 1, 1, 0, 0, 9, 999999),
            utc(2003, 1, 1, 0, 0, 10),
            id="just before",
        ),
        pytest.param(
            "10 * * * * *",
            utc(2003, 1, 1, 0, 0, 10, 500000),
            utc(2003, 1, 1, 0, 1, 10),
            id="fraction after",
        ),
        pytest.param(
            "* * * * * *", utc(2003, 1, 1, 0, 0, 0, 700000), utc(2003, 1, 1, 0, 0, 1), id="1 s"
        ),
        pytest.param(
            "* * * * * *", utc(2003, 12, 31, 23, 59, 59), utc(2004, 1, 1), id="second rolls year"
        ),
        # NCrontab Evaluations, six-part.
        pytest.param("45 * * * * *", utc(2003, 1, 1), utc(2003, 1, 1, 0, 0, 45), id="NC 45"),
        pytest.param(
            "45-47,48,49 * * * * *",
            utc(2003, 1, 1, 0, 0, 49),
            utc(2003, 1, 1, 0, 1, 45),
            id="NC list wraps minute",
        ),
        pytest.param(
            "2/5 * * * * *", utc(2003, 1, 1, 0, 0, 57), utc(2003, 1, 1, 0, 1, 2), id="NC 2/5"
        ),
        pytest.param(
            "6 45-47,48,49 * * * *",
            utc(2003, 1, 1, 0, 49, 30),
            utc(2003, 1, 1, 1, 45, 6),
            id="NC minute list",
        ),
        pytest.param(
            "9 2/5 * * * *",
            utc(2003, 1, 1, 0, 57, 30),
            utc(2003, 1, 1, 1, 2, 9),
            id="NC minute a/n",
        ),
        pytest.param(
            "0 10 * * 6 *", utc(2003, 12, 1, 5), utc(2004, 6, 1, 0, 10), id="NC month, next year"
        ),
        pytest.param(
            "0 * * * February,April-Jun *",
            utc(2002, 7, 1, 5),
            utc(2003, 2, 1),
            id="NC month names",
        ),
        pytest.param(
            "0 30 6 * * sunday", utc(2003, 6, 26, 10), utc(2003, 6, 29, 6, 30), id="NC sunday"
        ),
        pytest.param(
            "0 45 16 1 * Mon", utc(2003, 1, 1, 12), utc(2003, 9, 1, 16, 45), id="NC 1st on Monday"
        ),
        pytest.param(
            "0 1 12 29 2 *", utc(2000, 2, 29, 12, 1), utc(2004, 2, 29, 12, 1), id="NC leap day"
        ),
        pytest.param(
            "0 1 12 28 2 *", utc(2004, 2, 29, 12, 1), utc(2005, 2, 28, 12, 1), id="NC 28 Feb"
        ),
        pytest.param(
            "0 0 0 15,30,31 * *", utc(2000, 1, 31), utc(2000, 2, 15), id="NC 30/31 in February"
        ),
        pytest.param(
            "0 0 0 15,30,31 * *", utc(2000, 4, 30), utc(2000, 5, 15), id="NC 31 skips April"
        ),
        # NCrontab 2.0.0 (Kudu's) kept the old second when the minute moved on: 00:05:20.
        pytest.param(
            "10,20 5 * * * *",
            utc(2003, 1, 1, 0, 3, 15),
            utc(2003, 1, 1, 0, 5, 10),
            id="second resets when the minute moves",
        ),
        pytest.param(
            "10,20 0 * * * *",
            utc(2003, 1, 1, 0, 5, 15),
            utc(2003, 1, 1, 1, 0, 10),
            id="second resets when the hour moves",
        ),
        # Day-of-month AND day-of-week.
        pytest.param(
            "0 0 0 13 * 5", utc(2024, 1, 1), utc(2024, 9, 13), id="Friday the 13th, not OR"
        ),
        pytest.param("0 0 0 13 * 5", utc(2024, 9, 13), utc(2024, 12, 13), id="next Friday 13th"),
        pytest.param(
            "0 0 0 29 2 1", utc(2016, 3, 1), utc(2044, 2, 29), id="29 February on a Monday"
        ),
        pytest.param("0 0 0 31 * *", utc(2024, 1, 31), utc(2024, 3, 31), id="31st skips Feb"),
        pytest.param("0 0 0 1 1 *", utc(2024, 6, 1), utc(2025, 1, 1), id="yearly"),
        pytest.param(
            "0 0 0 1 1 *", utc(2024, 12, 31, 23, 59, 59, 999999), utc(2025, 1, 1), id="yearly edge"
        ),
        # Never.
        pytest.param("0 0 0 30 2 *", utc(2024, 1, 1), None, id="30 February never"),
        pytest.param("* * * 31 4 *", utc(2024, 1, 1), None, id="31 April never"),
        pytest.param("0 0 0 31 2,4,6,9,11 *", utc(2024, 1, 1), None, id="31 in short months"),
        pytest.param("0 0 0 1 1 *", utc(9999, 6, 1), None, id="past year 9999"),
        pytest.param("* * * * * *", utc(9999, 12, 31, 23, 59, 59), None, id="last second"),
    ],
)
def test_next_after(expression: str, base: datetime, expected: datetime | None) -> None:
    assert CronSchedule.parse(expression).next_after(base) == expected


@pytest.mark.parametrize(
    "expression",
    ["*/7 */13 * * * *", "0 0 */5 * * *", "30 15 9 1-7 * 1", "0 0 0 13 * 5", "17 3 4 * 2 *"],
)
def test_chained_occurrences_match_and_counts_agree(expression: str) -> None:
    """Walk 300 occurrences: each matches every field, and the missed count sees each one."""
    schedule = CronSchedule.parse(expression)
    start = utc(2023, 12, 30, 22, 11, 5)
    chain: list[datetime] = []
    moment = start
    for _ in range(300):
        found = schedule.next_after(moment)
        assert found is not None and found > moment
        assert found.second in schedule.seconds and found.minute in schedule.minutes
        assert found.hour in schedule.hours and found.day in schedule.days
        assert found.month in schedule.months
        assert (found.weekday() + 1) % 7 in schedule.days_of_week
        chain.append(found)
        moment = found
    now = chain[-1] + S  # just after the last one
    result = next_interval(schedule, last_run=start, now=now, ignore_missed=False)
    assert result is not None
    assert (result.missed, result.most_recent_missed) == (len(chain), chain[-1])


def test_next_after_needs_an_aware_base() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        CronSchedule.parse("* * * * * *").next_after(datetime(2024, 1, 1))


def test_next_after_keeps_the_time_zone() -> None:
    found = CronSchedule.parse("0 0 9 * * *").next_after(datetime(2024, 7, 1, 12, tzinfo=BERLIN))
    assert found == datetime(2024, 7, 2, 9, tzinfo=BERLIN)
    assert found is not None and found.tzinfo is BERLIN


# -- DST -----------------------------------------------------------------------------------------
# 2024 transitions: New York 10 Mar 02:00 EST -> 03:00 EDT and 3 Nov 02:00 EDT -> 01:00 EST;
# Berlin 31 Mar 02:00 CET -> 03:00 CEST and 27 Oct 03:00 CEST -> 02:00 CET.


def chain_utc(expression: str, start: datetime, count: int) -> list[datetime]:
    schedule = CronSchedule.parse(expression)
    found: list[datetime] = []
    moment = start
    for _ in range(count):
        following = schedule.next_after(moment)
        assert following is not None
        assert following.tzinfo is start.tzinfo
        found.append(following.astimezone(UTC))
        moment = following
    return found


@pytest.mark.parametrize(
    ("expression", "start", "expected_utc"),
    [
        # Spring forward: the missing 02:30 fires at 03:30 (moved forward by the gap), once.
        pytest.param(
            "0 30 2 * * *",
            datetime(2024, 3, 9, 2, 30, tzinfo=NY),
            [utc(2024, 3, 10, 7, 30), utc(2024, 3, 11, 6, 30)],
            id="New York daily 02:30 on the spring-forward day fires at 03:30 EDT",
        ),
        pytest.param(
            "0 30 2 * * *",
            datetime(2024, 3, 30, 2, 30, tzinfo=BERLIN),
            [utc(2024, 3, 31, 1, 30), utc(2024, 4, 1, 0, 30)],
            id="Berlin daily 02:30 on the spring-forward day fires at 03:30 CEST",
        ),
        # Fall back: the doubled wall time fires once, at its second (standard-time) instant.
        pytest.param(
            "0 30 1 * * *",
            datetime(2024, 11, 2, 1, 30, tzinfo=NY),
            [utc(2024, 11, 3, 6, 30), utc(2024, 11, 4, 6, 30)],
            id="New York daily 01:30 fires once, at 01:30 EST",
        ),
        pytest.param(
            "0 30 2 * * *",
            datetime(2024, 10, 26, 2, 30, tzinfo=BERLIN),
            [utc(2024, 10, 27, 1, 30), utc(2024, 10, 28, 1, 30)],
            id="Berlin daily 02:30 fires once, at 02:30 CET",
        ),
        pytest.param(
            "0 30 1 * * *",
            datetime(2024, 11, 3, 1, 10, tzinfo=NY),  # fold=0: the first, EDT, pass
            [utc(2024, 11, 3, 6, 30), utc(2024, 11, 4, 6, 30)],
            id="from inside the first pass, 01:30 EDT is skipped for 01:30 EST",
        ),
        pytest.param(
            "0 30 1 * * *",
            datetime(2024, 11, 3, 1, 40, tzinfo=NY, fold=1),  # the second, EST, pass
            [utc(2024, 11, 4, 6, 30)],
            id="after 01:30 EST it is tomorrow",
        ),
        # Hourly across the transitions, in absolute time.
        pytest.param(
            "0 0 * * * *",
            datetime(2024, 3, 10, 0, 0, tzinfo=NY),
            [utc(2024, 3, 10, 6), utc(2024, 3, 10, 7), utc(2024, 3, 10, 8)],
            id="New York hourly, spring: 01:00 EST, 03:00 EDT (the missing 02:00), 04:00 EDT",
        ),
        pytest.param(
            "0 0 * * * *",
            datetime(2024, 11, 3, 0, 0, tzinfo=NY),
            [utc(2024, 11, 3, 6), utc(2024, 11, 3, 7), utc(2024, 11, 3, 8)],
            id="New York hourly, fall: 01:00 EST (not EDT), 02:00 EST, 03:00 EST",
        ),
        pytest.param(
            "0 0 * * * *",
            datetime(2024, 3, 31, 0, 0, tzinfo=BERLIN),
            [utc(2024, 3, 31, 0), utc(2024, 3, 31, 1), utc(2024, 3, 31, 2)],
            id="Berlin hourly, spring: 01:00 CET, 03:00 CEST (the missing 02:00), 04:00 CEST",
        ),
        pytest.param(
            "0 0 * * * *",
            datetime(2024, 10, 27, 0, 0, tzinfo=BERLIN),
            [utc(2024, 10, 26, 23), utc(2024, 10, 27, 1), utc(2024, 10, 27, 2)],
            id="Berlin hourly, fall: 01:00 CEST, 02:00 CET (not CEST), 03:00 CET",
        ),
        # Every 15 minutes through the gap: 02:00-02:45 collapse onto 03:00-03:45 EDT.
        pytest.param(
            "0 */15 * * * *",
            datetime(2024, 3, 10, 1, 45, tzinfo=NY),
            [utc(2024, 3, 10, 7), utc(2024, 3, 10, 7, 15), utc(2024, 3, 10, 7, 30)],
            id="New York every 15 min: 01:45 EST, then 03:00 EDT, 03:15 EDT",
        ),
        # A hand-built wall time inside the gap is the instant 03:30 EDT; the next hour is 04:00.
        pytest.param(
            "0 0 * * * *",
            datetime(2024, 3, 10, 2, 30, tzinfo=NY),
            [utc(2024, 3, 10, 8)],
            id="base inside the gap is normalised first",
        ),
    ],
)
def test_dst(expression: str, start: datetime, expected_utc: list[datetime]) -> None:
    assert chain_utc(expression, start, len(expected_utc)) == expected_utc


@pytest.mark.parametrize(
    ("tz", "day", "expected"),
    [
        pytest.param(NY, (2024, 3, 10), [H, H, H], id="New York spring"),
        pytest.param(NY, (2024, 11, 3), [2 * H, H, H], id="New York fall"),
        pytest.param(BERLIN, (2024, 3, 31), [H, H, H], id="Berlin spring"),
        pytest.param(BERLIN, (2024, 10, 27), [H, 2 * H, H], id="Berlin fall"),
    ],
)
def test_hourly_intervals_are_absolute(
    tz: tzinfo, day: tuple[int, int, int], expected: list[timedelta]
) -> None:
    """next_interval from each run: elapsed time, as a timer must wait it."""
    schedule = CronSchedule.parse("0 0 * * * *")
    now = datetime(*day, tzinfo=tz)
    delays = []
    for _ in expected:
        result = next_interval(schedule, last_run=now, now=now, ignore_missed=False)
        assert result is not None and result.missed == 0
        delays.append(result.delay)
        now = (now.astimezone(UTC) + result.delay).astimezone(tz)
    assert delays == expected


# -- next interval: the missed-run rule ---------------------------------------------------------

HOURLY = "0 0 * * * *"
DAILY_8 = "0 0 8 * * *"


@pytest.mark.parametrize(
    ("expression", "last_run", "now", "ignore_missed", "expected"),
    [
        pytest.param(
            HOURLY, None, utc(2024, 5, 1, 10), False, NextRun(H, 0, None), id="never run: from now"
        ),
        pytest.param(
            HOURLY,
            None,
            utc(2024, 5, 1, 10, 0, 0, 250000),
            False,
            NextRun(H - timedelta(microseconds=250000), 0, None),
            id="delay keeps now's fraction",
        ),
        pytest.param(
            HOURLY,
            utc(2024, 5, 1, 9, 0, 0, 300000),
            utc(2024, 5, 1, 9, 20),
            False,
            NextRun(40 * M, 0, None),
            id="on schedule",
        ),
        pytest.param(
            HOURLY,
            utc(2024, 5, 1, 9),
            utc(2024, 5, 1, 10, 5),
            False,
            NextRun(timedelta(0), 0, None),
            id="missed by 5 min: run now",
        ),
        pytest.param(
            HOURLY,
            utc(2024, 5, 1, 10, 5, 0, 300000),
            utc(2024, 5, 1, 10, 5, 1),
            False,
            NextRun(55 * M - S, 0, None),
            id="missed by 5 min: once only, the catch-up run counts as the last run",
        ),
        pytest.param(
            HOURLY,
            utc(2024, 5, 1, 9),
            utc(2024, 5, 1, 10) + MISSED_GRACE,
            False,
            NextRun(timedelta(0), 0, None),
            id="missed by exactly 10 min: run now",
        ),
        pytest.param(
            HOURLY,
            utc(2024, 5, 1, 9),
            utc(2024, 5, 1, 10, 10, 1),
            False,
            NextRun(50 * M - S, 1, utc(2024, 5, 1, 10)),
            id="missed by 10 min 1 s: warn, wait",
        ),
        pytest.param(
            DAILY_8,
            utc(2024, 5, 1, 8),
            utc(2024, 5, 2, 10),
            False,
            NextRun(22 * H, 1, utc(2024, 5, 2, 8)),
            id="missed by 2 h: warn 1, wait for tomorrow",
        ),
        pytest.param(
            HOURLY,
            utc(2024, 5, 1, 7),
            utc(2024, 5, 1, 9, 5),
            False,
            NextRun(55 * M, 2, utc(2024, 5, 1, 9)),
            id="Kudu: only the first occurrence after the last run may catch up",
        ),
        pytest.param(
            HOURLY,
            utc(2024, 5, 1, 7),
            utc(2024, 5, 1, 9, 5),
            True,
            NextRun(timedelta(0), 0, None),
            id="ignore missed: run now",
        ),
        pytest.param(
            "* * * * * *",
            utc(2024, 1, 1),
            utc(2024, 1, 8, 0, 0, 0, 250000),
            False,
            NextRun(timedelta(microseconds=750000), 7 * 86400, utc(2024, 1, 8)),
            id="a week of every second: 604800 missed, counted not walked",
        ),
        pytest.param(
            "* * * * * *",
            utc(1995, 1, 1),
            utc(2025, 1, 1),
            False,
            NextRun(
                S,
                int((utc(2025, 1, 1) - utc(1995, 1, 1)).total_seconds()) - 1,
                utc(2024, 12, 31, 23, 59, 59),
            ),
            id="thirty years of every second",
        ),
        pytest.param("0 0 0 30 2 *", None, utc(2024, 5, 1), False, None, id="30 February: never"),
    ],
)
def test_next_interval(
    expression: str,
    last_run: datetime | None,
    now: datetime,
    ignore_missed: bool,
    expected: NextRun | None,
) -> None:
    result = next_interval(
        CronSchedule.parse(expression), last_run=last_run, now=now, ignore_missed=ignore_missed
    )
    assert result == expected


def test_next_interval_evaluates_in_nows_zone() -> None:
    """The last run (UTC on disk) is converted; the answer comes back in now's zone."""
    schedule = CronSchedule.parse(DAILY_8)
    now = datetime(2024, 5, 2, 10, tzinfo=BERLIN)
    result = next_interval(schedule, last_run=utc(2024, 5, 1, 6), now=now, ignore_missed=False)
    assert result == NextRun(22 * H, 1, datetime(2024, 5, 2, 8, tzinfo=BERLIN))
    assert result is not None and result.most_recent_missed is not None
    assert result.most_recent_missed.tzinfo is BERLIN


def test_next_interval_needs_an_aware_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        next_interval(
            CronSchedule.parse(HOURLY), last_run=None, now=datetime(2024, 1, 1), ignore_missed=True
        )


# -- time zones ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        pytest.param("Pacific Standard Time", "America/Los_Angeles", id="Pacific"),
        pytest.param("W. Europe Standard Time", "Europe/Berlin", id="W. Europe"),
        pytest.param("China Standard Time", "Asia/Shanghai", id="China"),
        pytest.param("UTC", "Etc/UTC", id="UTC"),
        pytest.param("Eastern Standard Time", "America/New_York", id="Eastern"),
        pytest.param("India Standard Time", "Asia/Kolkata", id="India: canonical, not Calcutta"),
        pytest.param("FLE Standard Time", "Europe/Kyiv", id="FLE"),
        pytest.param("UTC-11", "Etc/GMT+11", id="UTC-11: POSIX sign"),
        pytest.param("pacific standard TIME", "America/Los_Angeles", id="Windows IDs ignore case"),
        pytest.param("  Tokyo Standard Time ", "Asia/Tokyo", id="surrounding blanks"),
        pytest.param("Europe/Berlin", "Europe/Berlin", id="IANA"),
        pytest.param("America/Argentina/Buenos_Aires", "America/Argentina/Buenos_Aires", id="deep"),
        pytest.param("europe/berlin", "Europe/Berlin", id="IANA, wrong case"),
    ],
)
def test_resolve_timezone(name: str, key: str) -> None:
    zone = resolve_timezone(name)
    assert isinstance(zone, ZoneInfo)
    assert zone.key == key


@pytest.mark.parametrize("name", [None, "", "   "])
def test_resolve_timezone_defaults_to_utc(name: str | None) -> None:
    assert resolve_timezone(name) is UTC


@pytest.mark.parametrize(
    "name",
    [
        "Mars Standard Time",
        "Europe/Atlantis",
        "America",
        "../etc/passwd",
        "/etc/passwd",
        "zone.tab",
    ],
)
def test_resolve_timezone_rejects_unknown_names(name: str) -> None:
    with pytest.raises(UnknownTimeZoneError, match="time zone") as caught:
        resolve_timezone(name)
    assert isinstance(caught.value, ValueError)


def test_every_windows_zone_resolves() -> None:
    """The whole CLDR table (territory 001) against this system's tz database."""
    assert len(cron._WINDOWS_ZONES) >= 139
    for name, key in cron._WINDOWS_ZONES.items():
        zone = resolve_timezone(name)
        assert isinstance(zone, ZoneInfo) and zone.key == key, name


def test_windows_zone_falls_back_to_the_old_iana_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tz database older than a rename (Kyiv, 2022b) still has the old name."""
    real = cron._zone
    monkeypatch.setattr(cron, "_zone", lambda key: None if key == "Europe/Kyiv" else real(key))
    zone = resolve_timezone("FLE Standard Time")
    assert isinstance(zone, ZoneInfo) and zone.key == "Europe/Kiev"


def test_windows_zone_missing_from_the_system(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cron, "_zone", lambda key: None)
    with pytest.raises(UnknownTimeZoneError, match="install the tzdata package"):
        resolve_timezone("W. Europe Standard Time")


def test_schedule_in_a_windows_zone() -> None:
    """WEBSITE_TIME_ZONE=W. Europe Standard Time: 09:00 is Berlin's 09:00."""
    tz = resolve_timezone("W. Europe Standard Time")
    found = CronSchedule.parse("0 0 9 * * 1-5").next_after(datetime(2024, 7, 5, 10, tzinfo=tz))
    assert found is not None
    assert found.astimezone(UTC) == utc(2024, 7, 8, 7)  # Monday, CEST


def test_zoneinfo_is_available() -> None:
    """The system tz database (or the tzdata package) is what IANA names need."""
    assert "Europe/Berlin" in zoneinfo.available_timezones()
