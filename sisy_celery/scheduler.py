"""``celery beat -S sisy_celery.Scheduler``: dispatch due Task rows, exactly once per slot.

Each tick asks the database only for the rows that are due (an index range scan on
``enabled, next_run``); when some are, the run ledger's engine claims their slots in one
transaction per batch (one ``Run`` row per slot), and the claimed runs are published after
the commit and marked published. Messages go out from a publishing thread of beat's own: in
a burst, one batch is published while the next is claimed. Any number of beats can run at
once: claims are disjoint, and runs a dead beat left claimed are published again by the others
after ``republish_after`` seconds (a worker runs one copy of a run only). Upkeep (runs whose lease
lapsed, retention, the health record) runs every ``upkeep_every`` seconds, so an idle tick
stays one indexed query.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Iterator

from celery import beat
from django.db import DatabaseError, InterfaceError, connection
from django.utils import timezone

from . import conf, engine
from .dispatch import BrokerUnavailable, Dispatcher
from .models import run_celery_id

logger = logging.getLogger("sisy_celery.beat")

MAX_BACKOFF = 30.0
#: Seconds after which the health record of a silent beat is deleted.
FORGET_BEATS_AFTER = 24 * 3600.0


def _setup_django() -> None:
    from django.apps import apps

    if not apps.ready:
        import django

        django.setup()


@contextmanager
def deferred_stop() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back while slots are claimed and published.

    Beat stops by raising SystemExit from its signal handler wherever the main thread
    happens to be; between a claim's commit and its publish that would leave the claim
    for another beat to publish after ``republish_after`` seconds. Here a stop signal is
    only noted, and raised again once the batch is out, so beat stops as usual right after
    it. (``kill -9`` cannot be held back; the ledger covers it.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can set handlers; and only it receives the signals
        return
    held: list[int] = []
    numbers = [n for n in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(n) is not None]  # None: set in C
    previous = {number: signal.signal(number, lambda signum, frame: held.append(signum)) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(held):
            signal.raise_signal(number)


class Scheduler(beat.Scheduler):
    """Celery beat scheduler backed by ``sisy_celery.models.Task`` rows and the run ledger."""

    #: Seconds between two upkeep passes (lapsed leases, runs left claimed, health record).
    upkeep_every = 5.0
    #: Seconds between two retention passes (settled runs older than SISY_RUN_RETENTION).
    purge_every = 60.0
    #: Runs claimed this many seconds ago and not marked published are published again.
    republish_after = 10.0
    #: Seconds past a lapsed lease before its run is settled lost: a redelivered copy of the run
    #: (acks_late), which retries a second after the lease, gets to start it again first.
    lapse_grace = 5.0
    #: Most runs one message group publishes (one pipelined round trip where the broker allows it).
    publish_group = 500
    #: Most due rows the first claim of a burst takes (later claims take SISY_BEAT_BATCH_SIZE): its
    #: messages go out while the rest of the burst is still to be claimed.
    first_claim = 250
    #: Seconds to wait when due rows are locked by another beat's claim.
    locked_pause = 0.05

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _setup_django()
        from .checks import refuse_to_start

        refuse_to_start("beat")
        self._backoff = 0.0
        self._upkeep_at = 0.0
        self._purge_at = 0.0
        self.ident = f"{socket.gethostname()}:{os.getpid()}"
        self.started_at = timezone.now()
        # Leases are judged lapsed only once this beat has seen the database for a whole lease:
        # a worker cut off by the same outage gets that long to renew or settle.
        self._lapse_after = time.monotonic() + conf.running_timeout()
        self._dispatcher: Dispatcher | None = None
        #: claimed runs whose publish failed, published again before anything new is claimed
        self._unsent: list[Any] = []
        #: the last claim found more due rows than it took
        self._bursting = False
        #: the publishing thread, and the batch it is publishing with its runs
        self._sender: ThreadPoolExecutor | None = None
        self._sending: tuple[Future, list[Any]] | None = None
        super().__init__(*args, **kwargs)

    # -- clock and hooks ---------------------------------------------------------------

    def now(self) -> datetime:
        """The scheduler's clock (aware, UTC); override to test time-dependent behaviour."""
        return timezone.now()

    def setup_schedule(self) -> None:
        """Celery's own ``beat_schedule`` entries run beside database tasks, as in plain beat."""
        super().setup_schedule()
        logger.info("sisy beat %s started: %s", self.ident, self.info)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Run static entries and due database slots; return seconds until the next look."""
        static_wait = super().tick(*args, **kwargs)
        return max(0.0, min(static_wait, self.tick_database()))

    def tick_database(self) -> float:
        heartbeat = conf.heartbeat_frequency()
        try:
            # One connection for the life of beat (no per-tick reconnect); a broken one
            # raises below, is closed in _retry_later and reopened on the next tick.
            now = self.now()
            with deferred_stop():
                if time.monotonic() >= self._upkeep_at:
                    self.upkeep(now)
                # An idle tick is this one indexed query; the claim runs only when a row is due.
                earliest = self.earliest_next_run()
                due = (earliest is not None and earliest <= now) or bool(self._unsent)
                more = due and self.dispatch_due(now)
            if more:
                return 0.0
            if due:
                earliest = self.earliest_next_run()
        except (DatabaseError, InterfaceError) as exc:
            return self._retry_later("database", exc)
        except BrokerUnavailable as exc:
            return self._retry_later("broker", exc.__cause__ or exc)
        if self._backoff:
            logger.warning("sisy beat %s: database and broker reachable again; dispatching resumed", self.ident)
            self._backoff = 0.0
        if earliest is None:
            return heartbeat
        wait = (earliest - self.now()).total_seconds()
        if due and wait <= 0:
            # Still due after our batch: another beat holds those rows for its claim; look
            # again shortly rather than spin on the locked rows.
            return min(heartbeat, self.locked_pause)
        return min(heartbeat, max(0.0, wait))

    def _retry_later(self, what: str, exc: BaseException) -> float:
        self._backoff = min(MAX_BACKOFF, max(0.5, self._backoff * 2), conf.heartbeat_frequency() * 5)
        logger.warning("sisy beat %s: %s unavailable (%s: %s); retrying in %.1fs",
                       self.ident, what, type(exc).__name__, exc, self._backoff)
        if what == "database":
            self._lapse_after = time.monotonic() + conf.running_timeout()
            try:
                connection.close()
            except Exception:  # the connection is already broken; a new one is opened next tick
                pass
        else:
            self.close_dispatcher()
        return self._backoff

    # -- the database side -------------------------------------------------------------

    def earliest_next_run(self) -> datetime | None:
        from .models import Task

        return Task.objects.filter(enabled=True).order_by("next_run").values_list("next_run", flat=True).first()

    def dispatch_due(self, now: datetime) -> bool:
        """Claim one batch of due slots and start publishing it; True if there may be more due right now.

        In a burst, a batch's messages go out from the publishing thread while the next tick claims
        the next batch (its database waits overlap the encoding and the broker's round trips), and
        the batch is marked published once that claim is done; the last batch of a burst is
        published and marked before the tick ends. Runs whose publish failed are published first:
        while the broker is down nothing new is claimed, so an outage ends in one late run per task
        rather than a backlog.
        """
        if self._unsent:
            self.finish_sending(now)
            unsent, self._unsent = self._unsent, []
            self.publish(unsent, now)
        limit = conf.beat_batch_size()
        if not self._bursting:
            limit = min(limit, self.first_claim)
        batch = engine.claim_due(now, limit, self.ident)
        self._bursting = batch.examined >= limit
        self.finish_sending(now, following=batch.runs)
        if not self._bursting:
            self.finish_sending(now)
        return self._bursting

    def publish(self, runs: list[Any], now: datetime) -> None:
        """Publish claimed runs and mark them (the ``apply_entry`` of database tasks), before returning."""
        self.finish_sending(now, following=runs)
        self.finish_sending(now)

    def start_sending(self, runs: list[Any]) -> None:
        """Hand claimed runs to the publishing thread, which sends them in groups (one pipelined
        round trip each where the broker allows it); :meth:`finish_sending` marks them. The
        dispatcher is used by that thread only, one batch at a time."""
        if self._sending is not None:
            raise RuntimeError("a batch is already being published; finish_sending() first")
        if not runs:
            return
        if self._sender is None:
            self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sisy-publish")
        self._sending = (self._sender.submit(self._send, runs, self.dispatcher), runs)

    def _send(self, runs: list[Any], dispatcher: Dispatcher) -> tuple[list[tuple[list[Any], dict]], Exception | None]:
        """In the publishing thread: each group's refusals, in order, up to a broker failure."""
        out: list[tuple[list[Any], dict]] = []
        for start in range(0, len(runs), self.publish_group):
            group = runs[start:start + self.publish_group]
            try:
                out.append((group, engine.send(group, dispatcher)))
            except BrokerUnavailable as exc:
                return out, exc
        return out, None

    def finish_sending(self, now: datetime, following: list[Any] | None = None) -> None:
        """Wait for the batch being published, start publishing ``following`` (the next batch),
        then mark what went out, so the marking overlaps the next batch's publishing.

        If the broker failed, the runs not sent (and ``following``) are kept to be published again
        before anything new is claimed, and the failure is raised (publishing other runs, such as
        upkeep's, never drops them).
        """
        sending, self._sending = self._sending, None
        sent: list[tuple[list[Any], dict]] = []
        if sending is not None:
            future, runs = sending
            try:
                sent, failure = future.result()
            except BaseException:  # the thread failed otherwise: which runs went out is unknown
                self._keep(runs + (following or []))
                raise
            if failure is not None:
                self._keep(runs[sum(len(group) for group, _ in sent):] + (following or []))
                raise failure
        self.start_sending(following or [])
        for group, refused in sent:
            engine.mark(group, refused, now)
            if logger.isEnabledFor(logging.DEBUG):
                for run in group:
                    logger.debug("sisy task id=%s label=%r sent for slot %s (id %s)", run.task_id, run.task.label,
                                 run.slot.isoformat(), run_celery_id(run.task_id, run.slot))
        if sending is not None:
            logger.info("sisy beat %s: published %d run(s)", self.ident, len(sending[1]))

    def _keep(self, runs: list[Any]) -> None:
        kept = {run.pk for run in self._unsent}
        self._unsent += [run for run in runs if run.pk not in kept]

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(self.app)
        return self._dispatcher

    def close_dispatcher(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.close()
            self._dispatcher = None

    def upkeep(self, now: datetime) -> None:
        """Publish runs a dead beat left claimed, settle lapsed leases, purge old runs, report health."""
        limit = conf.beat_batch_size()
        self.publish(engine.claim_stale(now, self.republish_after, self.ident, limit), now)
        if time.monotonic() >= self._lapse_after:
            engine.lapse(now, limit, self.lapse_grace)
        if time.monotonic() >= self._purge_at:
            engine.purge(now - timedelta(seconds=conf.run_retention()), limit)
            self.forget_beats(now)
            self._purge_at = time.monotonic() + self.purge_every
        self.record_status(now)
        self._upkeep_at = time.monotonic() + self.upkeep_every

    def close(self) -> None:
        """Stopping cleanly: the batch being published is marked, and the health record says so, so
        ``sisy_status`` does not wait for it to age."""
        from .models import BeatProcess

        try:
            self.finish_sending(self.now())
        except (DatabaseError, InterfaceError, BrokerUnavailable) as exc:
            logger.warning("sisy beat %s stopped with a batch not marked published (another beat publishes "
                           "it again; workers drop copies): %s", self.ident, exc)
        if self._sender is not None:
            self._sender.shutdown()
            self._sender = None
        self.close_dispatcher()
        try:
            BeatProcess.objects.filter(ident=self.ident).update(stopped_at=self.now())
        except (DatabaseError, InterfaceError) as exc:
            logger.warning("sisy beat %s could not record its stop: %s", self.ident, exc)
        super().close()

    # -- health and banner -------------------------------------------------------------

    def record_status(self, now: datetime) -> None:
        """Let ``sisy_status`` see this beat ticking (written on every upkeep pass)."""
        from .models import BeatProcess

        fields = {"hostname": socket.gethostname(), "pid": os.getpid(), "started_at": self.started_at, "last_tick": now,
                  "stopped_at": None}
        # One UPDATE (autocommit) on every write but the first, which creates the row.
        if not BeatProcess.objects.filter(ident=self.ident).update(**fields):
            BeatProcess.objects.update_or_create(ident=self.ident, defaults=fields)

    def forget_beats(self, now: datetime) -> None:
        """Drop the health records of beats silent for a day (``sisy_status`` lists the rest)."""
        from .models import BeatProcess

        BeatProcess.objects.filter(last_tick__lt=now - timedelta(seconds=FORGET_BEATS_AFTER)).delete()

    @property
    def info(self) -> str:
        from .models import Task

        settings_dict = connection.settings_dict
        try:
            estimate = _estimated_rows(Task)
            if estimate >= 100_000:
                # A large table: PostgreSQL's statistics, not a COUNT(*) that reads it all at startup.
                tasks = f"about {estimate:,} task(s) (estimated)"
            else:
                tasks = f"{Task.objects.filter(enabled=True).count()} enabled task(s)"
        except DatabaseError as exc:
            tasks = f"unknown ({exc}) enabled task(s)"
        return (f"database {connection.vendor} {settings_dict.get('NAME')!s} "
                f"({settings_dict.get('HOST') or 'local'}), {tasks}, "
                f"heartbeat {conf.heartbeat_frequency():g}s, zone {conf.timezone_name()}")


def _estimated_rows(model: Any) -> int:
    """PostgreSQL's estimate of the rows of ``model``'s table (0 elsewhere, or when unknown)."""
    if connection.vendor != "postgresql":
        return 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                       [connection.ops.quote_name(model._meta.db_table)])
        row = cursor.fetchone()
    return max(0, int(row[0])) if row else 0

