"""Celery app of the Dispatcher's end-to-end tests: an unmodified Celery worker (``celery -A
dispatch_app worker``) with a task registered under the name ``sisy.run_callable``.

The task takes the arguments beat sends (task pk, function info, userdata, slot) and returns what
the worker saw of the message, so the tests check delivery, priority order and expiry from the
result backend (django-db, on the stack's database) whatever the real task does with its run
ledger. Queues are declared with ``x-max-priority`` so RabbitMQ honours priorities.
"""
from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

#: The default queue, a queue for the priority check, a queue for the expiry check
QUEUES = ("dispatch_default", "dispatch_prio", "dispatch_expiring")
TASK_NAME = "sisy.run_callable"  # the name the Dispatcher publishes


def configure(app: Celery) -> Celery:
    """The queue settings the publishing side and the worker share."""
    app.conf.update(task_default_queue=QUEUES[0], task_queue_max_priority=10, task_create_missing_queues=True)
    return app


def worker_app() -> Celery:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
    app = Celery("sisy-dispatch-e2e")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    configure(app)

    @app.task(bind=True, name=TASK_NAME)
    def run_callable(self: Any, task_pk: Any, func_info: dict, userdata: dict, scheduled_for: str | None = None
                     ) -> dict[str, Any]:
        time.sleep(float(userdata.get("seconds", 0)))
        info = self.request.delivery_info or {}
        return {"pk": task_pk, "slot": scheduled_for, "priority": info.get("priority"),
                "queue": info.get("routing_key"), "at": time.time(), "hostname": self.request.hostname}

    # Registered before Django loads sisy_celery (whose worker task has the same name): the first wins.
    app.finalize()
    return app


def __getattr__(name: str) -> Any:
    """``app``, for ``celery -A dispatch_app``: made on first use, so that the tests importing
    QUEUES and configure() get no Celery app (it would become the current one) and no task."""
    if name == "app":
        made = globals()["app"] = worker_app()
        return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
