"""Pure next-fire-time functions of the scheduler: no ORM, no clock of their own.

A schedule interval is one of the periodic presets (`@hourly`, `@daily`, `@weekly`,
`@monthly`), a 5-field cron expression (minute hour day-of-month month day-of-week), or
one of the two non-periodic words `@once` and `@always_on`, which never "fire" here: the
services decide when those run. Every datetime going in must be timezone-aware; every
datetime coming out is in UTC.

Wall clock and daylight saving
------------------------------
A cron or preset is read as wall-clock time in the trigger's time zone (`tz`), so
"0 9 * * *" in Europe/Paris means 09:00 in Paris summer and winter alike. Each matching
local wall-clock time gives exactly one fire instant:

* a local time that does not exist (the spring-forward gap) fires at the first instant
  after the gap: a daily 02:30 job in America/New_York fires on 2026-03-08 at 03:00 EDT
  (07:00 UTC), once;
* an ambiguous local time (the fall-back hour that happens twice) fires once, at its
  first occurrence (fold=0): an hourly job in New York on 2026-11-01 fires at 01:00 EDT
  (05:00 UTC) and not again at 01:00 EST (06:00 UTC);
* several local times that land on the same instant (02:00, 02:30 and 03:00 on the
  spring-forward day) fire once.

So nothing fires twice and no local time is missed. croniter's own DST handling (for
aware datetimes) has changed between releases and does not follow this rule, so croniter
is only ever given naive local wall-clock times, and `_wall_to_instant` turns each one into
an instant with zoneinfo.
"""

from __future__ import annotations

import copy
import functools
import re
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from itertools import islice

# croniter ships no type hints (no py.typed) and types-croniter is not a dependency.
from croniter import CroniterBadDateError, CroniterError, croniter  # type: ignore[import-untyped]

PRESETS: dict[str, str] = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 1",  # Monday 00:00, as Mage does (cron's own @weekly is Sunday)
    "@monthly": "0 0 1 * *",
}
ONCE = "@once"
ALWAYS_ON = "@always_on"

# The model columns holding an interval are varchar(100); refusing longer text here keeps
# PostgreSQL from answering a DataError instead of a message.
MAX_INTERVAL_LENGTH = 100

_WORDS = (ONCE, *PRESETS, ALWAYS_ON)
_FIELDS = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31, or L for the last day"),
    ("month", "1-12 or JAN-DEC"),
    ("day-of-week", "0-7 or SUN-SAT, 0 and 7 both Sunday"),
)
# croniter's hashed (H) and random (R) values change with a hash id or on every parse: a
# schedule must mean the same thing every time it is read.
_HASH_OR_RANDOM = re.compile(r"(^|,)[HR](\(|/|,|$)", re.IGNORECASE)
# Zone files that are not IANA names: `localtime` is the machine's own setting.
_NOT_ZONES = frozenset({"localtime", "posixrules"})
_ONE_MINUTE = timedelta(minutes=1)


class ScheduleError(ValueError):
    """A schedule interval, time zone or argument that cannot be used; the message is
    written for the user."""


@dataclass(frozen=True)
class _Schedule:
    interval: str  # normalised text
    # A croniter positioned nowhere in particular, copied for every use: a copy costs a
    # small fraction of a parse, and keeps concurrent callers from sharing state.
    template: croniter | None = field(default=None, compare=False)


# ---------------------------------------------------------------------------- validation


def validate_interval(value: str) -> str:
    """Return `value` normalised (stripped, runs of spaces collapsed, @words lower-cased),
    or raise ScheduleError saying what is wrong with it."""
    return _schedule(value).interval


def validate_timezone(name: str) -> str:
    """Return the IANA zone name (stripped), or raise ScheduleError."""
    if not isinstance(name, str):
        raise ScheduleError(f"time zone must be text, not {type(name).__name__}")
    _zone(name.strip())
    return name.strip()


def is_periodic(interval: str) -> bool:
    """True for a preset or a cron expression; False for @once, @always_on and anything
    that is not a valid interval (validate first to learn why)."""
    try:
        return _schedule(interval).template is not None
    except ScheduleError:
        return False


def _schedule(value: str) -> _Schedule:
    if not isinstance(value, str):
        raise ScheduleError(f"schedule interval must be text, not {type(value).__name__}")
    normalised = " ".join(value.split())
    if not normalised:
        raise ScheduleError(
            "schedule interval is empty: give a preset (@once, @hourly, @daily, @weekly, "
            "@monthly, @always_on) or a 5-field cron expression"
        )
    if len(normalised) > MAX_INTERVAL_LENGTH:
        raise ScheduleError(
            f"schedule interval is {len(normalised)} characters long; "
            f"at most {MAX_INTERVAL_LENGTH} are allowed"
        )
    return _parse(normalised)


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> _Schedule:
    """Parse normalised text once; the scheduler asks about the same few intervals on
    every tick. Errors are not cached (lru_cache does not cache exceptions)."""
    if text.startswith("@"):
        word = text.lower()
        if word in (ONCE, ALWAYS_ON):
            return _Schedule(word)
        if word in PRESETS:
            return _Schedule(word, _croniter(PRESETS[word]))
        raise ScheduleError(
            f"'{text}' is not a known preset; use one of {', '.join(_WORDS)} "
            "or a 5-field cron expression such as '0 0 1 1 *'"
        )
    _check_fields(text)
    try:
        template = _croniter(text)
        # An expression can be well formed yet match no date at all ("0 0 30 2 *"):
        # croniter searches 50 years ahead before giving up.
        copy.copy(template).get_next(datetime, start_time=datetime(2000, 1, 1))
    except CroniterBadDateError:
        raise ScheduleError(f"'{text}' never fires: no calendar date matches it") from None
    except (CroniterError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ScheduleError(f"'{text}' is not a valid cron expression ({exc})") from None
    return _Schedule(text, template)


def _check_fields(text: str) -> None:
    """Refuse a cron expression with the wrong number of fields or a bad field, naming
    the field; croniter alone would accept seconds and years and say less."""
    fields = text.split(" ")
    if len(fields) != len(_FIELDS):
        extra = (
            " (seconds and years are not supported)" if len(fields) in (6, 7) else ""
        )
        raise ScheduleError(
            f"'{text}' has {len(fields)} field{'s' if len(fields) != 1 else ''}; a cron "
            f"expression has exactly 5: minute hour day-of-month month day-of-week{extra}"
        )
    for index, ((name, allowed), value) in enumerate(zip(_FIELDS, fields, strict=True)):
        if _HASH_OR_RANDOM.search(value):
            raise ScheduleError(
                f"'{text}': the {name} field '{value}' uses hashed or random values "
                "(H, R), which are not supported"
            )
        probe = ["*"] * len(_FIELDS)
        probe[index] = value
        try:
            croniter.expand(" ".join(probe))
        except (CroniterError, ValueError, KeyError, IndexError, TypeError):
            raise ScheduleError(
                f"'{text}': the {name} field '{value}' is not valid (allowed: {allowed}; "
                "with *, lists a,b, ranges a-b and steps /n)"
            ) from None


def _croniter(expression: str) -> croniter:
    return croniter(expression, datetime(2000, 1, 1))


@functools.lru_cache(maxsize=1024)
def _zone(name: str) -> tzinfo:
    if name == "UTC":
        return UTC
    if name in _NOT_ZONES or name not in _zone_names():
        hint = _zone_names_by_lower().get(name.lower())
        suggestion = f"; did you mean '{hint}'?" if hint else " (for example 'Europe/Paris')"
        raise ScheduleError(f"'{name}' is not an IANA time zone name{suggestion}")
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(f"'{name}' is not an IANA time zone name") from None


@functools.cache
def _zone_names() -> frozenset[str]:
    # Reading the zone list is slow, so it is read once; it rules out file paths and the machine's
    # `localtime` that ZoneInfo() itself would open.
    return frozenset(zoneinfo.available_timezones()) - _NOT_ZONES


@functools.cache
def _zone_names_by_lower() -> dict[str, str]:
    return {name.lower(): name for name in _zone_names()}


def _aware(name: str, value: datetime) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ScheduleError(f"{name} must be a timezone-aware datetime, got {value!r}")
    return value


# ---------------------------------------------------------------------- fire instants


def next_fire_time(
    interval: str, *, after: datetime, tz: str = "UTC", start_time: datetime | None = None,
) -> datetime | None:
    """The first fire instant strictly after `after` and not before `start_time`, in UTC;
    None for @once and @always_on."""
    return next(_after(interval, after=after, tz=tz, start_time=start_time), None)


def fire_times(
    interval: str, *, start: datetime, end: datetime, tz: str = "UTC",
) -> Iterator[datetime]:
    """Every fire instant t with start <= t <= end, in order, in UTC (nothing for @once
    and @always_on). Arguments are checked at the call, not at the first next()."""
    schedule, zone = _schedule(interval), _zone(tz)
    _aware("start", start)
    _aware("end", end)
    if schedule.template is None or start > end:
        return iter(())
    return _until(_forward(schedule.template, zone, start, inclusive=True), end)


def latest_fire_time(
    interval: str, *, at_or_before: datetime, tz: str = "UTC", not_before: datetime | None = None,
) -> datetime | None:
    """The last fire instant <= `at_or_before`, in UTC, or None when there is none at or
    after `not_before` (or the interval is @once / @always_on).

    The scheduler uses it so that a trigger that missed many fires while the scheduler
    was down catches up with one run, not a stampede."""
    schedule, zone = _schedule(interval), _zone(tz)
    _aware("at_or_before", at_or_before)
    if not_before is not None:
        _aware("not_before", not_before)
    if schedule.template is None:
        return None
    latest = _backward_first(schedule.template, zone, at_or_before)
    if latest is None or (not_before is not None and latest < not_before):
        return None
    return latest


def upcoming(
    interval: str, *, after: datetime, count: int, tz: str = "UTC",
    start_time: datetime | None = None,
) -> list[datetime]:
    """The next `count` fire instants, as `next_fire_time` would return them one after
    the other (for the trigger page's "next runs")."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ScheduleError(f"count must be a whole number >= 0, got {count!r}")
    return list(islice(_after(interval, after=after, tz=tz, start_time=start_time), count))


def _after(
    interval: str, *, after: datetime, tz: str, start_time: datetime | None,
) -> Iterator[datetime]:
    """Fire instants strictly after `after` and not before `start_time`."""
    schedule, zone = _schedule(interval), _zone(tz)
    _aware("after", after)
    if start_time is not None and _aware("start_time", start_time) > after:
        bound, inclusive = start_time, True
    else:
        bound, inclusive = after, False
    if schedule.template is None:
        return iter(())
    return _forward(schedule.template, zone, bound, inclusive=inclusive)


def _until(instants: Iterator[datetime], end: datetime) -> Iterator[datetime]:
    for instant in instants:
        if instant > end:
            return
        yield instant


def _forward(
    template: croniter, zone: tzinfo, bound: datetime, *, inclusive: bool,
) -> Iterator[datetime]:
    """Fire instants from `bound` on (or strictly after it), ascending, each once.

    1. Start croniter at the local wall-clock minute of the instant just before the first
       candidate. Mapping wall-clock times to instants never goes backwards, so no wall
       time at or before that minute can map past the bound.
    2. Walk croniter over naive wall-clock times and map each to an instant.
    3. Drop instants before the bound (wall times in the repeated fall-back hour map to
       its first pass, which can lie before a bound inside the second pass) and instants
       equal to the last one yielded (several gap times collapse onto the gap's end).
    """
    before = bound - timedelta(microseconds=1) if inclusive else bound
    cron = copy.copy(template)
    # Flooring to the minute ourselves avoids croniter's float timestamps rounding
    # 01:59:59.999999 up to 02:00 and skipping a 02:00 match.
    cron.set_current(_wall_minute(before, zone), force=True)
    last: datetime | None = None
    while True:
        try:
            wall = cron.get_next(datetime)
        except (CroniterBadDateError, OverflowError):
            return  # past year 9999 or no further match
        instant = _wall_to_instant(wall, zone)
        if instant < bound or (instant == bound and not inclusive):
            continue
        if last is not None and instant <= last:
            continue
        last = instant
        yield instant


def _backward_first(template: croniter, zone: tzinfo, at_or_before: datetime) -> datetime | None:
    """The last fire instant <= `at_or_before`.

    Walk croniter backwards from a wall-clock time whose instant is already past the
    bound. When the bound's local time is the second pass of a repeated hour, wall times
    up to the end of that hour still map (fold=0) to instants before the bound, so start
    after them: at the same wall time plus the size of the fold.
    """
    local = at_or_before.astimezone(zone)
    start = local.replace(tzinfo=None, second=0, microsecond=0) + _ONE_MINUTE
    if local.fold:
        first_pass_offset = local.replace(fold=0).utcoffset()
        second_pass_offset = local.utcoffset()
        assert first_pass_offset is not None and second_pass_offset is not None
        start += first_pass_offset - second_pass_offset
    cron = copy.copy(template)
    cron.set_current(start, force=True)
    while True:
        try:
            wall = cron.get_prev(datetime)
        except (CroniterBadDateError, OverflowError, ValueError):
            return None  # before year 1 or no earlier match
        instant = _wall_to_instant(wall, zone)
        if instant <= at_or_before:
            return instant


def _wall_minute(instant: datetime, zone: tzinfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None, second=0, microsecond=0)


def _wall_to_instant(wall: datetime, zone: tzinfo) -> datetime:
    """The UTC instant of a naive local wall-clock time, per the DST rule above."""
    if zone is UTC:
        return wall.replace(tzinfo=UTC)
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first  # exists; fold=0 is the first pass of a repeated time
    return _gap_end(wall, zone)


def _gap_end(wall: datetime, zone: tzinfo) -> datetime:
    """The first instant after the spring-forward gap that swallows `wall`.

    For a missing wall time PEP 495 gives two readings, one with the offset before the
    transition and one with the offset after; the transition lies between them. Offsets
    change on whole seconds, so bisect over seconds (about 12 steps for a one-hour gap).
    """
    readings = sorted(wall.replace(tzinfo=zone, fold=fold).astimezone(UTC) for fold in (0, 1))
    low, high = int(readings[0].timestamp()), int(readings[1].timestamp())
    offset_after = readings[1].astimezone(zone).utcoffset()
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, zone).utcoffset() == offset_after:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)
