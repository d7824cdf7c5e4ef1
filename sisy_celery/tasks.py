"""The one generic Celery task, ``sisy.run_callable``, and "run now"."""
from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from celery import Celery, current_app, shared_task
from django.core.exceptions import ValidationError
from django.utils import timezone

from . import engine
from .callables import CallableError, call_arity, check_allowed, resolve
from .checks import configured_app
from .dispatch import TASK_NAME, BrokerUnavailable, Dispatcher
from .models import Task
from .signals import describe_error, parse_slot, track

logger = logging.getLogger("sisy_celery.worker")

TaskBusy = engine.TaskBusy


class RefusedMessage(Exception):
    """A ``sisy.run_callable`` message that does not match its task row; nothing was run."""


class NotSent(Exception):
    """"Run now" claimed a run but the broker refused its message (the task is flagged)."""


@shared_task(bind=True, name=TASK_NAME)
def run_callable(self: Any, task_pk: Any, func_info: dict[str, Any], userdata: dict[str, Any],
                 scheduled_for: str | None = None) -> Any:
    """Run the callable of Task ``task_pk`` for the slot ``scheduled_for``, once.

    The message must match its row (function info, allow-list), and its run must start in the
    ledger; a copy of a message, a run already started or settled, a disabled or deleted task
    runs nothing and counts nothing.
    """
    try:
        slot = parse_slot(scheduled_for)
    except (TypeError, ValueError):
        logger.error("sisy refused a message for task %r: its slot %r is not an aware ISO datetime",
                     task_pk, scheduled_for)
        raise RefusedMessage(f"slot {scheduled_for!r} is not an aware ISO datetime; nothing was run") from None
    try:
        task = Task.objects.filter(pk=task_pk).first()
    except (TypeError, ValueError, ValidationError):
        logger.error("sisy refused a message naming task %r: not a task id; nothing was run", task_pk)
        raise RefusedMessage(f"{task_pk!r} is not a task id; nothing was run") from None
    if task is None:
        logger.warning("sisy task %s no longer exists; run for %s dropped", task_pk, scheduled_for)
        return None
    if task._func_info != func_info:
        logger.error("sisy refused a message for task id=%s label=%r: its function info %r differs from the row",
                     task.pk, task.label, func_info)
        # The row's callable was changed after this slot was sent (or the message is forged): that
        # slot's run, if it has not started, is revoked rather than left waiting for its lease.
        engine.revoke(task.pk, slot, timezone.now(), "refused: the message's function info differs from the task")
        raise RefusedMessage(f"function info of the message differs from task {task.pk}; nothing was run")
    try:
        if not isinstance(func_info, dict):
            raise CallableError(f"Function info {func_info!r} is not valid: recreate the task with task_with_callable.")
        check_allowed(func_info)
    except CallableError as exc:
        logger.error("sisy refused task id=%s label=%r: %s", task.pk, task.label, exc)
        Task.objects.filter(pk=task.pk).update(problem=str(exc))
        engine.revoke(task.pk, slot, timezone.now(), f"refused: {exc}")
        raise RefusedMessage(str(exc)) from None
    started = engine.start(task, slot, self.request.hostname or "", timezone.now())
    if isinstance(started, engine.NotStarted):
        return _not_started(self, task, slot, started)
    track(started, task, self.request)
    try:
        try:
            func = resolve(func_info)
            arity = call_arity(func, task.callable_path)
        except CallableError as exc:
            logger.error("sisy task id=%s label=%r cannot run: %s", task.pk, task.label, exc)
            Task.objects.filter(pk=task.pk).update(problem=str(exc))
            raise
        message = {"task": task, "userdata": task.userdata, "scheduled_for": slot}
        return func(message) if arity else func()
    except Exception as exc:
        # The run's error, as the ledger records it: Celery's task_postrun carries no return value
        # when storing the failure in the result backend failed.
        self.request.sisy_error = describe_error(exc)
        raise


def _not_started(request_task: Any, task: Task, slot: datetime, why: engine.NotStarted) -> None:
    """A message that started nothing. A redelivered message whose run another attempt still holds
    (its worker may have died: the broker gave the message back) waits for that attempt's lease and
    tries again; anything else is dropped."""
    redelivered = (getattr(request_task.request, "delivery_info", None) or {}).get("redelivered")
    if why.why == engine.RUNNING and redelivered and why.lease_until is not None:
        wait = max(1.0, (why.lease_until - timezone.now()).total_seconds() + 1.0)
        logger.warning("sisy task id=%s label=%r: redelivered run for %s is held by another attempt until %s; "
                       "trying again in %.0fs", task.pk, task.label, slot.isoformat(), why.lease_until.isoformat(), wait)
        raise request_task.retry(countdown=wait, max_retries=None)
    logger.warning("sisy task id=%s label=%r: message for %s not run: %s", task.pk, task.label, slot.isoformat(),
                   why.detail)
    return None


def run_now(task: Task, app: Celery | None = None, by: str = "run now") -> str:
    """Claim and send one run of ``task`` now, under beat's rules and routing; return its Celery id.

    TaskBusy if beat's rules refuse it; BrokerUnavailable (the run is revoked) if the broker is
    unreachable; NotSent if the broker refused the message (the task is flagged);
    ImproperlyConfigured, before anything is claimed, if this process has no Celery app of its own.
    """
    app = app or current_app._get_current_object()
    configured_app(app)
    now = timezone.now()
    run = engine.claim_now(task, now, by)
    dispatcher = Dispatcher(app)
    try:
        sent = engine.publish([run], dispatcher, now)
    except BrokerUnavailable:
        engine.revoke(task.pk, run.slot, timezone.now(), "not sent: the broker was unreachable")
        raise
    finally:
        dispatcher.close()
    if not sent:
        raise NotSent(f"Task {task.pk} ({task.label}) not sent: the broker refused its message; see the task's problem.")
    return run.celery_id
