"""Worker-side bookkeeping: ``last_run``, ``iterations``, ``running`` and the running lease.

The task body calls :func:`run_started` once it has accepted a message; Celery's
``task_postrun`` and ``task_revoked`` signals then settle the run. Every update
is a single conditional statement, so concurrent runs never lose each other's
counts.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from datetime import timedelta
from typing import Any

from celery import states
from celery.signals import task_postrun, task_prerun, task_revoked
from django.db import close_old_connections
from django.db.models import Case, F, PositiveIntegerField, Value, When
from django.utils import timezone

from . import conf
from .models import FAR_FUTURE, Task
from .scheduler import UNPUBLISHED_BEFORE

logger = logging.getLogger("sisy_celery.worker")

#: The name of the one generic Celery task (defined in tasks.py, which imports this module).
TASK_NAME = "sisy.run_callable"


def run_started(request: Any, task: Task) -> None:
    """Record the start of an accepted run and keep its lease alive while it runs."""
    now = timezone.now()
    request.sisy_run = {"pk": task.pk, "iterations": task.iterations, "end_running": task.end_running}
    lease = now + timedelta(seconds=conf.running_timeout())
    Task.objects.filter(pk=task.pk).update(last_run=now, lease_expires=_renewed(lease))
    _leases.add(task.pk)


def _renewed(lease: Any) -> Case:
    """A new lease, unless the row's lease is the mark of a claim beat has not published yet
    (overlap allowed: another slot of the task is being sent), which beat swaps itself."""
    return Case(When(lease_expires__lt=UNPUBLISHED_BEFORE, then=F("lease_expires")), default=Value(lease))


def _release(pk: Any, status: str, count_run: bool, limited: bool = True, ends: bool = True) -> None:
    """Settle one run of task ``pk``: fewer in flight, one iteration used, finish if none remain.

    ``limited`` / ``ends`` say whether the task had an iteration count / an end date
    when the run started; they only spare queries that cannot match.
    """
    rows = Task.objects.filter(pk=pk)
    if count_run and limited and rows.filter(iterations=1, in_flight__lte=1).finish():
        logger.info("sisy task id=%s finished: its last iteration ran", pk)
        return
    extra: dict[str, Any] = {}
    if count_run:
        extra = {
            "iterations": Case(When(iterations__gt=1, then=F("iterations") - 1), default=F("iterations"),
                               output_field=PositiveIntegerField()),
            "last_status": Value(status),
        }
    rows.release_run(**extra)
    if ends and rows.filter(in_flight=0, next_run__gt=F("end_running"), end_running__lt=FAR_FUTURE).finish():
        logger.info("sisy task id=%s finished: its end_running has passed", pk)


@task_prerun.connect
def _on_prerun(sender: Any = None, task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    """Note whether a message the broker delivers again already ran to its end.

    A broker redelivers a message whose acknowledgement it never got (a connection lost in a
    broker restart, Redis's visibility timeout): if its run had finished, the task body skips it
    (see ``run_callable``). Looked up here, before Celery stores STARTED over the earlier state;
    a run that was interrupted (STARTED, or nothing stored) runs again, as documented.
    """
    if getattr(sender, "name", None) != TASK_NAME or task is None or task_id is None:
        return
    request = task.request
    if not (getattr(request, "delivery_info", None) or {}).get("redelivered"):
        return
    try:
        state = task.backend.get_task_meta(task_id).get("status")
    except Exception:  # no result store, or unreachable: run it rather than lose it
        logger.warning("sisy could not read the earlier state of redelivered message %s; it runs", task_id)
        return
    if state in states.READY_STATES:
        request.sisy_finished_before = state


@task_postrun.connect
def _on_postrun(sender: Any = None, task: Any = None, state: str | None = None, **kwargs: Any) -> None:
    if getattr(sender, "name", None) != TASK_NAME:
        return
    run = getattr(task.request, "sisy_run", None)
    if run is None:
        return  # refused or dropped message: nothing was claimed by this run
    _leases.discard(run["pk"])
    _release(run["pk"], state or "", count_run=True, limited=run["iterations"] > 0,
             ends=run["end_running"] < FAR_FUTURE)


@task_revoked.connect
def _on_revoked(sender: Any = None, request: Any = None, expired: bool = False, **kwargs: Any) -> None:
    if getattr(sender, "name", None) != TASK_NAME or request is None:
        return
    args = getattr(request, "args", None) or []
    if args:
        logger.warning("sisy run of task id=%s was %s before it started", args[0], "dropped (expired)" if expired else "revoked")
        _release(args[0], "REVOKED", count_run=False)


class _LeaseKeeper:
    """Renews the ``running`` lease of tasks this worker process is running, from one thread."""

    def __init__(self) -> None:
        self._running: Counter[Any] = Counter()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, pk: Any) -> None:
        with self._lock:
            self._running[pk] += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="sisy-lease", daemon=True)
                self._thread.start()

    def discard(self, pk: Any) -> None:
        with self._lock:
            self._running[pk] -= 1
            if self._running[pk] <= 0:
                del self._running[pk]

    def _loop(self) -> None:
        event = threading.Event()
        while True:
            timeout = conf.running_timeout()
            event.wait(max(timeout / 3, 0.2))
            with self._lock:
                pks = list(self._running)
            if not pks:
                continue
            try:
                close_old_connections()
                # Only rows still in flight: a run that ended after ``pks`` was read has already
                # cleared its lease, and renewing it would leave a settled task with a lease.
                Task.objects.filter(pk__in=pks, in_flight__gt=0).update(
                    lease_expires=_renewed(timezone.now() + timedelta(seconds=timeout)))
            except Exception:  # a database outage must not kill the lease thread
                logger.exception("sisy could not renew running leases of tasks %s", pks)


_leases = _LeaseKeeper()
