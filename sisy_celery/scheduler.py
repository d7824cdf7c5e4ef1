"""``celery beat -S sisy_celery.Scheduler``: dispatch due Task rows, exactly once per slot.

Each tick asks the database only for the rows that are due (an index range scan
on ``enabled, next_run``), claims their slots atomically, publishes one
``sisy.run_callable`` message per claimed slot and sleeps until the earliest
``next_run`` or the heartbeat, whichever comes first. Claims are made so that
any number of beat processes can run at once:

* where the database has ``SELECT … FOR UPDATE SKIP LOCKED`` (PostgreSQL,
  MariaDB ≥ 10.6, MySQL 8) the due rows are locked, so each beat takes a
  disjoint batch and writes it back with one set-based UPDATE;
* elsewhere (SQLite) each slot is taken with a conditional UPDATE on the
  ``next_run`` value that was read, so only one beat can win it.

A claim is committed before its message is published; if publishing fails the
claim is handed back, so a slot is never sent twice and is not lost. Until its
message goes out, a claim's lease holds a mark instead of an expiry (an instant in
1970, see ``UNPUBLISHED_BEFORE``), swapped for the real lease just before
publishing: a claim whose beat was killed before publishing it still carries the
mark, and is handed back by the next beat that starts or that finds the task due.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone as dt_timezone
from typing import Any, Iterator

from celery import beat
from django.db import DatabaseError, InterfaceError, connection, transaction
from django.db.models import F, Value
from django.db.models.functions import Least
from django.utils import timezone

from . import conf

logger = logging.getLogger("sisy_celery.beat")

MAX_BACKOFF = 30.0

#: Leases before this instant are not expiries but the marks of claims whose message has not been
#: published yet (a real lease ends ``SISY_RUNNING_TIMEOUT`` after its claim).
UNPUBLISHED_BEFORE = datetime(1971, 1, 1, tzinfo=dt_timezone.utc)
_MARKS = int((UNPUBLISHED_BEFORE - datetime(1970, 1, 1, tzinfo=dt_timezone.utc)) / timedelta(microseconds=1))


def unpublished_mark() -> datetime:
    """A fresh mark for the claims of one batch: a random instant of 1970, so that a claim taken
    over from a dead beat never carries the mark that beat would swap."""
    return UNPUBLISHED_BEFORE - timedelta(microseconds=1 + secrets.randbelow(_MARKS - 1))


def is_unpublished(lease: datetime | None) -> bool:
    return lease is not None and lease < UNPUBLISHED_BEFORE


def _setup_django() -> None:
    from django.apps import apps

    if not apps.ready:
        import django

        django.setup()


@contextmanager
def deferred_stop() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back while slots are claimed and published.

    Beat stops by raising SystemExit from its signal handler wherever the main thread
    happens to be; between a claim's commit and its publish that would strand the
    claim (its slot never sent, the task counted as running until its lease lapses).
    Here a stop signal is only noted, and raised again once the batch is out, so
    beat stops as usual right after it. (``kill -9`` cannot be held back.)
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


@dataclass
class Claim:
    """One due slot of one task: dispatch it (``send``), skip it, finish the task, or flag it."""

    task: Any
    slot: datetime
    action: str  # "send" | "skip" | "finish" | "broken"
    next_run: datetime | None = None
    reset_lease: bool = False
    problem: str = ""
    #: the row held a claim whose message was never published (its beat died): this claim replaces it
    unpublished: bool = False
    #: for "send": the mark written with the claim, and the lease it is swapped for before publishing
    mark: datetime | None = None
    lease: datetime | None = None
    swapped: bool = False


class Scheduler(beat.Scheduler):
    """Celery beat scheduler backed by ``sisy_celery.models.Task`` rows."""

    #: Seconds between two writes of this process's health record (``sisy_status``).
    status_every = 10.0
    #: Most claims whose marks are swapped for leases in one commit before they are published:
    #: a beat killed while publishing loses at most the rest of one group (groups start at one
    #: claim and double, so a small tick loses at most one slot; a commit per message would
    #: make a burst several times slower).
    publish_group = 32
    #: Seconds to wait when due rows are locked by another beat's claim.
    locked_pause = 0.05

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _setup_django()
        self._backoff = 0.0
        self._status_written = 0.0
        self.ident = f"{socket.gethostname()}:{os.getpid()}"
        self._recovered = False
        self.started_at = timezone.now()
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
            if not self._recovered:
                self.recover_unpublished(now)
                self._recovered = True
            # An idle tick is this one indexed query; the claiming transaction runs only when a row is due.
            earliest = self.earliest_next_run()
            due = earliest is not None and earliest <= now
            with deferred_stop():
                more = due and self.dispatch_due(now)
            self.record_status(now)
            if more:
                return 0.0
            if due:
                earliest = self.earliest_next_run()
        except (DatabaseError, InterfaceError) as exc:
            return self._retry_later("database", exc)
        except BrokerError as exc:
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
            # Claims of this beat may be left unpublished: look for them again once it reconnects.
            self._recovered = False
            try:
                connection.close()
            except Exception:  # the connection is already broken; a new one is opened next tick
                pass
        return self._backoff

    # -- the database side -------------------------------------------------------------

    def earliest_next_run(self) -> datetime | None:
        from .models import Task

        return Task.objects.filter(enabled=True).order_by("next_run").values_list("next_run", flat=True).first()

    def dispatch_due(self, now: datetime) -> bool:
        """Claim and publish one batch of due slots; True if there may be more due right now."""
        limit = conf.beat_batch_size()
        claims, examined = self.claim_due(now, limit)
        sent = [c for c in claims if c.action == "send"]
        start, size = 0, 1
        while start < len(sent):
            group = sent[start:start + size]
            # A database error here leaves the claims marked: handed back once it is back.
            self.swap_marks(group)
            for index, claim in enumerate(group):
                if not claim.swapped:
                    logger.warning("sisy task id=%s label=%r: slot %s was handed back by another beat before it "
                                   "was published here; not sent", claim.task.pk, claim.task.label,
                                   claim.slot.isoformat())
                    continue
                try:
                    self.apply_claim(claim)
                except Exception as exc:
                    self.hand_back([c for c in group[index:] if c.swapped] + sent[start + size:])
                    raise BrokerError(str(exc)) from exc
            start, size = start + size, min(size * 2, self.publish_group)
        return examined >= limit

    def swap_marks(self, claims: list[Claim]) -> None:
        """Replace the unpublished marks of ``claims`` by their leases in one commit; a claim whose mark
        is gone (a beat took this one for dead and handed it back) is left ``swapped = False``."""
        from .models import Task

        if not claims:
            return
        pks = [claim.task.pk for claim in claims]
        mark, lease = claims[0].mark, claims[0].lease
        with transaction.atomic():
            Task.objects.filter(pk__in=pks, lease_expires=mark).update(lease_expires=lease)
            # Rows this transaction just wrote are locked until it commits: a lease equal to ours is our swap.
            mine = set(Task.objects.filter(pk__in=pks, lease_expires=lease).values_list("pk", flat=True))
        for claim in claims:
            claim.swapped = claim.task.pk in mine

    def claim_due(self, now: datetime, limit: int) -> tuple[list[Claim], int]:
        """Take the due slots of up to ``limit`` rows atomically; return the claims and rows read."""
        from .models import Task

        lease = now + timedelta(seconds=conf.running_timeout())
        locking = connection.features.has_select_for_update_skip_locked
        with transaction.atomic():
            rows = Task.objects.due(now)
            if locking:
                rows = rows.select_for_update(skip_locked=True)
            claims = [self.plan(task, now) for task in rows[:limit]]
            mark = unpublished_mark()
            while any(claim.task.lease_expires == mark for claim in claims):
                mark = unpublished_mark()
            for claim in claims:
                if claim.action == "send":
                    claim.mark, claim.lease = mark, lease
            if locking:
                self._write_locked(claims, lease)
            else:
                claims = self._write_conditional(claims, lease)
        for claim in claims:
            self.log_claim(claim)
        return claims, len(claims)

    def plan(self, task: Any, now: datetime) -> Claim:
        """Decide what to do with one due row, from the row alone (no queries)."""
        slot = task.next_run
        in_flight = task.in_flight
        # A claim still marked unpublished while its task is due again: its beat died before
        # publishing it (a live beat publishes within the tick). Its slot is the one sent now.
        unpublished = bool(in_flight and is_unpublished(task.lease_expires) and task.claimed_slot is not None)
        if unpublished:
            in_flight -= 1
            slot = min(slot, task.claimed_slot)
        reset = bool(in_flight and not unpublished and task.lease_expires is not None and task.lease_expires < now)
        if reset:
            in_flight = 0
        if slot > task.end_running:
            if in_flight == 0:
                return Claim(task, slot, "finish", reset_lease=reset, unpublished=unpublished)
        try:
            # Missed slots are coalesced: the next run is the first slot after now. A slot taken
            # over from a dead beat leaves next_run as it is: the slot due now goes out next tick.
            following = task.next_run if slot < task.next_run else task.following_run(max(now, slot))
        except ValueError as exc:
            return Claim(task, slot, "broken", problem=str(exc), unpublished=unpublished)
        busy = (not task.allow_overlap and in_flight > 0) or (task.iterations and in_flight >= task.iterations)
        action = "skip" if slot > task.end_running or busy else "send"
        return Claim(task, slot, action, next_run=following, reset_lease=reset, unpublished=unpublished)

    def _write_locked(self, claims: list[Claim], lease: datetime) -> None:
        """Rows are locked by this transaction: write computed values in one statement."""
        from .models import FAR_FUTURE, Task

        changed = []
        for claim in claims:
            task = claim.task
            if claim.reset_lease:
                task.in_flight, task.running, task.lease_expires = 0, False, None
            if claim.unpublished:
                task.in_flight -= 1
                task.running, task.lease_expires = task.in_flight > 0, lease if task.in_flight else None
            if claim.action == "send":
                task.in_flight += 1
                task.running, task.lease_expires, task.claimed_slot = True, claim.mark, claim.slot
            if claim.action == "broken":
                task.next_run, task.problem = FAR_FUTURE, claim.problem
            elif claim.next_run is not None:
                task.next_run = claim.next_run
            if claim.action != "finish":
                changed.append(task)
        # Rows due together mostly end with the same values (slot, next run, lease): one UPDATE per
        # distinct set of values, instead of bulk_update's CASE per row (seconds for 1000 rows).
        fields = ("next_run", "in_flight", "running", "lease_expires", "claimed_slot", "problem")
        groups: dict[tuple, list] = {}
        for task in changed:
            groups.setdefault(tuple(getattr(task, name) for name in fields), []).append(task.pk)
        for values, pks in groups.items():
            Task.objects.filter(pk__in=pks).update(**dict(zip(fields, values)))
        finished = [c.task.pk for c in claims if c.action == "finish"]
        if finished:
            Task.objects.filter(pk__in=finished).finish()

    def _write_conditional(self, claims: list[Claim], lease: datetime) -> list[Claim]:
        """No row locks: each slot is won by the one UPDATE that still sees its ``next_run``."""
        from .models import FAR_FUTURE, Task, released_values

        won = []
        for claim in claims:
            task = claim.task
            rows = Task.objects.filter(pk=task.pk, next_run=task.next_run)
            changes: dict[str, Any] = {}
            if claim.reset_lease:
                changes.update(in_flight=Value(0), running=False, lease_expires=None)
            if claim.unpublished:
                rows = rows.filter(lease_expires=task.lease_expires)
                if claim.action != "send":
                    changes.update(released_values(lease))
            if claim.action == "send":
                in_flight = Value(1) if claim.reset_lease else F("in_flight") + (0 if claim.unpublished else 1)
                changes.update(in_flight=in_flight, running=True, lease_expires=claim.mark, claimed_slot=claim.slot)
            if claim.action == "broken":
                changes.update(next_run=FAR_FUTURE, problem=claim.problem)
            elif claim.next_run is not None:
                changes["next_run"] = claim.next_run
            if claim.action == "finish":
                ok = rows.finish() > 0
            else:
                ok = rows.update(**changes) == 1
            if ok:
                won.append(claim)
        return won

    def hand_back(self, claims: list[Claim]) -> None:
        """Publishing failed: give the slots back so they are sent once the broker returns."""
        from .models import Task, released_values

        for claim in claims:
            rows = Task.objects.filter(pk=claim.task.pk, next_run=claim.next_run)
            if not claim.swapped:  # still this beat's claim only while it carries the mark
                rows = rows.filter(lease_expires=claim.mark)
            rows.update(next_run=claim.slot, **released_values(claim.lease))
        logger.warning("sisy beat %s: handed back %d unsent slot(s) for the next attempt", self.ident, len(claims))

    def recover_unpublished(self, now: datetime) -> int:
        """Hand back claims that carry an unpublished mark: their beat was killed (or lost the
        database) between claiming and publishing. Run when this beat starts or reconnects.

        Each is taken back only while it still carries its mark, so a claim that a live beat
        is publishing right now is either published by it or handed back here, never both.
        """
        from .models import Task, released_values

        lease = now + timedelta(seconds=conf.running_timeout())
        marked = Task.objects.filter(in_flight__gt=0, lease_expires__lt=UNPUBLISHED_BEFORE, claimed_slot__isnull=False)
        count = 0
        for pk, label, slot, mark in marked.values_list("pk", "label", "claimed_slot", "lease_expires"):
            if Task.objects.filter(pk=pk, lease_expires=mark).update(next_run=Least(F("next_run"), Value(slot)),
                                                                      **released_values(lease)):
                count += 1
                logger.warning("sisy task id=%s label=%r: slot %s was claimed but never published (its beat "
                               "stopped mid-dispatch); handed back, it is sent now", pk, label, slot.isoformat())
        return count

    def log_claim(self, claim: Claim) -> None:
        task = claim.task
        if claim.reset_lease:
            logger.warning("sisy task id=%s label=%r: running lease lapsed (worker lost?); claim reclaimed",
                           task.pk, task.label)
        if claim.unpublished:
            logger.warning("sisy task id=%s label=%r: slot %s was claimed but never published (its beat "
                           "stopped mid-dispatch); claim taken over", task.pk, task.label, claim.slot.isoformat())
        if claim.action == "skip":
            logger.info("sisy task id=%s label=%r: slot %s skipped, a run is still going (next %s)",
                        task.pk, task.label, claim.slot.isoformat(), claim.next_run.isoformat())
        elif claim.action == "finish":
            logger.info("sisy task id=%s label=%r finished: end_running %s has passed",
                        task.pk, task.label, task.end_running.isoformat())
        elif claim.action == "broken":
            logger.error("sisy task id=%s label=%r flagged and not scheduled: %s", task.pk, task.label, claim.problem)

    # -- publishing --------------------------------------------------------------------

    def apply_claim(self, claim: Claim) -> Any:
        """Publish the run of one claimed slot (the ``apply_entry`` of database tasks)."""
        from .tasks import send

        result = send(claim.task, claim.slot, app=self.app, producer=self.producer)
        logger.info("sisy task id=%s label=%r sent for slot %s (id %s)",
                    claim.task.pk, claim.task.label, claim.slot.isoformat(), result.id)
        return result

    # -- health and banner -------------------------------------------------------------

    def record_status(self, now: datetime) -> None:
        """Let ``sisy_status`` see this beat ticking (written every ``status_every`` seconds)."""
        if time.monotonic() - self._status_written < self.status_every:
            return
        from .models import BeatProcess

        fields = {"hostname": socket.gethostname(), "pid": os.getpid(), "started_at": self.started_at, "last_tick": now}
        # One UPDATE (autocommit) on every write but the first, which creates the row.
        if not BeatProcess.objects.filter(ident=self.ident).update(**fields):
            BeatProcess.objects.update_or_create(ident=self.ident, defaults=fields)
        self._status_written = time.monotonic()

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


class BrokerError(Exception):
    """Publishing to the broker failed; the unsent claims were handed back."""
