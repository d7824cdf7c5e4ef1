"""Schedules: validation and the one function that computes the next run.

A schedule is a cron string or an interval, ``every N`` seconds, minutes or hours
(``every 90s``, ``every 5m``, ``every 2h``). Intervals are exact periods of real time
from an anchor (the task's ``start_running``; the Unix epoch when it has none), so
they ignore time zones and DST.

Fields mean what they mean in Vixie cron and cronie, the crontabs people run: a
range whose ends are equal is that one value (``5-5`` is minute 5, in every field,
seconds included), and the two day fields are ANDed when either of them starts
with ``*`` and ORed when both are restricted. croniter, which does the iterating,
reads ``5-5`` as the whole field and always ORs, so fields are normalised first.

Cron fields are read as local wall-clock time in a real time zone. Around DST
changes we follow cronie/Vixie cron: a slot that falls in a skipped local hour
runs at the first instant after the gap; a slot of a *fixed* hour that falls in
a repeated local hour runs once (in the first copy); slots of a wildcard or
stepped hour field run in both copies of the repeated hour.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone as dt_timezone, tzinfo
from functools import lru_cache

from croniter import croniter
from croniter.croniter import CroniterBadDateError, CroniterError

from . import conf

__all__ = ["next_run", "validate", "describe_fields", "day_rule", "FIELD_NAMES", "is_interval", "interval",
           "describe_interval", "schedule_warnings", "INTERVAL_EPOCH"]

FIELD_NAMES = ("minute", "hour", "day of month", "month", "day of week", "second")
ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_FORMAT_HINT = (
    "Use 5 fields 'minute hour day-of-month month day-of-week', optionally a 6th for "
    "seconds, e.g. '30 2 * * *' or '* * * * * */10'."
)
_RANDOM = re.compile(r"(?<![a-z])[rh](?![a-z])", re.IGNORECASE)
_RANGE = re.compile(r"^([0-9a-z]+)-([0-9a-z]+)(/[0-9]+)?$", re.IGNORECASE)
_NAMES = {
    3: {name: number for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)},
    4: {name: number for number, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))},
}
_ONE_SECOND = timedelta(seconds=1)
_UTC = dt_timezone.utc

#: where an interval without an anchor counts from: ``every 5m`` falls on :00, :05, :10 UTC ...
INTERVAL_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)
_INTERVAL = re.compile(r"every\s+(?P<count>\d+)\s*(?P<unit>[a-z]+)", re.IGNORECASE)
_INTERVAL_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), ("second", 1)),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), ("minute", 60)),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), ("hour", 3600)),
}
#: the longest interval: a longer period is a calendar matter, for cron
_INTERVAL_MAX_SECONDS = 366 * 86400
_INTERVAL_HINT = "Write 'every N' and a unit s, m or h, e.g. 'every 90s', 'every 5m' or 'every 2h'."


def is_interval(schedule: object) -> bool:
    """A schedule starting with the word 'every' is an interval (no cron field can start so)."""
    return isinstance(schedule, str) and schedule.strip()[:5].lower() == "every"


def _interval_parts(schedule: str) -> tuple[int, str, timedelta]:
    """Count, unit name and period of an interval schedule; ValueError naming the problem."""
    match = _INTERVAL.fullmatch(schedule.strip())
    unit = _INTERVAL_UNITS.get(match["unit"].lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f"Invalid interval schedule {schedule!r}. {_INTERVAL_HINT}")
    count = int(match["count"])
    seconds = count * unit[1]
    if not 1 <= seconds <= _INTERVAL_MAX_SECONDS:
        raise ValueError(
            f"Invalid interval schedule {schedule!r}: the period must be between 1 second and 366 days "
            f"(use cron for calendar schedules). {_INTERVAL_HINT}"
        )
    return count, unit[0], timedelta(seconds=seconds)


def interval(schedule: str) -> timedelta:
    """The period of an interval schedule such as 'every 90s'; ValueError naming the problem."""
    return _interval_parts(schedule)[2]


def describe_interval(schedule: str) -> str:
    """'every 90 seconds', 'every minute', 'every 2 hours' (ValueError if not a valid interval)."""
    count, unit, _ = _interval_parts(schedule)
    return f"every {unit}" if count == 1 else f"every {count} {unit}s"


def _next_interval_run(schedule: str, after: datetime, anchor: datetime | None) -> datetime:
    """The first ``anchor + k * period`` (k any whole number) strictly after ``after``, in UTC."""
    period = interval(schedule)
    start = INTERVAL_EPOCH if anchor is None else anchor.astimezone(_UTC)
    return start + ((after.astimezone(_UTC) - start) // period + 1) * period


def schedule_warnings(schedule: str) -> list[str]:
    """Valid schedules that probably do not mean what their author meant, each with the fix.

    A stepped first field with ``*`` seconds (``*/5 * * * * *``) reads like "every 5
    seconds" in tools that put seconds first; here seconds come last, so it means every
    second of every fifth minute.
    """
    if is_interval(schedule):
        return []
    fields = _parse(schedule).fields
    if len(fields) != 6 or "/" not in fields[0] or fields[5] != "*":
        return []
    step = fields[0].split("/", 1)[1]
    plain = fields[0].startswith("*/")
    return [
        f"{schedule!r} runs every second of the minutes {fields[0]!r}: the seconds field comes last. "
        f"For seconds {fields[0]!r} write '* * * * * {fields[0]}'{f' (or every {step}s)' if plain else ''}; "
        f"for one run in each of those minutes, '{' '.join(fields[:5])}'{f' (or every {step}m)' if plain else ''}."
    ]


def _single_values(value: str, index: int) -> str:
    """``value`` with each range whose ends are equal written as that one value (``5-5/2`` → ``5``)."""
    items = []
    for item in value.split(","):
        match = _RANGE.match(item)
        if match:
            low, high = (_number(end, index) for end in match.group(1, 2))
            if low is not None and low == high:
                item = match.group(1)
        items.append(item)
    return ",".join(items)


def _number(token: str, index: int) -> int | None:
    if token.isdigit():
        return int(token)
    return _NAMES.get(index, {}).get(token.lower())


def _days_anded(fields: list[str]) -> bool:
    """Vixie cron and cronie: the day fields are ANDed when either starts with ``*``, else ORed."""
    return fields[2].startswith(("*", "?")) or fields[4].startswith(("*", "?"))


class Cron:
    """A validated cron expression in Vixie cron's reading, ready to iterate over naive wall times."""

    __slots__ = ("expression", "fields", "wildcard_hour", "days_anded", "pattern")

    def __init__(self, expression: str) -> None:
        self.expression = expression
        fields = ALIASES.get(expression.strip().lower(), expression).split()
        self.fields = [_single_values(value, index) for index, value in enumerate(fields)]
        hour = self.fields[1]
        self.wildcard_hour = hour.startswith("*") or "/" in hour
        self.days_anded = _days_anded(self.fields)
        pattern = list(self.fields)
        if not self.days_anded and _covers_every_day(self.fields):
            # ORed with a field that names every day ('sun-sat', '1-31'): every day matches, where
            # croniter would read a whole-week field as '*' and keep the other field alone.
            pattern[2] = pattern[4] = "*"
        self.pattern = " ".join(pattern)

    def following(self, wall: datetime) -> datetime:
        """The first matching naive wall time strictly after ``wall``."""
        return croniter(self.pattern, wall, day_or=not self.days_anded).get_next(datetime)


def _covers_every_day(fields: list[str]) -> bool:
    """True if either day field, expanded, holds every day of the month or of the week."""
    expanded = croniter.expand(" ".join(fields))[0]
    month_days, week_days = expanded[2], expanded[4]
    return "*" in month_days or set(range(1, 32)) <= set(month_days) \
        or "*" in week_days or set(range(7)) <= {day % 7 for day in week_days if isinstance(day, int)}


def validate(schedule: object) -> str:
    """Return ``schedule`` if it is a valid cron string or interval, else raise ValueError naming the field."""
    if is_interval(schedule):
        interval(schedule)  # type: ignore[arg-type]
        return schedule  # type: ignore[return-value]
    _parse(schedule)
    return schedule  # type: ignore[return-value]


@lru_cache(maxsize=4096)
def _parse_cached(schedule: str) -> Cron:
    if schedule.strip().lower() in ALIASES:
        return Cron(schedule)
    fields = schedule.split()
    if fields[0].startswith("@"):
        raise ValueError(
            f"Invalid cron schedule {schedule!r}: unknown alias; the aliases are "
            f"{', '.join(sorted(ALIASES))}. {_FORMAT_HINT}"
        )
    if len(fields) not in (5, 6):
        raise ValueError(
            f"Invalid cron schedule {schedule!r}: it has {len(fields)} fields. {_FORMAT_HINT}"
        )
    for index, value in enumerate(fields):
        if _RANDOM.search(value):
            # croniter draws a new value for 'R' at every parse, so the slot would move each tick.
            raise ValueError(
                f"Invalid cron schedule {schedule!r}: field {index + 1} ({FIELD_NAMES[index]}) "
                f"{value!r} is not valid: random (R) and hashed (H) values are not supported; "
                f"use fixed numbers. {_FORMAT_HINT}"
            )
        probe = ["*"] * len(fields)
        probe[index] = _single_values(value, index)
        if not croniter.is_valid(" ".join(probe)):
            raise ValueError(
                f"Invalid cron schedule {schedule!r}: field {index + 1} ({FIELD_NAMES[index]}) "
                f"{value!r} is not valid. {_FORMAT_HINT}"
            )
    cron = Cron(schedule)
    try:
        cron.following(datetime(2000, 1, 1))
    except CroniterBadDateError:
        raise ValueError(
            f"Invalid cron schedule {schedule!r}: no date ever matches it "
            f"(check the day-of-month and month fields). {_FORMAT_HINT}"
        ) from None
    except (CroniterError, ValueError) as exc:
        raise ValueError(f"Invalid cron schedule {schedule!r}: {exc}. {_FORMAT_HINT}") from None
    return cron


def _parse(schedule: object) -> Cron:
    if not isinstance(schedule, str) or not schedule.strip():
        raise ValueError(f"Invalid cron schedule {schedule!r}: it must be a non-empty string. {_FORMAT_HINT}")
    return _parse_cached(schedule)


def describe_fields(schedule: str) -> dict[str, str]:
    """Map field names to their values as the scheduler reads them (``5-5`` → ``5``), for display."""
    return dict(zip(FIELD_NAMES, _parse(schedule).fields))


def day_rule(schedule: str) -> str | None:
    """How the two day fields combine: "and", "or", or None when one of them is a plain ``*``."""
    cron = _parse(schedule)
    if {cron.fields[2], cron.fields[4]} & {"*", "?"}:
        return None
    return "and" if cron.days_anded else "or"


def next_run(schedule: str, after: datetime, tz: str | tzinfo | None = None,
             anchor: datetime | None = None) -> datetime:
    """Return the next run of ``schedule`` strictly after the aware instant ``after``.

    ``tz`` is the zone the cron fields are read in (a name or tzinfo; None means
    the configured zone). ``anchor`` is the instant an interval's slots count from
    (None: :data:`INTERVAL_EPOCH`); cron ignores it. The result is an aware datetime in UTC.
    """
    if not isinstance(after, datetime) or after.tzinfo is None or after.utcoffset() is None:
        raise ValueError(f"next_run needs an aware datetime for 'after', got {after!r}.")
    if is_interval(schedule):
        if anchor is not None and (anchor.tzinfo is None or anchor.utcoffset() is None):
            raise ValueError(f"next_run needs an aware datetime for 'anchor', got {anchor!r}.")
        return _next_interval_run(schedule, after, anchor)
    _parse(schedule)
    zone = conf.get_zone(tz)
    # Work in UTC: two datetimes of the same tzinfo compare as naive wall times (PEP 495),
    # so an ``after`` in the second copy of a repeated hour would look earlier than it is
    # (and, as a cache key, would be taken for the first copy).
    return _next_run_utc(schedule, zone, after.astimezone(_UTC))


@lru_cache(maxsize=4096)
def _next_run_utc(schedule: str, zone: tzinfo, after: datetime) -> datetime:
    """``next_run`` for an instant in UTC. Cached: the rows beat claims in one tick share ``after``
    (its clock), so all rows of one schedule and zone cost one computation."""
    cron = _parse(schedule)
    local = after.astimezone(zone)
    wall = local.replace(tzinfo=None, fold=0)
    candidate = cron.following(wall)
    if local.fold == 0 and _is_ambiguous(wall, zone):
        # ``after`` is in the first copy of a repeated hour. A later slot in that
        # first copy comes first; failing that, a wildcard hour's slots in the
        # second copy come before anything past the repeat.
        if not _is_ambiguous(candidate, zone) and cron.wildcard_hour:
            repeat_start = _repeat_start(wall, zone)
            second = cron.following(repeat_start - _ONE_SECOND)
            if _is_ambiguous(second, zone):
                return second.replace(tzinfo=zone, fold=1).astimezone(_UTC)
    while True:
        for instant in _instants(candidate, zone, cron.wildcard_hour):
            if instant > after:
                return instant
        candidate = cron.following(candidate)


def _instants(wall: datetime, zone: tzinfo, both_copies: bool) -> list[datetime]:
    """The real instants (UTC) a naive wall time stands for, in order, under the DST rule."""
    first = wall.replace(tzinfo=zone, fold=0)
    second = wall.replace(tzinfo=zone, fold=1)
    if first.utcoffset() == second.utcoffset():
        return [first.astimezone(_UTC)]
    if _exists(first, zone):
        copies = [first, second] if both_copies else [first]
        return [copy.astimezone(_UTC) for copy in copies]
    # Skipped by a forward change: run at the first instant after the gap.
    return [_transition(second.astimezone(_UTC), first.astimezone(_UTC), zone)]


def _exists(aware: datetime, zone: tzinfo) -> bool:
    return aware.astimezone(_UTC).astimezone(zone).replace(tzinfo=None) == aware.replace(tzinfo=None)


def _is_ambiguous(wall: datetime, zone: tzinfo) -> bool:
    first = wall.replace(tzinfo=zone, fold=0)
    second = wall.replace(tzinfo=zone, fold=1)
    return first.utcoffset() != second.utcoffset() and _exists(first, zone)


def _repeat_start(wall: datetime, zone: tzinfo) -> datetime:
    """The naive wall time at which the repeated hour containing ``wall`` begins."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(_UTC)
    second = wall.replace(tzinfo=zone, fold=1).astimezone(_UTC)
    change = _transition(first, second, zone)
    return change.astimezone(zone).replace(tzinfo=None, fold=0)


def _transition(low: datetime, high: datetime, zone: tzinfo) -> datetime:
    """The first UTC instant in (low, high] whose offset is already that of ``high``."""
    target = high.astimezone(zone).utcoffset()
    while high - low > _ONE_SECOND:
        middle = low + (high - low) / 2
        middle = middle.replace(microsecond=0)
        if middle <= low:
            middle = low + _ONE_SECOND
        if middle.astimezone(zone).utcoffset() == target:
            high = middle
        else:
            low = middle
    return high
