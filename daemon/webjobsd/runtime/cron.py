"""CRON schedules of triggered jobs: NCrontab's six-field format, as Kudu uses it (Part B §6.2-6.3).

Owns: parsing a `schedule` string from `settings.job` into a `CronSchedule`; the next occurrence
after a given instant (`CronSchedule.next_after`); NCrontab's display form (`expanded`, used in the
trigger text `Schedule - {expanded}` and in the scheduler log); Kudu's next-interval and
missed-schedule rule (`next_interval`); and the time zone named by `WEBSITE_TIME_ZONE`
(`resolve_timezone`, Windows or IANA names).

Must not: read a clock, sleep, log or touch files. Time is a parameter: every function takes the
instants it needs, so the whole module is tested by tables. The 40-day cap on one timer interval,
the "never run: pretend the last run was one minute ago" rule and the log lines belong to the
scheduler.

Reference: Kudu pins NCrontab 2.0.0 (`Kudu.Core/packages.config`); `Kudu.Core/Jobs/Schedule.cs`
wraps it. We follow that version where it is deliberate and differ where it is a bug or a trap.
The decisions, one by one:

Format (as NCrontab 2.0.0)
    * Exactly 6 fields, `second minute hour day-of-month month day-of-week`; ranges 0-59, 0-59,
      0-23, 1-31, 1-12, 0-6 with 0 = Sunday (7 is out of range, as in NCrontab).
    * Per field a comma list of elements; an element is `*`, a value, `a-b`, each optionally
      followed by `/n`; `a/n` means `a-max/n`. A reversed range `5-1` is read as `1-5` (NCrontab
      swaps the ends; it does not wrap around).
    * Month and day-of-week values may be English names, case-insensitive, matched by prefix like
      NCrontab: an element that does not start with a digit names the *first* name, in calendar
      order, that it is a prefix of. So `Jan`, `january`, `J` are all January, `Ju` is June, `Ma`
      is March, `A` is April; for days `S` is Sunday, `T` Tuesday, `Th` Thursday, and `W` is
      Wednesday (not "weekday"). A longer string (`Mondays`) matches nothing and is an error.
    * Nothing else: no `?`, `L`, `W`, `#`, no `@hourly` macros (they are errors, with a hint).
    * Day-of-month AND day-of-week must both match (NCrontab), not Vixie cron's OR: `0 0 0 13 * 5`
      is Friday the 13th only.

Format (where we differ from NCrontab 2.0.0)
    * `a/1` means `a-max` (NCrontab 2.0.0 reads it as the single value `a`; NCrontab 3.x fixed it
      to mean `a-max`, which is also what Part B §6.2 says).
    * A step must be a whole number >= 1. NCrontab silently reads `*/0`, `5/0` or `*/-2` as step 1
      (every value); we reject them, because a schedule that fires every second by accident is
      worse than one that is reported as invalid.
    * Numbers are plain ASCII digits, at most 9 of them (NCrontab uses .NET `int.Parse`, which also
      takes `+5` after a `/`).
    * Fields may be separated by any whitespace (NCrontab splits on the space character only, so a
      tab there makes a field invalid).
    * Error texts are ours; they name the field and the problem, because they end up in Kudu's log
      line `Failed to parse schedule "{expr}". Error: {message}`.

Next occurrence
    * `next_after(base)` drops base's fraction of a second, adds one second, and returns the first
      time at or after that which matches: strictly after `base`, one-second resolution (as
      NCrontab `GetNextOccurrence`). It jumps date by date and then field by field (bisect in the
      sorted value lists), never second by second: a yearly schedule costs a few loop turns.
    * NCrontab 2.0.0 has a bug fixed in 3.x (issue #90): when the minute or hour moves forward it
      does not reset the second, so `10,20 5 * * * *` after 00:03:15 gives 00:05:20 instead of
      00:05:10. We return the true first match (as NCrontab 3.x does).
    * A schedule that can never fire (`0 0 0 30 2 *`, `* * * 31 4 *`) returns None. NCrontab 2.0.0
      walks until year 10000 and throws (it has no "never"); Kudu would not catch that when
      registering the job [INFERRED]. We detect it up front: a (month, day) pair that fits in the
      month (February counts 29 days) always comes back within one 400-year Gregorian cycle,
      with every weekday, so a feasible schedule always fires again. Occurrences past year 9999
      (Python's limit) are also None.

Wall clock and DST
    The schedule is matched against the wall-clock time of `base`'s time zone (Kudu: local time,
    `WEBSITE_TIME_ZONE`, UTC by default). A matching wall time is then turned into an instant the
    way Kudu's `Schedule.GetNextInterval` does, which converts with .NET's
    `TimeZoneInfo.GetUtcOffset`; for a time that does not exist or exists twice that returns the
    *standard-time* offset. For DST transitions this is "the later of the two readings PEP 495
    offers" (the fold whose UTC offset is smaller), which is what we implement:

    * Spring forward (gap): a wall time that does not exist fires as if the clock had not moved
      yet, i.e. shifted forward by the gap: 02:30 on the New York or Berlin transition day fires at
      03:30 (new offset). An hourly `0 59 * * * *` fires at 01:59 and then 03:59 (the 02:59
      occurrence and the 03:59 one are the same instant), exactly Kudu's `ScheduleFacts`
      `GetNextInterval_NextWithinDST_ReturnsExpectedValue`.
    * Fall back (overlap): a wall time that exists twice fires once, at its second (standard
      time) instant. A daily 01:30 in New York fires at 01:30 EST, not 01:30 EDT; an hourly
      `0 0 * * * *` fires at 00:00 EDT, 01:00 EST, 02:00 EST: two hours of absolute time between
      the first two runs.
    * Because every search starts from the true wall time of a real instant, results are always
      strictly after `base` in absolute time, and a chain `t = next_after(t)` never repeats.

Next interval (Kudu `Schedule.GetNextInterval`, §6.3)
    base = now if never run else last run; next = next_after(base); if next >= now wait next - now;
    else if `ignore_missed` or next is at most 10 minutes ago wait 0; else report the missed
    occurrences and wait until the first occurrence after now. Differences, all deliberate:

    * All comparisons and differences are on absolute time. Kudu compares the 10-minute rule on
      wall times, and reads `DateTime.Now` during the repeated fall-back hour as standard time (an
      hour late); with aware datetimes neither can happen here.
    * The missed count is exact and computed, not enumerated: Kudu walks every occurrence (a year
      of `10 * * * * *` is 525,600 steps); we count matching days and multiply by the occurrences
      per day, with bisect for the partial first and last day. Cost grows with the number of
      matching days in the window (microseconds per day), never with the number of occurrences.
      Like Kudu's `GetNextOccurrences(lastRun, now)`, it counts wall-clock occurrences strictly
      after the last run (to the second) and before now, so over a DST change a skipped or
      repeated hour counts as its wall-clock occurrences.
    * In the "run now" (catch-up) case `missed` is 0: the occurrence is served, not missed.
    * Note Kudu's rule looks only at the *first* occurrence after the last run: after two hours of
      downtime an hourly job whose latest occurrence was 5 minutes ago does not catch up; it
      reports the misses and waits for the next one. We keep that.
"""

from __future__ import annotations

import calendar
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import MAXYEAR, UTC, date, datetime, time, timedelta, tzinfo
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

__all__ = [
    "DAY_NAMES",
    "MISSED_GRACE",
    "MONTH_NAMES",
    "CronError",
    "CronSchedule",
    "NextRun",
    "UnknownTimeZoneError",
    "next_interval",
    "resolve_timezone",
]

# Kudu `Schedule.GetNextInterval`: an occurrence missed by at most this much still runs (once).
MISSED_GRACE = timedelta(minutes=10)

# NCrontab's names, in value order. Hard-coded: `calendar.month_name` follows LC_TIME.
MONTH_NAMES = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
DAY_NAMES = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")

# Each month's longest length (February counts its leap day): a (month, day) pair beyond it
# never exists.
_MAX_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

# Up to 9 digits: plenty for any field and every sane step, and no int() on a megabyte of digits.
_NUMBER = re.compile(r"[0-9]{1,9}")


class CronError(ValueError):
    """A schedule expression that does not parse. The message names the field and the problem."""


class UnknownTimeZoneError(ValueError):
    """A `WEBSITE_TIME_ZONE` value that is neither a Windows nor an IANA time zone name."""


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()


_FIELDS = (
    _Field("second", 0, 59),
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, MONTH_NAMES),
    _Field("day-of-week", 0, 6, DAY_NAMES),
)


def _unsupported_hint(element: str) -> str:
    """A hint for the Quartz/Vixie extensions people try, else nothing."""
    upper = element.upper()
    if "?" in upper or "#" in upper or upper in ("L", "W", "LW") or re.fullmatch(r"\d+[LW]", upper):
        return " (?, L, W and # are not supported)"
    return ""


def _parse_value(spec: _Field, text: str, token: str) -> int:
    where = f"{spec.name} field '{token}'"
    if not text:
        raise CronError(f"{where}: a value is missing")
    if text[0].isascii() and text[0].isdigit():
        # NCrontab: an element starting with a digit is a number, nothing else.
        if not _NUMBER.fullmatch(text):
            raise CronError(f"{where}: '{text}' is not a number{_unsupported_hint(text)}")
        value = int(text)
        if not spec.low <= value <= spec.high:
            raise CronError(f"{where}: {value} is out of range {spec.low}-{spec.high}")
        return value
    if not spec.names:
        raise CronError(
            f"{where}: '{text}' is not a number between {spec.low} and {spec.high}"
            f"{_unsupported_hint(text)}"
        )
    # NCrontab: the first name (in value order) that starts with the text, ignoring case.
    lowered = text.lower()
    for offset, name in enumerate(spec.names):
        if name.lower().startswith(lowered):
            return spec.low + offset
    raise CronError(
        f"{where}: '{text}' is neither a number between {spec.low} and {spec.high} nor the start "
        f"of a {spec.name} name ({spec.names[0]} ... {spec.names[-1]}){_unsupported_hint(text)}"
    )


def _parse_field(spec: _Field, token: str) -> tuple[int, ...]:
    where = f"{spec.name} field '{token}'"
    values: set[int] = set()
    for element in token.split(","):
        if not element:
            raise CronError(f"{where}: empty element in the list")
        # element = body, or body/step; body = `*`, a value, or a range `a-b`.
        body, stepped, step_text = element.partition("/")
        step = 1
        if stepped:
            if not _NUMBER.fullmatch(step_text) or int(step_text) < 1:
                raise CronError(f"{where}: step '{step_text}' must be a whole number of at least 1")
            step = int(step_text)
            if not body:
                raise CronError(f"{where}: a range or '*' is missing before '/'")
        if body == "*":
            first, last = spec.low, spec.high
        elif "-" in body:
            start_text, end_text = body.split("-", 1)
            first = _parse_value(spec, start_text, token)
            last = _parse_value(spec, end_text, token)
            # NCrontab swaps a reversed range rather than wrapping around or failing.
            first, last = min(first, last), max(first, last)
        else:
            first = _parse_value(spec, body, token)
            # `a/n` runs from a to the field's maximum (NCrontab 2.0.0 read `a/1` as just `a`).
            last = spec.high if stepped else first
        values.update(range(first, last + 1, step))
    return tuple(sorted(values))


def _format_field(spec: _Field, values: tuple[int, ...]) -> str:
    """NCrontab `CrontabFieldImpl.Format`: `*` for the full range, else runs collapsed to `a-b`."""
    if values == tuple(range(spec.low, spec.high + 1)):
        return "*"
    runs: list[str] = []
    start = previous = values[0]
    for value in (*values[1:], None):
        if value is not None and value == previous + 1:
            previous = value
            continue
        # A run of two prints as `a-b` too: NCrontab only writes a single value for a run of one.
        runs.append(str(start) if start == previous else f"{start}-{previous}")
        if value is not None:
            start = previous = value
    return ",".join(runs)


def _offset(moment: datetime) -> timedelta:
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError(f"{moment!r} must be timezone-aware")
    return offset


def _wall(moment: datetime) -> datetime:
    """The true local wall time of an aware instant, naive, fraction of a second dropped.

    Going through UTC normalises a datetime whose wall time does not exist in its zone (PEP 495
    allows building one); `astimezone` to the same tzinfo would return it unchanged.
    """
    tz = moment.tzinfo
    _offset(moment)
    local = moment.astimezone(UTC).astimezone(tz)
    return local.replace(tzinfo=None, microsecond=0, fold=0)


def _localize(wall: datetime, tz: tzinfo | None) -> datetime:
    """A matching wall time as an instant, as Kudu does (.NET `GetUtcOffset`: standard time).

    For a gap or an overlap the two folds give different offsets; the smaller offset is the
    later instant: in a gap that is the pre-transition (standard) offset, which moves the time
    forward by the gap; in an overlap it is the second, standard-time pass.
    """
    first = wall.replace(tzinfo=tz, fold=0)
    second = wall.replace(tzinfo=tz, fold=1)
    chosen = second if _offset(second) < _offset(first) else first
    return chosen.astimezone(UTC).astimezone(tz)


def _cron_weekday(year: int, month: int, day: int) -> int:
    """0 = Sunday, as in the day-of-week field (Python's weekday() has 0 = Monday)."""
    return (calendar.weekday(year, month, day) + 1) % 7


@dataclass(frozen=True, slots=True)
class CronSchedule:
    """A parsed six-field NCrontab expression: the sorted values each field allows.

    Build with `CronSchedule.parse(text)`; the constructor takes the value tuples directly
    (sorted, unique, in range, not empty) and checks them.
    """

    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    days_of_week: tuple[int, ...]
    # Derived once: month and weekday membership as bit masks, and whether any date ever matches.
    _month_mask: int = field(init=False, repr=False, compare=False)
    _weekday_mask: int = field(init=False, repr=False, compare=False)
    _feasible: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for spec, values in zip(_FIELDS, self._fields(), strict=True):
            if not values:
                raise CronError(f"{spec.name} field: no values")
            if list(values) != sorted(set(values)):
                raise CronError(f"{spec.name} field: values must be sorted and unique")
            if values[0] < spec.low or values[-1] > spec.high:
                raise CronError(f"{spec.name} field: values must be in {spec.low}-{spec.high}")
        object.__setattr__(self, "_month_mask", sum(1 << m for m in self.months))
        object.__setattr__(self, "_weekday_mask", sum(1 << d for d in self.days_of_week))
        feasible = any(self.days[0] <= _MAX_DAYS[m - 1] for m in self.months)
        object.__setattr__(self, "_feasible", feasible)

    def _fields(self) -> tuple[tuple[int, ...], ...]:
        return (
            self.seconds,
            self.minutes,
            self.hours,
            self.days,
            self.months,
            self.days_of_week,
        )

    @classmethod
    def parse(cls, text: str) -> CronSchedule:
        """Parse `second minute hour day-of-month month day-of-week`; raise `CronError`."""
        tokens = text.split()
        if len(tokens) != len(_FIELDS):
            hint = " (macros such as @hourly are not supported)" if text.strip()[:1] == "@" else ""
            raise CronError(
                "expected 6 fields (second minute hour day-of-month month day-of-week), "
                f"found {len(tokens)}{hint}"
            )
        parsed = [_parse_field(spec, token) for spec, token in zip(_FIELDS, tokens, strict=True)]
        return cls(*parsed)

    def expanded(self) -> str:
        """NCrontab's display form, e.g. `0 0,5,10,15,20,25,30,35,40,45,50,55 * * * *`."""
        return " ".join(
            _format_field(spec, values)
            for spec, values in zip(_FIELDS, self._fields(), strict=True)
        )

    def __str__(self) -> str:
        return self.expanded()

    def next_after(self, base: datetime) -> datetime | None:
        """The first occurrence strictly after `base`, aware, in base's time zone; None if never.

        `base` must be timezone-aware; the schedule is matched on its zone's wall clock.
        """
        tz = base.tzinfo
        try:
            start = _wall(base) + timedelta(seconds=1)
            wall = self._first_at_or_after(start)
            return None if wall is None else _localize(wall, tz)
        except OverflowError:
            # Beyond year 9999 (or before year 1 in UTC): nothing representable.
            return None

    # -- wall-clock search ---------------------------------------------------------------------

    def _first_at_or_after(self, start: datetime) -> datetime | None:
        day = start.date()
        if self._date_matches(day):
            moment = self._first_time_at_or_after(start.hour, start.minute, start.second)
            if moment is not None:
                return datetime.combine(day, moment)
        if day == date.max:
            return None
        following = next(self._dates_from(day + timedelta(days=1)), None)
        if following is None:
            return None
        return datetime.combine(following, time(self.hours[0], self.minutes[0], self.seconds[0]))

    def _date_matches(self, day: date) -> bool:
        return (
            (self._month_mask >> day.month) & 1 == 1
            and day.day in self.days
            and (self._weekday_mask >> _cron_weekday(day.year, day.month, day.day)) & 1 == 1
        )

    def _dates_from(self, start: date) -> Iterator[date]:
        """Matching dates from `start` on, ascending, month by month; until year 9999."""
        if not self._feasible:
            return
        year, month, first_day = start.year, start.month, start.day
        while year <= MAXYEAR:
            if (self._month_mask >> month) & 1:
                first_weekday, length = calendar.monthrange(year, month)
                # monthrange gives Monday = 0; shift to the cron numbering (Sunday = 0).
                first_weekday = (first_weekday + 1) % 7
                for day in self.days[bisect_left(self.days, first_day) :]:
                    if day > length:
                        break
                    if (self._weekday_mask >> ((first_weekday + day - 1) % 7)) & 1:
                        yield date(year, month, day)
            month, first_day = month + 1, 1
            if month > 12:
                year, month = year + 1, 1

    def _first_time_at_or_after(self, hour: int, minute: int, second: int) -> time | None:
        """The smallest allowed time of day >= hour:minute:second, or None (next day)."""
        hours, minutes, seconds = self.hours, self.minutes, self.seconds
        h = bisect_left(hours, hour)
        if h < len(hours) and hours[h] == hour:
            m = bisect_left(minutes, minute)
            if m < len(minutes) and minutes[m] == minute:
                s = bisect_left(seconds, second)
                if s < len(seconds):
                    return time(hour, minute, seconds[s])
                m += 1
            if m < len(minutes):
                return time(hour, minutes[m], seconds[0])
            h += 1
        if h < len(hours):
            return time(hours[h], minutes[0], seconds[0])
        return None

    def _last_time_at_or_before(self, moment: time) -> time | None:
        """The largest allowed time of day <= moment, or None."""
        hours, minutes, seconds = self.hours, self.minutes, self.seconds
        h = bisect_right(hours, moment.hour) - 1
        if h >= 0 and hours[h] == moment.hour:
            m = bisect_right(minutes, moment.minute) - 1
            if m >= 0 and minutes[m] == moment.minute:
                s = bisect_right(seconds, moment.second) - 1
                if s >= 0:
                    return time(moment.hour, moment.minute, seconds[s])
                m -= 1
            if m >= 0:
                return time(moment.hour, minutes[m], seconds[-1])
            h -= 1
        if h >= 0:
            return time(hours[h], minutes[-1], seconds[-1])
        return None

    def _times_before(self, moment: time) -> int:
        """How many allowed times of day are strictly before `moment` (lexicographic h, m, s)."""
        hours, minutes, seconds = self.hours, self.minutes, self.seconds
        count = bisect_left(hours, moment.hour) * len(minutes) * len(seconds)
        h = bisect_left(hours, moment.hour)
        if h < len(hours) and hours[h] == moment.hour:
            count += bisect_left(minutes, moment.minute) * len(seconds)
            m = bisect_left(minutes, moment.minute)
            if m < len(minutes) and minutes[m] == moment.minute:
                count += bisect_left(seconds, moment.second)
        return count

    def _times_through(self, moment: time) -> int:
        """How many allowed times of day are at or before `moment`."""
        return self._times_before(moment) + int(
            self._first_time_at_or_after(moment.hour, moment.minute, moment.second) == moment
        )

    def _occurrences_between(self, first: datetime, last: datetime) -> tuple[int, datetime | None]:
        """Count the wall-clock occurrences in [first, last] (naive, whole seconds).

        Returns the count and the latest of them. Walks matching *days*, not occurrences.
        """
        if first > last:
            return 0, None
        per_day = len(self.hours) * len(self.minutes) * len(self.seconds)
        count = 0
        latest: datetime | None = None
        for day in self._dates_from(first.date()):
            if day > last.date():
                break
            through = self._times_through(last.time()) if day == last.date() else per_day
            before = self._times_before(first.time()) if day == first.date() else 0
            if through > before:
                count += through - before
                end = last.time() if day == last.date() else time.max
                moment = self._last_time_at_or_before(end)
                assert moment is not None  # through > 0
                latest = datetime.combine(day, moment)
        return count, latest


@dataclass(frozen=True, slots=True)
class NextRun:
    """What the scheduler should do next (Kudu `Schedule.GetNextInterval`).

    `delay` is absolute time from `now` to the run (0 = run now). `missed` and
    `most_recent_missed` are set only when occurrences were skipped for good (Kudu's
    `Missed {count} schedules, most recent at {time}` warning); `most_recent_missed` is aware,
    in now's time zone.
    """

    delay: timedelta
    missed: int
    most_recent_missed: datetime | None


def next_interval(
    schedule: CronSchedule,
    *,
    last_run: datetime | None,
    now: datetime,
    ignore_missed: bool,
) -> NextRun | None:
    """Kudu's next-interval rule (§6.3) on aware datetimes; None if the schedule never fires again.

    The schedule is evaluated in `now`'s time zone; `last_run` (start of the newest run, None if
    never run) is converted to it.
    """
    tz = now.tzinfo
    _offset(now)
    base = now if last_run is None else last_run.astimezone(tz)
    upcoming = schedule.next_after(base)
    if upcoming is None:
        return None
    now_utc = now.astimezone(UTC)
    # Aware datetimes that share a tzinfo compare and subtract by wall time: use UTC.
    upcoming_utc = upcoming.astimezone(UTC)
    if upcoming_utc >= now_utc:
        return NextRun(upcoming_utc - now_utc, 0, None)
    if ignore_missed or now_utc - upcoming_utc <= MISSED_GRACE:
        return NextRun(timedelta(0), 0, None)
    # Kudu `GetNextOccurrences(lastRun, now)`: after the last run (to the second), before now.
    now_wall = now.astimezone(UTC).astimezone(tz).replace(tzinfo=None, fold=0)
    last_before_now = now_wall.replace(microsecond=0)
    if now_wall.microsecond == 0:
        last_before_now -= timedelta(seconds=1)
    missed, latest = schedule._occurrences_between(
        _wall(base) + timedelta(seconds=1), last_before_now
    )
    following = schedule.next_after(now)
    if following is None:
        return None
    return NextRun(
        following.astimezone(UTC) - now_utc,
        missed,
        None if latest is None else _localize(latest, tz),
    )


# -- time zones --------------------------------------------------------------------------------

# Windows time zone IDs (what App Service's WEBSITE_TIME_ZONE takes) to IANA names: the
# territory "001" (default) rows of Unicode CLDR `common/supplemental/windowsZones.xml`, 2024
# edition (Kazakhstan's "Central Asia Standard Time" already on Asia/Bishkek). Where CLDR gives an
# old alias we store today's canonical IANA name; `_OLD_IANA_NAMES` maps it back for systems whose
# tz database predates the rename.
_WINDOWS_ZONES: dict[str, str] = {
    "Dateline Standard Time": "Etc/GMT+12",
    "UTC-11": "Etc/GMT+11",
    "Aleutian Standard Time": "America/Adak",
    "Hawaiian Standard Time": "Pacific/Honolulu",
    "Marquesas Standard Time": "Pacific/Marquesas",
    "Alaskan Standard Time": "America/Anchorage",
    "UTC-09": "Etc/GMT+9",
    "Pacific Standard Time (Mexico)": "America/Tijuana",
    "UTC-08": "Etc/GMT+8",
    "Pacific Standard Time": "America/Los_Angeles",
    "US Mountain Standard Time": "America/Phoenix",
    "Mountain Standard Time (Mexico)": "America/Mazatlan",
    "Mountain Standard Time": "America/Denver",
    "Yukon Standard Time": "America/Whitehorse",
    "Central America Standard Time": "America/Guatemala",
    "Central Standard Time": "America/Chicago",
    "Easter Island Standard Time": "Pacific/Easter",
    "Central Standard Time (Mexico)": "America/Mexico_City",
    "Canada Central Standard Time": "America/Regina",
    "SA Pacific Standard Time": "America/Bogota",
    "Eastern Standard Time (Mexico)": "America/Cancun",
    "Eastern Standard Time": "America/New_York",
    "Haiti Standard Time": "America/Port-au-Prince",
    "Cuba Standard Time": "America/Havana",
    "US Eastern Standard Time": "America/Indiana/Indianapolis",
    "Turks And Caicos Standard Time": "America/Grand_Turk",
    "Paraguay Standard Time": "America/Asuncion",
    "Atlantic Standard Time": "America/Halifax",
    "Venezuela Standard Time": "America/Caracas",
    "Central Brazilian Standard Time": "America/Cuiaba",
    "SA Western Standard Time": "America/La_Paz",
    "Pacific SA Standard Time": "America/Santiago",
    "Newfoundland Standard Time": "America/St_Johns",
    "Tocantins Standard Time": "America/Araguaina",
    "E. South America Standard Time": "America/Sao_Paulo",
    "SA Eastern Standard Time": "America/Cayenne",
    "Argentina Standard Time": "America/Argentina/Buenos_Aires",
    "Greenland Standard Time": "America/Nuuk",
    "Montevideo Standard Time": "America/Montevideo",
    "Magallanes Standard Time": "America/Punta_Arenas",
    "Saint Pierre Standard Time": "America/Miquelon",
    "Bahia Standard Time": "America/Bahia",
    "UTC-02": "Etc/GMT+2",
    "Azores Standard Time": "Atlantic/Azores",
    "Cape Verde Standard Time": "Atlantic/Cape_Verde",
    "UTC": "Etc/UTC",
    "GMT Standard Time": "Europe/London",
    "Greenwich Standard Time": "Atlantic/Reykjavik",
    "Sao Tome Standard Time": "Africa/Sao_Tome",
    "Morocco Standard Time": "Africa/Casablanca",
    "W. Europe Standard Time": "Europe/Berlin",
    "Central Europe Standard Time": "Europe/Budapest",
    "Romance Standard Time": "Europe/Paris",
    "Central European Standard Time": "Europe/Warsaw",
    "W. Central Africa Standard Time": "Africa/Lagos",
    "Jordan Standard Time": "Asia/Amman",
    "GTB Standard Time": "Europe/Bucharest",
    "Middle East Standard Time": "Asia/Beirut",
    "Egypt Standard Time": "Africa/Cairo",
    "E. Europe Standard Time": "Europe/Chisinau",
    "Syria Standard Time": "Asia/Damascus",
    "West Bank Standard Time": "Asia/Hebron",
    "South Africa Standard Time": "Africa/Johannesburg",
    "FLE Standard Time": "Europe/Kyiv",
    "Israel Standard Time": "Asia/Jerusalem",
    "South Sudan Standard Time": "Africa/Juba",
    "Kaliningrad Standard Time": "Europe/Kaliningrad",
    "Sudan Standard Time": "Africa/Khartoum",
    "Libya Standard Time": "Africa/Tripoli",
    "Namibia Standard Time": "Africa/Windhoek",
    "Arabic Standard Time": "Asia/Baghdad",
    "Turkey Standard Time": "Europe/Istanbul",
    "Arab Standard Time": "Asia/Riyadh",
    "Belarus Standard Time": "Europe/Minsk",
    "Russian Standard Time": "Europe/Moscow",
    "E. Africa Standard Time": "Africa/Nairobi",
    "Iran Standard Time": "Asia/Tehran",
    "Arabian Standard Time": "Asia/Dubai",
    "Astrakhan Standard Time": "Europe/Astrakhan",
    "Azerbaijan Standard Time": "Asia/Baku",
    "Russia Time Zone 3": "Europe/Samara",
    "Mauritius Standard Time": "Indian/Mauritius",
    "Saratov Standard Time": "Europe/Saratov",
    "Georgian Standard Time": "Asia/Tbilisi",
    "Volgograd Standard Time": "Europe/Volgograd",
    "Caucasus Standard Time": "Asia/Yerevan",
    "Afghanistan Standard Time": "Asia/Kabul",
    "West Asia Standard Time": "Asia/Tashkent",
    "Ekaterinburg Standard Time": "Asia/Yekaterinburg",
    "Pakistan Standard Time": "Asia/Karachi",
    "Qyzylorda Standard Time": "Asia/Qyzylorda",
    "India Standard Time": "Asia/Kolkata",
    "Sri Lanka Standard Time": "Asia/Colombo",
    "Nepal Standard Time": "Asia/Kathmandu",
    "Central Asia Standard Time": "Asia/Bishkek",
    "Bangladesh Standard Time": "Asia/Dhaka",
    "Omsk Standard Time": "Asia/Omsk",
    "Myanmar Standard Time": "Asia/Yangon",
    "SE Asia Standard Time": "Asia/Bangkok",
    "Altai Standard Time": "Asia/Barnaul",
    "W. Mongolia Standard Time": "Asia/Hovd",
    "North Asia Standard Time": "Asia/Krasnoyarsk",
    "N. Central Asia Standard Time": "Asia/Novosibirsk",
    "Tomsk Standard Time": "Asia/Tomsk",
    "China Standard Time": "Asia/Shanghai",
    "North Asia East Standard Time": "Asia/Irkutsk",
    "Singapore Standard Time": "Asia/Singapore",
    "W. Australia Standard Time": "Australia/Perth",
    "Taipei Standard Time": "Asia/Taipei",
    "Ulaanbaatar Standard Time": "Asia/Ulaanbaatar",
    "Aus Central W. Standard Time": "Australia/Eucla",
    "Transbaikal Standard Time": "Asia/Chita",
    "Tokyo Standard Time": "Asia/Tokyo",
    "North Korea Standard Time": "Asia/Pyongyang",
    "Korea Standard Time": "Asia/Seoul",
    "Yakutsk Standard Time": "Asia/Yakutsk",
    "Cen. Australia Standard Time": "Australia/Adelaide",
    "AUS Central Standard Time": "Australia/Darwin",
    "E. Australia Standard Time": "Australia/Brisbane",
    "AUS Eastern Standard Time": "Australia/Sydney",
    "West Pacific Standard Time": "Pacific/Port_Moresby",
    "Tasmania Standard Time": "Australia/Hobart",
    "Vladivostok Standard Time": "Asia/Vladivostok",
    "Lord Howe Standard Time": "Australia/Lord_Howe",
    "Bougainville Standard Time": "Pacific/Bougainville",
    "Russia Time Zone 10": "Asia/Srednekolymsk",
    "Magadan Standard Time": "Asia/Magadan",
    "Norfolk Standard Time": "Pacific/Norfolk",
    "Sakhalin Standard Time": "Asia/Sakhalin",
    "Central Pacific Standard Time": "Pacific/Guadalcanal",
    "Russia Time Zone 11": "Asia/Kamchatka",
    "New Zealand Standard Time": "Pacific/Auckland",
    "UTC+12": "Etc/GMT-12",
    "Fiji Standard Time": "Pacific/Fiji",
    "Chatham Islands Standard Time": "Pacific/Chatham",
    "UTC+13": "Etc/GMT-13",
    "Tonga Standard Time": "Pacific/Tongatapu",
    "Samoa Standard Time": "Pacific/Apia",
    "Line Islands Standard Time": "Pacific/Kiritimati",
}

# Canonical IANA name -> the older name CLDR still lists (a link in every tz database).
_OLD_IANA_NAMES = {
    "America/Indiana/Indianapolis": "America/Indianapolis",
    "America/Argentina/Buenos_Aires": "America/Buenos_Aires",
    "America/Nuuk": "America/Godthab",
    "Europe/Kyiv": "Europe/Kiev",
    "Asia/Kolkata": "Asia/Calcutta",
    "Asia/Kathmandu": "Asia/Katmandu",
    "Asia/Yangon": "Asia/Rangoon",
}

# Windows IDs are case-insensitive (registry keys), so look them up that way.
_WINDOWS_BY_FOLDED = {name.casefold(): iana for name, iana in _WINDOWS_ZONES.items()}


def _zone(key: str) -> ZoneInfo | None:
    # Imported here: zoneinfo brings sysconfig (0.3 MB resident) into a daemon that, with no
    # WEBSITE_TIME_ZONE, never needs it.
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(key)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # Not found, not a TZif file, or a key that tries to leave the tz directory.
        return None


def resolve_timezone(name: str | None) -> tzinfo:
    """The zone of `WEBSITE_TIME_ZONE`: None or blank = UTC; a Windows ID; or an IANA name.

    Windows IDs (`W. Europe Standard Time`) are matched case-insensitively through the CLDR
    table; IANA names (`Europe/Berlin`) exactly, then case-insensitively. Raises
    `UnknownTimeZoneError` (a ValueError) for anything else.
    """
    if name is None or not name.strip():
        return UTC
    name = name.strip()
    iana = _WINDOWS_BY_FOLDED.get(name.casefold())
    if iana is not None:
        zone = _zone(iana) or _zone(_OLD_IANA_NAMES.get(iana, iana))
        if zone is None:
            raise UnknownTimeZoneError(
                f"time zone '{name}' maps to '{iana}', which this system's tz database lacks "
                "(install the tzdata package)"
            )
        return zone
    zone = _zone(name)
    if zone is not None:
        return zone
    # A miss is rare and costs one directory walk; worth it for `europe/berlin`.
    from zoneinfo import ZoneInfo, available_timezones

    folded = name.casefold()
    for key in sorted(available_timezones()):
        if key.casefold() == folded:
            return ZoneInfo(key)
    raise UnknownTimeZoneError(
        f"unknown time zone '{name}': use a Windows time zone ID such as "
        "'W. Europe Standard Time' or an IANA name such as 'Europe/Berlin'"
    )
