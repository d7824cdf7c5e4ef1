"""Publishing bursts of ``sisy.run_callable`` messages at the broker's speed.

Celery's ``send_task`` builds and sends every message through its generic path: the task's
options, routing, a ``saferepr`` of the arguments, kombu's ``Producer.publish`` and, on Redis,
a new client object and one round trip per message. :class:`Dispatcher` writes the same
protocol-2 messages (envelope, headers, properties, body and routing; tests/test_dispatch.py
compares them field by field with ``send_task``'s) but resolves each route once per batch,
builds the per-message parts cheaply and hands the whole batch to the transport:

* Redis: one pipelined round trip, with the keys, priority queues, envelope and encoding of
  kombu's Redis channel, through that channel's own connection pool;
* AMQP (py-amqp): the frames of every ``basic.publish`` written at once on one channel in
  publisher-confirm mode, then one wait for the broker's confirms;
* any other transport: kombu's ``Producer.publish``, one message at a time.

A failure that belongs to one message (a queue the broker refuses, an exchange that does not
exist, a message it will not store, arguments that cannot be encoded) is reported for that
message and the others still go out; a failure of the connection raises
:class:`BrokerUnavailable`.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from struct import error as struct_error, pack
from typing import Any, Callable, Sequence

import celery
from amqp.basic_message import Message as AmqpMessage
from amqp.serialization import dumps as amqp_dumps
from celery import signals
from celery.app.routes import MapRoute
from celery.utils.nodenames import anon_nodename
from kombu import Connection, Exchange, Queue
from kombu.common import Broadcast, maybe_declare
from kombu.compression import compress
from kombu.entity import maybe_delivery_mode
from kombu.serialization import dumps as serialize
from kombu.utils.json import dumps as json_dumps

logger = logging.getLogger("sisy_celery.dispatch")

#: The name of the one generic Celery task.
TASK_NAME = "sisy.run_callable"

#: Keyword arguments of the worker task's body (always none) and its embedded workflow parts.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
#: Options of Celery's send_task_message that are not message properties.
_NOT_PROPERTIES = ("exchange", "routing_key", "queue", "serializer", "delivery_mode", "compression", "declare",
                   "headers", "exchange_type", "retry", "retry_policy", "event_dispatcher", "timeout",
                   "confirm_timeout")
#: Bytes of AMQP frames buffered before they are written to the socket.
_AMQP_WRITE_CHUNK = 256 * 1024
#: Values, and characters of their JSON, in one Redis LPUSH at most (one message always goes, whatever its
#: size; the JSON is ASCII but for non-ASCII text in a header).
_REDIS_PUSH_SIZE = 1000
_REDIS_PUSH_CHARS = 4 * 1024 * 1024
#: Seconds to wait for the broker's publisher confirms of a batch.
_CONFIRM_TIMEOUT = 30.0
#: AMQP frame types and the Basic class id.
_METHOD, _HEADER, _BODY, _BASIC = 1, 2, 3, 60
_FRAME_END = b"\xce"


@dataclass(frozen=True)
class Outgoing:
    """One run to publish."""

    task_id: str  #: the Celery task id
    args: list  #: [task_pk, func_info, userdata, slot_isoformat]
    headers: dict  #: extra message headers, e.g. {"periodic_task_name": "sisy:12"}
    queue: str = ""  #: "" = Celery's default routing (task_routes, task_default_queue)
    priority: int | None = None
    expires: datetime | None = None  #: aware datetime
    key: Any = None  #: the caller's handle, returned with refusals


class BrokerUnavailable(Exception):
    """The connection failed: which messages of the batch went out is unknown (the caller re-publishes
    them all later; the worker drops copies)."""


class _Refused(Exception):
    """One message cannot be published (the reason is the message)."""


def uuid_text(raw: bytes, version: int) -> str:
    """``str(uuid.UUID(bytes=raw[:16], version=version))``, at a third of its cost (a burst makes
    two ids a message)."""
    data = bytearray(raw[:16])
    data[6] = (data[6] & 0x0F) | (version << 4)
    data[8] = (data[8] & 0x3F) | 0x80
    text = data.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


@dataclass
class _Route:
    """Where the messages of one ``Outgoing.queue`` go, as Celery's send_task_message resolves it."""

    queue: Queue | None
    exchange: str
    routing_key: str
    delivery_mode: int
    serializer: str
    compression: str | None
    declare: list[Any]
    priority: int | None  #: the route's priority, when a message has none
    mandatory: bool
    immediate: bool
    properties: dict[str, Any]  #: further properties the route or the task's options set


@dataclass
class _Message:
    """One message ready for a transport: Producer.publish's arguments, without serialization.

    Its headers are the entries every message of the batch shares (one dict, never changed)
    plus its own; the AMQP transport encodes the shared ones once per batch.
    """

    outgoing: Outgoing
    route: _Route
    shared: dict[str, Any]
    own: dict[str, Any]
    properties: dict[str, Any]  #: correlation_id, reply_to, delivery_mode, expiration (ms) and extras
    priority: int
    expiration: float | None  #: seconds, as Producer.publish takes it

    @property
    def headers(self) -> dict[str, Any]:
        return {**self.shared, **self.own}

    @property
    def body(self) -> tuple[list, dict, dict]:
        return (self.outgoing.args, {}, _EMBED)

    def encoded(self) -> tuple[Any, str, str]:
        """(body, content type, content encoding) as Producer.publish prepares them; compression
        adds its header."""
        content_type, content_encoding, body = serialize(self.body, serializer=self.route.serializer)
        if self.route.compression:
            body, self.own["compression"] = compress(body, self.route.compression)
        return body, content_type, content_encoding


class _Builder:
    """Turns Outgoing runs into protocol-2 messages as ``app.send_task(TASK_NAME, ...)`` would."""

    def __init__(self, app: celery.Celery) -> None:
        self.app = app
        conf = app.conf
        self.router = app.amqp.router
        # Routes that do not look at the arguments give one answer per queue: resolved once.
        self.static_routes = all(isinstance(route, MapRoute) for route in self.router.routes)
        self.task_type = app._tasks.get(TASK_NAME)
        options = dict(self.task_type._get_exec_options()) if self.task_type is not None else {}
        options = {key: value for key, value in options.items() if value is not None}
        self.default_expires = options.pop("expires", None)
        self.timelimit = [options.pop("time_limit", None), options.pop("soft_time_limit", None)]
        self.exec_options = options
        self.argsrepr_maxsize = app.amqp.argsrepr_maxsize
        self.default_delivery_mode = conf.task_default_delivery_mode
        self.default_serializer = conf.task_serializer
        self.default_compression = conf.task_compression
        self.default_exchange = app.amqp.default_exchange
        self.default_rkey = conf.task_default_routing_key
        self.sent_event = bool(conf.task_send_sent_event)
        self.routes: dict[str, _Route] = {}

    def route(self, outgoing: Outgoing) -> _Route:
        if self.static_routes:
            route = self.routes.get(outgoing.queue)
            if route is None:
                route = self.routes[outgoing.queue] = self._resolve(outgoing)
            return route
        return self._resolve(outgoing)

    def _resolve(self, outgoing: Outgoing) -> _Route:
        """Celery's routing (task_routes, task_queues, default queue) and send_task_message's reading of it."""
        options = dict(self.exec_options)
        if outgoing.queue:
            options["queue"] = outgoing.queue
        try:
            options = self.router.route(options, TASK_NAME, outgoing.args, None, self.task_type)
        except Exception as exc:  # QueueNotFound, or a router of the project that fails
            raise _Refused(_reason(exc)) from exc
        exchange = options.pop("exchange", None)
        routing_key = options.pop("routing_key", None)
        queue = options.pop("queue", None)
        serializer = options.pop("serializer", None) or self.default_serializer
        delivery_mode = options.pop("delivery_mode", None)
        compression = options.pop("compression", None) or self.default_compression
        declare = options.pop("declare", None)
        exchange_type = options.pop("exchange_type", None)
        for name in _NOT_PROPERTIES:
            options.pop(name, None)
        qname = queue
        if queue is None and exchange is None:
            queue = self.app.amqp.default_queue
        if queue is not None:
            if isinstance(queue, str):
                qname, queue = queue, self.app.amqp.queues[queue]
            else:
                qname = queue.name
        if delivery_mode is None:
            delivery_mode = getattr(getattr(queue, "exchange", None), "delivery_mode", None) or self.default_delivery_mode
        if exchange_type is None:
            exchange_type = getattr(getattr(queue, "exchange", None), "type", None) or "direct"
        if (not exchange or not routing_key) and exchange_type == "direct":
            exchange, routing_key = "", qname
        elif exchange is None:
            exchange = queue.exchange.name or self.default_exchange
            routing_key = routing_key or queue.routing_key or self.default_rkey
        if declare is None and queue is not None and not isinstance(queue, Broadcast):
            declare = [queue]
        if isinstance(exchange, Exchange):
            delivery_mode = delivery_mode or exchange.delivery_mode
            exchange = exchange.name
        return _Route(queue=queue, exchange=exchange or "", routing_key=routing_key or "",
                      delivery_mode=maybe_delivery_mode(delivery_mode), serializer=serializer,
                      compression=compression, declare=list(declare or ()),
                      priority=options.pop("priority", None), mandatory=bool(options.pop("mandatory", False)),
                      immediate=bool(options.pop("immediate", False)), properties=options)

    def argsrepr(self, args: list) -> str:
        """``repr`` of the arguments, cut at ``argsrepr_maxsize``.

        Celery's ``saferepr`` costs about 30 times as much; for JSON arguments up to the size
        limit and three levels deep both give the same text (the arguments of beat's messages are
        that), deeper or longer ones are shown in full or cut at the size limit instead of
        elided per level.
        """
        text = repr(args)
        if len(text) > self.argsrepr_maxsize:
            text = text[: self.argsrepr_maxsize - 3] + "..."
        return text

    def build(self, messages: Sequence[Outgoing]) -> tuple[list[_Message], list[tuple[Outgoing, str]]]:
        """The messages of a batch, and the ones refused before reaching the broker."""
        now = self.app.now()
        reply_to = self.app.thread_oid
        # The headers of as_task_v2 but id, root_id, argsrepr and expires, which are each message's.
        shared = {
            "lang": "py", "task": TASK_NAME, "shadow": None, "eta": None, "group": None, "group_index": None,
            "retries": 0, "timelimit": self.timelimit, "parent_id": None, "kwargsrepr": "{}",
            "origin": anon_nodename(), "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None,
            "stamps": {},
        }
        built: list[_Message] = []
        refused: list[tuple[Outgoing, str]] = []
        for outgoing in messages:
            try:
                route = self.route(outgoing)
            except _Refused as exc:
                refused.append((outgoing, str(exc)))
                continue
            expires = outgoing.expires
            if expires is None and self.default_expires is not None:
                expires = (now + timedelta(seconds=self.default_expires)
                           if isinstance(self.default_expires, (int, float)) else self.default_expires)
            own = {"id": outgoing.task_id, "root_id": outgoing.task_id, "expires": None,
                   "argsrepr": self.argsrepr(outgoing.args)}
            properties = {"correlation_id": outgoing.task_id, "reply_to": reply_to}
            properties.update(route.properties)
            expiration = None
            if expires is not None:
                own["expires"] = expires.isoformat()
                expiration = (expires - now).total_seconds()
                if expiration < 0:
                    logger.warning("sisy message %s expired %.1f s before it was published; the broker may drop it",
                                   outgoing.task_id, -expiration)
                    expiration = 0
                properties["expiration"] = str(int(expiration * 1000))
            common = shared
            if outgoing.headers:
                if shared.keys() & outgoing.headers.keys():  # the run overrides a shared header
                    own, common = {**shared, **own}, {}
                own.update(outgoing.headers)
            properties["delivery_mode"] = route.delivery_mode
            priority = outgoing.priority if outgoing.priority is not None else route.priority
            built.append(_Message(outgoing, route, common, own, properties, priority or 0, expiration))
        return built, refused

    def before(self, message: _Message) -> None:
        """Celery's ``before_task_publish`` signal, for projects that add headers there (tracing):
        the headers it may change become the message's own."""
        route = message.route
        message.own, message.shared = message.headers, {}
        signals.before_task_publish.send(
            sender=TASK_NAME, body=message.body, exchange=route.exchange, routing_key=route.routing_key,
            declare=route.declare, headers=message.own, properties=message.properties, retry_policy={})

    def after(self, messages: Sequence[_Message]) -> None:
        for message in messages:
            signals.after_task_publish.send(sender=TASK_NAME, body=message.body, headers=message.headers,
                                            exchange=message.route.exchange,
                                            routing_key=message.route.routing_key)


#: AMQP 0-9-1 basic properties in wire order: (flag bit, name, type), as py-amqp's Message lists them.
_PROPERTY_LAYOUT = [(1 << (15 - index), key, kind) for index, (key, kind) in enumerate(AmqpMessage.PROPERTIES)]


def _table_items(table: dict[str, Any]) -> bytes:
    """The entries of an AMQP field table, as py-amqp writes them, without the table's length.

    Strings and None (all of a sisy message's own headers) are written here; other values by py-amqp.
    """
    parts: list[bytes] = []
    for key, value in table.items():
        if value is None or isinstance(value, str):
            name = key.encode()
            parts += [pack("B", len(name)), name]
            if value is None:
                parts.append(b"V")
            else:
                data = value.encode("utf-8", "surrogatepass")
                parts += [pack(">cI", b"S", len(data)), data]
        else:
            parts.append(amqp_dumps("F", ({key: value},))[4:])
    return b"".join(parts)


class _Transport:
    """Publishes built messages on one broker connection; returns the refused ones."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def publish(self, messages: list[_Message]) -> list[tuple[_Message, str]]:
        raise NotImplementedError

    def declare(self, route: _Route, channel: Any) -> None:
        """Declare the route's entities on ``channel`` as kombu's publish would (cached per connection)."""
        for entity in route.declare:
            maybe_declare(entity, channel)


class _ProducerTransport(_Transport):
    """Any transport: kombu's ``Producer.publish`` per message, with send_task_message's arguments."""

    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self.producer = connection.Producer()
        self.connection_errors = connection.connection_errors

    def publish(self, messages: list[_Message]) -> list[tuple[_Message, str]]:
        refused = []
        for message in messages:
            route = message.route
            properties = {key: value for key, value in message.properties.items()
                          if key not in ("expiration", "delivery_mode")}
            try:
                self.producer.publish(
                    message.body, exchange=route.exchange, routing_key=route.routing_key,
                    serializer=route.serializer, compression=route.compression, delivery_mode=route.delivery_mode,
                    declare=route.declare, headers=message.headers, retry=False, priority=message.priority,
                    expiration=message.expiration, mandatory=route.mandatory, immediate=route.immediate,
                    **properties)
            except self.connection_errors:
                raise
            except Exception as exc:  # this message only: encoding, a refused declaration...
                refused.append((message, _reason(exc)))
        return refused


class _RedisTransport(_Transport):
    """kombu's Redis transport, one pipelined round trip per batch.

    Writes what ``Channel.basic_publish`` -> ``_put`` writes: the envelope of the virtual
    channel (body base64-encoded, a fresh delivery tag), LPUSHed to the queue's key for the
    message's priority, plus the PEXPIREs of a queue declared with an expiry. The messages of a
    batch for one key go in one LPUSH (Redis then parses one command, not one a message).
    """

    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self.channel = connection.default_channel
        self.fallback = _ProducerTransport(connection)

    def destinations(self, route: _Route) -> list[str] | None:
        """The queues a message of this route lands in; None for a fanout exchange (kombu's own path)."""
        channel = self.channel
        if not route.exchange:
            return [route.routing_key]
        if channel.typeof(route.exchange).type == "fanout":
            return None
        queues = channel._lookup(route.exchange, route.routing_key)
        if channel.typeof(route.exchange).type == "topic":
            queues = [queue for queue in queues if queue and queue != channel.deadletter_queue]
        return queues

    def publish(self, messages: list[_Message]) -> list[tuple[_Message, str]]:
        channel = self.channel
        refused: list[tuple[_Message, str]] = []
        destinations: dict[int, list[str] | None | _Refused] = {}
        encoding = channel.body_encoding
        tags = os.urandom(16 * len(messages))
        # Per key, in order: one LPUSH of many values leaves the list as one LPUSH per value would.
        pushes: dict[str, tuple[list[str], list[_Message]]] = {}
        touched: dict[str, None] = {}
        for index, message in enumerate(messages):
            route = message.route
            if id(route) not in destinations:
                try:
                    self.declare(route, channel)
                    destinations[id(route)] = self.destinations(route)
                except self.fallback.connection_errors:
                    raise
                except Exception as exc:  # a declaration this route cannot make
                    destinations[id(route)] = _Refused(_reason(exc))
            queues = destinations[id(route)]
            if isinstance(queues, _Refused):
                refused.append((message, str(queues)))
                continue
            if queues is None:
                refused += self.fallback.publish([message])
                continue
            if not queues:
                refused.append((message, f"no queue is bound to exchange {route.exchange!r} "
                                         f"with routing key {route.routing_key!r}"))
                continue
            try:
                body, content_type, content_encoding = message.encoded()
                body, body_encoding = channel.encode_body(body, encoding)
                properties = dict(message.properties)
                properties["priority"] = message.priority or channel.default_priority
                properties["delivery_info"] = {"exchange": route.exchange, "routing_key": route.routing_key}
                properties["body_encoding"] = body_encoding
                properties["delivery_tag"] = uuid_text(tags[16 * index:16 * index + 16], 4)
                envelope = {"body": body, "content-encoding": content_encoding, "content-type": content_type,
                            "headers": message.headers, "properties": properties}
                payload = json_dumps(envelope)
            except Exception as exc:  # arguments the serializer cannot encode
                refused.append((message, _reason(exc)))
                continue
            priority = channel._get_message_priority(envelope, reverse=False)
            for queue in queues:
                payloads, owners = pushes.setdefault(channel._q_for_pri(queue, priority), ([], []))
                payloads.append(payload)
                owners.append(message)
                touched[queue] = None
        expires = getattr(channel, "_expires", None) or {}
        return refused + self._push(pushes, {queue: expires[queue] for queue in touched if queue in expires})

    def _push(self, pushes: dict[str, tuple[list[str], list[_Message]]],
              expiring: dict[str, int]) -> list[tuple[_Message, str]]:
        """One pipelined round trip: the LPUSHes, then the PEXPIREs of queues declared with an expiry
        (as kombu's ``_put`` renews them); the messages of a failed LPUSH are refused."""
        channel = self.channel
        commands: list[list[_Message]] = []
        with channel.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            for key, (payloads, owners) in pushes.items():
                for start, end in _push_chunks(payloads):
                    pipe.lpush(key, *payloads[start:end])
                    commands.append(owners[start:end])
            for queue, expiry in expiring.items():
                for step in channel.priority_steps:
                    pipe.pexpire(channel._q_for_pri(queue, step), expiry)
            replies = pipe.execute(raise_on_error=False) if pushes or expiring else []
        failed: dict[int, tuple[_Message, str]] = {}
        for owners, reply in zip(commands, replies):
            if isinstance(reply, Exception):
                for owner in owners:
                    failed.setdefault(id(owner), (owner, _reason(reply)))
        return list(failed.values())


def _push_chunks(payloads: list[str]) -> list[tuple[int, int]]:
    """``(start, end)`` of consecutive payloads for one LPUSH each, within the count and size
    limits (a command is read whole into Redis's query buffer before it runs)."""
    chunks = []
    start = size = 0
    for end, payload in enumerate(payloads):
        if end > start and (end - start >= _REDIS_PUSH_SIZE or size + len(payload) > _REDIS_PUSH_CHARS):
            chunks.append((start, end))
            start, size = end, 0
        size += len(payload)
    if payloads:
        chunks.append((start, len(payloads)))
    return chunks


class _AmqpTransport(_Transport):
    """py-amqp: every message's ``basic.publish`` frames written at once on one channel in
    publisher-confirm mode, then one wait for the confirms.

    The frames are the ones py-amqp's frame writer makes for ``Channel.basic_publish`` of the
    message kombu's ``Channel.prepare_message`` builds. Each distinct queue is declared once per
    connection first, as kombu's publish does; a declaration the broker refuses (a reserved
    ``amq.`` name, a name over 255 bytes, an exchange that does not exist: checked once per
    connection) refuses the messages of that route only. A channel error while the batch is
    confirmed (a message over the broker's size limit, an exchange deleted since it was checked)
    closes the channel from that message on: the unconfirmed messages are then published again
    one by one until the one the broker refuses is found, and the rest as a new batch. Those
    republished ones may reach the queue twice (the broker can take a message and close the
    channel before it confirms it); the worker drops copies.

    Each call returns once the broker has confirmed its batch (for persistent messages: written
    them to disk), so its rate is bounded by the broker's intake, not by this process.
    """

    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self.channel = connection.channel()
        self.channel_errors = connection.channel_errors
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.exchanges: set[str] = set()  # exchanges known to exist on this connection
        self._confirming()

    def _confirming(self) -> None:
        """(Re)enter confirm mode: on a new channel, or one py-amqp reopened after a channel error."""
        self.channel.confirm_select()
        self.tag = 0  # the delivery tag of the last message published on this channel
        self.lowest = 1  # every tag below is confirmed
        self.unconfirmed: dict[int, _Message] = {}
        self.nacked: list[_Message] = []

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._confirm(tag, multiple, None)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._confirm(tag, multiple, self.nacked)

    def _confirm(self, tag: int, multiple: bool, into: list[_Message] | None) -> None:
        tags = range(self.lowest, tag + 1) if multiple else (tag,)
        for each in tags:
            message = self.unconfirmed.pop(each, None)
            if message is not None and into is not None:
                into.append(message)
        if multiple:
            self.lowest = max(self.lowest, tag + 1)

    def publish(self, messages: list[_Message]) -> list[tuple[_Message, str]]:
        refused: list[tuple[_Message, str]] = []
        queue = list(messages)
        while queue:
            batch, queue = queue, []
            in_doubt, reason = self._publish_batch(batch, refused)
            if in_doubt:
                # The broker closed the channel on one of these: find it, one confirmed publish at a time.
                for position, message in enumerate(in_doubt):
                    doubt, single_reason = self._publish_batch([message], refused)
                    if doubt:
                        refused.append((message, single_reason or reason))
                        queue = in_doubt[position + 1:]
                        break
        return refused

    def _publish_batch(self, messages: list[_Message], refused: list[tuple[_Message, str]]
                       ) -> tuple[list[_Message], str]:
        """Publish and confirm ``messages``; return the unconfirmed ones of a channel error, and its reason."""
        # Declarations first: one the broker refuses reopens the channel, before any frame is written.
        methods: dict[int, bytes | _Refused] = {}
        for message in messages:
            if id(message.route) not in methods:
                methods[id(message.route)] = self._method_frame(message.route)
        channel = self.channel
        connection = channel.connection
        write = connection.transport.write
        chunk_size = connection.frame_max - 8
        channel_id = channel.channel_id
        tables: dict[int, bytes] = {}
        buffer: list[bytes] = []
        size = 0
        for message in messages:
            method = methods[id(message.route)]
            if isinstance(method, _Refused):
                refused.append((message, str(method)))
                continue
            try:
                body, content_type, content_encoding = message.encoded()
                if isinstance(body, str):
                    content_encoding = content_encoding or "utf-8"
                    body = body.encode(content_encoding)
                properties = self._properties(message, content_type, content_encoding, tables)
            except Exception as exc:  # arguments the serializer cannot encode
                refused.append((message, _reason(exc)))
                continue
            header = pack(">HHQ", _BASIC, 0, len(body)) + properties
            frames = [pack(">BHI", _METHOD, channel_id, len(method)), method, _FRAME_END,
                      pack(">BHI", _HEADER, channel_id, len(header)), header, _FRAME_END]
            for start in range(0, len(body), chunk_size):
                part = body[start:start + chunk_size]
                frames += [pack(">BHI", _BODY, channel_id, len(part)), part, _FRAME_END]
            buffer += frames
            size += len(body) + len(header) + 64
            self.tag += 1
            self.unconfirmed[self.tag] = message
            if size >= _AMQP_WRITE_CHUNK:
                write(b"".join(buffer))
                connection.bytes_sent += 1
                buffer, size = [], 0
        if buffer:
            write(b"".join(buffer))
            connection.bytes_sent += 1
        try:
            self._wait_confirms()
        except self.channel_errors as exc:
            in_doubt = [self.unconfirmed[tag] for tag in sorted(self.unconfirmed)]
            refused += [(message, "the broker did not take it (basic.nack)") for message in self.nacked]
            logger.warning("sisy: the broker closed the publishing channel (%s); %d message(s) of the batch are "
                           "published again one by one", _reason(exc), len(in_doubt))
            self._confirming()
            return in_doubt, _reason(exc)
        refused += [(message, "the broker did not take it (basic.nack)") for message in self.nacked]
        self.nacked = []
        return [], ""

    def _properties(self, message: _Message, content_type: str, content_encoding: str,
                    tables: dict[int, bytes]) -> bytes:
        """The content header's property flags and list, as py-amqp serializes kombu's prepared message.

        The headers table is most of the cost: the entries shared by the batch are encoded once
        (``tables``), each message's own ones after them.
        """
        shared = tables.get(id(message.shared))
        if shared is None:
            shared = tables[id(message.shared)] = _table_items(message.shared)
        own = _table_items(message.own)
        values = {**message.properties, "content_type": content_type, "content_encoding": content_encoding,
                  "application_headers": True, "priority": message.priority}
        flags = 0
        parts: list[bytes] = []
        for bit, key, kind in _PROPERTY_LAYOUT:
            value = values.get(key)
            if value is None:
                continue
            flags |= bit
            if kind == "F":
                parts += [pack(">I", len(shared) + len(own)), shared, own]
            elif kind == "s":
                text = value.encode() if isinstance(value, str) else value
                parts += [pack("B", len(text)), text]
            elif kind == "o":
                parts.append(pack("B", value))
            else:
                parts.append(amqp_dumps(kind, (value,)))
        return pack(">H", flags) + b"".join(parts)

    def _method_frame(self, route: _Route) -> bytes | _Refused:
        """The payload of a route's basic.publish frame, after declaring its queue; a _Refused if either fails."""
        try:
            self.declare(route, self.channel)
            if route.exchange and route.exchange not in self.exchanges:
                # An exchange kombu did not declare (no_declare, or named by a route): does it exist?
                self.channel.exchange_declare(route.exchange, "", passive=True)
                self.exchanges.add(route.exchange)
            arguments = pack(">HH", _BASIC, 40) + amqp_dumps(
                "Bssbb", (0, route.exchange, route.routing_key, route.mandatory, route.immediate))
        except self.channel_errors as exc:  # the broker closed the channel; py-amqp has reopened it
            self._confirming()
            return _Refused(_reason(exc))
        except (struct_error, UnicodeError, ValueError) as exc:  # a name AMQP cannot carry; nothing was sent
            return _Refused(f"a queue, exchange or routing key name AMQP cannot carry (over 255 bytes?): {exc}")
        return arguments

    def _wait_confirms(self) -> None:
        connection = self.connection
        while self.unconfirmed:
            try:
                connection.drain_events(timeout=_CONFIRM_TIMEOUT)
            except socket.timeout as exc:
                raise BrokerUnavailable(f"no publisher confirms after {_CONFIRM_TIMEOUT:g} s") from exc


class Dispatcher:
    """Publishes batches of ``sisy.run_callable`` messages on a broker connection of its own.

    The connection (and its channel) is made at the first :meth:`publish`, kept for the next
    ones and made again after a failure. Not thread-safe: one per thread.
    """

    def __init__(self, app: celery.Celery) -> None:
        self._app = app
        self._builder = _Builder(app)
        self._connection: Connection | None = None
        self._transport: _Transport | None = None
        self._events: Any = None  # the events dispatcher of task_send_sent_event

    def publish(self, messages: Sequence[Outgoing]) -> list[tuple[Outgoing, str]]:
        """Publish all messages, in order. Return the messages the broker refused one by one, each with a
        short reason (a queue name the broker refuses, e.g. 'amq.x' on RabbitMQ, a name over 255 bytes, a
        message too large, an unroutable exchange): those belong to one message and must not stop the others.
        Raise BrokerUnavailable for connection-level failures."""
        if not messages:
            return []
        built, refused = self._builder.build(messages)
        if signals.before_task_publish.receivers:
            for message in built:
                self._builder.before(message)
        transport = self._connect()
        try:
            failed = transport.publish(built)
        except BrokerUnavailable:
            self.close()
            raise
        except transport.connection.connection_errors as exc:
            self.close()
            raise BrokerUnavailable(_reason(exc)) from exc
        if signals.after_task_publish.receivers:
            self._builder.after(built)
        if self._builder.sent_event:
            self._sent_events(built, {id(message) for message, _ in failed})
        refused += [(message.outgoing, reason) for message, reason in failed]
        if refused:
            order = {id(outgoing): index for index, outgoing in enumerate(messages)}
            refused.sort(key=lambda item: order[id(item[0])])
            for outgoing, reason in refused:
                logger.warning("sisy message %s was refused: %s", outgoing.task_id, reason)
        return refused

    def _sent_events(self, messages: list[_Message], failed: set[int]) -> None:
        """The ``task-sent`` events send_task emits when ``task_send_sent_event`` is on."""
        try:
            if self._events is None:
                self._events = self._app.events.Dispatcher(self._connection, enabled=True)
            for message in messages:
                if id(message) in failed:
                    continue
                headers, route = message.headers, message.route
                self._events.send("task-sent", uuid=headers["id"], root_id=headers["root_id"], parent_id=None,
                                  name=TASK_NAME, args=headers["argsrepr"], kwargs=headers["kwargsrepr"], retries=0,
                                  eta=None, expires=headers["expires"],
                                  queue=route.queue.name if route.queue else None, exchange=route.exchange,
                                  routing_key=route.routing_key)
        except Exception:  # the runs are published; a monitor missing their events must not undo that
            logger.warning("sisy could not send the task-sent events of a batch", exc_info=True)

    def _connect(self) -> _Transport:
        if self._transport is not None:
            return self._transport
        connection = self._app.connection_for_write()
        try:
            connection.connect()
            self._transport = self._transport_for(connection)(connection)
        except connection.connection_errors as exc:
            connection.release()
            raise BrokerUnavailable(_reason(exc)) from exc
        self._connection = connection
        return self._transport

    @staticmethod
    def _transport_for(connection: Connection) -> Callable[[Connection], _Transport]:
        transport = connection.transport
        if transport.driver_type == "redis":
            return _RedisTransport
        if transport.driver_name == "py-amqp":
            return _AmqpTransport
        return _ProducerTransport

    def close(self) -> None:
        """Close the connection (the next publish makes a new one)."""
        connection, self._connection, self._transport, self._events = self._connection, None, None, None
        if connection is not None:
            try:
                connection.release()
            except Exception:  # a connection that is already broken: nothing more to close
                logger.debug("sisy dispatcher: closing a broken connection", exc_info=True)
