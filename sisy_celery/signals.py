"""Worker-side bookkeeping: settle each run when its callable returns, keep its lease alive meanwhile.

The task body (``tasks.run_callable``) starts a run through the engine and hands it to
:func:`track`; Celery's ``task_postrun`` settles it, ``task_revoked`` revokes a run that
never started. Settling is retried until the database answers, and the run's lease is
renewed all that time, so an outage after the callable neither repeats nor loses the run.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from datetime import datetime
from typing import Any

from celery import states
from celery.signals import task_postrun, task_revoked, worker_init
from django.db import InterfaceError, OperationalError, close_old_connections, connection
from django.utils import timezone

from . import conf, engine
from .dispatch import TASK_NAME
from .models import Task

logger = logging.getLogger("sisy_celery.worker")

#: Longest pause between two attempts to settle a run while the database is unreachable.
MAX_SETTLE_PAUSE = 5.0


def track(run: engine.Started, task: Task, request: Any) -> None:
    """Note a run this process started: its lease is renewed until it is settled."""
    request.sisy_run = (run, task)
    _leases.add(run)


def settle(run: engine.Started, task: Task, state: str, error: str) -> None:
    """Settle ``run``, retrying with backoff until the database answers.

    Only a lost connection is retried. Run inside a caller's transaction (an eager ``apply()``
    in a test or a view), the connection is the caller's to manage: settled once, no retry.
    """
    pause = 0.2
    try:
        if connection.in_atomic_block:
            engine.settle(run, state, error, timezone.now(), task)
            return
        while True:
            try:
                close_old_connections()
                engine.settle(run, state, error, timezone.now(), task)
                return
            except (OperationalError, InterfaceError) as exc:
                logger.warning("sisy task id=%s: could not record the end of the run for %s (%s: %s); retrying in %.1fs",
                               run.task_pk, run.slot.isoformat(), type(exc).__name__, exc, pause)
                _close_connection()
                time.sleep(pause)
                pause = min(pause * 2, MAX_SETTLE_PAUSE)
    finally:
        _leases.discard(run)


def _close_connection() -> None:
    try:
        connection.close()
    except Exception:  # already broken; a new one is opened on the next query
        pass


def parse_slot(value: Any) -> datetime:
    """The aware slot a message carries; ValueError if it is not one."""
    slot = datetime.fromisoformat(value)
    if timezone.is_naive(slot):
        raise ValueError("naive")
    return slot


@worker_init.connect
def _on_worker_init(**kwargs: Any) -> None:
    from .checks import refuse_to_start

    refuse_to_start("worker")


@task_postrun.connect
def _on_postrun(sender: Any = None, task: Any = None, state: str | None = None, retval: Any = None,
                **kwargs: Any) -> None:
    if getattr(sender, "name", None) != TASK_NAME:
        return
    tracked = getattr(task.request, "sisy_run", None)
    if tracked is None:
        return  # refused, dropped or waiting message: no run was started by it
    task.request.sisy_run = None
    run, row = tracked
    error = "" if state == states.SUCCESS else getattr(task.request, "sisy_error", None) or describe_error(retval)
    settle(run, row, state or "", error)


def describe_error(exc: Any) -> str:
    """A run's error as the ledger and the admin show it: the exception's type and message."""
    return f"{type(exc).__name__}: {exc}"


@task_revoked.connect
def _on_revoked(sender: Any = None, request: Any = None, expired: bool = False, **kwargs: Any) -> None:
    if getattr(sender, "name", None) != TASK_NAME or request is None:
        return
    args = getattr(request, "args", None) or []
    try:
        task_pk, slot = args[0], parse_slot(args[3])
    except (IndexError, TypeError, ValueError):
        logger.warning("sisy dropped a %s message whose arguments name no run: %r",
                       "expired" if expired else "revoked", args)
        return
    reason = "expired before it started" if expired else "revoked before it started"
    if engine.revoke(task_pk, slot, timezone.now(), reason):
        logger.warning("sisy run of task id=%s for %s %s", task_pk, slot.isoformat(), reason)


class _LeaseKeeper:
    """Renews the leases of the runs this worker process is running, from one thread."""

    def __init__(self) -> None:
        self._running: Counter[engine.Started] = Counter()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, run: engine.Started) -> None:
        with self._lock:
            self._running[run] += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="sisy-lease", daemon=True)
                self._thread.start()

    def discard(self, run: engine.Started) -> None:
        with self._lock:
            self._running[run] -= 1
            if self._running[run] <= 0:
                del self._running[run]

    def _loop(self) -> None:
        event = threading.Event()
        while True:
            event.wait(max(conf.running_timeout() / 3, 0.2))
            with self._lock:
                runs = list(self._running)
            if not runs:
                continue
            try:
                close_old_connections()
                engine.renew(runs, timezone.now())
            except Exception:  # a database outage must not kill the lease thread
                logger.exception("sisy could not renew the leases of %d running run(s)", len(runs))
                _close_connection()


_leases = _LeaseKeeper()
