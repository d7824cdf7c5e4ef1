"""An independent reading of cron fields as Vixie cron and cronie read them, for the tests.

Written from crontab(5), not from sisy_celery.schedules or croniter: each field is a set of
values (``a-b/s`` is a, a+s, … up to b, so ``5-5`` is 5; ``*`` is the whole range; in the
day-of-week field 7 is Sunday like 0), and a day matches when both day fields match if either
of them starts with ``*``, when either matches otherwise. ``L`` (the last day of the month) is
the one croniter extension read here, because the DST tests use it.
"""
from __future__ import annotations

import calendar
from datetime import date, datetime, timedelta
from typing import Iterator

RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7), (0, 59))
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
NAMES = {3: {name: i for i, name in enumerate(MONTHS, start=1)}, 4: {name: i for i, name in enumerate(WEEKDAYS)}}
SEARCH_YEARS = 400


def number(token: str, index: int) -> int:
    return int(token) if token.isdigit() else NAMES[index][token.lower()]


def values(field: str, index: int) -> set[int]:
    """The set of values a field stands for."""
    low, high = RANGES[index]
    found: set[int] = set()
    for item in field.split(","):
        item, _, step = item.partition("/")
        if item == "*":
            first, last = low, high
        elif "-" in item:
            first, last = (number(end, index) for end in item.split("-"))
        else:
            first = last = number(item, index)
        found.update(range(first, last + 1, int(step or 1)))
    if index == 4 and 7 in found:
        found = (found - {7}) | {0}
    return found


class Reference:
    """One schedule (5 fields, or 6 with seconds last), matched by brute force."""

    def __init__(self, schedule: str) -> None:
        fields = schedule.split()
        if len(fields) == 5:
            fields.append("0")
        self.last_day = fields[2] == "L"
        self.sets = [set() if (index == 2 and self.last_day) else values(field, index)
                     for index, field in enumerate(fields)]
        self.anded = fields[2].startswith("*") or fields[4].startswith("*")

    def day_matches(self, day: date) -> bool:
        if day.month not in self.sets[3]:
            return False
        if self.last_day:
            in_month = day.day == calendar.monthrange(day.year, day.month)[1]
        else:
            in_month = day.day in self.sets[2]
        in_week = (day.weekday() + 1) % 7 in self.sets[4]  # cron: Sunday = 0
        return (in_month and in_week) if self.anded else (in_month or in_week)

    def matches(self, wall: datetime) -> bool:
        return (self.day_matches(wall.date()) and wall.hour in self.sets[1] and wall.minute in self.sets[0]
                and wall.second in self.sets[5])

    def walls(self, after: datetime) -> Iterator[datetime]:
        """Every matching naive wall time strictly after ``after``, in order."""
        day = after.date()
        for _ in range(SEARCH_YEARS * 366):
            if self.day_matches(day):
                for hour in sorted(self.sets[1]):
                    for minute in sorted(self.sets[0]):
                        for second in sorted(self.sets[5]):
                            wall = datetime(day.year, day.month, day.day, hour, minute, second)
                            if wall > after:
                                yield wall
            day += timedelta(days=1)


def repeats_in_both_copies(hour: str) -> bool:
    """The DST rule's wildcard hour: it starts with ``*`` or steps through a range (``a-a/s`` is one value)."""
    if hour.startswith("*"):
        return True
    for item in hour.split(","):
        span, _, step = item.partition("/")
        ends = span.split("-")
        if step and not (len(ends) == 2 and ends[0] == ends[1]):
            return True
    return False
