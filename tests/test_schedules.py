"""next_run(): cron fields read as local wall time, with the cronie DST rule (DESIGN.md point 2)."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo

import pytest
from django.contrib.messages import get_messages
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone as dj_timezone
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from sisy_celery import admin as sisy_admin, schedules
from sisy_celery.models import HAS_NOT_RUN, Task, task_with_callable
from sisy_celery.schedules import (
    day_rule, describe_fields, describe_interval, interval, is_interval, next_run, schedule_warnings, validate,
)
from tests.test_admin import form_data
from tests.testapp import jobs
from tests.cron_reference import Reference, repeats_in_both_copies

UTC = timezone.utc
NY = ZoneInfo("America/New_York")
SYDNEY = ZoneInfo("Australia/Sydney")
LONDON = ZoneInfo("Europe/London")
ZONES = [
    "UTC", "America/New_York", "Australia/Sydney", "Europe/London", "America/Santiago",
    "Australia/Lord_Howe", "Pacific/Chatham", "Asia/Beirut", "America/Havana", "Asia/Kolkata",
]


def local(zone: ZoneInfo, *args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=zone, fold=fold)


def chain(schedule: str, after: datetime, zone: ZoneInfo | str, steps: int) -> list[datetime]:
    """Call next_run repeatedly from the previous result, as beat does."""
    results = []
    for _ in range(steps):
        after = next_run(schedule, after, zone)
        results.append(after)
    return results


def walls(results: list[datetime], zone: ZoneInfo) -> list[str]:
    """Local wall time with its UTC offset, e.g. '11-01 01:30 -0400'."""
    return [r.astimezone(zone).strftime("%m-%d %H:%M:%S %z").replace(":00 ", " ") for r in results]


# -- basics ------------------------------------------------------------------------------


def test_result_is_utc_and_strictly_after():
    after = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    result = next_run("0 12 * * *", after, "UTC")
    assert result == datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
    assert result.tzinfo is UTC


def test_after_in_another_offset_is_the_same_instant():
    after = datetime(2026, 1, 1, 17, 0, tzinfo=timezone(timedelta(hours=5)))  # 12:00 UTC
    assert next_run("30 12 * * *", after, "UTC") == datetime(2026, 1, 1, 12, 30, tzinfo=UTC)


def test_sub_second_after_goes_to_the_next_slot():
    after = datetime(2026, 1, 1, 10, 0, 0, 500000, tzinfo=UTC)
    assert next_run("* * * * * *", after, "UTC") == datetime(2026, 1, 1, 10, 0, 1, tzinfo=UTC)
    assert next_run("* * * * *", after, "UTC") == datetime(2026, 1, 1, 10, 1, tzinfo=UTC)
    just_before = datetime(2026, 1, 1, 12, 0, tzinfo=UTC) - timedelta(microseconds=1)
    assert next_run("0 12 * * *", just_before, "UTC") == datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def test_five_fields():
    after = datetime(2026, 5, 5, 10, 7, tzinfo=UTC)
    assert walls(chain("*/15 9-10 * * *", after, "UTC", 4), ZoneInfo("UTC")) == [
        "05-05 10:15 +0000", "05-05 10:30 +0000", "05-05 10:45 +0000", "05-06 09:00 +0000",
    ]


def test_sixth_field_is_seconds():
    after = datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
    assert chain("* * * * * */30", after, "UTC", 3) == [
        datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 1, 0, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 1, 30, tzinfo=UTC),
    ]
    assert next_run("0 0 * * * 15", after, "UTC") == datetime(2026, 1, 1, 0, 0, 15, tzinfo=UTC)
    assert next_run("* * * * * *", after, "UTC") == datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)


@pytest.mark.parametrize("alias, expected", [
    ("@daily", datetime(2026, 3, 11, 0, 0, tzinfo=UTC)),
    ("@midnight", datetime(2026, 3, 11, 0, 0, tzinfo=UTC)),
    ("@hourly", datetime(2026, 3, 10, 15, 0, tzinfo=UTC)),
    ("@weekly", datetime(2026, 3, 15, 0, 0, tzinfo=UTC)),  # Sunday
    ("@monthly", datetime(2026, 4, 1, 0, 0, tzinfo=UTC)),
    ("@yearly", datetime(2027, 1, 1, 0, 0, tzinfo=UTC)),
    ("@annually", datetime(2027, 1, 1, 0, 0, tzinfo=UTC)),
    (" @DAILY ", datetime(2026, 3, 11, 0, 0, tzinfo=UTC)),
])
def test_aliases(alias, expected):
    assert next_run(alias, datetime(2026, 3, 10, 14, 20, tzinfo=UTC), "UTC") == expected


def test_alias_in_a_zone():
    after = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
    assert walls([next_run("@daily", after, NY)], NY) == ["07-02 00:00 -0400"]


def test_month_ends():
    after = datetime(2026, 1, 1, tzinfo=UTC)
    assert [d.date().isoformat() for d in chain("0 0 31 * *", after, "UTC", 4)] == [
        "2026-01-31", "2026-03-31", "2026-05-31", "2026-07-31",
    ]
    assert [d.date().isoformat() for d in chain("0 0 30 * *", after, "UTC", 3)] == [
        "2026-01-30", "2026-03-30", "2026-04-30",
    ]


def test_last_day_of_month():
    after = datetime(2024, 1, 1, tzinfo=UTC)
    assert [d.date().isoformat() for d in chain("0 0 L * *", after, "UTC", 5)] == [
        "2024-01-31", "2024-02-29", "2024-03-31", "2024-04-30", "2024-05-31",
    ]
    assert next_run("0 0 L 2 *", datetime(2026, 1, 1, tzinfo=UTC), "UTC") == datetime(2026, 2, 28, tzinfo=UTC)


def test_leap_day():
    after = datetime(2024, 3, 1, tzinfo=UTC)
    assert [d.date().isoformat() for d in chain("0 0 29 2 *", after, "UTC", 3)] == [
        "2028-02-29", "2032-02-29", "2036-02-29",
    ]
    assert next_run("0 0 29 2 *", datetime(2024, 2, 28, 12, tzinfo=UTC), "UTC") == datetime(2024, 2, 29, tzinfo=UTC)


def test_year_end_rollover():
    after = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert next_run("* * * * *", after, "UTC") == datetime(2027, 1, 1, tzinfo=UTC)


def test_day_of_month_and_day_of_week_are_ored_like_cron():
    # Vixie cron: when both day fields are restricted, either one matching is enough.
    after = datetime(2026, 1, 1, tzinfo=UTC)  # a Thursday
    assert [d.date().isoformat() for d in chain("0 0 15 * 1", after, "UTC", 3)] == [
        "2026-01-05", "2026-01-12", "2026-01-15",
    ]


def test_names_and_seven_for_sunday():
    after = datetime(2026, 1, 1, tzinfo=UTC)
    assert next_run("0 0 * * sun", after, "UTC") == datetime(2026, 1, 4, tzinfo=UTC)
    assert next_run("0 0 * * 7", after, "UTC") == datetime(2026, 1, 4, tzinfo=UTC)
    assert next_run("0 0 1 jun *", after, "UTC") == datetime(2026, 6, 1, tzinfo=UTC)


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule, field", [
    ("x * * * *", "field 1 (minute) 'x'"),
    ("60 * * * *", "field 1 (minute) '60'"),
    ("*/0 * * * *", "field 1 (minute) '*/0'"),
    ("* 24 * * *", "field 2 (hour) '24'"),
    ("* * 32 * *", "field 3 (day of month) '32'"),
    ("* * 0 * *", "field 3 (day of month) '0'"),
    ("* * * 13 *", "field 4 (month) '13'"),
    ("* * * foo *", "field 4 (month) 'foo'"),
    ("* * * * 8", "field 5 (day of week) '8'"),
    ("* * * * * 60", "field 6 (second) '60'"),
    ("0 0 1 1 * 2030", "field 6 (second) '2030'"),
])
def test_bad_field_is_named(schedule, field):
    with pytest.raises(ValueError) as info:
        next_run(schedule, datetime(2026, 1, 1, tzinfo=UTC), "UTC")
    message = str(info.value)
    assert f"Invalid cron schedule {schedule!r}: {field} is not valid." in message
    assert "Use 5 fields 'minute hour day-of-month month day-of-week', optionally a 6th for seconds" in message


@pytest.mark.parametrize("schedule, count", [
    ("* * * * * * *", 7), ("0 0 1 1 * 0 2030", 7), ("* * * *", 4), ("0", 1),
])
def test_wrong_number_of_fields(schedule, count):
    with pytest.raises(ValueError, match=rf"it has {count} fields\. Use 5 fields"):
        validate(schedule)


@pytest.mark.parametrize("schedule", ["", "   ", None, 5, ["*"] * 5])
def test_not_a_string(schedule):
    with pytest.raises(ValueError, match=r"it must be a non-empty string\. Use 5 fields"):
        validate(schedule)


@pytest.mark.parametrize("schedule", ["0 0 31 2 *", "0 0 30 2 *", "0 0 31 4,6,9,11 *"])
def test_impossible_dates(schedule):
    with pytest.raises(ValueError, match=r"no date ever matches it \(check the day-of-month and month fields\)"):
        next_run(schedule, datetime(2026, 1, 1, tzinfo=UTC), "UTC")


@pytest.mark.parametrize("alias", ["@reboot", "@every_5m", "@"])
def test_unknown_alias(alias):
    with pytest.raises(ValueError) as info:
        validate(alias)
    assert f"Invalid cron schedule {alias!r}: unknown alias" in str(info.value)
    assert "@daily" in str(info.value)


@pytest.mark.parametrize("schedule, field", [
    ("R * * * *", "field 1 (minute) 'R'"),
    ("0 R * * *", "field 2 (hour) 'R'"),
    ("H * * * *", "field 1 (minute) 'H'"),
    ("0 0 * * * R", "field 6 (second) 'R'"),
])
def test_random_and_hashed_values_are_refused(schedule, field):
    # croniter draws a new random value each time it parses 'R', so the slot would move at every tick.
    with pytest.raises(ValueError) as info:
        validate(schedule)
    assert f"{field} is not valid: random (R) and hashed (H) values are not supported" in str(info.value)


def test_validate_returns_the_schedule_and_describe_fields():
    assert validate("*/5 1 * * *") == "*/5 1 * * *"
    assert describe_fields("*/5 1 * * * 30") == {
        "minute": "*/5", "hour": "1", "day of month": "*", "month": "*", "day of week": "*", "second": "30",
    }
    assert describe_fields("@hourly")["minute"] == "0"


@pytest.mark.parametrize("after", [datetime(2026, 1, 1), "2026-01-01T00:00:00Z", None, 0])
def test_naive_or_non_datetime_after_is_refused(after):
    with pytest.raises(ValueError, match="next_run needs an aware datetime for 'after'"):
        next_run("* * * * *", after, "UTC")


@pytest.mark.parametrize("tz", ["Mars/Olympus_Mons", "EST5EDT/x", "../etc/passwd", "+05:00"])
def test_unknown_zone_is_refused(tz):
    with pytest.raises(ValueError) as info:
        next_run("* * * * *", datetime(2026, 1, 1, tzinfo=UTC), tz)
    assert str(info.value) == f"Unknown time zone {tz!r}: use an IANA name such as 'UTC' or 'Europe/Paris'."


# -- which zone -----------------------------------------------------------------------------


def test_zone_may_be_a_name_or_a_tzinfo():
    after = datetime(2026, 7, 1, 0, 0, tzinfo=UTC)
    expected = datetime(2026, 7, 1, 13, 0, tzinfo=UTC)  # 09:00 EDT
    assert next_run("0 9 * * *", after, "America/New_York") == expected
    assert next_run("0 9 * * *", after, NY) == expected
    kolkata = timezone(timedelta(hours=5, minutes=30))
    assert next_run("0 9 * * *", after, kolkata) == datetime(2026, 7, 1, 3, 30, tzinfo=UTC)


@pytest.mark.parametrize("overrides, expected_hour", [
    ({"SISY_TIMEZONE": "America/New_York", "CELERY_TIMEZONE": "Europe/London", "TIME_ZONE": "Asia/Tokyo"}, 13),
    ({"CELERY_TIMEZONE": "Europe/London", "TIME_ZONE": "Asia/Tokyo"}, 8),
    ({"TIME_ZONE": "Asia/Tokyo"}, 0),
    ({}, 9),  # tests.settings: TIME_ZONE = 'UTC'
])
def test_default_zone_comes_from_settings(overrides, expected_hour):
    after = datetime(2026, 7, 1, 0, 0, tzinfo=UTC)
    with override_settings(**overrides):
        assert next_run("0 9 * * *", after).hour == expected_hour
        assert next_run("0 9 * * *", after, "").hour == expected_hour


def test_unknown_configured_zone_is_refused():
    with override_settings(SISY_TIMEZONE="Nowhere/Land"):
        with pytest.raises(ValueError, match="Unknown time zone 'Nowhere/Land'"):
            next_run("* * * * *", datetime(2026, 1, 1, tzinfo=UTC))


# -- DST: the cronie rule ----------------------------------------------------------------------


def test_new_york_spring_gap_fixed_hour_runs_after_the_gap():
    after = local(NY, 2026, 3, 7, 12, 0)
    assert walls(chain("30 2 * * *", after, NY, 3), NY) == [
        "03-08 03:00 -0400", "03-09 02:30 -0400", "03-10 02:30 -0400",
    ]


def test_new_york_spring_gap_exact_transition_instant():
    result = next_run("30 2 * * *", local(NY, 2026, 3, 8, 1, 59, 59), NY)
    assert result == datetime(2026, 3, 8, 7, 0, tzinfo=UTC)  # 03:00 EDT, the first instant after the gap
    # Just after the moved run, the next one is the next day's 02:30, not a second run at 03:xx.
    assert next_run("30 2 * * *", result, NY) == local(NY, 2026, 3, 9, 2, 30)


def test_new_york_spring_gap_stepped_minutes_collapse_into_one_run():
    after = local(NY, 2026, 3, 8, 1, 0)
    assert walls(chain("*/20 * * * *", after, NY, 6), NY) == [
        "03-08 01:20 -0500", "03-08 01:40 -0500", "03-08 03:00 -0400",
        "03-08 03:20 -0400", "03-08 03:40 -0400", "03-08 04:00 -0400",
    ]


def test_new_york_spring_gap_seconds_schedule():
    after = local(NY, 2026, 3, 8, 1, 59, 0)
    assert walls(chain("* * * * * */30", after, NY, 4), NY) == [
        "03-08 01:59:30 -0500", "03-08 03:00 -0400", "03-08 03:00:30 -0400", "03-08 03:01 -0400",
    ]


def test_new_york_fall_back_fixed_hour_runs_once():
    after = local(NY, 2026, 10, 31, 12, 0)
    assert walls(chain("30 1 * * *", after, NY, 3), NY) == [
        "11-01 01:30 -0400", "11-02 01:30 -0500", "11-03 01:30 -0500",
    ]


def test_new_york_fall_back_fixed_hour_after_in_second_copy():
    after = local(NY, 2026, 11, 1, 1, 10, fold=1)  # 01:10 EST, the repeat
    assert after.utcoffset() == timedelta(hours=-5)
    assert walls([next_run("30 1 * * *", after, NY)], NY) == ["11-02 01:30 -0500"]
    assert walls([next_run("*/15 1 * * *", after, NY)], NY) == ["11-02 01:00 -0500"]


def test_new_york_fall_back_fixed_hour_every_minute_of_the_hour_runs_once():
    results = chain("*/15 1 * * *", local(NY, 2026, 11, 1, 0, 0), NY, 5)
    assert walls(results, NY) == [
        "11-01 01:00 -0400", "11-01 01:15 -0400", "11-01 01:30 -0400", "11-01 01:45 -0400", "11-02 01:00 -0500",
    ]


def test_new_york_fall_back_wildcard_hour_runs_in_both_copies():
    after = local(NY, 2026, 11, 1, 0, 0)
    assert walls(chain("30 * * * *", after, NY, 4), NY) == [
        "11-01 00:30 -0400", "11-01 01:30 -0400", "11-01 01:30 -0500", "11-01 02:30 -0500",
    ]


def test_new_york_fall_back_stepped_minutes_run_in_both_copies():
    after = local(NY, 2026, 11, 1, 0, 50)
    assert walls(chain("*/15 * * * *", after, NY, 10), NY) == [
        "11-01 01:00 -0400", "11-01 01:15 -0400", "11-01 01:30 -0400", "11-01 01:45 -0400",
        "11-01 01:00 -0500", "11-01 01:15 -0500", "11-01 01:30 -0500", "11-01 01:45 -0500",
        "11-01 02:00 -0500", "11-01 02:15 -0500",
    ]


@pytest.mark.parametrize("schedule", ["0 */1 * * *", "0 * * * *", "@hourly", "0 1-23/2 * * *", "0 1/12 * * *"])
def test_new_york_fall_back_stepped_hours_run_in_both_copies(schedule):
    results = chain(schedule, local(NY, 2026, 11, 1, 0, 30), NY, 2)
    assert walls(results, NY) == ["11-01 01:00 -0400", "11-01 01:00 -0500"]


def test_new_york_fall_back_after_at_end_of_first_copy_goes_to_second_copy():
    after = local(NY, 2026, 11, 1, 1, 59, 59)  # EDT, one second before the clocks go back
    assert walls([next_run("30 * * * *", after, NY)], NY) == ["11-01 01:30 -0500"]
    assert walls([next_run("30 1 * * *", after, NY)], NY) == ["11-02 01:30 -0500"]


def test_sydney_autumn_fall_back_first_sunday_of_april():
    # AEDT -> AEST at 03:00 AEDT on 2026-04-05: 02:00-02:59 happens twice.
    after = local(SYDNEY, 2026, 4, 4, 12, 0)
    assert walls(chain("30 2 * * *", after, SYDNEY, 3), SYDNEY) == [
        "04-05 02:30 +1100", "04-06 02:30 +1000", "04-07 02:30 +1000",
    ]
    assert walls(chain("0 * * * *", local(SYDNEY, 2026, 4, 5, 0, 30), SYDNEY, 5), SYDNEY) == [
        "04-05 01:00 +1100", "04-05 02:00 +1100", "04-05 02:00 +1000", "04-05 03:00 +1000", "04-05 04:00 +1000",
    ]


def test_sydney_spring_gap_first_sunday_of_october():
    # AEST -> AEDT at 02:00 AEST on 2026-10-04: 02:00-02:59 never happens.
    after = local(SYDNEY, 2026, 10, 3, 12, 0)
    assert walls(chain("30 2 * * *", after, SYDNEY, 3), SYDNEY) == [
        "10-04 03:00 +1100", "10-05 02:30 +1100", "10-06 02:30 +1100",
    ]
    assert walls(chain("15 * * * *", local(SYDNEY, 2026, 10, 4, 0, 30), SYDNEY, 4), SYDNEY) == [
        "10-04 01:15 +1000", "10-04 03:00 +1100", "10-04 03:15 +1100", "10-04 04:15 +1100",
    ]


def test_london_both_changes():
    assert walls(chain("30 1 * * *", local(LONDON, 2026, 3, 28, 12, 0), LONDON, 2), LONDON) == [
        "03-29 02:00 +0100", "03-30 01:30 +0100",
    ]
    assert walls(chain("30 1 * * *", local(LONDON, 2026, 10, 24, 12, 0), LONDON, 3), LONDON) == [
        "10-25 01:30 +0100", "10-26 01:30 +0000", "10-27 01:30 +0000",
    ]
    assert walls(chain("30 * * * *", local(LONDON, 2026, 10, 25, 0, 0), LONDON, 3), LONDON) == [
        "10-25 00:30 +0100", "10-25 01:30 +0100", "10-25 01:30 +0000",
    ]


def test_midnight_transitions_santiago():
    zone = ZoneInfo("America/Santiago")
    # Clocks go from 24:00 to 01:00 on 2026-09-06: a daily midnight job runs at 01:00.
    assert walls(chain("0 0 * * *", local(zone, 2026, 9, 5, 12, 0), zone, 2), zone) == [
        "09-06 01:00 -0300", "09-07 00:00 -0300",
    ]
    # Clocks go back from 24:00 to 23:00 on 2026-04-04: 23:30 is repeated and runs once.
    assert walls(chain("30 23 * * *", local(zone, 2026, 4, 4, 12, 0), zone, 2), zone) == [
        "04-04 23:30 -0300", "04-05 23:30 -0400",
    ]


def test_half_hour_shift_lord_howe():
    zone = ZoneInfo("Australia/Lord_Howe")
    # 02:00-02:29 is skipped on 2026-10-04, 01:30-01:59 repeated on 2026-04-05.
    assert walls([next_run("15 2 * * *", local(zone, 2026, 10, 4, 0, 0), zone)], zone) == ["10-04 02:30 +1100"]
    assert walls(chain("*/20 * * * *", local(zone, 2026, 4, 5, 1, 30), zone, 5), zone) == [
        "04-05 01:40 +1100", "04-05 01:40 +1030", "04-05 02:00 +1030", "04-05 02:20 +1030", "04-05 02:40 +1030",
    ]


def test_per_day_chain_across_a_whole_year_keeps_the_wall_time():
    results = chain("0 9 * * *", local(NY, 2026, 1, 1, 0, 0), NY, 365)
    assert {r.astimezone(NY).strftime("%H:%M") for r in results} == {"09:00"}
    assert len({r.astimezone(NY).date() for r in results}) == 365
    assert {r.astimezone(UTC).hour for r in results} == {13, 14}


# -- properties --------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def transitions(zone_name: str, year: int) -> tuple[datetime, ...]:
    """The UTC instants at which ``zone_name`` changes offset during ``year``."""
    zone = ZoneInfo(zone_name)
    found = []
    t = datetime(year, 1, 1, tzinfo=UTC)
    previous = t.astimezone(zone).utcoffset()
    while t.year == year:
        t += timedelta(minutes=15)
        offset = t.astimezone(zone).utcoffset()
        if offset != previous:
            found.append(t)
            previous = offset
    return tuple(found)


def wall_instants(wall: datetime, zone: ZoneInfo, both_copies: bool) -> list[datetime]:
    """Reference DST rule, by brute force: the instants a naive wall time is run at."""
    first = wall.replace(tzinfo=zone, fold=0)
    second = wall.replace(tzinfo=zone, fold=1)
    # In UTC: PEP 495 makes a fold=1 time unequal to every instant of another zone.
    first, second = first.astimezone(UTC), second.astimezone(UTC)
    if first == second:
        return [first]
    exists = first.astimezone(zone).replace(tzinfo=None) == wall
    if exists:
        return [first, second] if both_copies else [first]
    # In a gap: walk to the first whole minute whose offset is the new one.
    t = second.replace(second=0, microsecond=0)
    new_offset = first.astimezone(zone).utcoffset()
    while t.astimezone(zone).utcoffset() != new_offset:
        t += timedelta(minutes=1)
    return [t]


def reference_next_run(schedule: str, after: datetime, zone: ZoneInfo) -> datetime:
    """Slow, obvious oracle: the earliest instant > after among all wall slots near ``after``."""
    both_copies = repeats_in_both_copies(schedule.split()[1])
    start = after.astimezone(zone).replace(tzinfo=None) - timedelta(hours=3)
    best = None
    for wall in Reference(schedule).walls(start):
        if best is not None and wall > best.astimezone(zone).replace(tzinfo=None) + timedelta(hours=3):
            return best
        for instant in wall_instants(wall, zone, both_copies):
            if instant > after and (best is None or instant < best):
                best = instant


def _field(draw, low: int, high: int, hot: list[int]) -> str:
    value = st.one_of(st.integers(low, high), st.sampled_from(hot))
    kind = draw(st.sampled_from(["star", "step", "one", "range", "list", "range_step"]))
    if kind == "star":
        return "*"
    if kind == "step":
        return f"*/{draw(st.integers(1, max(1, (high - low) // 2)))}"
    if kind == "one":
        return str(draw(value))
    if kind == "list":
        return ",".join(str(v) for v in sorted(set(draw(st.lists(value, min_size=2, max_size=4)))))
    a = draw(value)
    b = draw(st.integers(a, high))
    if kind == "range":
        return f"{a}-{b}"
    return f"{a}-{b}/{draw(st.integers(1, 5))}"


@st.composite
def cron_strings(draw, fixed_hour: bool = False) -> str:
    minute = _field(draw, 0, 59, [0, 15, 30, 45, 59])
    if fixed_hour:
        hour = ",".join(str(h) for h in sorted(set(draw(st.lists(st.sampled_from([0, 1, 2, 3, 23]), min_size=1, max_size=2)))))
    else:
        hour = _field(draw, 0, 23, [0, 1, 2, 3, 23])
    dom = draw(st.sampled_from(["*", "*", "*", "L", "1", "15", "29", "31", "1-7", "*/2"]))
    month = draw(st.sampled_from(["*", "*", "*", "3", "4", "9,10", "10-11", "2"]))
    dow = draw(st.sampled_from(["*", "*", "*", "0", "6", "1-5", "sun"]))
    fields = [minute, hour, dom, month, dow]
    if draw(st.booleans()):
        fields.append(draw(st.sampled_from(["0", "30", "*/20", "*/30", "15,45"])))
    return " ".join(fields)


@st.composite
def instants(draw) -> tuple[str, datetime]:
    """A zone and an instant, often within a couple of days before one of its DST changes."""
    zone_name = draw(st.sampled_from(ZONES))
    year = draw(st.integers(2021, 2030))
    near = transitions(zone_name, year)
    if near and draw(st.integers(0, 3)):
        base = draw(st.sampled_from(near))
        after = base + timedelta(seconds=draw(st.integers(-2 * 86400, 3 * 3600)))
    else:
        after = datetime(year, 1, 1, tzinfo=UTC) + timedelta(seconds=draw(st.integers(0, 365 * 86400)))
    after += timedelta(microseconds=draw(st.sampled_from([0, 0, 1, 999999])))
    if draw(st.booleans()):
        after = after.astimezone(ZoneInfo(zone_name))  # same tzinfo as the schedule's zone
    return zone_name, after


def _valid(schedule: str) -> bool:
    try:
        validate(schedule)
    except ValueError:
        return False
    return True


PROPERTY = settings(max_examples=int(os.environ.get('SISY_HYPOTHESIS_EXAMPLES', 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(cron_strings(), instants())
def test_property_next_run_is_the_reference_slot(schedule, zone_and_after):
    zone_name, after = zone_and_after
    assume(_valid(schedule))
    zone = ZoneInfo(zone_name)
    result = next_run(schedule, after, zone_name)
    assert result > after
    assert result.utcoffset() == timedelta(0)
    wall = result.astimezone(zone).replace(tzinfo=None)
    if not Reference(schedule).matches(wall):
        # Only a slot moved out of a skipped local hour may run at a non-matching wall time:
        # it then runs at the very instant the clocks jumped forward.
        before = (result - timedelta(seconds=1)).astimezone(zone)
        assert result.astimezone(zone).utcoffset() > before.utcoffset(), (schedule, zone_name, after, result)
        gap = result.astimezone(zone).utcoffset() - before.utcoffset()
        skipped_slot = next(Reference(schedule).walls(wall - gap - timedelta(seconds=1)))
        assert skipped_slot < wall
    assert result == reference_next_run(schedule, after, zone), (schedule, zone_name, after)


@PROPERTY
@given(cron_strings(fixed_hour=True), instants())
def test_property_fixed_hour_never_repeats_a_wall_time(schedule, zone_and_after):
    zone_name, after = zone_and_after
    assume(_valid(schedule))
    zone = ZoneInfo(zone_name)
    results = chain(schedule, after, zone_name, 30)
    assert results == sorted(results) and len(set(results)) == 30
    local_walls = [r.astimezone(zone).replace(tzinfo=None) for r in results]
    assert len(set(local_walls)) == 30, (schedule, zone_name, after, walls(results, zone))


@PROPERTY
@given(cron_strings(), instants())
def test_property_chain_is_strictly_increasing_and_matches(schedule, zone_and_after):
    zone_name, after = zone_and_after
    assume(_valid(schedule))
    results = chain(schedule, after, zone_name, 10)
    assert all(a < b for a, b in zip([after] + results, results))
    # In a zone without DST every result matches the expression exactly.
    if zone_name in ("UTC", "Asia/Kolkata"):
        zone = ZoneInfo(zone_name)
        assert all(Reference(schedule).matches(r.astimezone(zone).replace(tzinfo=None)) for r in results)



# -- intervals: "every N seconds/minutes/hours" from an anchor, in real time ----------------------------

# 2026-01-01T00:00Z is 1,767,225,600 s after the epoch: a multiple of 90 s, 5 min and 2 h.
NEW_YEAR = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("schedule, seconds", [
    ("every 90s", 90), ("every 5m", 300), ("every 2h", 7200), ("every 1s", 1), ("Every 90 Seconds", 90),
    ("  every 3 min ", 180), ("every 1 hour", 3600), ("every 12hrs", 43200), ("every 8784h", 366 * 86400),
])
def test_interval_forms(schedule, seconds):
    assert is_interval(schedule)
    assert validate(schedule) == schedule
    assert interval(schedule) == timedelta(seconds=seconds)


@pytest.mark.parametrize("schedule, detail", [
    ("every", ""), ("every 5", ""), ("every 5x", ""), ("every 5 m s", ""), ("everyday", ""), ("every -5s", ""),
    ("every 1.5m", ""), ("every 0s", "between 1 second and 366 days"), ("every 8785h", "between 1 second"),
    ("every 99999999999999999999999h", "between 1 second"),
])
def test_bad_intervals_are_refused_with_the_form_to_use(schedule, detail):
    with pytest.raises(ValueError) as caught:
        validate(schedule)
    message = str(caught.value)
    assert message.startswith(f"Invalid interval schedule {schedule!r}")
    assert detail in message and "'every 90s', 'every 5m' or 'every 2h'" in message


def test_cron_strings_are_not_intervals():
    assert not any(is_interval(s) for s in ("* * * * *", "@daily", "*/5 * * * * *", "", None, 5))


def test_interval_without_anchor_counts_from_the_epoch():
    assert next_run("every 90s", NEW_YEAR, "UTC") == NEW_YEAR + timedelta(seconds=90)
    assert next_run("every 90s", NEW_YEAR - timedelta(microseconds=1)) == NEW_YEAR
    assert next_run("every 5m", NEW_YEAR + timedelta(minutes=7, seconds=30)) == NEW_YEAR + timedelta(minutes=10)
    assert next_run("every 2h", NEW_YEAR + timedelta(hours=1)) == NEW_YEAR + timedelta(hours=2)


def test_interval_counts_from_its_anchor():
    anchor = datetime(2026, 5, 4, 10, 0, 7, 250000, tzinfo=UTC)
    assert next_run("every 2m", anchor - timedelta(microseconds=1), anchor=anchor) == anchor
    assert next_run("every 2m", anchor, anchor=anchor) == anchor + timedelta(minutes=2)
    assert next_run("every 2m", anchor + timedelta(minutes=5), anchor=anchor) == anchor + timedelta(minutes=6)
    # the anchor may be given in any offset; the result is UTC
    result = next_run("every 2m", anchor, anchor=anchor.astimezone(NY))
    assert result == anchor + timedelta(minutes=2) and result.tzinfo is UTC


def test_cron_ignores_the_anchor():
    anchor = datetime(2026, 5, 4, 10, 0, 7, tzinfo=UTC)
    assert next_run("0 12 * * *", anchor, "UTC", anchor=anchor) == datetime(2026, 5, 4, 12, 0, tzinfo=UTC)


def test_naive_anchor_is_refused():
    with pytest.raises(ValueError, match="aware datetime for 'anchor'"):
        next_run("every 5m", NEW_YEAR, anchor=datetime(2026, 1, 1))


def test_interval_ignores_the_zone_and_dst():
    """Every hour across New York's spring gap and London's fall back: 60 real minutes apart, while the
    local clock shows a 2-hour step in the gap and the same hour twice in the repeat."""
    spring = local(NY, 2026, 3, 8, 0, 30)
    runs = [next_run("every 1h", spring, NY, anchor=spring)]
    for _ in range(3):
        runs.append(next_run("every 1h", runs[-1], NY, anchor=spring))
    assert [b - a for a, b in zip(runs, runs[1:])] == [timedelta(hours=1)] * 3
    assert walls(runs, NY) == ["03-08 01:30 -0500", "03-08 03:30 -0400", "03-08 04:30 -0400", "03-08 05:30 -0400"]
    autumn = local(LONDON, 2026, 10, 25, 0, 30)
    runs = [next_run("every 1h", autumn, "Europe/London", anchor=autumn)]
    for _ in range(2):
        runs.append(next_run("every 1h", runs[-1], "Europe/London", anchor=autumn))
    assert walls(runs, LONDON) == ["10-25 01:30 +0100", "10-25 01:30 +0000", "10-25 02:30 +0000"]


@st.composite
def interval_cases(draw) -> tuple[str, timedelta, datetime, datetime]:
    """An interval, an anchor and an instant, both near a DST change of New York or London."""
    count = draw(st.integers(1, 200))
    unit, seconds = draw(st.sampled_from([("s", 1), ("m", 60), ("h", 3600)]))
    assume(count * seconds <= 48 * 3600)
    zone_name = draw(st.sampled_from(["America/New_York", "Europe/London"]))
    change = draw(st.sampled_from(transitions(zone_name, draw(st.integers(2021, 2030)))))
    anchor = change + timedelta(seconds=draw(st.integers(-3 * 86400, 3 * 86400)),
                                microseconds=draw(st.sampled_from([0, 1, 500000])))
    after = change + timedelta(seconds=draw(st.integers(-2 * 86400, 3600)))
    zone = ZoneInfo(zone_name)
    return f"every {count}{unit}", timedelta(seconds=count * seconds), anchor.astimezone(zone), after.astimezone(zone)


@PROPERTY
@given(interval_cases())
def test_property_consecutive_interval_slots_are_exactly_the_period_apart(case):
    schedule, period, anchor, after = case
    zone = after.tzinfo
    runs = [next_run(schedule, after, zone, anchor=anchor)]
    while runs[-1] - after < timedelta(days=3) and len(runs) < 400:
        runs.append(next_run(schedule, runs[-1], zone, anchor=anchor))
    assert timedelta(0) < runs[0] - after <= period
    assert (runs[0] - anchor) % period == timedelta(0)
    assert all(b - a == period for a, b in zip(runs, runs[1:]))


@pytest.mark.django_db
def test_task_with_an_interval_and_no_start_runs_on_the_epoch_grid():
    before = dj_timezone.now()
    task = task_with_callable(jobs.job, schedule="every 90s")
    task.save()
    assert task.start_running == HAS_NOT_RUN
    assert before < task.next_run <= before + timedelta(seconds=90)
    assert (task.next_run - HAS_NOT_RUN) % timedelta(seconds=90) == timedelta(0)
    assert task.following_run(task.next_run) == task.next_run + timedelta(seconds=90)


@pytest.mark.django_db
def test_task_with_an_interval_counts_from_start_running():
    start = dj_timezone.now().replace(microsecond=0) + timedelta(hours=1, seconds=7)
    task = Task.run_iterations(jobs.job, iterations=3, schedule="every 5m", start_running=start)
    assert task.next_run == start
    assert task.following_run(start + timedelta(minutes=12)) == start + timedelta(minutes=15)
    later = start + timedelta(minutes=1)
    task.start_running = later
    task.save()
    task.refresh_from_db()
    assert task.next_run == later


@pytest.mark.django_db
def test_run_immediately_with_an_interval_runs_now_then_on_the_grid():
    before = dj_timezone.now()
    task = Task.run_iterations(jobs.job, iterations=2, schedule="every 2h", run_immediately=True)
    assert before <= task.next_run <= dj_timezone.now()
    assert task.following_run(task.next_run) == NEW_YEAR + timedelta(hours=2) * (
        (task.next_run - NEW_YEAR) // timedelta(hours=2) + 1)


def test_bad_interval_is_refused_at_creation():
    with pytest.raises(ValueError, match="Invalid interval schedule 'every 5x'"):
        task_with_callable(jobs.job, schedule="every 5x")


@pytest.mark.parametrize("schedule, text", [
    ("every 90s", "every 90 seconds"), ("every 1s", "every second"), ("every 5 minutes", "every 5 minutes"),
    ("every 1h", "every hour"), ("every 2h", "every 2 hours"), ("every 5x", ""),
])
def test_describe_interval_in_the_admin(schedule, text):
    assert sisy_admin.describe_schedule(schedule) == text
    if text:
        assert describe_interval(schedule) == text


@pytest.mark.django_db
def test_preview_of_an_interval_counts_from_the_anchor(admin_client: Client):
    anchor = dj_timezone.now().replace(microsecond=0) + timedelta(minutes=10, seconds=7)
    url = reverse("admin:sisy_celery_task_preview")
    response = admin_client.get(url, {"schedule": "every 90s", "timezone": "Europe/Paris", "anchor": anchor.isoformat()})
    assert response.status_code == 200
    data = response.json()
    assert data["description"] == "every 90 seconds" and data["warnings"] == []
    runs = [datetime.fromisoformat(run["at"]) for run in data["runs"]]
    assert len(runs) == 5
    assert all(b - a == timedelta(seconds=90) for a, b in zip(runs, runs[1:]))
    assert all((run - anchor) % timedelta(seconds=90) == timedelta(0) for run in runs)
    # no anchor (a new task without a start): the epoch grid
    runs = [datetime.fromisoformat(run["at"]) for run in admin_client.get(url, {"schedule": "every 90s"}).json()["runs"]]
    assert all((run - HAS_NOT_RUN) % timedelta(seconds=90) == timedelta(0) for run in runs)


@pytest.mark.django_db
def test_change_page_preview_of_an_interval_task(admin_client: Client):
    start = dj_timezone.now().replace(microsecond=0) + timedelta(days=1, seconds=7)
    task = task_with_callable(jobs.job, schedule="every 2h", start_running=start, timezone="America/New_York")
    task.save()
    page = admin_client.get(reverse("admin:sisy_celery_task_change", args=[task.pk])).content.decode()
    preview = page[page.index('class="sisy-preview"'):]
    preview = preview[:preview.index("</ol>")]
    assert f'data-anchor="{start.isoformat()}"' in preview
    assert "every 2 hours" in preview and preview.count("<li>") == 5
    for k in range(5):
        assert (start + timedelta(hours=2 * k)).astimezone(NY).strftime("%Y-%m-%d %H:%M:%S %Z") in preview


# -- the seconds-last warning -------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["*/5 * * * * *", "0-30/10 * * * * *"])
def test_stepped_minutes_with_every_second_are_warned_about(schedule):
    (warning,) = schedule_warnings(schedule)
    minutes = schedule.split()[0]
    assert warning.startswith(f"{schedule!r} runs every second of the minutes {minutes!r}: "
                              f"the seconds field comes last.")
    assert f"'* * * * * {minutes}'" in warning and f"'{minutes} * * * *'" in warning


@pytest.mark.parametrize("schedule", [
    "*/5 * * * *", "* * * * * */5", "*/5 * * * * 0", "5 * * * * *", "* * * * * *", "every 5m", "@hourly",
])
def test_other_schedules_have_no_warning(schedule):
    assert schedule_warnings(schedule) == []


@pytest.mark.django_db
def test_admin_warns_but_saves_a_seconds_last_surprise(admin_client: Client):
    preview = admin_client.get(reverse("admin:sisy_celery_task_preview"), {"schedule": "*/5 * * * * *"}).json()
    assert preview["warnings"] == schedule_warnings("*/5 * * * * *")
    response = admin_client.post(reverse("admin:sisy_celery_task_add"),
                                 form_data(label="surprise", schedule="*/5 * * * * *"))
    assert response.status_code == 302
    task = Task.objects.get(label="surprise")
    assert task.schedule == "*/5 * * * * *"
    assert [str(m) for m in get_messages(response.wsgi_request) if m.level_tag == "warning"] == \
        schedule_warnings("*/5 * * * * *")
    page = admin_client.get(reverse("admin:sisy_celery_task_change", args=[task.pk])).content.decode()
    preview = page[page.index('class="sisy-preview"'):]
    preview = preview[:preview.index("</ol>")]
    assert '<li class="warning">' in preview and "the seconds field comes last" in preview


@pytest.mark.django_db
def test_admin_form_refuses_a_bad_interval_on_its_field(admin_client: Client):
    response = admin_client.post(reverse("admin:sisy_celery_task_add"), form_data(schedule="every 5x"))
    assert response.status_code == 200
    form_errors = response.context["adminform"].form.errors
    assert list(form_errors) == ["schedule"] and form_errors["schedule"][0].startswith("Invalid interval schedule")
    assert not Task.objects.exists()
# -- independent of what ran before and of the machine's zone --------------------------------


@pytest.fixture(autouse=True)
def _cold_caches() -> None:
    """Each test computes its schedules afresh: a parse or a next run cached by an earlier test
    (or by the process a mutation run forks from) would hide what the code does now."""
    for value in vars(schedules).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


@pytest.fixture
def machine_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The process's local zone (TZ) set west of every zone under test, far from UTC."""
    monkeypatch.setenv("TZ", "Pacific/Honolulu")
    time.tzset()
    yield "Pacific/Honolulu"
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("schedule, after, expected", [
    # a wildcard hour in the repeated hour: the first copy comes first
    ("30 * * * *", local(NY, 2026, 11, 1, 0, 45), datetime(2026, 11, 1, 5, 30, tzinfo=UTC)),
    # after the first copy's slot, the second copy's comes before anything past the repeat
    ("30 * * * *", local(NY, 2026, 11, 1, 1, 40), datetime(2026, 11, 1, 6, 30, tzinfo=UTC)),
    # a slot in the skipped hour runs at the first instant after the gap (03:00 EDT)
    ("30 2 * * *", local(NY, 2026, 3, 8, 1, 0), datetime(2026, 3, 8, 7, 0, tzinfo=UTC)),
])
def test_dst_results_are_utc_whatever_the_machine_zone(machine_zone: str, schedule: str, after: datetime,
                                                       expected: datetime) -> None:
    assert datetime.now().astimezone().utcoffset() == timedelta(hours=-10), f"TZ={machine_zone} took effect"
    result = next_run(schedule, after, NY)
    assert result == expected
    assert result.utcoffset() == timedelta(0) and result.tzname() == "UTC"


def test_sub_second_after_at_the_start_of_the_repeated_hour() -> None:
    # 01:00:00.5 EDT, the first copy: the hourly slot of the second copy, 01:00 EST, is next. The
    # search for where the repeat begins then narrows to less than two seconds around it.
    after = datetime(2026, 11, 1, 1, 0, 0, 500000, tzinfo=NY)
    assert next_run("0 * * * *", after, NY) == datetime(2026, 11, 1, 6, 0, tzinfo=UTC)
    assert next_run("0 1 * * *", after, NY) == datetime(2026, 11, 2, 6, 0, tzinfo=UTC)  # fixed hour: once


class NoOffset(tzinfo):
    """A tzinfo that knows no offset: datetimes carrying it are naive by Python's definition."""

    def utcoffset(self, dt: datetime | None) -> None:
        return None

    def tzname(self, dt: datetime | None) -> str:
        return "unknown"

    def dst(self, dt: datetime | None) -> None:
        return None


def test_after_with_a_tzinfo_but_no_offset_is_refused() -> None:
    with pytest.raises(ValueError, match="aware datetime"):
        next_run("* * * * *", datetime(2026, 1, 1, tzinfo=NoOffset()), "UTC")


@pytest.mark.parametrize("schedule", ["0 1/1 * * *", "0 0-23/1 * * *"])
def test_stepped_hour_without_a_star_runs_in_both_copies(schedule: str) -> None:
    after = local(NY, 2026, 11, 1, 0, 30)
    assert walls(chain(schedule, after, NY, 3), NY) == ["11-01 01:00 -0400", "11-01 01:00 -0500", "11-01 02:00 -0500"]


def test_interval_anchor_with_a_tzinfo_but_no_offset_is_refused() -> None:
    with pytest.raises(ValueError, match="aware datetime for 'anchor'"):
        next_run("every 5m", datetime(2026, 1, 1, tzinfo=UTC), anchor=datetime(2026, 1, 1, tzinfo=NoOffset()))


# -- the exact warning text -----------------------------------------------------------------------


def test_star_step_warning_offers_the_every_forms() -> None:
    assert schedule_warnings("*/5 * * * * *") == [
        "'*/5 * * * * *' runs every second of the minutes '*/5': the seconds field comes last. "
        "For seconds '*/5' write '* * * * * */5' (or every 5s); "
        "for one run in each of those minutes, '*/5 * * * *' (or every 5m)."
    ]


@pytest.mark.parametrize("schedule, minutes", [("10-40/15 * * * * *", "10-40/15"), ("7/20 */2 * * * *", "7/20")])
def test_range_step_warning_has_no_every_form(schedule: str, minutes: str) -> None:
    rest = " ".join(schedule.split()[1:5])
    assert schedule_warnings(schedule) == [
        f"{schedule!r} runs every second of the minutes {minutes!r}: the seconds field comes last. "
        f"For seconds {minutes!r} write '* * * * * {minutes}'; "
        f"for one run in each of those minutes, '{minutes} {rest}'."
    ]


def test_star_step_warning_with_a_stepped_hour_names_the_minute_step() -> None:
    (warning,) = schedule_warnings("*/10 */3 * * * *")
    assert warning.endswith("For seconds '*/10' write '* * * * * */10' (or every 10s); "
                            "for one run in each of those minutes, '*/10 */3 * * *' (or every 10m).")


# -- equal ranges, names in any case ------------------------------------------------------------------


@pytest.mark.parametrize("schedule, field, shown", [
    ("5-5,7 * * * *", "minute", "5,7"),
    ("1,9-9,20-30 * * * *", "minute", "1,9,20-30"),
    ("0 0 * jan-JAN *", "month", "jan"),
    ("0 0 * Mar-3 *", "month", "Mar"),
    ("0 0 * * MON-mon", "day of week", "MON"),
    ("0 0 * * 1-Mon", "day of week", "1"),
    ("0 0 * 1-01 *", "month", "1"),
])
def test_equal_ranges_become_their_value(schedule: str, field: str, shown: str) -> None:
    assert describe_fields(schedule)[field] == shown


@pytest.mark.parametrize("schedule, expected", [
    ("0 0 1 JAN *", "2027-01-01 00:00"),
    ("0 0 1 jan-JAN *", "2027-01-01 00:00"),
    ("0 0 1 Jan-jan/2 *", "2027-01-01 00:00"),
    ("0 0 * * SAT", "2026-03-07 00:00"),
    ("0 0 * * sat-SAT", "2026-03-07 00:00"),
    ("0 0 * * Fri-fri", "2026-03-06 00:00"),
])
def test_month_and_weekday_names_in_any_case(schedule: str, expected: str) -> None:
    after = datetime(2026, 3, 5, 12, 0, tzinfo=UTC)  # a Thursday
    assert next_run(schedule, after, "UTC").strftime("%Y-%m-%d %H:%M") == expected


@pytest.mark.parametrize("schedule", ["jan-jan * * * *", "0 mon-mon * * *", "0 0 sun-sun * *"])
def test_names_outside_month_and_weekday_fields_are_refused(schedule: str) -> None:
    with pytest.raises(ValueError, match="is not valid"):
        validate(schedule)


# -- the day-of-month / day-of-week rule --------------------------------------------------------------


def daily(schedule: str, count: int, after: datetime = datetime(2026, 3, 5, 12, 0, tzinfo=UTC)) -> list[str]:
    days = []
    for _ in range(count):
        after = next_run(schedule, after, "UTC")
        days.append(after.strftime("%a %m-%d"))
    return days


@pytest.mark.parametrize("schedule", ["0 0 ? * mon", "0 0 ? * 1", "0 0 ? * MON"])
def test_question_mark_day_of_month_ands_like_a_star(schedule: str) -> None:
    assert daily(schedule, 3) == ["Mon 03-09", "Mon 03-16", "Mon 03-23"]


def test_question_mark_day_of_week_ands_like_a_star() -> None:
    assert daily("0 0 1 * ?", 3) == ["Wed 04-01", "Fri 05-01", "Mon 06-01"]


EVERY_DAY = ["Fri 03-06", "Sat 03-07", "Sun 03-08", "Mon 03-09", "Tue 03-10", "Wed 03-11", "Thu 03-12",
             "Fri 03-13", "Sat 03-14"]


@pytest.mark.parametrize("schedule", [
    "0 0 1 * sun-sat", "0 0 1 * 0-6", "0 0 1 * 1-7", "0 0 1 * 0-7", "0 0 1 * mon-sun", "0 0 1 * 1-5,6-7",
    "0 0 20 * 0,1,2,3,4,5,6", "0 0 20 * 1,2,3,4,5,6,7",
    "0 0 1-31 * mon", "0 0 1-15,16-31 * mon", "0 0 1-31 * 1-3", "0 0 1-31/1 * wed",
])
def test_ored_with_a_field_naming_every_day_runs_every_day(schedule: str) -> None:
    assert day_rule(schedule) == "or"
    assert daily(schedule, 9) == EVERY_DAY


@pytest.mark.parametrize("schedule, expected", [
    # day 0 is no day of the month: 1-30 misses the 31st, a Tuesday
    ("0 0 1-30 * mon", ["Fri 03-27", "Sat 03-28", "Sun 03-29", "Mon 03-30", "Wed 04-01", "Thu 04-02"]),
    # 2-31 misses the 1st, a Wednesday
    ("0 0 2-31 * mon", ["Fri 03-27", "Sat 03-28", "Sun 03-29", "Mon 03-30", "Tue 03-31", "Thu 04-02"]),
    # six weekdays are not a week: the 1st and those days
    ("0 0 1 * 0-5", ["Fri 03-27", "Sun 03-29", "Mon 03-30", "Tue 03-31", "Wed 04-01", "Thu 04-02"]),
    ("0 0 1 * 1-6", ["Fri 03-27", "Sat 03-28", "Mon 03-30", "Tue 03-31", "Wed 04-01", "Thu 04-02"]),
])
def test_ored_with_fields_short_of_every_day_keeps_both(schedule: str, expected: list[str]) -> None:
    assert day_rule(schedule) == "or"
    assert daily(schedule, 6, datetime(2026, 3, 26, 12, 0, tzinfo=UTC)) == expected


@pytest.mark.parametrize("schedule, rule", [
    ("0 0 1 * sun-sat", "or"), ("0 0 1-31 * mon", "or"), ("0 0 ? * mon", None), ("0 0 1 * ?", None),
    ("0 0 */2 * 1", "and"), ("0 0 1 * */2", "and"), ("0 0 1 * *", None), ("0 0 * * 1", None),
    ("0 0 * 1 1", None), ("0 0 1 1 *", None), ("0 0 1 * 1", "or"),
])
def test_day_rule_names_the_rule(schedule: str, rule: str | None) -> None:
    assert day_rule(schedule) == rule


def test_parsed_cron_keeps_its_expression() -> None:
    assert schedules._parse("0 0 1 * sun-sat").expression == "0 0 1 * sun-sat"
    assert schedules._parse("@daily").expression == "@daily"


@pytest.mark.parametrize("schedule, every_day", [
    ("0 0 1 * sun-sat", True), ("0 0 1 * 0-6", True), ("0 0 1 * 1-7", True), ("0 0 1 * 0,1,2,3,4,5,6", True),
    ("0 0 1-31 * mon", True), ("0 0 1-15,16-31 * 1-3", True), ("0 0 ? * mon", True), ("0 0 1 * ?", True),
    ("0 0 1-30 * mon", False), ("0 0 2-31 * mon", False), ("0 0 1 * 0-5", False), ("0 0 1 * 1-6", False),
    ("0 0 13 * 5", False),
])
def test_a_day_field_naming_every_day_is_recognised(schedule: str, every_day: bool) -> None:
    # croniter 7 ORs such fields right by itself; older croniter (which the project accepts) reads a
    # whole-week field as '*' and keeps the other field alone, so Cron writes both as '*'.
    assert schedules._covers_every_day(schedule.split()) is every_day
