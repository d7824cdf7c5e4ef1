"""Cron fields mean what they mean in Vixie cron and cronie (the crontabs people run).

An equal range is one value, in every field; the two day fields are ANDed when either starts
with ``*`` and ORed otherwise. The property test checks the next 50 slots of random 5-field
expressions against tests/cron_reference.py, an independent reading of crontab(5). The admin's
description and next-runs preview show what the scheduler does.
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth.models import User
from django.urls import reverse
from hypothesis import HealthCheck, given, settings, strategies as st

from sisy_celery.admin import describe_schedule
from sisy_celery.schedules import day_rule, describe_fields, next_run
from tests.cron_reference import MONTHS, WEEKDAYS, Reference

UTC = timezone.utc
START = datetime(2026, 1, 1, tzinfo=UTC)  # a Thursday


def slots(schedule: str, count: int, after: datetime = START) -> list[datetime]:
    found = []
    for _ in range(count):
        after = next_run(schedule, after, "UTC")
        found.append(after)
    return found


def stamps(schedule: str, count: int, after: datetime = START) -> list[str]:
    return [slot.strftime("%a %m-%d %H:%M:%S") for slot in slots(schedule, count, after)]


# -- an equal range is one value ---------------------------------------------------------------


@pytest.mark.parametrize("schedule, expected", [
    ("5-5 * * * *", ["Thu 01-01 00:05:00", "Thu 01-01 01:05:00", "Thu 01-01 02:05:00"]),
    ("0 9-9 * * *", ["Thu 01-01 09:00:00", "Fri 01-02 09:00:00", "Sat 01-03 09:00:00"]),
    ("0 0 * * Sun-Sun", ["Sun 01-04 00:00:00", "Sun 01-11 00:00:00", "Sun 01-18 00:00:00"]),
    ("0 0 * * 7-7", ["Sun 01-04 00:00:00", "Sun 01-11 00:00:00", "Sun 01-18 00:00:00"]),
    ("0 0 * * 0-0", ["Sun 01-04 00:00:00", "Sun 01-11 00:00:00", "Sun 01-18 00:00:00"]),
    ("0 0 10-10 * *", ["Sat 01-10 00:00:00", "Tue 02-10 00:00:00", "Tue 03-10 00:00:00"]),
    ("0 0 1 Mar-mar *", ["Sun 03-01 00:00:00", "Mon 03-01 00:00:00", "Wed 03-01 00:00:00"]),
    ("* * * * * 30-30", ["Thu 01-01 00:00:30", "Thu 01-01 00:01:30", "Thu 01-01 00:02:30"]),
    ("5-5/2 * * * *", ["Thu 01-01 00:05:00", "Thu 01-01 01:05:00", "Thu 01-01 02:05:00"]),
    ("1,5-5,7 * * * *", ["Thu 01-01 00:01:00", "Thu 01-01 00:05:00", "Thu 01-01 00:07:00"]),
])
def test_an_equal_range_is_one_value(schedule, expected):
    assert stamps(schedule, 3) == expected


@pytest.mark.parametrize("schedule", ["30 1 * * *", "30 1-1 * * *", "30 1-1/2 * * *"])
def test_an_equal_hour_range_is_a_fixed_hour_under_the_dst_rule(schedule):
    # New York falls back on 2026-11-01: a fixed hour runs once, in the first copy of 01:00-02:00.
    after = datetime(2026, 10, 31, 16, 0, tzinfo=UTC)
    zone = ZoneInfo("America/New_York")
    runs = []
    for _ in range(3):
        after = next_run(schedule, after, zone)
        runs.append(after.astimezone(zone).strftime("%m-%d %H:%M %z"))
    assert runs == ["11-01 01:30 -0400", "11-02 01:30 -0500", "11-03 01:30 -0500"]


def test_an_equal_range_is_shown_as_the_value_it_is():
    assert describe_fields("5-5 9-9 * * Sun-Sun 30-30") == {
        "minute": "5", "hour": "9", "day of month": "*", "month": "*", "day of week": "Sun", "second": "30",
    }


# -- the two day fields --------------------------------------------------------------------------


def test_day_fields_are_anded_when_one_starts_with_a_star():
    # Odd days of the month that are Mondays (Vixie cron), not every odd day and every Monday.
    assert stamps("0 0 */2 * 1", 4) == [
        "Mon 01-05 00:00:00", "Mon 01-19 00:00:00", "Mon 02-09 00:00:00", "Mon 02-23 00:00:00",
    ]
    assert stamps("0 0 1-7 * */7", 2) == ["Sun 01-04 00:00:00", "Sun 02-01 00:00:00"]


def test_day_fields_are_ored_when_both_are_restricted():
    assert stamps("0 0 13 * 5", 4) == [
        "Fri 01-02 00:00:00", "Fri 01-09 00:00:00", "Tue 01-13 00:00:00", "Fri 01-16 00:00:00",
    ]
    # The first seven days and every Monday: a range is restricted, it does not start with '*'.
    assert stamps("0 0 1-7 * 1", 8) == [
        "Fri 01-02 00:00:00", "Sat 01-03 00:00:00", "Sun 01-04 00:00:00",
        "Mon 01-05 00:00:00", "Tue 01-06 00:00:00", "Wed 01-07 00:00:00", "Mon 01-12 00:00:00",
        "Mon 01-19 00:00:00",
    ]


@pytest.mark.parametrize("schedule, rule", [
    ("0 0 */2 * 1", "and"), ("0 0 15 * */2", "and"), ("0 0 15 * 1", "or"), ("0 0 1-7 * mon-fri", "or"),
    ("0 0 * * 1", None), ("0 0 15 * *", None), ("* * * * *", None), ("@weekly", None),
])
def test_day_rule(schedule, rule):
    assert day_rule(schedule) == rule


# -- what the admin shows ------------------------------------------------------------------------


@pytest.mark.parametrize("schedule, description", [
    ("5-5 * * * *", "At 5 minutes past the hour"),
    ("0 9-9 * * *", "At 09:00"),
    ("* * * * * 30-30", "At 30 seconds past the minute"),
    ("0 0 */2 * 1", "At 00:00, every 2 days, and only on Monday (the day must match both fields)"),
    ("0 0 15 * 1", "At 00:00, on day 15 of the month, or on Monday (a day matching either field is enough)"),
    ("0 0 1-7 * 1-5", "At 00:00, between day 1 and 7 of the month, or Monday through Friday (a day matching "
                      "either field is enough)"),
    ("0 0 * * 1", "At 00:00, only on Monday"),
])
def test_the_admin_describes_what_the_scheduler_does(schedule, description):
    assert describe_schedule(schedule) == description


@pytest.mark.django_db
@pytest.mark.parametrize("schedule", ["5-5 * * * *", "0 0 */2 * 1", "0 0 15 * 1", "* * * * * 30-30"])
def test_the_admin_preview_lists_the_scheduler_slots(client, schedule):
    client.force_login(User.objects.create_superuser("admin", "a@example.com", "pw"))
    before = datetime.now(UTC)
    response = client.get(reverse("admin:sisy_celery_task_preview"), {"schedule": schedule, "timezone": "UTC"})
    runs = [datetime.fromisoformat(run["at"]) for run in response.json()["runs"]]
    assert len(runs) == 5
    assert runs == slots(schedule, 5, runs[0] - timedelta(microseconds=1))
    assert runs[0] >= next_run(schedule, before, "UTC")  # the first slot after the request's own clock
    assert all(Reference(schedule).matches(run.replace(tzinfo=None)) for run in runs)


# -- property: agree with an independent reading of crontab(5) -------------------------------------


def numbers(draw, index: int, low: int, high: int) -> str:
    """One list item of a field, in any of crontab(5)'s forms, names included where the field has them."""
    names = {3: MONTHS, 4: WEEKDAYS}.get(index)

    def value(number: int) -> str:
        if names and number != 7 and draw(st.integers(0, 3)) == 0:  # 'sun' is 0: 'mon-sun' is a reversed range
            name = names[number - 1 if index == 3 else number]
            return draw(st.sampled_from([name, name.upper(), name.title()]))
        return str(number)

    kind = draw(st.sampled_from(["star", "star_step", "one", "range", "equal", "range_step", "equal_step"]))
    a = draw(st.integers(low, high))
    b = draw(st.integers(a, high))
    step = draw(st.integers(1, max(1, high - low)))
    return {
        "star": "*", "star_step": f"*/{step}", "one": value(a), "range": f"{value(a)}-{value(b)}",
        "equal": f"{value(a)}-{value(a)}", "range_step": f"{value(a)}-{value(b)}/{step}",
        "equal_step": f"{value(a)}-{value(a)}/{step}",
    }[kind]


@st.composite
def vixie_expressions(draw) -> str:
    fields = []
    for index, (low, high) in enumerate([(0, 59), (0, 23), (1, 28), (1, 12), (0, 7)]):
        items = [numbers(draw, index, low, high) for _ in range(draw(st.integers(1, 3)))]
        if len(items) > 1 and "*" in items:
            items = [item for item in items if item != "*"] or ["*"]
        fields.append(",".join(items))
    return " ".join(fields)


PROPERTY = settings(max_examples=int(os.environ.get("SISY_HYPOTHESIS_EXAMPLES", 150)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(vixie_expressions(), st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2060, 1, 1)))
def test_property_next_50_slots_agree_with_crontab(schedule, start):
    after = start.replace(tzinfo=UTC)
    reference = Reference(schedule)
    expected = []
    for wall in reference.walls(start):
        expected.append(wall.replace(tzinfo=UTC))
        if len(expected) == 50:
            break
    assert slots(schedule, 50, after) == expected, schedule
