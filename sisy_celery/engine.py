"""The run ledger's state machine: every write to run state goes through this module.

A slot of a task becomes a :class:`~sisy_celery.models.Run` row when beat claims it, and
moves only forward::

    claimed --publish--> published --start--> started --settle--> succeeded | failed
       |  ^                  |                   |
       |  +--(re-publish)    +--revoke/lapse--> revoked | lost
       +--(refused by the broker)--> lost

Beat claims (insert runs and advance ``next_run`` in one transaction), publishes after
the commit and marks what went out; runs a dead beat left ``claimed`` are published again
by any beat (at-least-once publish). A worker starts a run with one conditional UPDATE: a
copy of a message, a run already started or settled, or a run of a disabled or deleted
task changes nothing, so a slot runs once. Settling, renewing, lapsing and revoking are
conditional on the state and on the start they belong to, so no caller can settle another's
run. ``Task.running`` is kept as a projection of the ledger ("some run is not settled"),
``Task.iterations`` is counted down by settlement only, ``Task.last_run`` is the start of
the last settled run.

Callers pass the clock (``now``) in: the scheduler and the worker decide when, this
module decides what is written.
"""
from __future__ import annotations

import json
import logging
import operator
from dataclasses import dataclass
from functools import reduce
from datetime import datetime, timedelta, timezone as dt_timezone
from typing import Any, Iterable, Sequence

from django.db import connection, transaction
from django.db.models import BigIntegerField, Count, Exists, F, Func, OuterRef, Q, Subquery, Value
from django.db.models.expressions import RawSQL
from django.db.models.functions import Greatest

from . import conf
from .dispatch import Dispatcher, Outgoing
from .models import FAR_FUTURE, Run, Task, following_run, result_tag, run_celery_id

logger = logging.getLogger("sisy_celery.engine")

SEND, SKIP, FINISH, BROKEN = "send", "skip", "finish", "broken"
#: what a worker's start found, when it did not start the run
UNKNOWN, RUNNING, SETTLED, DISABLED, OVERLAP = "unknown", "running", "settled", "disabled", "overlap"
#: Celery's final task states, as run outcomes (any other state settles as failed)
OUTCOMES = {"SUCCESS": Run.SUCCEEDED, "FAILURE": Run.FAILED}


class TaskBusy(Exception):
    """A run was not claimed: the task is already running (overlap off), or its unfinished runs use
    up the iterations left."""


def _lease(now: datetime) -> datetime:
    return now + timedelta(seconds=conf.running_timeout())


def _short(text: str) -> str:
    return text if len(text) <= 300 else text[:297] + "..."


# -- beat: claim ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Due:
    """A due task row as beat's claim reads it: the columns that decide its slot and make its
    message, as plain values (a burst reads thousands of rows; model instances cost more than
    everything else the claim does)."""

    pk: int
    label: str
    schedule: str
    timezone: str
    start_running: datetime
    end_running: datetime
    iterations: int
    allow_overlap: bool
    next_run: datetime
    _func_info: dict
    _extra_data: dict
    queue: str
    priority: int | None
    expires: int | None

    def following_run(self, after: datetime) -> datetime:
        return following_run(self, after)

    @property
    def result_tag(self) -> str:
        return result_tag(self.pk)


#: The columns of a Due, in order.
DUE_COLUMNS = tuple(Due.__dataclass_fields__)


@dataclass(frozen=True)
class Claimed:
    """A run beat claimed and publishes: its ledger row's key, its slot and its task's row."""

    pk: int
    task: Due
    slot: datetime

    @property
    def task_id(self) -> int:
        return self.task.pk


@dataclass
class Decision:
    """What to do with one due task row: send its slot, skip it, finish the task, or flag it."""

    task: Task | Due
    slot: datetime
    action: str
    next_run: datetime | None = None
    problem: str = ""


def plan(task: Task | Due, now: datetime, unsettled: int = 0) -> Decision:
    """Decide from the row and its number of unsettled runs.

    Missed slots are coalesced: the next run is the first slot after now. Overlap off waits
    for every unsettled run; ``iterations`` bounds the runs that may be unsettled at once, so
    the runs counted can never exceed it.
    """
    slot = task.next_run
    if slot > task.end_running and unsettled == 0:
        return Decision(task, slot, FINISH)
    try:
        following = task.following_run(max(now, slot))
    except ValueError as exc:
        return Decision(task, slot, BROKEN, problem=str(exc))
    return Decision(task, slot, SKIP if busy(task, unsettled) or slot > task.end_running else SEND,
                    next_run=following)


def busy(task: Task | Due, unsettled: int) -> bool:
    """No new run while overlap is off and one is unsettled, or while the unsettled runs use up the
    iterations left."""
    return (not task.allow_overlap and unsettled > 0) or 0 < task.iterations <= unsettled


def _pks(pks: list[Any]) -> Any:
    """The right side of a ``pk__in`` filter: on PostgreSQL one array parameter (a burst's lists
    are a thousand ids, which Django would bind and the driver splice in one by one)."""
    if connection.vendor == "postgresql" and len(pks) > 1:
        return RawSQL("SELECT unnest(%s::bigint[])", [pks], output_field=BigIntegerField())
    return pks


def unsettled_counts(task_pks: Iterable[Any]) -> dict[Any, int]:
    """``{task pk: unsettled runs}`` for the tasks that have any."""
    rows = (Run.objects.filter(task_id__in=list(task_pks), state__in=Run.UNSETTLED)
            .values_list("task_id").annotate(n=Count("pk")).order_by())
    return dict(rows)


@dataclass
class Batch:
    """One claiming transaction: the runs to publish and the number of due rows it read."""

    runs: list[Claimed]
    decisions: list[Decision]
    examined: int


def claim_due(now: datetime, limit: int, beat: str) -> Batch:
    """Claim the due slots of up to ``limit`` task rows in one transaction.

    Where the database has ``SKIP LOCKED`` the rows are locked, so concurrent beats take
    disjoint batches and write them back set-based; elsewhere (SQLite) each row is won by the
    one UPDATE that still sees the ``next_run`` it read. Either way a slot gets at most one run
    (the ledger is unique on task + slot as well).
    """
    locking = connection.features.has_select_for_update_skip_locked
    with transaction.atomic():
        rows = Task.objects.due(now)
        if locking:
            rows = rows.select_for_update(skip_locked=True)
        # each row with its number of unsettled runs (a correlated count on the run index)
        unsettled = Run.objects.filter(task_id=OuterRef("pk"), state__in=Run.UNSETTLED).order_by().annotate(
            n=Func(F("pk"), function="COUNT")).values("n")
        read = rows.annotate(unsettled=Subquery(unsettled)).values_list(*DUE_COLUMNS, "unsettled")[:limit]
        decisions = [plan(Due(*columns), now, count) for *columns, count in _read_due(read)]
        won = _write_locked(decisions) if locking else _write_conditional(decisions)
        runs = _insert_claimed([d for d in won if d.action == SEND], beat, now)
    for decision in won:
        _log_decision(decision)
    return Batch(runs, won, len(decisions))


#: Due's JSON columns, by position in a row of the claim's read.
_JSON_COLUMNS = tuple(DUE_COLUMNS.index(name) for name in ("_func_info", "_extra_data"))


def _read_due(read: Any) -> Iterable[Sequence[Any]]:
    """The rows of the claim's read. On PostgreSQL with psycopg 3 (in UTC, as Django sets the session
    under USE_TZ) they are read on a cursor that loads timestamps with psycopg's own loader (its C
    one where installed) and each distinct JSON text is parsed once: a burst reads thousands of
    rows, and Django's per-value loaders (a Python subclass of the timestamp loader that replaces
    the zone, one ``json.loads`` a cell) cost more than the read itself."""
    if connection.vendor != "postgresql" or connection.timezone != dt_timezone.utc or not hasattr(
            connection.connection, "adapters"):  # psycopg2, or a session in another zone
        return read
    from psycopg import adapters, postgres
    from psycopg.pq import Format

    sql, params = read.query.sql_with_params()
    with connection.cursor() as cursor:
        oid = postgres.types["timestamptz"].oid
        cursor.cursor.adapters.register_loader(oid, adapters.get_loader(oid, Format.TEXT))
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    parsed: dict[str, Any] = {}
    out = []
    for row in rows:
        row = list(row)
        for index in _JSON_COLUMNS:
            text = row[index]
            if text not in parsed:
                parsed[text] = None if text is None else json.loads(text)
            row[index] = parsed[text]
        out.append(row)
    return out


def _insert_claimed(sends: list[Decision], beat: str, now: datetime) -> list[Claimed]:
    """Insert the claimed runs of a batch. PostgreSQL takes the rows as two arrays in one small
    statement (Django's bulk_create binds every value of every row, which costs a burst more
    than the insert itself); other databases use bulk_create."""
    if not sends:
        return []
    if connection.vendor != "postgresql":
        runs = Run.objects.bulk_create(
            [Run(task_id=d.task.pk, slot=d.slot, state=Run.CLAIMED, beat=beat, claimed_at=now) for d in sends])
        return [Claimed(run.pk, d.task, d.slot) for run, d in zip(runs, sends)]
    table = connection.ops.quote_name(Run._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (task_id, slot, state, attempt, beat, worker, claimed_at, error) "
            "SELECT claimed.task_id, claimed.slot, %s, 0, %s, '', %s, '' "
            "FROM unnest(%s::bigint[], %s::timestamptz[]) AS claimed (task_id, slot) RETURNING task_id, id",
            [Run.CLAIMED, beat, now, [d.task.pk for d in sends], [d.slot for d in sends]])
        ids = dict(cursor.fetchall())
    return [Claimed(ids[d.task.pk], d.task, d.slot) for d in sends]


def _task_values(decision: Decision) -> dict[str, Any]:
    if decision.action == BROKEN:
        return {"next_run": FAR_FUTURE, "problem": decision.problem}
    values: dict[str, Any] = {"next_run": decision.next_run}
    if decision.action == SEND:
        values["running"] = True
    return values


def _write_locked(decisions: list[Decision]) -> list[Decision]:
    """The rows are locked by this transaction: one UPDATE per distinct set of values (rows due
    together mostly share them), rather than one per row."""
    groups: dict[tuple[tuple[str, Any], ...], list[Any]] = {}
    for decision in decisions:
        if decision.action != FINISH:
            groups.setdefault(tuple(sorted(_task_values(decision).items())), []).append(decision.task.pk)
    for values, pks in groups.items():
        Task.objects.filter(pk__in=_pks(pks)).update(**dict(values))
    finished = [d.task.pk for d in decisions if d.action == FINISH]
    if finished:
        Task.objects.filter(pk__in=finished).finish()
    return decisions


def _write_conditional(decisions: list[Decision]) -> list[Decision]:
    """No row locks: each row is won by the UPDATE that still sees the ``next_run`` it read."""
    won = []
    for decision in decisions:
        rows = Task.objects.filter(pk=decision.task.pk, next_run=decision.task.next_run)
        if decision.action == FINISH:
            ok = rows.finish() > 0
        else:
            ok = rows.update(**_task_values(decision)) == 1
        if ok:
            won.append(decision)
    return won


def _log_decision(decision: Decision) -> None:
    task = decision.task
    if decision.action == SKIP:
        logger.info("sisy task id=%s label=%r: slot %s skipped, a run is still going or waiting (next %s)",
                    task.pk, task.label, decision.slot.isoformat(), decision.next_run.isoformat())
    elif decision.action == FINISH:
        logger.info("sisy task id=%s label=%r finished: end_running %s has passed",
                    task.pk, task.label, task.end_running.isoformat())
    elif decision.action == BROKEN:
        logger.error("sisy task id=%s label=%r flagged and not scheduled: %s", task.pk, task.label, decision.problem)


def claim_now(task: Task, now: datetime, by: str) -> Run:
    """Claim a run of ``task`` for the slot ``now`` ("run now"), under beat's rules; TaskBusy if not."""
    with transaction.atomic():
        row = Task.objects.select_for_update().filter(pk=task.pk).first()
        if row is None:
            raise TaskBusy(f"Task {task.pk} no longer exists; not sent.")
        if not row.enabled:
            raise TaskBusy(f"Task {row.pk} ({row.label}) is disabled (or finished); enable it to run it. Not sent.")
        if busy(row, unsettled_counts([row.pk]).get(row.pk, 0)):
            raise TaskBusy(f"Task {row.pk} ({row.label}) is already running (overlap off) or its unfinished "
                           f"runs use up the iterations left; not sent.")
        run = Run.objects.create(task=row, slot=now, state=Run.CLAIMED, beat=by, claimed_at=now)
        Task.objects.filter(pk=row.pk).update(running=True)
    return run


# -- beat: publish --------------------------------------------------------------------------


def message(run: Run | Claimed) -> Outgoing:
    """The ``sisy.run_callable`` message of ``run`` (its task attached)."""
    task = run.task
    return Outgoing(
        task_id=run_celery_id(task.pk, run.slot),
        args=[task.pk, task._func_info, task._extra_data, run.slot.isoformat()],
        headers={"periodic_task_name": task.result_tag},
        queue=task.queue,
        priority=task.priority,
        expires=None if task.expires is None else run.slot + timedelta(seconds=task.expires),
        key=run.pk,
    )


def publish(runs: Sequence[Run | Claimed], dispatcher: Dispatcher, now: datetime) -> int:
    """Publish ``runs`` (claimed, committed) and mark what went out; return how many did.

    A message the broker refuses on its own (its queue, routing or size) parks that task
    only. A connection failure raises ``BrokerUnavailable`` from the dispatcher and leaves
    the runs claimed: the caller publishes them again before it claims anything new, and any
    beat re-publishes runs left claimed (the worker drops any copy).
    """
    if not runs:
        return 0
    return mark(runs, send(runs, dispatcher), now)


def send(runs: Sequence[Run | Claimed], dispatcher: Dispatcher) -> dict[Any, str]:
    """The broker's half of :func:`publish`, which touches no database (beat runs it in a thread
    of its own while it claims the next batch): publish the messages of ``runs``; return the
    reasons of those the broker refused, by run pk. Raises ``BrokerUnavailable``."""
    if not runs:
        return {}
    refused = dispatcher.publish([message(run) for run in runs])
    return {outgoing.key: reason for outgoing, reason in refused}


def mark(runs: Sequence[Run | Claimed], refused: dict[Any, str], now: datetime) -> int:
    """The ledger's half of :func:`publish`, once :func:`send` is back: mark the runs that went out
    published (their lease starts now) and park the refused ones; return how many went out."""
    sent = [run.pk for run in runs if run.pk not in refused]
    if sent:
        Run.objects.filter(pk__in=_pks(sent), state=Run.CLAIMED).update(
            state=Run.PUBLISHED, published_at=now, lease_until=_lease(now))
    for run in runs:
        if run.pk in refused:
            park(run, refused[run.pk], now)
    return len(sent)


def park(run: Run | Claimed, reason: str, now: datetime) -> None:
    """The broker refused the message of ``run``: that run is lost and its task flagged and stopped
    (every other task keeps its slots). Saving the task again (e.g. with a valid queue) resumes it."""
    task = run.task
    problem = _short(f"The broker refused the message for queue {task.queue or '(default)'!r}: {reason}")
    with transaction.atomic():
        Run.objects.filter(pk=run.pk, state=Run.CLAIMED).update(
            state=Run.LOST, finished_at=now, error=_short(f"refused by the broker: {reason}"))
        Task.objects.filter(pk=task.pk).update(next_run=FAR_FUTURE, problem=problem)
        sync_running([task.pk])
    logger.error("sisy task id=%s label=%r queue=%r flagged and not scheduled: the broker refused its message (%s)",
                 task.pk, task.label, task.queue, reason)


def claim_stale(now: datetime, older_than: float, beat: str, limit: int) -> list[Run]:
    """Take over runs claimed more than ``older_than`` seconds ago and still not marked published:
    their beat died between claim and publish (or its publish failed). The caller publishes them
    again; if the first publish did go out, the worker runs only one of the copies."""
    cutoff = now - timedelta(seconds=older_than)
    with transaction.atomic():
        rows = Run.objects.filter(state=Run.CLAIMED, claimed_at__lt=cutoff).order_by("claimed_at")
        if connection.features.has_select_for_update_skip_locked:
            rows = rows.select_for_update(skip_locked=True)
        runs = list(rows[:limit])
        if not runs:
            return []
        Run.objects.filter(pk__in=[run.pk for run in runs], state=Run.CLAIMED).update(claimed_at=now, beat=beat)
    # The tasks are read apart from the locked runs, so their rows stay free for beat's claims.
    tasks = Task.objects.in_bulk({run.task_id for run in runs})
    orphans = [run for run in runs if run.task_id not in tasks]
    for run in orphans:
        revoke(run.task_id, run.slot, now, "its task was deleted before the run was published")
    runs = [run for run in runs if run.task_id in tasks]
    for run in runs:
        run.task = tasks[run.task_id]
        logger.warning("sisy task id=%s label=%r: run for slot %s was claimed by %s but not published; "
                       "publishing it now", run.task_id, run.task.label, run.slot.isoformat(), run.beat)
    return runs


# -- beat: upkeep ---------------------------------------------------------------------------


def lapse(now: datetime, limit: int, grace: float = 0.0) -> int:
    """Settle as lost the published and started runs whose lease lapsed more than ``grace`` seconds
    ago: no worker started the message in time (lost with the broker, or no worker), or the worker
    running it stopped renewing (killed). Their tasks are free again; a lost run uses no iteration.
    The grace lets a redelivered copy, which waits for the lease to lapse, start first."""
    cutoff = now - timedelta(seconds=grace)
    rows = list(Run.objects.filter(state__in=(Run.PUBLISHED, Run.STARTED), lease_until__lt=cutoff)
                .values_list("pk", "task_id", "slot", "state", "worker")[:limit])
    if not rows:
        return 0
    why = {Run.PUBLISHED: "not started by any worker before its lease lapsed (message lost, or no worker)",
           Run.STARTED: "its worker stopped renewing the lease (worker lost)"}
    with transaction.atomic():
        for state, error in why.items():
            Run.objects.filter(pk__in=[r[0] for r in rows if r[3] == state], state=state, lease_until__lt=cutoff).update(
                state=Run.LOST, finished_at=now, lease_until=None, error=error)
        # a run whose lease was renewed (or that settled) since the read is not lost
        lost = set(Run.objects.filter(pk__in=[r[0] for r in rows], state=Run.LOST, finished_at=now)
                   .values_list("pk", flat=True))
        sync_running({r[1] for r in rows})
    for pk, task_pk, slot, state, worker in rows:
        if pk in lost:
            logger.warning("sisy task id=%s: run for slot %s lost: %s%s", task_pk, slot.isoformat(), why[state],
                           f" ({worker})" if worker else "")
    return len(lost)


def purge(before: datetime, limit: int) -> int:
    """Delete up to ``limit`` settled runs claimed before ``before`` (``SISY_RUN_RETENTION``)."""
    pks = list(Run.objects.filter(state__in=Run.SETTLED, claimed_at__lt=before).values_list("pk", flat=True)[:limit])
    return Run.objects.filter(pk__in=pks).delete()[0] if pks else 0


def waiting(now: datetime, older_than: float) -> int:
    """How many runs were published more than ``older_than`` seconds ago and no worker started yet
    (no worker running, or none listening on their queue)."""
    return Run.objects.filter(state=Run.PUBLISHED, claimed_at__lt=now - timedelta(seconds=older_than)).count()


def abandon(task_pks: Sequence[Any], now: datetime, reason: str) -> int:
    """Settle every unsettled run of these tasks as lost (an operator cleared a stuck task)."""
    with transaction.atomic():
        count = Run.objects.filter(task_id__in=list(task_pks), state__in=Run.UNSETTLED).update(
            state=Run.LOST, finished_at=now, lease_until=None, error=_short(reason))
        sync_running(task_pks)
    return count


def sync_running(task_pks: Iterable[Any]) -> None:
    """Set ``Task.running`` from the ledger: some run of the task is not settled."""
    Task.objects.filter(pk__in=list(task_pks)).update(
        running=Exists(Run.objects.filter(task_id=OuterRef("pk"), state__in=Run.UNSETTLED)))


# -- worker ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """A run this worker started; ``started_at`` tells this start from any other attempt of the run."""

    task_pk: Any
    slot: datetime
    started_at: datetime


@dataclass(frozen=True)
class NotStarted:
    """Why a message started nothing: ``UNKNOWN`` (no such run), ``RUNNING`` (another attempt holds a
    live lease until ``lease_until``), ``SETTLED``, ``DISABLED`` or ``OVERLAP``."""

    why: str
    detail: str = ""
    lease_until: datetime | None = None


def start(task: Task, slot: datetime, worker: str, now: datetime) -> Started | NotStarted:
    """Start the run of ``task`` for ``slot``: one conditional UPDATE. Only a claimed or published run
    of an enabled task starts, or a started one whose lease lapsed (its worker died: a redelivered
    attempt). Anything else (a copy, a settled run, a disabled or deleted task) starts nothing."""
    runs = Run.objects.filter(task_id=task.pk, slot=slot)
    if not task.allow_overlap and Run.objects.filter(
            task_id=task.pk, state=Run.STARTED, lease_until__gte=now).exclude(slot=slot).exists():
        return _not_started(task, slot, now, OVERLAP)
    startable = runs.filter(Q(state__in=(Run.CLAIMED, Run.PUBLISHED)) | Q(state=Run.STARTED, lease_until__lt=now))
    if startable.filter(Exists(Task.objects.filter(pk=OuterRef("task_id"), enabled=True))).update(
            state=Run.STARTED, attempt=F("attempt") + 1, worker=worker, started_at=now, lease_until=_lease(now)):
        return Started(task.pk, slot, now)
    return _not_started(task, slot, now, None)


def _not_started(task: Task, slot: datetime, now: datetime, why: str | None) -> NotStarted:
    """Say why a start changed nothing; a waiting run that can never start (its task is disabled, or
    another run of an overlap-off task holds the lease) is settled as revoked, so it blocks nothing."""
    run = Run.objects.filter(task_id=task.pk, slot=slot).values("state", "lease_until", "error").first()
    if run is None:
        return NotStarted(UNKNOWN, "no run of this task was dispatched for that slot")
    if run["state"] in Run.SETTLED:
        return NotStarted(SETTLED, f"the run is already {run['state']}" + (f" ({run['error']})" if run["error"] else ""))
    if run["state"] == Run.STARTED and why is None:
        return NotStarted(RUNNING, "another attempt of this run is running", lease_until=run["lease_until"])
    why = why or DISABLED
    detail = ("another run of this task is running and overlap is off" if why == OVERLAP
              else "the task is disabled or finished")
    revoke(task.pk, slot, now, detail)
    return NotStarted(why, detail)


def settle(run: Started, state: str, error: str, now: datetime, task: Task) -> bool:
    """Record the outcome of a started run and count it: one iteration used (the task finishes when
    none is left), ``last_run`` and ``running`` updated. Only the start ``run`` names is settled, once;
    False if it was not (settled already, or given up as lost after its lease lapsed)."""
    outcome = OUTCOMES.get(state, Run.FAILED)
    if not task.iterations and task.end_running >= FAR_FUTURE and connection.vendor == "postgresql":
        if _settle_recurring(run, outcome, _short(error), state, now):
            return True
    with transaction.atomic():
        mine = Run.objects.filter(task_id=run.task_pk, slot=run.slot, started_at=run.started_at)
        if not mine.filter(state=Run.STARTED).update(state=outcome, finished_at=now, lease_until=None,
                                                     error=_short(error)):
            late = mine.filter(state=Run.LOST).update(state=outcome, finished_at=now, error=_short(
                f"finished after its lease had lapsed; not counted as an iteration. {error}"))
            if late:
                logger.warning("sisy task id=%s: run for slot %s finished after its lease lapsed; its outcome is "
                               "recorded but it uses no iteration", run.task_pk, run.slot.isoformat())
            return False
        tasks = Task.objects.filter(pk=run.task_pk)
        counted = {
            "last_run": Greatest(F("last_run"), Value(run.started_at)),
            "last_status": Value(state),
            "running": Exists(Run.objects.filter(task_id=OuterRef("pk"), state__in=Run.UNSETTLED)),
        }
        # ``task`` is the row as loaded at the start; other runs may have counted down since, so
        # whether this was the last iteration is decided by the database.
        if not task.iterations or not tasks.filter(iterations__gt=1).update(iterations=F("iterations") - 1, **counted):
            if task.iterations and tasks.filter(iterations=1).finish(last_run=counted["last_run"],
                                                                    last_status=counted["last_status"]):
                logger.info("sisy task id=%s finished: its last iteration ran", run.task_pk)
                return True
            tasks.update(**counted)
        if task.end_running < FAR_FUTURE and tasks.filter(running=False, next_run__gt=F("end_running")).finish():
            logger.info("sisy task id=%s finished: its end_running has passed", run.task_pk)
    return True


def _settle_recurring(run: Started, outcome: str, error: str, status: str, now: datetime) -> bool:
    """Settle a started run of a task that counts nothing down (no iterations, no end) in one
    statement: PostgreSQL's data-modifying WITH writes the run's outcome and the task's
    ``last_run``, ``last_status`` and ``running`` at once, so a run costs its worker three
    statements (load, start, settle) and no transaction. False if the run was not this start's
    to settle (the caller's general path then says why)."""
    runs, tasks = (connection.ops.quote_name(model._meta.db_table) for model in (Run, Task))
    sql = f"""
        WITH settled AS (
            UPDATE {runs} SET state = %s, finished_at = %s, lease_until = NULL, error = %s
            WHERE task_id = %s AND slot = %s AND started_at = %s AND state = %s
            RETURNING task_id
        ), counted AS (
            UPDATE {tasks} SET last_run = GREATEST(last_run, %s), last_status = %s,
                running = EXISTS (SELECT 1 FROM {runs} AS other WHERE other.task_id = {tasks}.id
                                  AND other.state = ANY(%s) AND other.slot <> %s)
            WHERE id IN (SELECT task_id FROM settled)
        )
        SELECT count(*) FROM settled"""
    with connection.cursor() as cursor:
        cursor.execute(sql, [outcome, now, error, run.task_pk, run.slot, run.started_at, Run.STARTED,
                             run.started_at, status, list(Run.UNSETTLED), run.slot])
        (settled,) = cursor.fetchone()
    return settled == 1


def renew(runs: Iterable[Started], now: datetime) -> int:
    """Extend the leases of runs still going in this worker."""
    mine = [Q(task_id=run.task_pk, slot=run.slot, started_at=run.started_at) for run in runs]
    if not mine:
        return 0
    return Run.objects.filter(reduce(operator.or_, mine), state=Run.STARTED).update(lease_until=_lease(now))


def revoke(task_pk: Any, slot: datetime, now: datetime, reason: str) -> bool:
    """Settle the run of ``task_pk`` for ``slot`` as revoked if it has not started (a revoked or
    expired message, a refused callable): its own run only, never another slot's, never a started one."""
    with transaction.atomic():
        done = Run.objects.filter(task_id=task_pk, slot=slot, state__in=(Run.CLAIMED, Run.PUBLISHED)).update(
            state=Run.REVOKED, finished_at=now, lease_until=None, error=_short(reason))
        if done:
            sync_running([task_pk])
    return bool(done)
