"""The Celery app of the in-process tests: configured from tests.settings (``memory://`` broker).

Made the default app, so ``run_now`` and the admin publish to the in-memory broker
(no server, no worker) from any thread, including pytest-django's live server.
"""
from __future__ import annotations

from typing import Any

from celery import Celery

app = Celery("sisy-tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.set_default()
app.set_current()


def purge() -> None:
    """Drop every message the in-memory broker holds."""
    with app.connection_for_write() as connection:
        connection.default_channel.queue_purge("celery")


def published() -> list[Any]:
    """Take the messages published to the default queue, oldest first."""
    messages = []
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("celery", no_ack=True)
        while True:
            try:
                messages.append(queue.get(block=False))
            except queue.Empty:
                break
        queue.close()
    return messages
