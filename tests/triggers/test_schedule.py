"""The pure next-fire-time functions: presets, crons, bounds, time zones and DST."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from triggers.schedule import (
    ALWAYS_ON,
    ONCE,
    PRESETS,
    ScheduleError,
    fire_times,
    is_periodic,
    latest_fire_time,
    next_fire_time,
    upcoming,
    validate_interval,
    validate_timezone,
)

pytestmark = pytest.mark.sqlite

NEW_YORK = "America/New_York"


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def hours_in(interval: str, start: datetime, end: datetime, tz: str) -> list[datetime]:
    return list(fire_times(interval, start=start, end=end, tz=tz))


# ------------------------------------------------------------------------------ presets


def test_presets_are_mages_crons():
    assert PRESETS == {
        "@hourly": "0 * * * *",
        "@daily": "0 0 * * *",
        "@weekly": "0 0 * * 1",
        "@monthly": "0 0 1 * *",
    }


def test_hourly_fires_on_each_hour_strictly_after():
    assert next_fire_time("@hourly", after=utc(2026, 5, 4, 10, 17)) == utc(2026, 5, 4, 11)
    assert next_fire_time("@hourly", after=utc(2026, 5, 4, 11)) == utc(2026, 5, 4, 12)
    # A fraction of a second past the hour is already after it.
    just_after = utc(2026, 5, 4, 11) + timedelta(microseconds=1)
    assert next_fire_time("@hourly", after=just_after) == utc(2026, 5, 4, 12)


def test_daily_fires_at_local_midnight_of_the_trigger_zone():
    assert next_fire_time("@daily", after=utc(2026, 5, 4, 10)) == utc(2026, 5, 5)
    # Kolkata is +05:30 all year: local midnight is 18:30 UTC the day before.
    assert next_fire_time("@daily", after=utc(2026, 5, 4, 10), tz="Asia/Kolkata") == utc(
        2026, 5, 4, 18, 30
    )


def test_weekly_fires_on_monday_midnight():
    # 2026-03-04 is a Wednesday.
    fires = upcoming("@weekly", after=utc(2026, 3, 4, 9), count=3)
    assert fires == [utc(2026, 3, 9), utc(2026, 3, 16), utc(2026, 3, 23)]
    assert all(fire.weekday() == 0 for fire in fires)


def test_monthly_fires_on_the_first_at_midnight():
    assert upcoming("@monthly", after=utc(2026, 1, 15), count=3) == [
        utc(2026, 2, 1), utc(2026, 3, 1), utc(2026, 4, 1),
    ]


def test_business_hours_cron():
    cron = "*/15 9-17 * * 1-5"
    # 2026-03-06 is a Friday: 17:45 is the last fire of the week, then Monday 09:00.
    assert next_fire_time(cron, after=utc(2026, 3, 6, 17, 40)) == utc(2026, 3, 6, 17, 45)
    assert upcoming(cron, after=utc(2026, 3, 6, 17, 45), count=2) == [
        utc(2026, 3, 9, 9), utc(2026, 3, 9, 9, 15),
    ]
    friday = hours_in(cron, utc(2026, 3, 6), utc(2026, 3, 6, 23, 59), "UTC")
    assert len(friday) == 9 * 4
    assert (friday[0], friday[-1]) == (utc(2026, 3, 6, 9), utc(2026, 3, 6, 17, 45))
    assert hours_in(cron, utc(2026, 3, 7), utc(2026, 3, 8, 23, 59), "UTC") == []


# ------------------------------------------------------------------------------- bounds


def test_start_time_is_honoured_inclusively():
    after = utc(2026, 1, 1)
    assert next_fire_time("@daily", after=after, start_time=utc(2026, 2, 10, 12)) == utc(2026, 2, 11)
    # A start time that is itself a fire instant fires then.
    assert next_fire_time("@daily", after=after, start_time=utc(2026, 2, 10)) == utc(2026, 2, 10)
    # A start time in the past changes nothing: still strictly after `after`.
    assert next_fire_time("@daily", after=after, start_time=utc(2025, 6, 1)) == utc(2026, 1, 2)
    assert upcoming("@daily", after=after, count=2, start_time=utc(2026, 2, 10)) == [
        utc(2026, 2, 10), utc(2026, 2, 11),
    ]


def test_fire_times_includes_both_bounds():
    fires = hours_in("@hourly", utc(2026, 5, 4, 0), utc(2026, 5, 4, 3), "UTC")
    assert fires == [utc(2026, 5, 4, h) for h in range(4)]
    off_the_hour = hours_in("@hourly", utc(2026, 5, 4, 0, 1), utc(2026, 5, 4, 2, 59), "UTC")
    assert off_the_hour == [utc(2026, 5, 4, 1), utc(2026, 5, 4, 2)]
    assert hours_in("@hourly", utc(2026, 5, 4, 3), utc(2026, 5, 4, 0), "UTC") == []


def test_fire_times_checks_its_arguments_at_the_call():
    with pytest.raises(ScheduleError):
        fire_times("not a cron", start=utc(2026, 1, 1), end=utc(2026, 1, 2))


def test_generators_of_one_interval_do_not_share_state():
    first = fire_times("@daily", start=utc(2026, 1, 1), end=utc(2026, 1, 31))
    second = fire_times("@daily", start=utc(2026, 6, 1), end=utc(2026, 6, 30))
    assert next(first) == utc(2026, 1, 1)
    assert next(second) == utc(2026, 6, 1)
    assert next(first) == utc(2026, 1, 2)
    assert next(second) == utc(2026, 6, 2)


def test_latest_fire_time():
    at = utc(2026, 5, 4, 10, 30)
    assert latest_fire_time("@hourly", at_or_before=at) == utc(2026, 5, 4, 10)
    assert latest_fire_time("@hourly", at_or_before=utc(2026, 5, 4, 10)) == utc(2026, 5, 4, 10)
    assert latest_fire_time("@daily", at_or_before=at) == utc(2026, 5, 4)
    # Nothing at or after not_before: None (no catch-up run to make).
    assert latest_fire_time("@hourly", at_or_before=at, not_before=utc(2026, 5, 4, 10, 1)) is None
    assert latest_fire_time("@hourly", at_or_before=at, not_before=utc(2026, 5, 4, 10)) == utc(
        2026, 5, 4, 10
    )
    assert latest_fire_time("@monthly", at_or_before=at, tz=NEW_YORK) == utc(2026, 5, 1, 4)


def test_upcoming_returns_count_fires():
    fires = upcoming("*/5 * * * *", after=utc(2026, 5, 4, 10, 2), count=4)
    assert fires == [utc(2026, 5, 4, 10, m) for m in (5, 10, 15, 20)]
    assert upcoming("@hourly", after=utc(2026, 5, 4), count=0) == []
    with pytest.raises(ScheduleError, match="count"):
        upcoming("@hourly", after=utc(2026, 5, 4), count=-1)


@pytest.mark.parametrize("word", [ONCE, ALWAYS_ON])
def test_once_and_always_on_never_fire_here(word):
    after = utc(2026, 5, 4)
    assert not is_periodic(word)
    assert next_fire_time(word, after=after, start_time=utc(2026, 6, 1)) is None
    assert list(fire_times(word, start=after, end=utc(2027, 1, 1))) == []
    assert latest_fire_time(word, at_or_before=after) is None
    assert upcoming(word, after=after, count=3) == []


def test_is_periodic():
    assert all(is_periodic(preset) for preset in PRESETS)
    assert is_periodic("5 4 * * sun")
    assert not is_periodic("@yearly")
    assert not is_periodic("61 * * * *")


def test_results_are_utc_whatever_the_inputs_zone():
    paris_noon = datetime(2026, 7, 1, 12, tzinfo=ZoneInfo("Europe/Paris"))
    fire = next_fire_time("0 14 * * *", after=paris_noon, tz="Europe/Paris")
    assert fire == utc(2026, 7, 1, 12)
    assert fire is not None and fire.tzinfo is UTC


# --------------------------------------------------------------------- zones and DST


def test_sao_paulo_has_no_dst_and_stays_at_minus_three():
    zone = ZoneInfo("America/Sao_Paulo")
    # Early November and mid February used to be Brazil's DST changes; no longer.
    for after in (utc(2026, 10, 30), utc(2027, 2, 12)):
        fires = upcoming("0 9 * * *", after=after, count=7, tz="America/Sao_Paulo")
        assert [fire.hour for fire in fires] == [12] * 7
        assert {fire.astimezone(zone).utcoffset() for fire in fires} == {timedelta(hours=-3)}
        assert {fire.astimezone(zone).hour for fire in fires} == {9}


def test_new_york_spring_forward_daily_0230_fires_once_at_the_end_of_the_gap():
    fires = upcoming("30 2 * * *", after=utc(2026, 3, 6, 12), count=3, tz=NEW_YORK)
    # 02:30 EST, then 02:30 does not exist: 03:00 EDT, then 02:30 EDT.
    assert fires == [utc(2026, 3, 7, 7, 30), utc(2026, 3, 8, 7), utc(2026, 3, 9, 6, 30)]


def test_new_york_spring_forward_daily_0130_is_unaffected():
    fires = upcoming("30 1 * * *", after=utc(2026, 3, 6, 12), count=3, tz=NEW_YORK)
    assert fires == [utc(2026, 3, 7, 6, 30), utc(2026, 3, 8, 6, 30), utc(2026, 3, 9, 5, 30)]


def test_new_york_spring_forward_hourly_skips_nothing_and_repeats_nothing():
    zone = ZoneInfo(NEW_YORK)
    # Local midnight to local midnight: a 23-hour day, 05:00 to 04:00 UTC.
    day = hours_in("@hourly", utc(2026, 3, 8, 5), utc(2026, 3, 9, 3, 59), NEW_YORK)
    assert day == [utc(2026, 3, 8, 5) + timedelta(hours=h) for h in range(23)]
    # 02:00 does not exist; its fire is the 03:00 EDT one (07:00 UTC), once.
    assert [fire.astimezone(zone).hour for fire in day] == [0, 1, *range(3, 24)]


def test_new_york_fall_back_daily_0230_is_unaffected():
    fires = upcoming("30 2 * * *", after=utc(2026, 10, 30, 12), count=3, tz=NEW_YORK)
    # 02:30 EDT, then 02:30 EST (after the repeated hour), then 02:30 EST.
    assert fires == [utc(2026, 10, 31, 6, 30), utc(2026, 11, 1, 7, 30), utc(2026, 11, 2, 7, 30)]


def test_new_york_fall_back_daily_0130_fires_once_at_the_first_pass():
    fires = upcoming("30 1 * * *", after=utc(2026, 10, 30, 12), count=3, tz=NEW_YORK)
    # 01:30 EDT (05:30 UTC) on the fall-back day, not again at 01:30 EST (06:30 UTC).
    assert fires == [utc(2026, 10, 31, 5, 30), utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]


def test_new_york_fall_back_hourly_fires_each_local_hour_once():
    zone = ZoneInfo(NEW_YORK)
    # Local midnight to local midnight: a 25-hour day, 04:00 to 05:00 UTC.
    day = hours_in("@hourly", utc(2026, 11, 1, 4), utc(2026, 11, 2, 4, 59), NEW_YORK)
    assert day == [utc(2026, 11, 1, 4), utc(2026, 11, 1, 5)] + [
        utc(2026, 11, 1, 7) + timedelta(hours=h) for h in range(22)
    ]
    assert utc(2026, 11, 1, 6) not in day  # 01:00 EST, the second pass
    assert [fire.astimezone(zone).hour for fire in day] == list(range(24))


def test_wall_times_inside_the_gap_collapse_to_one_fire():
    fires = hours_in("*/30 * * * *", utc(2026, 3, 8, 6, 30), utc(2026, 3, 8, 7, 30), NEW_YORK)
    # 01:30 EST, then 02:00, 02:30 (missing) and 03:00 EDT all at 07:00 UTC, then 03:30.
    assert fires == [utc(2026, 3, 8, 6, 30), utc(2026, 3, 8, 7), utc(2026, 3, 8, 7, 30)]


def test_a_fire_at_the_end_of_the_gap_is_inside_an_inclusive_start():
    assert hours_in("30 2 * * *", utc(2026, 3, 8, 7), utc(2026, 3, 8, 8), NEW_YORK) == [
        utc(2026, 3, 8, 7)
    ]
    assert latest_fire_time("30 2 * * *", at_or_before=utc(2026, 3, 8, 7), tz=NEW_YORK) == utc(
        2026, 3, 8, 7
    )
    assert next_fire_time("30 2 * * *", after=utc(2026, 3, 8, 7), tz=NEW_YORK) == utc(
        2026, 3, 9, 6, 30
    )


def test_from_inside_the_repeated_hour():
    # 06:10 UTC is 01:10 EST, the second pass: the 01:00 fire was at 05:00 UTC.
    assert next_fire_time("@hourly", after=utc(2026, 11, 1, 6, 10), tz=NEW_YORK) == utc(
        2026, 11, 1, 7
    )
    # 06:30 UTC is 01:30 EST; 01:45 fired at 01:45 EDT, 05:45 UTC, before it.
    assert latest_fire_time("45 1 * * *", at_or_before=utc(2026, 11, 1, 6, 30), tz=NEW_YORK) == utc(
        2026, 11, 1, 5, 45
    )
    assert next_fire_time("45 1 * * *", after=utc(2026, 11, 1, 5, 50), tz=NEW_YORK) == utc(
        2026, 11, 2, 6, 45
    )


def test_half_hour_dst_of_lord_howe():
    # Lord Howe moves its clocks by 30 minutes: on 2026-04-05 02:00 (+11:00) becomes
    # 01:30 (+10:30), at 15:00 UTC on the 4th; 01:45 happens twice.
    tz = "Australia/Lord_Howe"
    assert next_fire_time("45 1 * * *", after=utc(2026, 4, 4, 14), tz=tz) == utc(2026, 4, 4, 14, 45)
    assert next_fire_time("45 1 * * *", after=utc(2026, 4, 4, 15), tz=tz) == utc(2026, 4, 5, 15, 15)
    assert latest_fire_time("45 1 * * *", at_or_before=utc(2026, 4, 4, 15, 20), tz=tz) == utc(
        2026, 4, 4, 14, 45
    )


def test_a_year_of_half_hourly_fires_in_new_york():
    zone = ZoneInfo(NEW_YORK)
    start = datetime(2026, 1, 1, tzinfo=zone)
    end = datetime(2027, 1, 1, tzinfo=zone) - timedelta(seconds=1)
    fires = list(fire_times("*/30 * * * *", start=start, end=end, tz=NEW_YORK))
    assert all(a < b for a, b in zip(fires, fires[1:], strict=False))
    # Every local wall time fires once; 02:00 and 02:30 of the spring-forward day share
    # 03:00's instant, so two fires fewer than the 365 * 48 wall times.
    assert len(fires) == 365 * 48 - 2
    walls = {fire.astimezone(zone).replace(tzinfo=None) for fire in fires}
    assert len(walls) == len(fires)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("  0   9 * *\t1-5 ", "0 9 * * 1-5"),
        ("@Daily", "@daily"),
        (" @once ", "@once"),
        ("@always_on", "@always_on"),
        ("0 0 * * 7", "0 0 * * 7"),
        ("15 2 L * *", "15 2 L * *"),
        ("0 8 * JAN-MAR MON,FRI", "0 8 * JAN-MAR MON,FRI"),
    ],
)
def test_validate_interval_normalises(value, expected):
    assert validate_interval(value) == expected


def test_every_preset_validates_to_itself():
    for word in (*PRESETS, ONCE, ALWAYS_ON):
        assert validate_interval(word) == word


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("60 * * * *", "minute field '60'"),
        ("* 24 * * *", "hour field '24'"),
        ("0 0 32 * *", "day-of-month field '32'"),
        ("0 0 * 13 *", "month field '13'"),
        ("0 0 * * 8", "day-of-week field '8'"),
        ("*/0 * * * *", "minute field '\\*/0'"),
        ("1,,2 * * * *", "minute field '1,,2'"),
        ("0 0 * * * *", "has 6 fields.*seconds and years are not supported"),
        ("0 0 0 * * * 2030", "has 7 fields"),
        ("0 0 * *", "has 4 fields"),
        ("every day", "has 2 fields"),
        ("@yearly", "not a known preset"),
        ("@daly", "not a known preset"),
        ("0 0 30 2 *", "never fires"),
        ("H * * * *", "hashed or random"),
        ("R 0 * * *", "hashed or random"),
    ],
)
def test_validate_interval_refuses_with_a_reason(value, reason):
    with pytest.raises(ScheduleError, match=reason) as caught:
        validate_interval(value)
    assert f"'{value}'" in str(caught.value)


@pytest.mark.parametrize("value", ["", "   ", None, 5, "0 " * 60])
def test_validate_interval_refuses_empty_long_and_non_text(value):
    with pytest.raises(ScheduleError, match="schedule interval"):
        validate_interval(value)


def test_a_bad_interval_is_refused_by_every_function():
    after = utc(2026, 1, 1)
    with pytest.raises(ScheduleError, match="minute field"):
        next_fire_time("99 * * * *", after=after)
    with pytest.raises(ScheduleError, match="not a known preset"):
        upcoming("@fortnightly", after=after, count=2)
    with pytest.raises(ScheduleError, match="has 6 fields"):
        latest_fire_time("* * * * * *", at_or_before=after)


def test_validate_timezone():
    assert validate_timezone("America/New_York") == NEW_YORK
    assert validate_timezone(" Europe/Paris ") == "Europe/Paris"
    assert validate_timezone("UTC") == "UTC"


@pytest.mark.parametrize(
    "name", ["Mars/Olympus_Mons", "", "../../etc/passwd", "/etc/localtime", "localtime", "EST+5"],
)
def test_validate_timezone_refuses_what_is_not_an_iana_zone(name):
    with pytest.raises(ScheduleError, match="not an IANA time zone") as caught:
        validate_timezone(name)
    assert f"'{name}'" in str(caught.value)


def test_validate_timezone_suggests_the_right_spelling():
    with pytest.raises(ScheduleError, match="did you mean 'America/New_York'"):
        validate_timezone("america/new_york")


def test_a_bad_timezone_is_refused_by_the_fire_time_functions():
    with pytest.raises(ScheduleError, match="'Mars/Base'"):
        next_fire_time("@daily", after=utc(2026, 1, 1), tz="Mars/Base")


def test_naive_datetimes_are_refused():
    naive = datetime(2026, 1, 1)
    with pytest.raises(ScheduleError, match="after must be a timezone-aware"):
        next_fire_time("@daily", after=naive)
    with pytest.raises(ScheduleError, match="start_time must be a timezone-aware"):
        next_fire_time("@daily", after=utc(2026, 1, 1), start_time=naive)
    with pytest.raises(ScheduleError, match="end must be a timezone-aware"):
        fire_times("@daily", start=utc(2026, 1, 1), end=naive)
    with pytest.raises(ScheduleError, match="not_before must be a timezone-aware"):
        latest_fire_time("@daily", at_or_before=utc(2026, 1, 1), not_before=naive)
