"""Publish-only rates of ``sisy.run_callable`` messages, without any database: raw kombu, Celery's
``send_task`` and :class:`sisy_celery.dispatch.Dispatcher`, on Redis and on RabbitMQ, each as a ratio
to raw kombu measured in the same run.

    python bench/dispatch.py            (run by `make bench` after bench/run.py)

* raw kombu: ``Producer.publish`` of the same body and headers as a sisy message, one at a time,
  to a queue through the default exchange (as Celery publishes to a plain queue), no retry;
* send_task: ``app.send_task(TASK_NAME, args=..., task_id=..., headers=...)`` with one producer;
* Dispatcher: ``Dispatcher.publish`` in batches of BENCH_DISPATCH_BATCH (1000) messages; on
  RabbitMQ each call returns once the broker has confirmed its batch, so that rate is bounded by
  the broker's own intake, while kombu's and Celery's publish return once the frames are written.
  RabbitMQ gets two more rows for that reason: raw kombu with ``confirm_publish``, and the Dispatcher
  without publisher confirms (a variant that is not shipped: what the confirms cost).

Each is timed for 2,000 and 20,000 messages (BENCH_DISPATCH_SIZES), best of BENCH_DISPATCH_ROUNDS (2)
rounds, and the queue is checked to hold every message. The broker is a Redis database of this
benchmark (BENCH_DISPATCH_REDIS, db 7) and a RabbitMQ virtual host of its own
(``sisy_bench_dispatch``, made with rabbitmqctl; BENCH_DISPATCH_AMQP to use another URL); only the
benchmark's own queues are deleted afterwards.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from celery import Celery  # noqa: E402
from kombu import Connection, Queue  # noqa: E402

from common import unconfirmed_publishing  # noqa: E402
from sisy_celery.dispatch import TASK_NAME, Dispatcher, Outgoing  # noqa: E402

REDIS = os.environ.get("BENCH_DISPATCH_REDIS", "redis://127.0.0.1:6379/7")
VHOST = "sisy_bench_dispatch"
AMQP = os.environ.get("BENCH_DISPATCH_AMQP", "")
SIZES = [int(s) for s in os.environ.get("BENCH_DISPATCH_SIZES", "2000,20000").split(",") if s.strip()]
BATCH = int(os.environ.get("BENCH_DISPATCH_BATCH", "1000"))
ROUNDS = int(os.environ.get("BENCH_DISPATCH_ROUNDS", "2"))
QUEUE = f"sisy_bench_dispatch_{os.getpid()}"
FUNC_INFO = {"func_type": "function", "module_name": "jobs.jobs", "func_name": "no_arguments",
             "func_path": "jobs.jobs.no_arguments"}


def amqp_url() -> str:
    """A virtual host of the benchmark's own, or the default one when rabbitmqctl is not at hand."""
    if AMQP:
        return AMQP
    try:
        made = all(subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, timeout=60).returncode == 0
                   for args in (["add_vhost", VHOST], ["set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*"]))
    except (OSError, subprocess.TimeoutExpired):
        made = False
    return f"amqp://guest:guest@127.0.0.1:5672/{VHOST}" if made else "amqp://guest:guest@127.0.0.1:5672//"


def runs(n: int, slot: datetime) -> list[Outgoing]:
    return [Outgoing(str(uuid.uuid4()), [pk, FUNC_INFO, {}, slot.isoformat()], {"periodic_task_name": f"sisy:{pk}"})
            for pk in range(1, n + 1)]


def queue_length(url: str) -> int:
    with Connection(url) as conn:
        return conn.default_channel.queue_declare(QUEUE, passive=True).message_count


def settled_length(url: str, n: int, patience: float = 60.0) -> int:
    """The queue's length once it holds ``n`` messages, or after ``patience`` seconds: a publisher that
    does not wait for the broker returns before the broker has taken everything."""
    deadline = time.monotonic() + patience
    while (held := queue_length(url)) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    return held


def purge(url: str) -> None:
    with Connection(url) as conn:
        conn.default_channel.queue_purge(QUEUE)


def raw_kombu(url: str, messages: list[Outgoing], sample: dict[str, Any], **options: Any) -> float:
    """kombu's Producer.publish of a sisy message's body and headers, one at a time."""
    body = (messages[0].args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    with Connection(url, **options) as conn:
        producer = conn.Producer(serializer="json")
        producer.publish(body, routing_key=QUEUE, headers=sample, declare=[Queue(QUEUE)], retry=False)
        purge(url)
        started = time.perf_counter()
        for message in messages:
            producer.publish((message.args, {}, body[2]), routing_key=QUEUE, headers=sample, retry=False)
        return time.perf_counter() - started


def celery_send_task(app: Celery, messages: list[Outgoing]) -> float:
    with app.producer_or_acquire() as producer:
        started = time.perf_counter()
        for message in messages:
            app.send_task(TASK_NAME, args=message.args, task_id=message.task_id, headers=message.headers,
                          producer=producer)
        return time.perf_counter() - started


def dispatcher(app: Celery, messages: list[Outgoing]) -> float:
    publisher = Dispatcher(app)
    publisher.publish(messages[:1])  # connect and declare, as a running beat has done
    purge(app.conf.broker_url)
    started = time.perf_counter()
    for start in range(0, len(messages), BATCH):
        refused = publisher.publish(messages[start:start + BATCH])
        assert not refused, refused[:3]
    elapsed = time.perf_counter() - started
    publisher.close()
    return elapsed


def unconfirmed(app: Celery, messages: list[Outgoing]) -> float:
    with unconfirmed_publishing():
        return dispatcher(app, messages)


def measure(url: str) -> dict[str, dict[int, float]]:
    """Rates (messages/s) of each publisher at each size: the best of ROUNDS rounds, queue checked."""
    app = Celery("sisy-bench-dispatch", broker=url, set_as_current=False)
    app.conf.task_default_queue = QUEUE
    slot = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    sample = {"periodic_task_name": "sisy:1"}
    kinds: dict[str, Callable[[list[Outgoing]], float]] = {
        "raw kombu Producer.publish": lambda m: raw_kombu(url, m, sample),
        "Celery send_task": lambda m: celery_send_task(app, m),
        "sisy Dispatcher": lambda m: dispatcher(app, m),
    }
    if url.startswith("amqp"):
        # The Dispatcher returns once the broker has confirmed the batch; kombu's publish, as Celery's,
        # returns once the frames are written. The same guarantee costs kombu one round trip a message.
        kinds["raw kombu, confirm_publish"] = lambda m: raw_kombu(url, m, sample,
                                                                   transport_options={"confirm_publish": True})
        kinds["Dispatcher, no confirms"] = lambda m: unconfirmed(app, m)
    rates: dict[str, dict[int, float]] = {kind: {} for kind in kinds}
    try:
        for n in SIZES:
            for _round in range(ROUNDS):
                for kind, publish in kinds.items():
                    messages = runs(n, slot)
                    seconds = publish(messages)
                    held = settled_length(url, n)
                    if held != n:
                        raise RuntimeError(f"{kind}: the queue holds {held} of {n} messages")
                    purge(url)
                    rates[kind][n] = max(rates[kind].get(n, 0.0), n / seconds)
    finally:
        with Connection(url) as conn:
            conn.default_channel.queue_delete(QUEUE)
        if url.startswith("redis"):  # kombu keeps the bindings of the queue's exchange in keys of their own
            import redis

            client = redis.Redis.from_url(url)
            for key in client.scan_iter(match=f"*{QUEUE}*"):
                client.delete(key)
            client.close()
    return rates


def table(results: dict[str, dict[str, dict[int, float]]]) -> str:
    lines = ["Publish-only rates of sisy.run_callable messages (no database), messages/s and ratio to raw kombu",
             f"{'broker':10} {'publisher':28}" + "".join(f"{f'{n:,} msgs':>22}" for n in SIZES),
             "-" * (40 + 22 * len(SIZES))]
    for broker, rates in results.items():
        raw = rates["raw kombu Producer.publish"]
        for kind, by_size in rates.items():
            cells = "".join(f"{f'{by_size[n]:,.0f} /s = {by_size[n] / raw[n]:.2f}x':>22}" for n in SIZES)
            lines.append(f"{broker:10} {kind:28}{cells}")
    goals = [("Redis", 3.0), ("RabbitMQ", 1.5)]
    lines.append("")
    for broker, target in goals:
        if broker in results:
            rates = results[broker]
            worst = min(rates["sisy Dispatcher"][n] / rates["raw kombu Producer.publish"][n] for n in SIZES)
            lines.append(f"  [{'met' if worst >= target else 'NOT met':7}] {broker}: Dispatcher >= {target:g}x raw "
                         f"kombu at every size: lowest {worst:.2f}x")
    return "\n".join(lines)


def main() -> int:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    results = {"Redis": measure(REDIS), "RabbitMQ": measure(amqp_url())}
    print(f"\n{table(results)}\n  (batches of {BATCH}, best of {ROUNDS} rounds; load average at the start {load}, "
          f"at the end {', '.join(f'{x:.2f}' for x in os.getloadavg())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
