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
claim is handed back, so a slot is never sent twice and is not lost.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import beat
from django.db import DatabaseError, InterfaceError, connection, transaction
from django.db.models import F, Value
from django.utils import timezone

from . import conf

logger = logging.getLogger("sisy_celery.beat")

MAX_BACKOFF = 30.0


def _setup_django() -> None:
    from django.apps import apps

    if not apps.ready:
        import django

        django.setup()


@dataclass
class Claim:
    """One due slot of one task: dispatch it (``send``), skip it, finish the task, or flag it."""

    task: Any
    slot: datetime
    action: str  # "send" | "skip" | "finish" | "broken"
    next_run: datetime | None = None
    reset_lease: bool = False
    problem: str = ""


class Scheduler(beat.Scheduler):
    """Celery beat scheduler backed by ``sisy_celery.models.Task`` rows."""

    #: Seconds between two writes of this process's health record (``sisy_status``).
    status_every = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _setup_django()
        self._backoff = 0.0
        self._status_written = 0.0
        self.ident = f"{socket.gethostname()}:{os.getpid()}"
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
            # An idle tick is this one indexed query; the claiming transaction runs only when a row is due.
            earliest = self.earliest_next_run()
            due = earliest is not None and earliest <= now
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
        return min(heartbeat, max(0.0, (earliest - self.now()).total_seconds()))

    def _retry_later(self, what: str, exc: BaseException) -> float:
        self._backoff = min(MAX_BACKOFF, max(0.5, self._backoff * 2), conf.heartbeat_frequency() * 5)
        logger.warning("sisy beat %s: %s unavailable (%s: %s); retrying in %.1fs",
                       self.ident, what, type(exc).__name__, exc, self._backoff)
        if what == "database":
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
        for index, claim in enumerate(sent):
            try:
                self.apply_claim(claim)
            except Exception as exc:
                self.hand_back(sent[index:])
                raise BrokerError(str(exc)) from exc
        return examined >= limit

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
        reset = bool(in_flight and task.lease_expires is not None and task.lease_expires < now)
        if reset:
            in_flight = 0
        if slot > task.end_running:
            if in_flight == 0:
                return Claim(task, slot, "finish", reset_lease=reset)
        try:
            # Missed slots are coalesced: the next run is the first slot after now.
            following = task.following_run(max(now, slot))
        except ValueError as exc:
            return Claim(task, slot, "broken", problem=str(exc))
        busy = (not task.allow_overlap and in_flight > 0) or (task.iterations and in_flight >= task.iterations)
        if slot > task.end_running or busy:
            return Claim(task, slot, "skip", next_run=following, reset_lease=reset)
        return Claim(task, slot, "send", next_run=following, reset_lease=reset)

    def _write_locked(self, claims: list[Claim], lease: datetime) -> None:
        """Rows are locked by this transaction: write computed values in one statement."""
        from .models import FAR_FUTURE, Task

        changed = []
        for claim in claims:
            task = claim.task
            if claim.reset_lease:
                task.in_flight, task.running, task.lease_expires = 0, False, None
            if claim.action == "send":
                task.in_flight += 1
                task.running, task.lease_expires, task.claimed_slot = True, lease, claim.slot
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
        from .models import FAR_FUTURE, Task

        won = []
        for claim in claims:
            rows = Task.objects.filter(pk=claim.task.pk, next_run=claim.slot)
            changes: dict[str, Any] = {}
            if claim.reset_lease:
                changes.update(in_flight=Value(0), running=False, lease_expires=None)
            if claim.action == "send":
                changes.update(in_flight=(Value(1) if claim.reset_lease else F("in_flight") + 1),
                               running=True, lease_expires=lease, claimed_slot=claim.slot)
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
        from .models import Task

        for claim in claims:
            Task.objects.filter(pk=claim.task.pk, next_run=claim.next_run).release_run(next_run=claim.slot)
        logger.warning("sisy beat %s: handed back %d unsent slot(s) for the next attempt", self.ident, len(claims))

    def log_claim(self, claim: Claim) -> None:
        task = claim.task
        if claim.reset_lease:
            logger.warning("sisy task id=%s label=%r: running lease lapsed (worker lost?); claim reclaimed",
                           task.pk, task.label)
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
            count: Any = Task.objects.filter(enabled=True).count()
        except DatabaseError as exc:
            count = f"unknown ({exc})"
        return (f"database {connection.vendor} {settings_dict.get('NAME')!s} "
                f"({settings_dict.get('HOST') or 'local'}), {count} enabled task(s), "
                f"heartbeat {conf.heartbeat_frequency():g}s, zone {conf.timezone_name()}")


class BrokerError(Exception):
    """Publishing to the broker failed; the unsent claims were handed back."""
