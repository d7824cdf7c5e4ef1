"""The Dispatcher's messages against Celery's ``send_task``, on real Redis and RabbitMQ servers.

Each comparison publishes the same run twice into an empty queue, once with
``app.send_task(TASK_NAME, args=..., task_id=..., headers=..., queue=..., priority=...,
expires=...)`` and once with :class:`Dispatcher`, reads both raw messages back from the broker
and compares every field. A difference fails the test unless it is listed in ``ALLOWED`` with
the reason it is expected.

The Celery apps here are small apps of the test's own (no task registered under the name, as
in a beat process that has not imported the worker task: send_task then takes no task options),
each on a Redis database or RabbitMQ virtual host of its own.
"""
from __future__ import annotations

import base64
import json
import secrets
import socket
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery import Celery
from celery.utils.saferepr import saferepr
from kombu import Connection, Exchange, Queue
from kombu.transport.redis import PRIORITY_STEPS

from sisy_celery import dispatch
from sisy_celery.dispatch import TASK_NAME, BrokerUnavailable, Dispatcher, Outgoing, uuid_text
from tests.conftest import require_service
from tests.e2e.harness import SERVICES, AmqpBroker, RedisBroker

UTC = timezone.utc
FUNC_INFO = {"func_type": "function", "module_name": "jobs.jobs", "func_name": "record",
             "func_path": "jobs.jobs.record"}
SEP = "\x06\x16"  # kombu's Redis separator between a queue name and its priority


def ms_close(ours: Any, theirs: Any) -> bool:
    """Both messages carry the milliseconds from publish to expiry; they were published moments apart."""
    return abs(int(ours) - int(theirs)) < 2000


def distinct_uuids(ours: Any, theirs: Any) -> bool:
    """kombu's Redis channel gives each message a fresh uuid4 delivery tag (its ack key)."""
    return len(ours) == len(theirs) == 36 and ours != theirs


#: Differences that are expected, with the reason: field path -> check both values must pass.
ALLOWED: dict[str, Callable[[Any, Any], bool]] = {
    # expiration = milliseconds left until ``expires``, computed at the moment of publishing
    "properties.expiration": ms_close,
    # Redis: a new uuid4 per published message (kombu's virtual channel does the same)
    "properties.delivery_tag": distinct_uuids,
}


def differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Every path where two decoded messages differ, except those ALLOWED (whose check must hold)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        found = []
        for key in sorted(set(ours) | set(theirs)):
            found += differences(ours.get(key, "<missing>"), theirs.get(key, "<missing>"),
                                 f"{path}.{key}" if path else key)
        return found
    if ours == theirs:
        return []
    check = ALLOWED.get(path)
    if check is not None and check(ours, theirs):
        return []
    return [f"{path}: dispatcher {ours!r} != send_task {theirs!r}"]


def args_for(pk: int, slot: datetime) -> list[Any]:
    return [pk, FUNC_INFO, {"n": pk, "tags": ["a", "b"]}, slot.isoformat()]


def send_task(app: Celery, outgoing: Outgoing) -> None:
    """What tasks.send does today: send_task with the options the task row sets."""
    options: dict[str, Any] = {"headers": outgoing.headers}
    if outgoing.queue:
        options["queue"] = outgoing.queue
    if outgoing.priority is not None:
        options["priority"] = outgoing.priority
    if outgoing.expires is not None:
        options["expires"] = outgoing.expires
    with app.producer_or_acquire() as producer:
        app.send_task(TASK_NAME, args=outgoing.args, task_id=outgoing.task_id, producer=producer, **options)


def make_app(url: str, **conf: Any) -> Celery:
    app = Celery(f"dispatch-test-{secrets.token_hex(3)}", broker=url, set_as_current=False)
    app.conf.update(task_default_queue=conf.pop("task_default_queue", "celery"), **conf)
    return app


def cases(prefix: str, slot: datetime) -> list[tuple[str, dict[str, Any], Outgoing]]:
    """(name, app settings, run) for each routing option a task row or Celery's settings can set."""
    expires = slot + timedelta(minutes=10)
    routed = f"{prefix}-routed"
    topic = f"{prefix}-topic"
    return [
        ("default queue", {}, Outgoing("id-1", args_for(1, slot), {"periodic_task_name": "sisy:1"})),
        ("queue, priority and expiry", {}, Outgoing("id-2", args_for(2, slot), {"periodic_task_name": "sisy:2"},
                                                    queue=f"{prefix}-q", priority=7, expires=expires)),
        ("task_routes", {"task_routes": {TASK_NAME: {"queue": routed}}},
         Outgoing("id-3", args_for(3, slot), {"periodic_task_name": "sisy:3"})),
        ("task_queues: topic exchange, routing key, priority from the route",
         {"task_queues": [Queue(topic, Exchange(topic, type="topic"), routing_key="runs.sisy")],
          "task_routes": {TASK_NAME: {"queue": topic, "priority": 4}}},
         Outgoing("id-4", args_for(4, slot), {"periodic_task_name": "sisy:4"}, expires=expires)),
    ]


def default_queue(prefix: str) -> str:
    return f"{prefix}-default"


# -- brokers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    require_service(*SERVICES["redis"])
    broker = RedisBroker("redis")
    try:
        yield broker.acquire()
    finally:
        broker.release()


@pytest.fixture(scope="module")
def amqp_url() -> Iterator[str]:
    require_service(*SERVICES["amqp"])
    broker = AmqpBroker("amqp", ())
    try:
        yield broker.acquire()
    finally:
        broker.release()


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def redis_messages(url: str, key: str) -> list[dict[str, Any]]:
    """The raw envelopes of a Redis list, oldest first, body decoded (base64, then JSON)."""
    client = redis_client(url)
    try:
        raw = client.lrange(key, 0, -1)
    finally:
        client.close()
    messages = []
    for item in reversed(raw):  # LPUSH, BRPOP: the list's tail is the oldest
        envelope = json.loads(item)
        assert envelope["properties"]["body_encoding"] == "base64"
        envelope["body"] = json.loads(base64.b64decode(envelope["body"]))
        messages.append(envelope)
    return messages


def amqp_messages(url: str, queue: str) -> list[dict[str, Any]]:
    """basic_get every message of an AMQP queue: properties (headers included), delivery info, body."""
    messages = []
    with Connection(url) as conn:
        channel = conn.channel()
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            info = dict(message.delivery_info)
            info.pop("delivery_tag")  # the getting channel's counter
            info.pop("message_count")  # messages still in the queue after this get
            messages.append({"properties": dict(message.properties), "delivery_info": info,
                             "body": json.loads(message.body)})
        channel.close()
    return messages


def delete_amqp_queues(url: str, names: list[str]) -> None:
    with Connection(url) as conn:
        for name in names:
            channel = conn.channel()
            try:
                channel.queue_delete(name)
            finally:
                channel.close()


# -- field-by-field comparison --------------------------------------------------------------


def publish_both(url: str, prefix: str, settings: dict[str, Any], outgoing: Outgoing) -> None:
    """The run through send_task, then through a Dispatcher, on an app with ``settings``."""
    app = make_app(url, task_default_queue=default_queue(prefix), **settings)
    send_task(app, outgoing)
    dispatcher = Dispatcher(app)
    assert dispatcher.publish([outgoing]) == []
    dispatcher.close()


def test_redis_messages_match_send_task(redis_url: str) -> None:
    prefix = f"cmp-{secrets.token_hex(3)}"
    slot = datetime.now(UTC).replace(microsecond=0)
    for name, settings, outgoing in cases(prefix, slot):
        publish_both(redis_url, prefix, settings, outgoing)
        client = redis_client(redis_url)
        keys = [key.decode() for key in client.keys(f"{prefix}*")]
        client.close()
        assert len(keys) == 1, (name, keys)
        priority = outgoing.priority or settings.get("task_routes", {}).get(TASK_NAME, {}).get("priority")
        step = max(step for step in PRIORITY_STEPS if step <= (priority or 0))  # kombu's priority queues
        assert keys[0].endswith(f"{SEP}{step}") if step else SEP not in keys[0], (name, keys)
        theirs, ours = redis_messages(redis_url, keys[0])
        assert differences(ours, theirs) == [], name
        assert ours["headers"]["id"] == outgoing.task_id and ours["headers"]["task"] == TASK_NAME
        assert ours["body"][0] == outgoing.args
        redis_client(redis_url).delete(keys[0])


def test_amqp_messages_match_send_task(amqp_url: str) -> None:
    prefix = f"cmp-{secrets.token_hex(3)}"
    slot = datetime.now(UTC).replace(microsecond=0)
    queues = [default_queue(prefix), f"{prefix}-q", f"{prefix}-routed", f"{prefix}-topic"]
    try:
        for name, settings, outgoing in cases(prefix, slot):
            publish_both(amqp_url, prefix, settings, outgoing)
            queue = outgoing.queue or (settings["task_routes"][TASK_NAME]["queue"] if "task_routes" in settings
                                       else default_queue(prefix))
            found = amqp_messages(amqp_url, queue)
            assert len(found) == 2, name
            theirs, ours = found
            assert differences(ours, theirs) == [], name
            headers = ours["properties"]["application_headers"]
            assert headers["id"] == outgoing.task_id and headers["task"] == TASK_NAME
            assert ours["body"][0] == outgoing.args
    finally:
        delete_amqp_queues(amqp_url, queues)


def test_redis_pushes_are_cut_by_count_and_size_but_take_any_one_message(monkeypatch: Any) -> None:
    monkeypatch.setattr(dispatch, "_REDIS_PUSH_SIZE", 3)
    monkeypatch.setattr(dispatch, "_REDIS_PUSH_CHARS", 10)
    assert dispatch._push_chunks([]) == []
    assert dispatch._push_chunks(["a"] * 7) == [(0, 3), (3, 6), (6, 7)]
    assert dispatch._push_chunks(["aaaa", "bbbb", "cc", "d" * 25, "e"]) == [(0, 3), (3, 4), (4, 5)]


@pytest.mark.parametrize("version", [4, 5])
def test_uuid_text_is_the_text_of_the_uuid_module(version: int) -> None:
    """Run ids (version 5) must stay what ``uuid.uuid5`` made before, or messages in flight during an
    upgrade would not match their runs; delivery tags (version 4) must look like kombu's."""
    for _ in range(500):
        raw = secrets.token_bytes(16)
        assert uuid_text(raw, version) == str(uuid.UUID(bytes=raw, version=version))


def test_argsrepr_is_the_repr_of_the_arguments_cut_at_the_size_limit() -> None:
    """Celery's saferepr gives the same text for beat's arguments (JSON, three levels); deeper or
    longer arguments are shown by repr, cut at argsrepr_maxsize, where saferepr elides per level."""
    app = make_app("memory://")
    dispatcher = Dispatcher(app)
    slot = datetime.now(UTC)
    plain = args_for(5, slot)
    deep = [6, FUNC_INFO, {"a": {"b": {"c": {"d": 1}}}}, slot.isoformat()]
    long = [7, FUNC_INFO, {"text": "x" * 5000}, slot.isoformat()]
    built, refused = dispatcher._builder.build([Outgoing(f"id-{a[0]}", a, {}) for a in (plain, deep, long)])
    assert refused == []
    reprs = [message.headers["argsrepr"] for message in built]
    maxsize = app.amqp.argsrepr_maxsize
    assert reprs[0] == repr(plain) == saferepr(plain, maxsize, maxlevels=app.conf.task_repr_maxlevels)
    assert reprs[1] == repr(deep) and "{'d': 1}" in reprs[1]
    assert len(reprs[2]) == maxsize and reprs[2] == repr(long)[: maxsize - 3] + "..."


# -- refusals -------------------------------------------------------------------------------


def batch(prefix: str, slot: datetime, count: int, odd: dict[int, dict[str, Any]]) -> list[Outgoing]:
    """``count`` runs keyed 0.., ids ``prefix-n``; run n takes the Outgoing fields ``odd[n]``."""
    return [Outgoing(**{"task_id": f"{prefix}-{n}", "args": args_for(n, slot), "headers": {}, "key": n,
                        **odd.get(n, {})}) for n in range(count)]


def reasons(refused: list[tuple[Outgoing, str]], expected: dict[int, str]) -> bool:
    """The refused runs are exactly those of ``expected`` (by key, in order), each reason naming its cause."""
    assert [outgoing.key for outgoing, _ in refused] == list(expected)
    for (outgoing, reason), cause in zip(refused, expected.values()):
        assert cause in reason, (outgoing.key, reason)
    return True


def test_amqp_refuses_one_message_and_delivers_the_rest(amqp_url: str) -> None:
    """'amq.x' (a reserved prefix) and a name over 255 bytes are refused when their queue is
    declared, a queue whose exchange does not exist when the exchange is checked: each is
    reported, the other messages of the batch arrive once each, in order."""
    prefix = f"ref-{secrets.token_hex(3)}"
    ghost = f"{prefix}-ghost"
    app = make_app(amqp_url, task_default_queue=default_queue(prefix), task_queues=[
        Queue(default_queue(prefix)),
        Queue(ghost, Exchange(f"{prefix}-missing", type="topic", no_declare=True), routing_key="x", no_declare=True),
    ], task_create_missing_queues=True)
    slot = datetime.now(UTC)
    runs = batch(prefix, slot, 6, {1: {"queue": "amq.x"}, 3: {"queue": "q" * 300}, 4: {"queue": ghost}})
    dispatcher = Dispatcher(app)
    try:
        assert reasons(dispatcher.publish(runs), {1: "ACCESS_REFUSED", 3: "255", 4: "NOT_FOUND"})
        delivered = amqp_messages(amqp_url, default_queue(prefix))
        assert [m["properties"]["correlation_id"] for m in delivered] == [f"{prefix}-{n}" for n in (0, 2, 5)]
        # The channel, reopened after the errors, carries the next batch.
        assert dispatcher.publish([Outgoing(f"{prefix}-6", args_for(6, slot), {})]) == []
        assert len(amqp_messages(amqp_url, default_queue(prefix))) == 1
    finally:
        dispatcher.close()
        delete_amqp_queues(amqp_url, [default_queue(prefix)])


def test_amqp_channel_closed_mid_batch(amqp_url: str) -> None:
    """An error the broker raises only on the publish itself (here: the exchange of one queue is
    deleted after it was checked; a message over the broker's size limit does the same) closes
    the channel from that message on. That message is reported; the later ones are published
    again; earlier ones the broker had not confirmed yet may arrive twice (the worker drops copies),
    none is lost."""
    prefix = f"mid-{secrets.token_hex(3)}"
    topic = f"{prefix}-topic"
    app = make_app(amqp_url, task_default_queue=default_queue(prefix), task_queues=[
        Queue(default_queue(prefix)), Queue(topic, Exchange(topic, type="topic"), routing_key="runs")])
    slot = datetime.now(UTC)
    dispatcher = Dispatcher(app)
    try:
        assert dispatcher.publish([Outgoing(f"{prefix}-t", args_for(0, slot), {}, queue=topic)]) == []
        with Connection(amqp_url) as conn:
            conn.default_channel.exchange_delete(topic)
        assert reasons(dispatcher.publish(batch(prefix, slot, 40, {20: {"queue": topic}})), {20: "NOT_FOUND"})
        ids = [m["properties"]["correlation_id"] for m in amqp_messages(amqp_url, default_queue(prefix))]
        assert set(ids) == {f"{prefix}-{n}" for n in range(40) if n != 20}
        assert all(ids.count(f"{prefix}-{n}") == 1 for n in range(21, 40))
    finally:
        dispatcher.close()
        delete_amqp_queues(amqp_url, [default_queue(prefix), topic])


def test_redis_refuses_one_message_and_delivers_the_rest(redis_url: str) -> None:
    """Redis refuses a push to a key that holds something else than a list (WRONGTYPE); the
    serializer refuses arguments it cannot encode; Celery refuses a queue missing from
    task_queues when it may not create queues. The others are delivered, in order."""
    prefix = f"ref-{secrets.token_hex(3)}"
    app = make_app(redis_url, task_default_queue=default_queue(prefix),
                   task_queues=[Queue(default_queue(prefix)), Queue(f"{prefix}-str")],
                   task_create_missing_queues=False)
    client = redis_client(redis_url)
    client.set(f"{prefix}-str", "not a list")
    slot = datetime.now(UTC)
    runs = batch(prefix, slot, 7, {1: {"queue": f"{prefix}-str"},
                                   2: {"args": [2, FUNC_INFO, {"bad": object()}, slot.isoformat()]},
                                   4: {"queue": f"{prefix}-unknown"},
                                   6: {"queue": f"{prefix}-str"}})
    dispatcher = Dispatcher(app)
    try:
        assert reasons(dispatcher.publish(runs), {1: "WRONGTYPE", 2: "EncodeError", 4: "QueueNotFound",
                                                  6: "WRONGTYPE"})
        delivered = redis_messages(redis_url, default_queue(prefix))
        assert [m["headers"]["id"] for m in delivered] == [f"{prefix}-{n}" for n in (0, 3, 5)]
    finally:
        dispatcher.close()
        for key in client.keys(f"{prefix}*"):
            client.delete(key)
        client.close()


def test_redis_batch_keeps_order_per_priority_and_renews_queue_expiry(redis_url: str, monkeypatch: Any) -> None:
    """A batch goes out as LPUSHes of many values per priority key (here at most two a command):
    each key holds its messages in the order of the batch, as one push per message leaves them; a
    queue declared with an expiry gets it on every priority key, as kombu renews it on each publish."""
    monkeypatch.setattr(dispatch, "_REDIS_PUSH_SIZE", 2)
    prefix = f"exp-{secrets.token_hex(3)}"
    queue = default_queue(prefix)
    app = make_app(redis_url, task_default_queue=queue, task_queues=[Queue(queue, expires=60)])
    client = redis_client(redis_url)
    slot = datetime.now(UTC)
    runs = batch(prefix, slot, 7, {n: {"priority": 9} for n in (1, 4, 5)})
    dispatcher = Dispatcher(app)
    try:
        assert dispatcher.publish(runs) == []
        (urgent,) = {key.decode() for key in client.keys(f"{queue}*")} - {queue}  # kombu's key of a priority
        assert [m["headers"]["id"] for m in redis_messages(redis_url, queue)] == [f"{prefix}-{n}" for n in (0, 2, 3, 6)]
        assert [m["headers"]["id"] for m in redis_messages(redis_url, urgent)] == [f"{prefix}-{n}" for n in (1, 4, 5)]
        assert 0 < client.pttl(queue) <= 60_000 and 0 < client.pttl(urgent) <= 60_000
    finally:
        dispatcher.close()
        for key in client.keys(f"{prefix}*"):
            client.delete(key)
        client.close()


# -- connections ----------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_unreachable_broker_raises_broker_unavailable(scheme: str) -> None:
    app = make_app(f"{scheme}://127.0.0.1:{closed_port()}//" if scheme == "amqp"
                   else f"redis://127.0.0.1:{closed_port()}/0", broker_connection_timeout=1)
    dispatcher = Dispatcher(app)
    with pytest.raises(BrokerUnavailable):
        dispatcher.publish([Outgoing("id-1", args_for(1, datetime.now(UTC)), {})])


def test_amqp_lost_connection_raises_then_reconnects(amqp_url: str) -> None:
    prefix = f"conn-{secrets.token_hex(3)}"
    app = make_app(amqp_url, task_default_queue=default_queue(prefix))
    dispatcher = Dispatcher(app)
    slot = datetime.now(UTC)
    try:
        assert dispatcher.publish([Outgoing(f"{prefix}-1", args_for(1, slot), {})]) == []
        # The broker's side of the connection goes away (as in a broker restart).
        dispatcher._connection.connection.transport.sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(BrokerUnavailable):
            dispatcher.publish([Outgoing(f"{prefix}-2", args_for(2, slot), {})])
        assert dispatcher.publish([Outgoing(f"{prefix}-3", args_for(3, slot), {})]) == []
        ids = [m["properties"]["correlation_id"] for m in amqp_messages(amqp_url, default_queue(prefix))]
        assert ids[0] == f"{prefix}-1" and ids[-1] == f"{prefix}-3"
    finally:
        dispatcher.close()
        delete_amqp_queues(amqp_url, [default_queue(prefix)])


# -- other transports -----------------------------------------------------------------------


@pytest.mark.parametrize("url", ["memory://", "filesystem://"])
def test_other_transports_publish_through_kombu(url: str, tmp_path: Any) -> None:
    """Any other transport gets kombu's Producer.publish per message: same message as send_task."""
    folder = str(tmp_path)
    # A queue of its own: memory:// is shared by the process, and other tests' "run now" leave
    # messages in the project's default queue.
    queue_name = f"other-{secrets.token_hex(4)}"
    app = make_app(url, task_default_queue=queue_name,
                   broker_transport_options={"data_folder_in": folder, "data_folder_out": folder,
                                             "processed_folder": folder, "control_folder": folder})
    slot = datetime.now(UTC)
    outgoing = Outgoing("id-9", args_for(9, slot), {"periodic_task_name": "sisy:9"}, priority=5,
                        expires=slot + timedelta(minutes=5))
    send_task(app, outgoing)
    dispatcher = Dispatcher(app)
    assert dispatcher.publish([outgoing]) == []
    dispatcher.close()
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(queue_name, no_ack=True)
        theirs, ours = queue.get(timeout=5), queue.get(timeout=5)
        queue.close()
    for field in ("headers", "content_type", "content_encoding", "payload"):
        assert getattr(ours, field) == getattr(theirs, field), field
    extra = {"delivery_tag": distinct_uuids, "expiration": ms_close}
    for key in set(ours.properties) | set(theirs.properties):
        if ours.properties.get(key) != theirs.properties.get(key):
            assert extra[key](ours.properties[key], theirs.properties[key]), key


def test_messages_are_json_and_a_worker_accepts_nothing_else_by_default() -> None:
    """docs/security.md: beat's messages are JSON, and a worker with Celery's defaults (as the
    example project and the tests run) refuses pickle, so a forged message cannot bring objects."""
    from tests.celery_app import app as project_app

    assert (project_app.conf.task_serializer, set(project_app.conf.accept_content)) == ("json", {"json"})
    app = make_app("memory://")
    queue = f"json-{secrets.token_hex(4)}"
    dispatcher = Dispatcher(app)
    assert dispatcher.publish([Outgoing("id-json", args_for(7, datetime.now(UTC)), {}, queue=queue)]) == []
    dispatcher.close()
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue, no_ack=True)
        message = simple.get(timeout=5)
        simple.close()
    assert message.content_type == "application/json"
    assert json.loads(message.body)[0][:2] == [7, FUNC_INFO]
