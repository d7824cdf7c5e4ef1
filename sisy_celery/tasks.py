"""The one generic Celery task, ``sisy.run_callable``, and the single dispatch path to it."""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from celery import Celery, current_app, shared_task
from celery.result import AsyncResult
from django.core.exceptions import ValidationError
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from . import conf
from .callables import CallableError, call_arity, check_allowed, resolve
from .models import Task
from .scheduler import UNPUBLISHED_BEFORE
from .signals import TASK_NAME, run_started

logger = logging.getLogger("sisy_celery.worker")


class RefusedMessage(Exception):
    """A ``sisy.run_callable`` message that does not match its task row; nothing was run."""


def message_args(task: Task, scheduled_for: datetime) -> list[Any]:
    return [task.pk, task._func_info, task._extra_data, scheduled_for.isoformat()]


def send_options(task: Task, scheduled_for: datetime) -> dict[str, Any]:
    """apply_async options for a run of ``task``: routing, priority, expiry and the result tag."""
    options: dict[str, Any] = {"headers": {"periodic_task_name": task.result_tag}}
    if task.queue:
        options["queue"] = task.queue
    if task.priority is not None:
        options["priority"] = task.priority
    if task.expires is not None:
        options["expires"] = scheduled_for + timedelta(seconds=task.expires)
    return options


def send(task: Task, scheduled_for: datetime, app: Celery | None = None, producer: Any = None) -> AsyncResult:
    """Publish the run of ``task`` for the claimed slot ``scheduled_for``.

    Every dispatch path (beat, admin "run now", ``sisy_run``) ends here, so routing,
    priority, expiry and the result tag are the same whichever way a run starts.
    """
    return (app or current_app).send_task(
        TASK_NAME, args=message_args(task, scheduled_for), producer=producer, **send_options(task, scheduled_for)
    )


@shared_task(bind=True, name=TASK_NAME)
def run_callable(self: Any, task_pk: Any, func_info: dict[str, Any], userdata: dict[str, Any],
                 scheduled_for: str | None = None) -> Any:
    """Run the callable of Task ``task_pk`` with ``message`` = {task, userdata, scheduled_for}."""
    finished = getattr(self.request, "sisy_finished_before", None)
    if finished:
        logger.warning("sisy task %s: the message for %s was delivered again after its run had finished (%s); "
                       "not run twice", task_pk, scheduled_for, finished)
        return None
    try:
        task = Task.objects.filter(pk=task_pk).first()
    except (TypeError, ValueError, ValidationError):
        logger.error("sisy refused a message naming task %r: not a task id; nothing was run", task_pk)
        raise RefusedMessage(f"{task_pk!r} is not a task id; nothing was run") from None
    if task is None:
        logger.warning("sisy task %s no longer exists; run for %s dropped", task_pk, scheduled_for)
        return None
    try:
        slot = datetime.fromisoformat(scheduled_for) if scheduled_for else timezone.now()
        if timezone.is_naive(slot):
            raise ValueError("naive")
    except (TypeError, ValueError):
        logger.error("sisy refused a message for task id=%s label=%r: its slot %r is not an aware ISO datetime",
                     task.pk, task.label, scheduled_for)
        raise RefusedMessage(f"slot {scheduled_for!r} is not an aware ISO datetime; nothing was run") from None
    if task._func_info != func_info:
        logger.error("sisy refused a message for task id=%s label=%r: its function info %r differs from the row",
                     task.pk, task.label, func_info)
        refuse(task, slot)
        raise RefusedMessage(f"function info of the message differs from task {task.pk}; nothing was run")
    try:
        if not isinstance(func_info, dict):
            raise CallableError(f"Function info {func_info!r} is not valid: recreate the task with task_with_callable.")
        check_allowed(func_info)
    except CallableError as exc:
        logger.error("sisy refused task id=%s label=%r: %s", task.pk, task.label, exc)
        refuse(task, slot, problem=str(exc))
        raise RefusedMessage(str(exc)) from None
    if not task.allow_overlap and task.claimed_slot is not None and task.claimed_slot != slot:
        logger.warning("sisy task id=%s label=%r: run for %s superseded by the claim for %s; not run",
                       task.pk, task.label, scheduled_for, task.claimed_slot.isoformat())
        return None
    run_started(self.request, task)
    try:
        func = resolve(func_info)
        arity = call_arity(func, task.callable_path)
    except CallableError as exc:
        logger.error("sisy task id=%s label=%r cannot run: %s", task.pk, task.label, exc)
        Task.objects.filter(pk=task.pk).update(problem=str(exc))
        raise
    message = {"task": task, "userdata": task.userdata, "scheduled_for": slot}
    return func(message) if arity else func()


def refuse(task: Task, slot: datetime, problem: str | None = None) -> None:
    """A refused message ran nothing: hand back the claim beat made for it (no iteration is used).

    Otherwise ``in_flight`` would keep a task without overlap blocked, or one with
    iterations out of runs, until its running lease lapsed. ``problem`` flags the row itself:
    the message repeated the row's function info, as beat sends it, and one claim is handed
    back. A message whose function info differs from the row is handed back only if it is the
    message of the row's current claim (its slot is the claimed one and no run of that claim
    has started); any other (forged, or older than the claim) changes no counter.
    """
    rows = Task.objects.filter(pk=task.pk, in_flight__gt=0)
    if problem is not None:
        Task.objects.filter(pk=task.pk).update(problem=problem)
    elif task.claimed_slot == slot and task.last_run < slot:
        rows = rows.filter(claimed_slot=slot, last_run__lt=slot)
    else:
        rows = rows.none()
    if not rows.release_run(last_status="REFUSED"):
        logger.warning("sisy task id=%s label=%r: the refused message for %s matches no claim; counters left as they are",
                       task.pk, task.label, slot.isoformat())


class TaskBusy(Exception):
    """``run_now`` was refused: the task is already running (overlap off) or out of iterations."""


def run_now(task: Task, app: Celery | None = None) -> AsyncResult:
    """Dispatch ``task`` now, claiming the run exactly as beat does (same rules, same routing)."""
    now = timezone.now()
    rows = Task.objects.filter(pk=task.pk)
    if not task.allow_overlap:
        # A lease before UNPUBLISHED_BEFORE is not lapsed: it marks a claim beat is about to publish.
        rows = rows.filter(Q(in_flight=0) | Q(lease_expires__lt=now, lease_expires__gte=UNPUBLISHED_BEFORE))
    if task.iterations:
        rows = rows.filter(Q(iterations=0) | Q(in_flight__lt=F("iterations")))
    lease = now + timedelta(seconds=conf.running_timeout())
    # With overlap allowed, beat may be publishing another slot: leave its mark and claimed slot to it.
    pending = Q(lease_expires__lt=UNPUBLISHED_BEFORE)
    if not rows.update(in_flight=F("in_flight") + 1, running=True,
                       lease_expires=Case(When(pending, then=F("lease_expires")), default=Value(lease)),
                       claimed_slot=Case(When(pending, then=F("claimed_slot")), default=Value(now))):
        raise TaskBusy(f"Task {task.pk} ({task.label}) is already running or has no iterations left; not sent.")
    try:
        return send(task, now, app=app)
    except Exception:
        Task.objects.filter(pk=task.pk).release_run()
        raise
