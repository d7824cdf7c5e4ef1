"""The Task model and the public API kept from the original ``sisy`` app."""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import datetime, timedelta, timezone as dt_timezone
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator
from django.db import models
from django.utils import timezone

from . import conf, schedules
from .callables import get_func_info
from .dispatch import uuid_text

HAS_NOT_RUN = datetime(1970, 1, 1, 0, 0, tzinfo=dt_timezone.utc)
FAR_FUTURE = datetime(2217, 12, 31, 23, 59, tzinfo=dt_timezone.utc)

# Fields whose change means the next run must be computed again (a queue the broker refused parks the task).
_SCHEDULING_FIELDS = ("schedule", "timezone", "start_running", "wait_for_schedule", "enabled", "queue")


def __getattr__(name: str) -> Any:
    if name == "DEFAULT_SCHEDULE":
        return conf.default_schedule()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def validate_schedule(value: str) -> None:
    """Model/form validator: a cron string, with the bad field named."""
    try:
        schedules.validate(value)
    except ValueError as exc:
        raise ValidationError(str(exc), code="invalid_schedule") from None


def validate_timezone(value: str) -> None:
    if value:
        try:
            conf.get_zone(value)
        except ValueError as exc:
            raise ValidationError(str(exc), code="invalid_timezone") from None


def check_userdata(value: Any) -> dict[str, Any]:
    """Return ``value`` (None becomes {}) if it is a dict of JSON data, else raise ValueError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"userdata must be a dict of JSON-serializable data, got {type(value).__name__}: "
            f"pass e.g. {{'account': 42}}."
        )
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(
            f"userdata must be a dict of JSON-serializable data ({exc}): use only dicts with "
            f"string keys, lists, strings, finite numbers, booleans and None."
        ) from None
    try:
        _check_json_tree(value)
    except RecursionError:  # Python 3.13's json encoder goes deeper than this walk can
        raise ValueError("userdata is nested too deeply: keep it to a few hundred levels.") from None
    return value


def _check_json_tree(value: Any) -> None:
    """JSON would turn other keys into strings (so the data would come back changed), and
    PostgreSQL cannot store NUL characters or lone surrogates: refuse them at creation, on every database."""
    if isinstance(value, str):
        problem = _text_problem(value)
        if problem:
            raise ValueError(f"userdata must not contain {problem}.")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"userdata keys must be strings, got {key!r}: JSON would turn it into {str(key)!r}.")
            _check_json_tree(key)
            _check_json_tree(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_json_tree(item)


def _text_problem(value: str) -> str:
    """What in ``value`` a database cannot store, or '' if nothing."""
    if "\x00" in value:
        return "NUL characters (databases cannot store them)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "lone surrogate characters (they are not valid Unicode; databases cannot store them)"
    return ""


def check_delay_until(value: Any, now: datetime) -> datetime:
    if not isinstance(value, datetime):
        raise ValueError(f"delay_until must be a datetime.datetime instance, got {type(value).__name__}.")
    if timezone.is_naive(value):
        raise ValueError(
            "delay_until must be timezone-aware: use e.g. django.utils.timezone.now() + timedelta(...)."
        )
    if value <= now:
        raise ValueError(f"delay_until {value.isoformat()} is in the past: a task cannot start running in the past.")
    return value


def validate_queue(value: str) -> None:
    """A queue name both Redis and AMQP brokers accept, refused when the task is created rather than
    when beat publishes (a refused publish parks the task)."""
    problem = queue_problem(value)
    if problem:
        raise ValidationError(problem, code="invalid_queue")


#: Redis keys kombu's Redis transport keeps for itself: a queue of that name would clash with them.
_KOMBU_KEYS = ("unacked", "unacked_index", "unacked_mutex")


def queue_problem(value: str) -> str:
    """Why ``value`` cannot be a queue name on Redis and AMQP brokers, or '' if it can."""
    if not value:
        return ""
    if len(value.encode("utf-8")) > 200:
        return "Queue names are at most 200 bytes (AMQP brokers refuse names over 255)."
    if value.startswith("amq."):
        return f"Queue {value!r}: names starting with 'amq.' are reserved by AMQP brokers; choose another name."
    if value.startswith("_kombu") or value in _KOMBU_KEYS:
        return f"Queue {value!r} clashes with the keys kombu keeps in Redis; choose another name."
    if not re.fullmatch(r"[A-Za-z0-9_.:@-]+", value):
        return (f"Queue {value!r}: use only letters, digits and . _ : @ - (no spaces or other characters), "
                f"e.g. 'reports' or 'billing.high'.")
    return ""


class TaskQuerySet(models.QuerySet):
    def due(self, now: datetime) -> "TaskQuerySet":
        """Enabled tasks whose next run is at or before ``now``, earliest first (uses the index)."""
        return self.filter(enabled=True, next_run__lte=now).order_by("next_run")

    def finish(self, **kept: Any) -> int:
        """Finish these tasks: delete them, or disable them with SISY_KEEP_FINISHED_TASKS.

        A kept task gets ``finished_at``, which tells it apart from one a user disabled
        (``sisy_purge_finished`` and the admin's "finished" filter rely on that), and the
        further values ``kept`` (the last run's, when its settlement finishes the task).
        """
        if conf.keep_finished_tasks():
            return self.update(enabled=False, running=False, finished_at=timezone.now(), **kept)
        return self.delete()[0]


class Task(models.Model):
    label = models.CharField(max_length=255, blank=True, help_text="Name of the task; defaults to the callable's dotted path.")
    schedule = models.CharField(
        max_length=80,
        default=conf.default_schedule,
        validators=[validate_schedule],
        help_text="Cron string: minute hour day-of-month month day-of-week [second].",
    )
    enabled = models.BooleanField(default=True, help_text="The task is not scheduled while this is off.")
    start_running = models.DateTimeField(default=HAS_NOT_RUN, help_text="First time the task may run.")
    end_running = models.DateTimeField(default=FAR_FUTURE, help_text="The task finishes once this has passed.")
    wait_for_schedule = models.BooleanField(
        default=True, help_text="Wait for the first cron slot; when off, the first run happens right away."
    )
    iterations = models.PositiveIntegerField(default=0, help_text="Runs left before the task finishes; 0 = forever.")
    allow_overlap = models.BooleanField(
        default=True, help_text="When off, a slot that comes due while a run is still going is skipped."
    )
    timezone = models.CharField(
        max_length=63, blank=True, validators=[validate_timezone],
        help_text="Zone the schedule is read in; blank = SISY_TIMEZONE / Celery's timezone / TIME_ZONE.",
    )
    queue = models.CharField(max_length=200, blank=True, validators=[validate_queue],
                             help_text="Celery queue; blank = default routing.")
    priority = models.PositiveSmallIntegerField(
        null=True, blank=True, validators=[MaxValueValidator(255)], help_text="Message priority; empty = none."
    )
    expires = models.PositiveIntegerField(
        null=True, blank=True, help_text="Drop the message if not started this many seconds after its slot."
    )

    created_at = models.DateTimeField(auto_now_add=True)
    modified_at = models.DateTimeField(auto_now=True)
    last_run = models.DateTimeField(default=HAS_NOT_RUN, editable=False)
    next_run = models.DateTimeField(default=HAS_NOT_RUN, editable=False)
    _func_info = models.JSONField(default=dict, editable=False)
    _extra_data = models.JSONField(default=dict, blank=True)
    running = models.BooleanField(
        default=False, editable=False, help_text="Some run of this task is claimed, queued or running (from the run ledger)."
    )
    last_status = models.CharField(max_length=20, blank=True, editable=False, help_text="Outcome of the last settled run.")
    problem = models.TextField(blank=True, editable=False)
    finished_at = models.DateTimeField(
        null=True, blank=True, editable=False,
        help_text="When the task finished and was kept disabled (SISY_KEEP_FINISHED_TASKS).",
    )

    objects = TaskQuerySet.as_manager()

    class Meta:
        indexes = [
            # "Enabled tasks due before T, earliest first" is a range scan of this index, and the
            # admin's default order (enabled first, then by next run) reads it in order too.
            models.Index(fields=["-enabled", "next_run"], name="sisy_task_enabled_next_idx"),
        ]

    def __str__(self) -> str:
        return self.label or f"Task {self.pk}"

    # -- loaded state, so save() writes only what this instance changed ----------------

    @classmethod
    def from_db(cls, db: str, field_names: Any, values: Any) -> "Task":
        instance = super().from_db(db, field_names, values)
        instance._remember()
        return instance

    def refresh_from_db(self, *args: Any, **kwargs: Any) -> None:
        """Refreshed (or lazily loaded deferred) fields are the database's values again."""
        super().refresh_from_db(*args, **kwargs)
        fields = kwargs.get("fields", args[1] if len(args) > 1 else None)
        self._remember(fields)

    def _remember(self, fields: Any = None) -> None:
        """Note the values as they are in the database (only ``fields`` if given)."""
        loaded = {} if fields is None else dict(getattr(self, "_loaded", {}))
        names = None if fields is None else set(fields)
        for f in self._meta.concrete_fields:
            if f.attname in self.__dict__ and (names is None or f.name in names or f.attname in names):
                loaded[f.attname] = _copy(self.__dict__[f.attname])
        self._loaded = loaded

    def _changed_fields(self) -> list[str]:
        """Fields whose value differs from the database's, or was set while deferred."""
        loaded = getattr(self, "_loaded", {})
        return [
            f.name for f in self._meta.concrete_fields
            if f.attname in self.__dict__ and (f.attname not in loaded or self.__dict__[f.attname] != loaded[f.attname])
        ]

    def check_text(self) -> None:
        """ValueError for text a column cannot hold (SQLite would store it, PostgreSQL would not)."""
        for f in self._meta.concrete_fields:
            value = self.__dict__.get(f.attname)
            if not isinstance(f, (models.CharField, models.TextField)) or not isinstance(value, str):
                continue
            if f.max_length and len(value) > f.max_length:
                raise ValueError(f"{f.name} {value[:40]!r}... is longer than {f.max_length} characters.")
            problem = _text_problem(value)
            if problem:
                raise ValueError(f"{f.name} must not contain {problem}.")

    # -- properties ---------------------------------------------------------------------

    @property
    def userdata(self) -> dict[str, Any]:
        """The task's JSON user data; mutate it in place and ``save()`` to persist."""
        if self._extra_data is None:
            self._extra_data = {}
        return self._extra_data

    @userdata.setter
    def userdata(self, value: dict[str, Any] | None) -> None:
        self._extra_data = check_userdata(value)

    @property
    def funcinfo(self) -> dict[str, Any]:
        return self._func_info

    @property
    def zone(self) -> Any:
        return conf.get_zone(self.timezone or None)

    @property
    def callable_path(self) -> str:
        return (self._func_info or {}).get("func_path", "")

    @property
    def result_tag(self) -> str:
        return result_tag(self.pk)

    # -- scheduling ---------------------------------------------------------------------

    def following_run(self, after: datetime) -> datetime:
        return following_run(self, after)

    def first_run(self, now: datetime) -> datetime:
        """When a new (or re-scheduled) task runs first, honouring start_running and wait_for_schedule."""
        start = max(now, self.start_running)
        if not self.wait_for_schedule and self.last_run == HAS_NOT_RUN:
            return start
        return self.following_run(start - timedelta(microseconds=1))

    def clean(self) -> None:
        errors = {}
        for name, check in (("_extra_data", check_userdata),):
            try:
                check(getattr(self, name))
            except ValueError as exc:
                errors[name] = str(exc)
        if self.start_running and self.end_running and self.end_running <= self.start_running:
            errors["end_running"] = "end_running must be after start_running."
        if errors:
            raise ValidationError(errors)

    def save(self, *args: Any, **kwargs: Any) -> None:
        schedules.validate(self.schedule)
        self.check_text()
        if self.timezone:
            conf.get_zone(self.timezone)
        check_userdata(self._extra_data)
        if not self._func_info:
            raise ValueError(
                "Task has no callable: create it with task_with_callable(), Task.run_iterations() or "
                "Task.run_once(), or choose a callable in the admin form."
            )
        if not self.label:
            self.label = self.callable_path
        if self.enabled and self.finished_at is not None:
            self.finished_at = None  # enabled again: no longer a finished task
        adding = self._state.adding
        changed = None if adding else self._changed_fields()
        requested = kwargs.get("update_fields")
        if requested is not None and changed is not None:
            changed = [name for name in changed if name in set(requested)]
        rescheduled = self.next_run == HAS_NOT_RUN or bool(changed and any(f in changed for f in _SCHEDULING_FIELDS))
        if rescheduled:
            self.next_run = self.first_run(timezone.now())
            self.problem = ""
            if changed is not None:
                changed += ["next_run", "problem"]
        if requested is not None:
            # The caller chose the fields; a recomputed next run is written with them.
            kwargs["update_fields"] = sorted(set(requested) | ({"next_run", "problem"} if rescheduled else set()))
        elif changed is not None and hasattr(self, "_loaded") and not kwargs.get("force_insert"):
            # Write only what this instance changed: beat and workers update next_run,
            # iterations and running concurrently, and a stale copy must not undo that.
            kwargs["update_fields"] = sorted(set(changed) | {"modified_at"})
        super().save(*args, **kwargs)
        self._remember(None if requested is None else kwargs["update_fields"])

    # -- the original's class methods ---------------------------------------------------

    @classmethod
    def run_iterations(
        cls,
        the_callable: Any,
        iterations: int = 1,
        label: str | None = None,
        schedule: str = "* * * * * *",
        userdata: dict[str, Any] | None = None,
        run_immediately: bool = False,
        delay_until: datetime | None = None,
        **fields: Any,
    ) -> "Task":
        """Create, save and return a task that runs ``iterations`` times (0 = forever)."""
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
            raise ValueError(f"iterations must be a whole number >= 0 (0 = forever), got {iterations!r}.")
        task = task_with_callable(the_callable, label=label, schedule=schedule, userdata=userdata, **fields)
        task.iterations = iterations
        if delay_until is not None:
            task.start_running = check_delay_until(delay_until, timezone.now())
        if run_immediately:
            task.wait_for_schedule = False
        task.save()
        return task

    @classmethod
    def run_once(
        cls,
        the_callable: Any,
        userdata: dict[str, Any] | None = None,
        delay_until: datetime | None = None,
        **fields: Any,
    ) -> "Task":
        """Create, save and return a task that runs once, right away or at ``delay_until``."""
        return cls.run_iterations(
            the_callable, iterations=1, userdata=userdata, run_immediately=True, delay_until=delay_until, **fields
        )


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value)) if isinstance(value, (dict, list)) else value


_SETTABLE = {
    "enabled", "start_running", "end_running", "wait_for_schedule", "iterations", "allow_overlap",
    "timezone", "queue", "priority", "expires",
}


def task_with_callable(
    the_callable: Any,
    label: str | None = None,
    schedule: str | None = None,
    userdata: dict[str, Any] | None = None,
    pk_override: Any = None,
    **fields: Any,
) -> Task:
    """Return an unsaved Task that calls ``the_callable`` on ``schedule``; save it to activate it.

    ``fields`` may set any public field (``start_running``, ``allow_overlap``, ``queue`` …).
    """
    unknown = set(fields) - _SETTABLE
    if unknown:
        raise TypeError(f"task_with_callable() got unknown field(s) {sorted(unknown)}; settable: {sorted(_SETTABLE)}.")
    schedule = conf.default_schedule() if schedule is None else schedule
    schedules.validate(schedule)
    info = get_func_info(the_callable, pk_override=pk_override)
    task = Task(label=label or info["func_path"], schedule=schedule, _func_info=info, _extra_data=check_userdata(userdata))
    for name, value in fields.items():
        setattr(task, name, value)
    if task.timezone:
        conf.get_zone(task.timezone)
    for name in ("start_running", "end_running"):
        if name in fields and (not isinstance(fields[name], datetime) or timezone.is_naive(fields[name])):
            raise ValueError(f"{name} must be a timezone-aware datetime.")
    task.check_text()
    try:
        # The fields' own validators (iterations >= 0, priority <= 255 ...): a ValueError now
        # rather than an IntegrityError, or silently stored nonsense, at save().
        task.clean_fields(exclude=[f.name for f in Task._meta.fields if f.name not in fields])
        # Django 4.2 gives positive integer fields no lower bound on SQLite (its CHECK fails at save).
        negative = {f.name: ["Ensure this value is greater than or equal to 0."] for f in Task._meta.fields
                    if f.get_internal_type().startswith("Positive") and f.name in fields
                    and isinstance(fields[f.name], int) and fields[f.name] < 0}
        if negative:
            raise ValidationError(negative)
    except ValidationError as exc:
        raise ValueError(" ".join(f"{name}: {' '.join(errors)}" for name, errors in exc.message_dict.items())) from None
    if task.end_running <= task.start_running:
        raise ValueError("end_running must be after start_running.")
    return task


def taskinfo_with_label(label: str) -> dict[str, Any]:
    """The function info of the task labelled ``label`` (for reverse data migrations)."""
    return Task.objects.get(label=label).funcinfo


class BeatProcess(models.Model):
    """One running (or recently running) beat process, for ``sisy_status`` health checks."""

    ident = models.CharField(max_length=255, unique=True, help_text="host:pid")
    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    last_tick = models.DateTimeField(help_text="When it last reported (beats report on every upkeep pass).")
    stopped_at = models.DateTimeField(null=True, blank=True, help_text="When it stopped cleanly.")

    class Meta:
        verbose_name_plural = "beat processes"

    def __str__(self) -> str:
        return self.ident


#: Namespace of the Celery task ids of runs: the id is a function of (task, slot) alone, so a message,
#: every copy or re-publish of it and its django-celery-results row share one id.
RUN_ID_NAMESPACE = uuid.UUID("6f1c7a52-3c1e-4f0e-9a59-5b0f2a7f3d10")


def following_run(row: Any, after: datetime) -> datetime:
    """The next slot of a task row (a Task, or the values beat's claim reads) strictly after ``after``.
    An interval counts from ``start_running``; its default, HAS_NOT_RUN, is the Unix epoch, a fixed grid."""
    return schedules.next_run(row.schedule, after, conf.get_zone(row.timezone or None), anchor=row.start_running)


def result_tag(task_pk: Any) -> str:
    """The ``periodic_task_name`` the results of task ``task_pk`` carry in django-celery-results."""
    return f"sisy:{task_pk}"


def run_celery_id(task_pk: Any, slot: datetime) -> str:
    """The Celery task id of the run of task ``task_pk`` for ``slot``."""
    name = f"{task_pk}/{slot.astimezone(dt_timezone.utc).isoformat()}".encode()
    return uuid_text(hashlib.sha1(RUN_ID_NAMESPACE.bytes + name).digest(), 5)  # uuid.uuid5, inlined


class Run(models.Model):
    """One dispatched slot of one task: the record beat and workers agree on (the run ledger).

    Every write to these rows goes through :mod:`sisy_celery.engine`. The task is referenced
    without a database constraint so that the history outlives a finished task that is deleted.
    """

    CLAIMED = "claimed"
    PUBLISHED = "published"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REVOKED = "revoked"
    LOST = "lost"
    STATES = [(CLAIMED, "claimed"), (PUBLISHED, "published"), (STARTED, "started"), (SUCCEEDED, "succeeded"),
              (FAILED, "failed"), (REVOKED, "revoked"), (LOST, "lost")]
    #: states of a run that is not over: the task counts as running while it has one
    UNSETTLED = (CLAIMED, PUBLISHED, STARTED)
    SETTLED = (SUCCEEDED, FAILED, REVOKED, LOST)

    # No index of its own: the unique (task, slot) and the (task, state) index lead with it.
    task = models.ForeignKey(Task, on_delete=models.DO_NOTHING, db_constraint=False, db_index=False,
                             related_name="runs")
    slot = models.DateTimeField(help_text="The instant this run was due.")
    state = models.CharField(max_length=10, choices=STATES, default=CLAIMED)
    attempt = models.PositiveSmallIntegerField(default=0, help_text="Starts so far (a redelivered run starts again).")
    beat = models.CharField(max_length=255, blank=True, help_text="The beat (host:pid) that claimed or last published it.")
    worker = models.CharField(max_length=255, blank=True, help_text="The worker that started it.")
    claimed_at = models.DateTimeField()
    published_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    lease_until = models.DateTimeField(
        null=True, blank=True,
        help_text="A published or started run is alive until then; a worker renews it while the callable runs.",
    )
    error = models.CharField(max_length=300, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["task", "slot"], name="sisy_run_task_slot_uniq")]
        indexes = [
            # a task's unsettled runs (beat's claim counts them for a whole batch at once)
            models.Index(fields=["task", "state"], name="sisy_run_task_state_idx"),
            # runs left claimed by a dead beat, leases to check (unsettled runs are few), retention
            models.Index(fields=["state", "claimed_at"], name="sisy_run_state_claimed_idx"),
        ]

    def __str__(self) -> str:
        return f"run of task {self.task_id} for {self.slot.isoformat()} ({self.state})"

    @property
    def celery_id(self) -> str:
        return run_celery_id(self.task_id, self.slot)

    @property
    def lateness(self) -> timedelta | None:
        """Started minus slot: how late the run began."""
        return None if self.started_at is None else self.started_at - self.slot
