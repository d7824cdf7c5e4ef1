"""Settings of sisy-celery, read from Django settings at call time.

Every value is looked up when it is needed rather than at import, so
``override_settings`` and per-process configuration always take effect.
"""
from __future__ import annotations

import zoneinfo
from datetime import tzinfo

from django.conf import settings

DEFAULT_SCHEDULE = "* * * * *"
DEFAULT_HEARTBEAT_FREQUENCY = 1.0
DEFAULT_RUNNING_TIMEOUT = 300.0
DEFAULT_BEAT_BATCH_SIZE = 1000
DEFAULT_RUN_RETENTION = 7 * 24 * 3600.0


def default_schedule() -> str:
    """``SISY_DEFAULT_SCHEDULE``: the cron string a task gets when none is given."""
    return getattr(settings, "SISY_DEFAULT_SCHEDULE", DEFAULT_SCHEDULE)


def heartbeat_frequency() -> float:
    """``SISY_HEARTBEAT_FREQUENCY``: the longest beat sleeps before it looks at the database."""
    return float(getattr(settings, "SISY_HEARTBEAT_FREQUENCY", DEFAULT_HEARTBEAT_FREQUENCY))


def running_timeout() -> float:
    """``SISY_RUNNING_TIMEOUT``: seconds a ``running`` claim lasts unless a worker renews it."""
    return float(getattr(settings, "SISY_RUNNING_TIMEOUT", DEFAULT_RUNNING_TIMEOUT))


def keep_finished_tasks() -> bool:
    """``SISY_KEEP_FINISHED_TASKS``: disable finished tasks instead of deleting them."""
    return bool(getattr(settings, "SISY_KEEP_FINISHED_TASKS", False))


def run_retention() -> float:
    """``SISY_RUN_RETENTION``: seconds settled runs stay in the ledger (a timedelta is accepted)."""
    value = getattr(settings, "SISY_RUN_RETENTION", DEFAULT_RUN_RETENTION)
    return value.total_seconds() if hasattr(value, "total_seconds") else float(value)


ALLOW_ALL_MODULES = "__all__"


def allowed_modules() -> list[str] | None:
    """``SISY_ALLOWED_MODULES``: dotted module prefixes whose callables may run (None = any module).

    Any module only when the setting says so (``"__all__"``), or while it is unset and DEBUG is
    on. Unset with DEBUG off allows none: a web server that skips the system checks (E008)
    still refuses every callable rather than running any importable function.
    """
    value = getattr(settings, "SISY_ALLOWED_MODULES", None)
    if value == ALLOW_ALL_MODULES or (value is None and settings.DEBUG):
        return None
    return [] if value is None else list(value)


def beat_batch_size() -> int:
    """``SISY_BEAT_BATCH_SIZE``: due rows claimed per database round trip."""
    return int(getattr(settings, "SISY_BEAT_BATCH_SIZE", DEFAULT_BEAT_BATCH_SIZE))


def timezone_name() -> str:
    """The zone cron strings are read in: ``SISY_TIMEZONE``, Celery's ``timezone``, ``TIME_ZONE``."""
    for name in ("SISY_TIMEZONE", "CELERY_TIMEZONE"):
        value = getattr(settings, name, None)
        if value:
            return str(value)
    return settings.TIME_ZONE or "UTC"


def get_zone(name: str | tzinfo | None = None) -> tzinfo:
    """Return a tzinfo for ``name`` (None = the configured zone); ValueError if unknown."""
    if isinstance(name, tzinfo):
        return name
    key = name or timezone_name()
    try:
        return zoneinfo.ZoneInfo(key)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise ValueError(
            f"Unknown time zone {key!r}: use an IANA name such as 'UTC' or 'Europe/Paris'."
        ) from exc
