"""Django system checks for sisy-celery settings: misconfiguration fails at start, not at 3 a.m.

Also the guards other code calls where a check cannot see the problem: :func:`configured_app`
before sisy publishes, :func:`unapplied_migrations` when a process starts on the database.
"""
from __future__ import annotations

import logging
import math
from datetime import timedelta
from typing import Any

from celery import Celery
from django.apps import apps
from django.conf import settings
from django.core.checks import ERROR, Error, Warning, register, run_checks
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from . import conf, schedules

logger = logging.getLogger("sisy_celery")

#: result backends (CELERY_RESULT_BACKEND) that store results with django_celery_results' models
DJANGO_RESULT_BACKENDS = ("django-db", "django-cache")


def refuse_to_start(process: str) -> None:
    """Run the system checks in a starting beat or worker, as runserver does, and exit non-zero with the
    message of each error: a global misconfiguration stops the process instead of being blamed on task
    rows. (Celery's own Django fix-up runs the checks in a worker but ignores what they find.)"""
    errors = [str(m) for m in run_checks() if m.level >= ERROR]
    try:
        unmigrated = unapplied_migrations()
    except DatabaseError as exc:  # unreachable now: beat and workers wait for the database
        logger.warning("sisy %s could not check its migrations (database unavailable: %s)", process, exc)
    else:
        errors += [unmigrated] if unmigrated else []
    for message in errors:
        logger.error("sisy %s cannot start: %s", process, message)
    if errors:
        raise SystemExit(f"sisy {process} cannot start:\n" + "\n".join(errors))


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


@register()
def check_result_backend(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """A django-celery-results backend without its app fails in the worker, with a long traceback."""
    backend = getattr(settings, "CELERY_RESULT_BACKEND", None)
    if backend in DJANGO_RESULT_BACKENDS and not apps.is_installed("django_celery_results"):
        return [Error(
            f"CELERY_RESULT_BACKEND is {backend!r} but 'django_celery_results' is not in INSTALLED_APPS.",
            hint="Add 'django_celery_results' to INSTALLED_APPS and run `python manage.py migrate`.",
            id="sisy_celery.E010",
        )]
    return []


def scheduler_problem(name: str) -> str | None:
    """What is wrong with ``name`` as ``celery beat -S`` resolves it (entry-point aliases first), or
    None: an alias of a scheduler that is not installed ('django') names a module, which beat then
    fails to call."""
    from celery.beat import Scheduler as CeleryScheduler
    from celery.utils.imports import load_extension_class_names, symbol_by_name

    try:
        found = symbol_by_name(name, aliases=dict(load_extension_class_names("celery.beat_schedulers")))
    except (ImportError, AttributeError, ValueError) as exc:
        return f"cannot be imported ({exc})"
    if isinstance(found, type) and issubclass(found, CeleryScheduler):
        return None
    problem = "is not a Celery beat scheduler class"
    if not any(mark in name for mark in ".:"):
        problem += " (a bare name is the alias of a scheduler package, and none of that name is installed)"
    return problem


@register()
def check_beat_scheduler(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """CELERY_BEAT_SCHEDULER is resolved as ``celery beat -S`` resolves it."""
    name = getattr(settings, "CELERY_BEAT_SCHEDULER", None)
    problem = None if name is None else scheduler_problem(name)
    if problem is None:
        return []
    return [Error(
        f"CELERY_BEAT_SCHEDULER {name!r} {problem}.",
        hint="For sisy-celery set CELERY_BEAT_SCHEDULER = 'sisy_celery.Scheduler' (then `celery beat` needs no -S).",
        id="sisy_celery.E011",
    )]


def refuse_unknown_scheduler() -> None:
    """Exit with one line if this process is ``celery beat`` with a scheduler that is no scheduler.

    beat resolves its scheduler only after printing its banner, so ``-S django`` without
    django-celery-beat ends in a TypeError traceback; Django is set up (and this runs, from
    ``AppConfig.ready``) earlier, inside the beat command, whose options click still holds.
    """
    import click

    context = click.get_current_context(silent=True)
    name = context.params.get("scheduler") if context is not None and context.info_name == "beat" else None
    problem = scheduler_problem(name) if name else None
    if problem:
        raise SystemExit(f"celery beat cannot start: the scheduler {name!r} (from -S or CELERY_BEAT_SCHEDULER) "
                         f"{problem}. For sisy-celery use -S sisy_celery.Scheduler, or set CELERY_BEAT_SCHEDULER = "
                         "'sisy_celery.Scheduler' and leave -S out.")


def configured_app(app: Celery) -> None:
    """Raise ImproperlyConfigured if ``app`` is Celery's unconfigured fallback app.

    Celery makes that app (named 'default', without the Django fix-up) when code asks for
    the current app and the project's own was never created, because ``proj/celery.py`` is
    not imported by ``proj/__init__.py``: it would publish to amqp://localhost, where no
    worker listens.
    """
    if app.main == "default" and not app.fixups:
        raise ImproperlyConfigured(
            "sisy-celery found no Celery app of this project (only Celery's unconfigured default app, "
            "which sends to amqp://guest@localhost//): create proj/celery.py and import it in "
            "proj/__init__.py with `from .celery import app as celery_app`."
        )


@register()
def check_celery_app(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """The process that runs the checks (runserver, migrate ...) is the one the admin sends from."""
    from celery import current_app

    try:
        configured_app(current_app._get_current_object())
    except ImproperlyConfigured as exc:
        return [Warning(
            str(exc),
            hint="Without it the admin's 'Run now' and sisy_run send nowhere; see the README's quick start.",
            id="sisy_celery.W010",
        )]
    return []


def unapplied_migrations(using: str = DEFAULT_DB_ALIAS) -> str:
    """'' when sisy_celery's migrations are all applied on database ``using``, else a one-line message.

    For a process that starts before ``migrate`` (beat, a worker): it says what to run
    instead of failing on a missing table. Raises the database's error if it is unreachable.
    """
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connections[using])
    targets = [node for node in executor.loader.graph.leaf_nodes() if node[0] == "sisy_celery"]
    pending = [migration.name for migration, _ in executor.migration_plan(targets)
               if migration.app_label == "sisy_celery"]
    if not pending:
        return ""
    return (f"sisy_celery's tables on database {using!r} are not migrated ({len(pending)} migration(s) not "
            f"applied: {', '.join(pending)}): run `python manage.py migrate`.")
