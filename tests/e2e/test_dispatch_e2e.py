"""The Dispatcher's messages consumed by unmodified Celery workers (solo and prefork pools), on
Redis and on RabbitMQ.

The worker is ``celery -A dispatch_app worker`` (tests/e2e/dispatch_app.py): a small Celery app
of its own with a task registered as ``sisy.run_callable`` that returns what it saw of the message,
so these tests do not depend on what the real task does with its run. It runs against a Stack's
database (django-db results) and broker (a Redis database / RabbitMQ virtual host of its own); the
messages are published from this process with a Dispatcher, as beat publishes them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from sisy_celery.dispatch import TASK_NAME, Dispatcher, Outgoing
from tests.e2e.conftest import require_stack
from tests.e2e.dispatch_app import QUEUES, configure
from tests.e2e.harness import EXAMPLE, Stack, wait_for

pytestmark = pytest.mark.e2e

UTC = timezone.utc
HERE = Path(__file__).resolve().parent
FUNC_INFO = {"func_type": "function", "module_name": "jobs.jobs", "func_name": "record",
             "func_path": "jobs.jobs.record"}
#: the order a worker takes priorities 9, 0, 6, 3 in: Redis (kombu) serves 0 first, RabbitMQ 9 first
PRIORITY_ORDER = {"redis": [0, 3, 6, 9], "amqp": [9, 6, 3, 0]}
#: the result rows of the two runs that expire in the queue
EXPIRED = {"redis": ["REVOKED", "REVOKED"], "amqp": [None, None]}


@pytest.fixture(scope="module", params=["redis", "amqp"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_stack("postgres", request.param)
    stack = Stack("postgres", request.param, tmp_path_factory.mktemp(f"dispatch-{request.param}"))
    stack.queues = QUEUES
    stack._broker.queues = QUEUES
    try:
        stack.setup()
        yield stack
    finally:
        stack.teardown()


class Worker:
    """``celery -A dispatch_app worker -P pool -c 1 -E`` on the stack, its log in the stack's folder."""

    def __init__(self, stack: Stack, pool: str) -> None:
        self.log = stack.workdir / f"dispatch-worker-{pool}-{uuid.uuid4().hex[:6]}.log"
        env = stack.env(PYTHONPATH=os.pathsep.join([str(HERE), str(EXAMPLE)]))
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "dispatch_app", "worker", "-P", pool, "-c", "1", "-E", "-Q", ",".join(QUEUES), "-l", "info", "-n", f"dispatch-{pool}@%h",
                 "--without-gossip", "--without-mingle", "--without-heartbeat"],
                cwd=stack.workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.ready, 60, f"the {pool} worker to start")

    def ready(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(f"the worker exited with {self.popen.returncode}:\n{self.text()[-3000:]}")
        return " ready." in self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


class Events:
    """The worker's task events (``-E``), as Flower receives them, captured in a thread."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.seen: list[dict[str, Any]] = []
        self.receiver: Any = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._capture, daemon=True)
        self.thread.start()
        assert self.ready.wait(20), "the event receiver did not start"

    def _capture(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self.seen.append})
            self.ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def of(self, kind: str) -> dict[str, str]:
        """uuid -> task name of the events of one kind (task-received carries the name)."""
        return {event["uuid"]: event.get("name", "") for event in list(self.seen) if event.get("type") == kind}

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(timeout=10)


def results(stack: Stack, ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = stack.query("SELECT task_id, status, task_name, result, periodic_task_name, worker "
                       "FROM django_celery_results_taskresult")
    return {row["task_id"]: row for row in rows if row["task_id"] in ids}


def run(pk: int, slot: datetime, **fields: Any) -> Outgoing:
    userdata = fields.pop("userdata", {})
    return Outgoing(str(uuid.uuid4()), [pk, FUNC_INFO, userdata, slot.isoformat()],
                    {"periodic_task_name": f"sisy:{pk}"}, key=pk, **fields)


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_workers_consume_dispatched_messages(stack: Stack, pool: str) -> None:
    """Published before the worker starts: plain runs, four priorities, and two runs that expire
    before it starts. The worker runs the plain ones and the priorities in the broker's priority
    order, never runs the expired ones, and the result backend and the task events name
    every message's task and id."""
    stack.reset()
    app = configure(Celery("dispatch-e2e-publisher", broker=stack.broker, set_as_current=False))
    slot = datetime.now(UTC).replace(microsecond=0)
    plain = [run(n, slot) for n in range(1, 6)]
    prioritised = [run(10 + p, slot, queue=QUEUES[1], priority=p) for p in (9, 0, 6, 3)]
    expiring = [run(20 + n, slot, queue=QUEUES[2], expires=datetime.now(UTC) + timedelta(seconds=1))
                for n in range(2)]
    dispatcher = Dispatcher(app)
    events = Events(app)
    worker = None
    try:
        assert dispatcher.publish(plain + prioritised + expiring) == []
        time.sleep(2)  # the expiring runs expire in the queue
        worker = Worker(stack, pool)
        ids = [m.task_id for m in plain + prioritised + expiring]
        expected = len(ids) - (len(expiring) if stack.broker_kind == "amqp" else 0)
        done = wait_for(lambda: (lambda found: found if len(found) == expected and all(
            row["status"] in ("SUCCESS", "REVOKED") for row in found.values()) else None)(results(stack, ids)),
            60, "a result for every message")
        for message in plain + prioritised:
            row = done[message.task_id]
            assert (row["status"], row["task_name"], row["periodic_task_name"]) == (
                "SUCCESS", TASK_NAME, f"sisy:{message.key}")
            assert json.loads(row["result"])["pk"] == message.key
        # Expired in the queue: RabbitMQ drops them itself (the expiration property), a worker on Redis
        # revokes them (the expires header). Either way they never run.
        assert [done.get(m.task_id, {}).get("status") for m in expiring] == EXPIRED[stack.broker_kind]
        order = sorted(prioritised, key=lambda m: json.loads(done[m.task_id]["result"])["at"])
        assert [m.priority for m in order] == PRIORITY_ORDER[stack.broker_kind]
        assert [json.loads(done[m.task_id]["result"])["priority"] for m in order] == PRIORITY_ORDER[
            stack.broker_kind]

        # The events a monitor sees: every run received and done under its id and the task's name,
        # the expired ones revoked.
        ran = [m.task_id for m in plain + prioritised]
        received = wait_for(lambda: (lambda got: got if set(ran) <= set(got) else None)(events.of("task-received")),
                            20, "task-received events of every run")
        assert {received[i] for i in ran} == {TASK_NAME}
        assert set(ran) <= set(events.of("task-succeeded"))
        revoked = [m.task_id in events.of("task-revoked") for m in expiring]
        assert revoked == [status == "REVOKED" for status in EXPIRED[stack.broker_kind]]
    finally:
        events.stop()
        dispatcher.close()
        if worker is not None:
            worker.stop()


def test_inspect_shows_a_running_dispatched_message(stack: Stack) -> None:
    """``celery inspect active`` names a run in progress by its id and task name (prefork: a solo
    worker answers remote control only between tasks)."""
    stack.reset()
    app = configure(Celery("dispatch-e2e-inspect", broker=stack.broker, set_as_current=False))
    worker = Worker(stack, "prefork")
    dispatcher = Dispatcher(app)
    try:
        slow = run(30, datetime.now(UTC), userdata={"seconds": 6})
        assert dispatcher.publish([slow]) == []
        active = wait_for(lambda: [task for tasks in (app.control.inspect(timeout=1).active() or {}).values()
                                   for task in tasks if task["id"] == slow.task_id], 20, "the slow run in inspect")
        assert active[0]["name"] == TASK_NAME and active[0]["args"][0] == 30
    finally:
        dispatcher.close()
        worker.stop()
