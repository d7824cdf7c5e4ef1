"""The one generic Celery task, ``sisy.run_callable``, and the single dispatch path to it."""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from celery import Celery, current_app, shared_task
from celery.result import AsyncResult
from django.utils import timezone

from .callables import CallableError, call_arity, check_allowed, resolve
from .models import Task

logger = logging.getLogger("sisy_celery.worker")

TASK_NAME = "sisy.run_callable"


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


def send(task: Task, scheduled_for: datetime | None = None, app: Celery | None = None) -> AsyncResult:
    """Publish one run of ``task`` for ``scheduled_for``; every dispatch path goes through here."""
    slot = scheduled_for or timezone.now()
    return (app or current_app).send_task(TASK_NAME, args=message_args(task, slot), **send_options(task, slot))


@shared_task(bind=True, name=TASK_NAME)
def run_callable(self: Any, task_pk: Any, func_info: dict[str, Any], userdata: dict[str, Any],
                 scheduled_for: str | None = None) -> Any:
    """Run the callable of Task ``task_pk`` with ``message`` = {task, userdata, scheduled_for}."""
    task = Task.objects.filter(pk=task_pk).first()
    if task is None:
        logger.warning("sisy task %s no longer exists; run for %s dropped", task_pk, scheduled_for)
        return None
    if task._func_info != func_info:
        logger.error("sisy refused a message for task id=%s label=%r: its function info %r differs from the row",
                     task.pk, task.label, func_info)
        raise RefusedMessage(f"function info of the message differs from task {task.pk}; nothing was run")
    try:
        check_allowed(func_info)
    except CallableError as exc:
        logger.error("sisy refused task id=%s label=%r: %s", task.pk, task.label, exc)
        raise RefusedMessage(str(exc)) from None
    from .signals import run_started

    run_started(self.request, task)
    try:
        func = resolve(func_info)
        arity = call_arity(func, task.callable_path)
    except CallableError as exc:
        logger.error("sisy task id=%s label=%r cannot run: %s", task.pk, task.label, exc)
        Task.objects.filter(pk=task.pk).update(problem=str(exc))
        raise
    slot = datetime.fromisoformat(scheduled_for) if scheduled_for else timezone.now()
    message = {"task": task, "userdata": task.userdata, "scheduled_for": slot}
    return func(message) if arity else func()
