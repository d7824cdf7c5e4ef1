"""Django system checks for sisy-celery settings: misconfiguration fails at start, not at 3 a.m."""
from __future__ import annotations

import io
import math
from typing import Any

from celery.signals import beat_init, worker_init
from django.conf import settings
from django.core.checks import Error, register

from . import conf, schedules


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
    ):
        value = getattr(settings, name, default)
        # NaN and infinity pass "> 0" but would make beat sleep forever or never; a batch
        # size is read with int(), so 0.5 would become 0 and beat would claim no rows.
        whole = name == "SISY_BEAT_BATCH_SIZE"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value <= 0 or (whole and value != int(value)):
            errors.append(Error(
                f"{name} must be a {'whole ' if whole else ''}number greater than 0, got {value!r}.",
                hint=f"Remove it to use the default ({default}) or set a positive number.",
                id={"SISY_HEARTBEAT_FREQUENCY": "sisy_celery.E004", "SISY_RUNNING_TIMEOUT": "sisy_celery.E005",
                    "SISY_BEAT_BATCH_SIZE": "sisy_celery.E006"}[name],
            ))
    if not settings.USE_TZ:
        errors.append(Error(
            "sisy-celery needs USE_TZ = True: schedules are evaluated in real time zones.",
            hint="Set USE_TZ = True (the Django default).",
            id="sisy_celery.E007",
        ))
    return errors


@beat_init.connect
@worker_init.connect
def refuse_to_start(**kwargs: Any) -> None:
    """Beat and worker run the system checks at start and exit with their message, as runserver does.

    Celery's own Django fix-up runs the checks in a worker but ignores what they find.
    """
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    try:
        call_command("check", stdout=io.StringIO(), stderr=io.StringIO())
    except SystemCheckError as exc:
        raise SystemExit(str(exc)) from None
