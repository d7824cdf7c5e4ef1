"""Django system checks for sisy-celery settings: misconfiguration fails at start, not at 3 a.m."""
from __future__ import annotations

import logging
import math
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.checks import ERROR, Error, register, run_checks

from . import conf, schedules

logger = logging.getLogger("sisy_celery")


def refuse_to_start(process: str) -> None:
    """Run the system checks in a starting beat or worker, as runserver does, and exit non-zero with the
    message of each error: a global misconfiguration stops the process instead of being blamed on task
    rows. (Celery's own Django fix-up runs the checks in a worker but ignores what they find.)"""
    errors = [m for m in run_checks() if m.level >= ERROR]
    for message in errors:
        logger.error("sisy %s cannot start: %s", process, message)
    if errors:
        raise SystemExit(f"sisy {process} cannot start:\n" + "\n".join(str(m) for m in errors))


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    errors: list[Any] = []
    try:
        schedules.validate(conf.default_schedule())
    except ValueError as exc:
        errors.append(Error(
            f"SISY_DEFAULT_SCHEDULE is not a valid cron string: {exc}",
            hint="Set it to a cron string such as '* * * * *' or remove it.",
            id="sisy_celery.E001",
        ))
    try:
        conf.get_zone()
    except ValueError:
        errors.append(Error(
            f"The time zone {conf.timezone_name()!r} (from SISY_TIMEZONE, CELERY_TIMEZONE or TIME_ZONE) is unknown.",
            hint="Use an IANA zone name such as 'UTC' or 'Europe/Paris'.",
            id="sisy_celery.E002",
        ))
    allowed = getattr(settings, "SISY_ALLOWED_MODULES", None)
    if allowed is not None and allowed != conf.ALLOW_ALL_MODULES and (
        isinstance(allowed, str)
        or not isinstance(allowed, (list, tuple, set, frozenset))
        or not all(isinstance(p, str) and p and all(part.isidentifier() for part in p.split(".")) for p in allowed)
        or conf.ALLOW_ALL_MODULES in allowed  # meant as the value itself, not as a module prefix
    ):
        errors.append(Error(
            f"SISY_ALLOWED_MODULES must be a list of dotted module prefixes or {conf.ALLOW_ALL_MODULES!r}, "
            f"got {allowed!r}.",
            hint="For example SISY_ALLOWED_MODULES = ['billing.jobs', 'reports'].",
            id="sisy_celery.E003",
        ))
    elif allowed is None and not settings.DEBUG:
        errors.append(Error(
            "SISY_ALLOWED_MODULES is not set: with DEBUG off no callable may be scheduled or run, and "
            "anyone allowed to add a task could otherwise run any importable function.",
            hint=f"List the module prefixes your scheduled callables live in, e.g. SISY_ALLOWED_MODULES = "
                 f"['billing.jobs']; to allow every module, say so: SISY_ALLOWED_MODULES = "
                 f"{conf.ALLOW_ALL_MODULES!r}.",
            id="sisy_celery.E008",
        ))
    for name, default in (
        ("SISY_HEARTBEAT_FREQUENCY", conf.DEFAULT_HEARTBEAT_FREQUENCY),
        ("SISY_RUNNING_TIMEOUT", conf.DEFAULT_RUNNING_TIMEOUT),
        ("SISY_BEAT_BATCH_SIZE", conf.DEFAULT_BEAT_BATCH_SIZE),
        ("SISY_RUN_RETENTION", conf.DEFAULT_RUN_RETENTION),
    ):
        value = getattr(settings, name, default)
        if isinstance(value, timedelta) and name == "SISY_RUN_RETENTION":
            value = value.total_seconds()
        # NaN and infinity pass "> 0" but would make beat sleep forever or never; a batch
        # size is read with int(), so 0.5 would become 0 and beat would claim no rows.
        whole = name == "SISY_BEAT_BATCH_SIZE"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value <= 0 or (whole and value != int(value)):
            errors.append(Error(
                f"{name} must be a {'whole ' if whole else ''}number greater than 0, got {value!r}.",
                hint=f"Remove it to use the default ({default}) or set a positive number.",
                id={"SISY_HEARTBEAT_FREQUENCY": "sisy_celery.E004", "SISY_RUNNING_TIMEOUT": "sisy_celery.E005",
                    "SISY_BEAT_BATCH_SIZE": "sisy_celery.E006", "SISY_RUN_RETENTION": "sisy_celery.E009"}[name],
            ))
    if not settings.USE_TZ:
        errors.append(Error(
            "sisy-celery needs USE_TZ = True: schedules are evaluated in real time zones.",
            hint="Set USE_TZ = True (the Django default).",
            id="sisy_celery.E007",
        ))
    return errors

