"""Publishing ``sisy.run_callable`` messages in batches, with errors told apart per message."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

from celery import Celery
from kombu.exceptions import OperationalError

logger = logging.getLogger("sisy_celery.dispatch")

#: The name of the one generic Celery task every run is a message of.
TASK_NAME = "sisy.run_callable"


@dataclass(frozen=True)
class Outgoing:
    """One run to publish."""

    task_id: str
    args: list[Any]
    headers: dict[str, Any] = field(default_factory=dict)
    queue: str = ""
    priority: int | None = None
    expires: datetime | None = None
    key: Any = None


class BrokerUnavailable(Exception):
    """The connection failed: which messages of the batch went out is unknown (the caller publishes
    them again later; the worker drops copies)."""


class Dispatcher:
    """Publishes runs through the Celery app's producer pool."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def publish(self, messages: Sequence[Outgoing]) -> list[tuple[Outgoing, str]]:
        """Publish ``messages`` in order; return those the broker refused one by one, with the reason.
        Raise BrokerUnavailable when the connection fails."""
        refused: list[tuple[Outgoing, str]] = []
        with self.app.producer_or_acquire() as producer:
            for outgoing in messages:
                try:
                    self.app.send_task(TASK_NAME, args=outgoing.args, task_id=outgoing.task_id, producer=producer,
                                       headers=outgoing.headers, **_routing(outgoing))
                except (OperationalError, ConnectionError, OSError) as exc:
                    raise BrokerUnavailable(str(exc)) from exc
                except Exception as exc:  # the broker refused this message (queue, routing, size)
                    refused.append((outgoing, f"{type(exc).__name__}: {exc}"))
                    producer.revive(producer.connection.channel())
        return refused

    def close(self) -> None:
        """Nothing is held between batches here (the app's pool keeps the connection)."""


def _routing(outgoing: Outgoing) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if outgoing.queue:
        options["queue"] = outgoing.queue
    if outgoing.priority is not None:
        options["priority"] = outgoing.priority
    if outgoing.expires is not None:
        options["expires"] = outgoing.expires
    return options
