"""The run ledger's engine, without processes: an injected clock and a dispatcher stub that can fail.

Runs on SQLite and (``SISY_TEST_DB=postgres``) PostgreSQL: every state transition, beats
racing, recovery of runs left claimed, lapsed leases, retention, exactly-N iterations,
and DST nights with the same clock on the beat and the worker side.
"""
from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta, timezone as dt_timezone
from types import SimpleNamespace
from typing import Any, Sequence
from zoneinfo import ZoneInfo

import pytest
from django.db import OperationalError, connection, connections, transaction
from django.db.models import Value
from django.test.utils import override_settings

from sisy_celery import engine
from sisy_celery.dispatch import BrokerUnavailable, Outgoing
from sisy_celery.models import FAR_FUTURE, RUN_ID_NAMESPACE, Run, Task, run_celery_id, task_with_callable
from tests.testapp import jobs

pytestmark = pytest.mark.django_db

UTC = dt_timezone.utc
T0 = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
BEAT = "beat-a:1"


class StubDispatcher:
    """Records what it is asked to publish. ``down_at=k``: the connection fails at the k-th message of
    a call; ``refuse``: the (task pk) whose messages the broker refuses one by one."""

    def __init__(self, down_at: int | None = None, refuse: Sequence[Any] = ()) -> None:
        self.down_at = down_at
        self.refuse = set(refuse)
        self.sent: list[Outgoing] = []

    def publish(self, messages: Sequence[Outgoing]) -> list[tuple[Outgoing, str]]:
        refused = []
        for index, outgoing in enumerate(messages):
            if self.down_at is not None and index == self.down_at:
                raise BrokerUnavailable("connection refused")
            if outgoing.args[0] in self.refuse:
                refused.append((outgoing, "ACCESS_REFUSED"))
            else:
                self.sent.append(outgoing)
        return refused

    def close(self) -> None:
        pass


def make(schedule: str = "* * * * * *", due: datetime | None = T0, the_callable: Any = jobs.job,
         **fields: Any) -> Task:
    """A saved task whose next run is ``due``."""
    task = task_with_callable(the_callable, schedule=schedule, **fields)
    task.save()
    if due is not None:
        Task.objects.filter(pk=task.pk).update(next_run=due)
        task.refresh_from_db()
    return task


def dispatch(now: datetime, dispatcher: StubDispatcher | None = None, limit: int = 100) -> engine.Batch:
    """What one beat tick does with the due rows: claim, then publish."""
    batch = engine.claim_due(now, limit, BEAT)
    engine.publish(batch.runs, dispatcher or StubDispatcher(), now)
    return batch


def runs_of(task: Task) -> list[tuple[datetime, str]]:
    return list(Run.objects.filter(task_id=task.pk).order_by("slot").values_list("slot", "state"))


def start(task: Task, slot: datetime, now: datetime, worker: str = "w1") -> engine.Started | engine.NotStarted:
    return engine.start(Task.objects.get(pk=task.pk), slot, worker, now)


def run_to_end(task: Task, slot: datetime, now: datetime, state: str = "SUCCESS") -> bool:
    """A worker starts the run of ``slot`` and settles it at once."""
    row = Task.objects.get(pk=task.pk)
    started = engine.start(row, slot, "w1", now)
    assert isinstance(started, engine.Started), started
    return engine.settle(started, state, "", now, row)


# -- planning -------------------------------------------------------------------------------


def test_plan_sends_a_due_slot_and_coalesces_missed_ones() -> None:
    task = make(schedule="* * * * *", due=T0 - timedelta(minutes=10))
    decision = engine.plan(task, T0)
    assert (decision.action, decision.slot, decision.next_run) == (engine.SEND, T0 - timedelta(minutes=10),
                                                                   T0 + timedelta(minutes=1))


@pytest.mark.parametrize("fields, unsettled, action", [
    ({}, 0, engine.SEND),
    ({}, 3, engine.SEND),  # overlap allowed, unlimited
    ({"allow_overlap": False}, 1, engine.SKIP),
    ({"allow_overlap": False}, 0, engine.SEND),
    ({"iterations": 2}, 1, engine.SEND),
    ({"iterations": 2}, 2, engine.SKIP),
])
def test_plan_busy_rules(fields: dict[str, Any], unsettled: int, action: str) -> None:
    assert engine.plan(make(**fields), T0, unsettled).action == action


def test_plan_finishes_after_end_running_only_when_nothing_runs() -> None:
    task = make(end_running=T0 - timedelta(seconds=1), start_running=T0 - timedelta(days=1))
    assert engine.plan(task, T0, 0).action == engine.FINISH
    assert engine.plan(task, T0, 1).action == engine.SKIP


def test_plan_flags_a_broken_schedule() -> None:
    task = make()
    task.schedule = "61 * * * *"
    decision = engine.plan(task, T0)
    assert decision.action == engine.BROKEN and "minute" in decision.problem.lower()


# -- claim and publish ----------------------------------------------------------------------


def test_claim_inserts_runs_advances_next_run_and_publish_marks_them() -> None:
    tasks = [make(userdata={"n": n}) for n in range(3)]
    later = make(due=T0 + timedelta(seconds=5))
    stub = StubDispatcher()
    batch = dispatch(T0, stub)
    assert batch.examined == 3 and len(batch.runs) == 3
    for task in tasks:
        task.refresh_from_db()
        assert task.next_run == T0 + timedelta(seconds=1) and task.running
        assert runs_of(task) == [(T0, Run.PUBLISHED)]
    assert runs_of(later) == []
    run = Run.objects.get(task_id=tasks[0].pk)
    assert (run.beat, run.claimed_at, run.published_at, run.attempt) == (BEAT, T0, T0, 0)
    assert run.lease_until == T0 + timedelta(seconds=300)
    first = stub.sent[0]
    assert first.task_id == run_celery_id(tasks[0].pk, T0) == run.celery_id
    assert first.task_id == str(uuid.uuid5(RUN_ID_NAMESPACE, f"{tasks[0].pk}/{T0.isoformat()}"))
    assert first.args == [tasks[0].pk, tasks[0]._func_info, {"n": 0}, T0.isoformat()]
    assert first.headers == {"periodic_task_name": f"sisy:{tasks[0].pk}"}


def test_claim_batches_are_bounded_and_report_more() -> None:
    for _ in range(5):
        make()
    assert dispatch(T0, limit=3).examined == 3
    assert dispatch(T0, limit=3).examined == 2
    assert Run.objects.filter(state=Run.PUBLISHED).count() == 5


def test_routing_options_reach_the_message() -> None:
    task = make(queue="reports", priority=7, expires=30)
    stub = StubDispatcher()
    dispatch(T0, stub)
    (message,) = stub.sent
    assert (message.queue, message.priority, message.expires) == ("reports", 7, T0 + timedelta(seconds=30))
    assert message.key == Run.objects.get(task_id=task.pk).pk


def test_a_refused_message_parks_its_task_only() -> None:
    good, bad, other = make(), make(queue="fine"), make()
    stub = StubDispatcher(refuse=[bad.pk])
    dispatch(T0, stub)
    assert sorted(m.args[0] for m in stub.sent) == sorted([good.pk, other.pk])
    bad.refresh_from_db()
    assert bad.next_run == FAR_FUTURE and "refused" in bad.problem and "'fine'" in bad.problem
    assert not bad.running
    (run,) = Run.objects.filter(task_id=bad.pk)
    assert run.state == Run.LOST and "ACCESS_REFUSED" in run.error
    # the others go on: next tick their next slot goes out, the parked task stays parked
    stub2 = StubDispatcher()
    dispatch(T0 + timedelta(seconds=1), stub2)
    assert sorted(m.args[0] for m in stub2.sent) == sorted([good.pk, other.pk])
    # saving it with another queue resumes it
    bad.queue = "other"
    bad.save()
    bad.refresh_from_db()
    assert bad.problem == "" and bad.next_run < FAR_FUTURE


def test_broker_down_leaves_runs_claimed_and_another_beat_republishes_them() -> None:
    tasks = [make() for _ in range(4)]
    down = StubDispatcher(down_at=2)
    batch = engine.claim_due(T0, 100, BEAT)
    with pytest.raises(BrokerUnavailable):
        engine.publish(batch.runs, down, T0)
    assert Run.objects.filter(state=Run.CLAIMED).count() == 4
    assert engine.claim_stale(T0 + timedelta(seconds=5), 10, "beat-b:2", 100) == []
    stale = engine.claim_stale(T0 + timedelta(seconds=11), 10, "beat-b:2", 100)
    assert len(stale) == 4 and {run.beat for run in Run.objects.all()} == {"beat-b:2"}
    stub = StubDispatcher()
    assert engine.publish(stale, stub, T0 + timedelta(seconds=11)) == 4
    assert sorted(m.args[0] for m in stub.sent) == sorted(t.pk for t in tasks)
    assert {m.args[3] for m in stub.sent} == {T0.isoformat()}
    assert Run.objects.filter(state=Run.PUBLISHED).count() == 4
    # the re-published slots run once each, whichever copy comes first
    for task in tasks:
        assert run_to_end(task, T0, T0 + timedelta(seconds=12))
        assert isinstance(start(task, T0, T0 + timedelta(seconds=12)), engine.NotStarted)


def test_a_beat_losing_the_race_for_a_row_claims_nothing_for_it() -> None:
    """Two beats read the same due row; the one that writes second (SQLite's conditional path) wins
    nothing, so the slot has one run."""
    task = make()
    stale = engine.plan(Task.objects.get(pk=task.pk), T0)
    dispatch(T0)
    assert engine._write_conditional([stale]) == []
    assert runs_of(task) == [(T0, Run.PUBLISHED)]


def test_concurrent_beats_claim_disjoint_batches(transactional_db: None) -> None:
    """Two threads (two database connections) claim the same 40 due rows at once: 40 runs in all, one
    per slot, whatever the database's locking (SKIP LOCKED on PostgreSQL, conditional UPDATEs on SQLite)."""
    for _ in range(40):
        make()
    results: dict[str, int] = {}
    errors: list[BaseException] = []
    retried: list[str] = []
    barrier = threading.Barrier(2)

    def beat(name: str) -> None:
        try:
            barrier.wait()
            total = 0
            while True:
                try:
                    batch = engine.claim_due(T0, 7, name)
                except OperationalError as exc:
                    # SQLite serialises writers: a writer that finds the database locked gets an
                    # error, which beat treats as a database outage and retries.
                    if "locked" not in str(exc):
                        raise
                    retried.append(name)
                    time.sleep(0.01)
                    continue
                total += len(batch.runs)
                if batch.examined == 0:
                    break
            results[name] = total
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=beat, args=(name,)) for name in ("a:1", "b:2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert retried == [] or connection.vendor == "sqlite", "only SQLite reports a locked database"
    assert Run.objects.count() == 40 == sum(results.values())
    assert Run.objects.values("task_id", "slot").distinct().count() == 40


# -- the worker side ------------------------------------------------------------------------


def test_start_is_idempotent_and_copies_run_nothing() -> None:
    task = make()
    dispatch(T0)
    now = T0 + timedelta(seconds=0.2)
    first = start(task, T0, now)
    assert isinstance(first, engine.Started) and first.started_at == now
    copy = start(task, T0, now)
    assert isinstance(copy, engine.NotStarted) and copy.why == engine.RUNNING
    assert copy.lease_until == now + timedelta(seconds=300)
    run = Run.objects.get(task_id=task.pk)
    assert (run.state, run.attempt, run.worker, run.started_at) == (Run.STARTED, 1, "w1", now)
    assert engine.settle(first, "SUCCESS", "", now + timedelta(seconds=1), task)
    after = start(task, T0, now + timedelta(seconds=2))
    assert isinstance(after, engine.NotStarted) and after.why == engine.SETTLED
    assert start(task, T0 + timedelta(seconds=7), now).why == engine.UNKNOWN
    run.refresh_from_db()
    assert (run.state, run.attempt, run.finished_at) == (Run.SUCCEEDED, 1, now + timedelta(seconds=1))


def test_a_message_for_a_disabled_or_deleted_task_runs_nothing_and_frees_the_task() -> None:
    disabled, deleted = make(), make()
    dispatch(T0)
    Task.objects.filter(pk=disabled.pk).update(enabled=False)
    for task in (disabled, deleted):
        row = Task.objects.get(pk=task.pk)
        if task is deleted:
            Task.objects.filter(pk=task.pk).delete()
        result = engine.start(row, T0, "w1", T0)
        assert isinstance(result, engine.NotStarted) and result.why == engine.DISABLED
        assert runs_of(task) == [(T0, Run.REVOKED)]
    assert not Task.objects.get(pk=disabled.pk).running


def test_overlap_off_a_second_run_never_starts_while_one_runs() -> None:
    task = make(allow_overlap=False)
    dispatch(T0)
    assert isinstance(start(task, T0, T0), engine.Started)
    # a run of another slot claimed behind beat's back (run now on SQLite racing beat)
    Run.objects.create(task=task, slot=T0 + timedelta(seconds=1), state=Run.PUBLISHED, claimed_at=T0)
    refused = start(task, T0 + timedelta(seconds=1), T0 + timedelta(seconds=1))
    assert isinstance(refused, engine.NotStarted) and refused.why == engine.OVERLAP
    assert runs_of(task)[1] == (T0 + timedelta(seconds=1), Run.REVOKED)


def test_a_redelivered_attempt_starts_again_only_once_the_lease_lapsed() -> None:
    task = make()
    dispatch(T0)
    first = start(task, T0, T0, worker="dead")
    assert isinstance(first, engine.Started)
    lease_end = T0 + timedelta(seconds=300)
    assert start(task, T0, lease_end - timedelta(seconds=1)).why == engine.RUNNING
    second = start(task, T0, lease_end + timedelta(seconds=1), worker="w2")
    assert isinstance(second, engine.Started)
    run = Run.objects.get(task_id=task.pk)
    assert (run.attempt, run.worker) == (2, "w2")
    # the dead attempt can no longer settle (or renew) the run; the live one can
    assert engine.renew([first], lease_end) == 0
    assert not engine.settle(first, "SUCCESS", "", lease_end + timedelta(seconds=2), task)
    assert engine.settle(second, "SUCCESS", "", lease_end + timedelta(seconds=2), task)


@pytest.mark.parametrize("iterations", [0, 3])  # recurring (one statement on PostgreSQL) and counted down
def test_settle_records_outcome_last_run_and_running(iterations: int) -> None:
    task = make(iterations=iterations)
    dispatch(T0)
    started = start(task, T0, T0 + timedelta(seconds=0.5))
    assert engine.settle(started, "FAILURE", "RuntimeError: boom", T0 + timedelta(seconds=2), task)
    task.refresh_from_db()
    assert (task.last_run, task.last_status, task.running, task.iterations) == (
        T0 + timedelta(seconds=0.5), "FAILURE", False, max(0, iterations - 1))
    run = Run.objects.get(task_id=task.pk)
    assert (run.state, run.error, run.lease_until, run.finished_at) == (
        Run.FAILED, "RuntimeError: boom", None, T0 + timedelta(seconds=2))
    assert run.lateness == timedelta(seconds=0.5)
    assert not engine.settle(started, "SUCCESS", "", T0 + timedelta(seconds=3), task), "settled twice"


@pytest.mark.parametrize("keep", [False, True])
def test_iterations_exactly_n_with_overlap_and_concurrent_runs(keep: bool) -> None:
    """iterations=3 with overlap: at most 3 runs are ever unsettled at once, each settle counts one,
    and the third finishes the task, whatever order they end in; a 4th slot is never claimed."""
    task = make(iterations=3)
    with override_settings(SISY_KEEP_FINISHED_TASKS=keep):
        starts = []
        for second in range(6):
            now = T0 + timedelta(seconds=second)
            dispatch(now)
            for slot, state in runs_of(task):
                if state == Run.PUBLISHED:
                    starts.append(start(task, slot, now))
        assert len(starts) == 3 and all(isinstance(s, engine.Started) for s in starts)
        # the run that finishes the task started first: last_run stays the latest start
        for index, outcome in ((1, "SUCCESS"), (2, "SUCCESS"), (0, "FAILURE")):
            assert engine.settle(starts[index], outcome, "", T0 + timedelta(seconds=7), task)
        remaining = Task.objects.filter(pk=task.pk).first()
        if keep:
            assert (remaining.enabled, remaining.running, remaining.finished_at is not None) == (False, False, True)
            # the last settlement finished the task and still counted: the latest start, the last outcome
            assert (remaining.last_run, remaining.last_status) == (T0 + timedelta(seconds=2), "FAILURE")
        else:
            assert remaining is None
        assert sorted(Run.objects.filter(task_id=task.pk).values_list("state", flat=True)) == [
            Run.FAILED, Run.SUCCEEDED, Run.SUCCEEDED]
        assert dispatch(T0 + timedelta(seconds=8)).runs == []


def test_end_running_finishes_the_task_after_its_last_run() -> None:
    task = make(start_running=T0 - timedelta(days=1), end_running=T0 + timedelta(seconds=0.5))
    dispatch(T0)
    started = start(task, T0, T0)
    # the next slot is past the end, but a run is still going: the task is not finished yet
    assert dispatch(T0 + timedelta(seconds=1)).runs == []
    assert Task.objects.filter(pk=task.pk).exists()
    engine.settle(started, "SUCCESS", "", T0 + timedelta(seconds=2), task)
    assert not Task.objects.filter(pk=task.pk).exists()


def test_renew_extends_only_the_runs_of_this_start() -> None:
    a, b = make(), make()
    dispatch(T0)
    run_a = start(a, T0, T0)
    start(b, T0, T0)
    assert engine.renew([run_a], T0 + timedelta(seconds=100)) == 1
    leases = dict(Run.objects.values_list("task_id", "lease_until"))
    assert leases == {a.pk: T0 + timedelta(seconds=400), b.pk: T0 + timedelta(seconds=300)}
    assert engine.renew([], T0) == 0


def test_revoke_settles_its_own_unstarted_run_only() -> None:
    a = make()
    dispatch(T0)
    dispatch(T0 + timedelta(seconds=1))
    assert isinstance(start(a, T0, T0 + timedelta(seconds=1)), engine.Started)
    # an expired (or forged expired) message for the running slot changes nothing
    assert not engine.revoke(a.pk, T0, T0 + timedelta(seconds=2), "expired before it started")
    assert engine.revoke(a.pk, T0 + timedelta(seconds=1), T0 + timedelta(seconds=2), "expired before it started")
    assert runs_of(a) == [(T0, Run.STARTED), (T0 + timedelta(seconds=1), Run.REVOKED)]
    assert Task.objects.get(pk=a.pk).running


# -- upkeep ---------------------------------------------------------------------------------


def test_lapse_settles_lost_runs_and_frees_their_tasks() -> None:
    queued, running, alive = make(allow_overlap=False), make(allow_overlap=False), make()
    dispatch(T0)
    start(running, T0, T0)
    start(alive, T0, T0)
    later = T0 + timedelta(seconds=200)
    engine.renew([engine.Started(alive.pk, T0, T0)], later)
    assert engine.lapse(T0 + timedelta(seconds=299), 100) == 0
    # within the grace a redelivered copy may still take the lapsed run over
    assert engine.lapse(T0 + timedelta(seconds=301), 100, grace=5) == 0
    assert engine.lapse(T0 + timedelta(seconds=301), 100) == 2
    states = dict(Run.objects.values_list("task_id", "state"))
    assert states == {queued.pk: Run.LOST, running.pk: Run.LOST, alive.pk: Run.STARTED}
    assert "not started" in Run.objects.get(task_id=queued.pk).error
    assert "stopped renewing" in Run.objects.get(task_id=running.pk).error
    assert not Task.objects.get(pk=running.pk).running and Task.objects.get(pk=alive.pk).running
    # the overlap-off tasks whose runs were lost take their next slot again
    assert {run.task_id for run in dispatch(T0 + timedelta(seconds=302)).runs} >= {queued.pk, running.pk}
    # the lost run's late message runs nothing
    assert start(queued, T0, T0 + timedelta(seconds=303)).why == engine.SETTLED


def test_a_run_that_ends_after_its_lease_lapsed_records_its_outcome_but_no_iteration() -> None:
    task = make(iterations=2)
    dispatch(T0)
    started = start(task, T0, T0)
    engine.lapse(T0 + timedelta(seconds=400), 100)
    assert not engine.settle(started, "SUCCESS", "", T0 + timedelta(seconds=401), task)
    run = Run.objects.get(task_id=task.pk)
    assert run.state == Run.SUCCEEDED and "lease had lapsed" in run.error
    assert Task.objects.get(pk=task.pk).iterations == 2


def test_purge_deletes_settled_runs_in_bounded_batches() -> None:
    task = make()
    for second in range(5):
        now = T0 + timedelta(seconds=second)
        dispatch(now)
        run_to_end(task, now, now)
    dispatch(T0 + timedelta(seconds=5))  # one unsettled run: never purged
    assert engine.purge(T0 + timedelta(seconds=1), 3) == 1, "only runs claimed before the cutoff"
    cutoff = T0 + timedelta(days=1)
    assert engine.purge(cutoff, 3) == 3
    assert engine.purge(cutoff, 3) == 1
    assert engine.purge(cutoff, 3) == 0
    assert runs_of(task) == [(T0 + timedelta(seconds=5), Run.PUBLISHED)]


def test_abandon_gives_up_unsettled_runs() -> None:
    task = make()
    dispatch(T0)
    start(task, T0, T0)
    assert engine.abandon([task.pk], T0, "cleared by admin") == 1
    assert runs_of(task) == [(T0, Run.LOST)] and not Task.objects.get(pk=task.pk).running


def test_claim_now_follows_beats_rules() -> None:
    task = make(allow_overlap=False, due=None)
    run = engine.claim_now(task, T0, "admin:alice")
    assert (run.state, run.beat, run.slot) == (Run.CLAIMED, "admin:alice", T0)
    assert Task.objects.get(pk=task.pk).running
    with pytest.raises(engine.TaskBusy, match="already running"):
        engine.claim_now(task, T0 + timedelta(seconds=1), "admin:alice")
    limited = make(iterations=1, due=None)
    engine.publish([engine.claim_now(limited, T0, "x")], StubDispatcher(), T0)
    with pytest.raises(engine.TaskBusy):
        engine.claim_now(limited, T0 + timedelta(seconds=1), "x")
    # a run beat claimed and has not published yet counts as unfinished
    pending = make(allow_overlap=False)
    engine.claim_due(T0, 100, BEAT)
    with pytest.raises(engine.TaskBusy, match="already running"):
        engine.claim_now(pending, T0 + timedelta(seconds=1), "x")
    # overlap off: a run whose lease lapsed holds it back until beat settles it as lost; then it goes
    solo = make(allow_overlap=False, due=None)
    engine.publish([engine.claim_now(solo, T0, "x")], StubDispatcher(), T0)
    assert isinstance(start(solo, T0, T0), engine.Started)
    with pytest.raises(engine.TaskBusy):
        engine.claim_now(solo, T0 + timedelta(seconds=400), "x")
    engine.lapse(T0 + timedelta(seconds=400), 100)
    assert engine.claim_now(solo, T0 + timedelta(seconds=401), "x").state == Run.CLAIMED
    off = make(due=None, enabled=False)
    with pytest.raises(engine.TaskBusy, match="is disabled"):
        engine.claim_now(off, T0, "x")
    gone = make(due=None)
    Task.objects.filter(pk=gone.pk).delete()
    with pytest.raises(engine.TaskBusy, match="no longer exists"):
        engine.claim_now(gone, T0, "x")


# -- DST, with one clock for beat and worker -----------------------------------------------


def test_the_claim_counts_an_interval_from_the_task_start_as_the_model_does() -> None:
    """The claim reads due rows as plain values, not Task instances: an interval's slots still count
    from ``start_running``, as ``Task.following_run`` counts them."""
    start = T0 - timedelta(seconds=100)
    task = make(schedule="every 90s", start_running=start)
    assert [run.slot for run in dispatch(T0).runs] == [T0]
    moved = Task.objects.get(pk=task.pk)
    assert moved.next_run == start + timedelta(seconds=180) == moved.following_run(T0)


def test_the_claim_reads_the_schedule_in_the_task_zone_as_the_model_does() -> None:
    """9:00 in Kolkata (UTC+05:30) is 03:30 UTC, whatever zone the project is configured in."""
    slot = datetime(2030, 6, 1, 3, 30, tzinfo=UTC)
    task = make(schedule="0 9 * * *", timezone="Asia/Kolkata", due=slot)
    assert [run.slot for run in dispatch(slot).runs] == [slot]
    moved = Task.objects.get(pk=task.pk)
    assert moved.next_run == slot + timedelta(days=1) == moved.following_run(slot)


@pytest.mark.parametrize("night, schedule, expected_local", [
    # spring forward: 02:30 does not exist; it runs at the first instant after the gap, once
    (datetime(2030, 3, 10, 5, 0, tzinfo=UTC), "30 2 * * *", ["03:00"]),
    # fall back: 01:30 happens twice; a fixed-hour slot runs once
    (datetime(2030, 11, 3, 4, 0, tzinfo=UTC), "30 1 * * *", ["01:30"]),
    # fall back: a wildcard-hour slot runs in both copies of the repeated hour
    (datetime(2030, 11, 3, 4, 0, tzinfo=UTC), "45 * * * *", ["00:45", "01:45", "01:45", "02:45"]),
])
def test_dst_nights_run_each_slot_once(night: datetime, schedule: str, expected_local: list[str]) -> None:
    zone = ZoneInfo("America/New_York")
    task = make(schedule=schedule, timezone="America/New_York", due=None)
    Task.objects.filter(pk=task.pk).update(next_run=task.following_run(night))
    ran = []
    for minute in range(0, 4 * 60):
        now = night + timedelta(minutes=minute)
        for run in dispatch(now).runs:
            assert run_to_end(task, run.slot, now + timedelta(seconds=1))
            ran.append(run.slot)
    assert [slot.astimezone(zone).strftime("%H:%M") for slot in ran] == expected_local
    assert len(set(ran)) == len(ran)
    assert Run.objects.filter(task_id=task.pk, state=Run.SUCCEEDED).count() == len(expected_local)


def test_claim_finishes_tasks_past_their_end_and_flags_broken_rows() -> None:
    ended = make(start_running=T0 - timedelta(days=1), end_running=T0 - timedelta(seconds=1))
    broken = make()
    Task.objects.filter(pk=broken.pk).update(schedule="every full moon")
    fine = make()
    batch = dispatch(T0)
    assert [run.task_id for run in batch.runs] == [fine.pk]
    assert {d.task.pk: d.action for d in batch.decisions} == {ended.pk: engine.FINISH, broken.pk: engine.BROKEN,
                                                             fine.pk: engine.SEND}
    assert not Task.objects.filter(pk=ended.pk).exists()
    broken.refresh_from_db()
    assert broken.next_run == FAR_FUTURE and broken.problem and runs_of(broken) == []


def test_a_claimed_run_whose_task_was_deleted_is_revoked_not_published() -> None:
    task, other = make(), make()
    engine.claim_due(T0, 100, BEAT)
    Task.objects.filter(pk=task.pk).delete()
    stale = engine.claim_stale(T0 + timedelta(seconds=11), 10, BEAT, 100)
    assert [run.task_id for run in stale] == [other.pk]
    assert runs_of(task) == [(T0, Run.REVOKED)]


# -- what a run costs the worker ----------------------------------------------------------------

#: Statements of one run of a recurring task in the worker (load the task, start, settle): on
#: PostgreSQL the settlement is one data-modifying WITH statement; elsewhere it is a transaction
#: (here a savepoint, as tests run inside one) of two UPDATEs.
WORKER_STATEMENTS = {"postgresql": ["SELECT", "UPDATE", "WITH"],
                     "sqlite": ["SELECT", "UPDATE", "SAVEPOINT", "UPDATE", "UPDATE", "RELEASE"]}


def test_a_run_of_a_recurring_task_costs_the_worker_its_statements_and_no_more() -> None:
    from django.test.utils import CaptureQueriesContext

    from sisy_celery.tasks import run_callable

    task = make()
    dispatch(T0)
    with CaptureQueriesContext(connection) as captured:
        result = run_callable.apply(args=[task.pk, task._func_info, task._extra_data, T0.isoformat()])
    assert result.get() == "ok"
    assert [query["sql"].split()[0] for query in captured] == WORKER_STATEMENTS[connection.vendor], captured
    task.refresh_from_db()
    run = Run.objects.get(task_id=task.pk)
    assert (task.last_status, task.running, task.last_run) == ("SUCCESS", False, run.started_at)
    assert (run.slot, run.state) == (T0, Run.SUCCEEDED)


@pytest.mark.filterwarnings("ignore:Exception raised outside body:RuntimeWarning")  # Celery's, for the store
def test_a_failed_run_records_the_callables_error_when_the_result_backend_is_down(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker stores a failure in the result backend before ``task_postrun``; when that store fails,
    Celery's postrun carries no return value and no state. The run still records the callable's error."""
    from celery.app.trace import build_tracer

    from sisy_celery.tasks import run_callable

    task = make(the_callable=jobs.failing)
    dispatch(T0)

    def backend_down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("result backend unreachable")

    monkeypatch.setattr(run_callable.backend, "mark_as_failure", backend_down)
    trace = build_tracer(run_callable.name, run_callable, eager=False, propagate=False, app=run_callable.app)
    with pytest.raises(ConnectionError):  # Celery's tracer tries the store again and gives up: the worker logs it
        trace(run_celery_id(task.pk, T0), [task.pk, task._func_info, task._extra_data, T0.isoformat()], {},
              {"hostname": "w1"})
    run = Run.objects.get(task_id=task.pk)
    assert (run.state, run.error) == (Run.FAILED, "RuntimeError: boom")


def test_settling_a_recurring_run_keeps_running_while_another_run_of_it_is_unsettled() -> None:
    task = make()
    dispatch(T0)
    dispatch(T0 + timedelta(seconds=1))
    first, second = start(task, T0, T0), start(task, T0 + timedelta(seconds=1), T0 + timedelta(seconds=1))
    assert engine.settle(second, "SUCCESS", "", T0 + timedelta(seconds=2), task)
    task.refresh_from_db()
    assert (task.running, task.last_run, task.last_status) == (True, T0 + timedelta(seconds=1), "SUCCESS")
    # the earlier start ends last: last_run stays the latest start, and nothing is unsettled now
    assert engine.settle(first, "FAILURE", "ValueError: x", T0 + timedelta(seconds=3), task)
    task.refresh_from_db()
    assert (task.running, task.last_run, task.last_status) == (False, T0 + timedelta(seconds=1), "FAILURE")
    assert runs_of(task) == [(T0, Run.FAILED), (T0 + timedelta(seconds=1), Run.SUCCEEDED)]


def test_a_recurring_run_settled_late_or_after_its_task_was_deleted() -> None:
    late, deleted = make(), make()
    dispatch(T0)
    late_start, deleted_start = start(late, T0, T0), start(deleted, T0, T0)
    engine.lapse(T0 + timedelta(seconds=400), 100)
    assert not engine.settle(late_start, "SUCCESS", "", T0 + timedelta(seconds=401), late)
    run = Run.objects.get(task_id=late.pk)
    assert run.state == Run.SUCCEEDED and run.error.startswith("finished after its lease had lapsed")
    assert Task.objects.get(pk=late.pk).last_status == ""
    # (a lapsed run was settled lost; one whose task is gone is settled all the same)
    Run.objects.filter(task_id=deleted.pk).update(state=Run.STARTED, lease_until=T0 + timedelta(seconds=900))
    Task.objects.filter(pk=deleted.pk).delete()
    assert engine.settle(deleted_start, "SUCCESS", "", T0 + timedelta(seconds=402), deleted)
    assert runs_of(deleted) == [(T0, Run.SUCCEEDED)]


# -- exact outcomes: texts stored, timestamps, which rows a write touches ---------------------


def logged(caplog: pytest.LogCaptureFixture, level: str) -> list[str]:
    """The messages the engine logged at ``level``."""
    return [record.getMessage() for record in caplog.records
            if record.name == "sisy_celery.engine" and record.levelname == level]


@pytest.mark.parametrize("text, stored", [
    ("x" * 300, "x" * 300),
    ("x" * 301, "x" * 297 + "..."),
    ("y" * 1000, "y" * 297 + "..."),
])
def test_short_keeps_300_characters_and_marks_a_cut(text: str, stored: str) -> None:
    assert engine._short(text) == stored


def test_a_long_reason_is_stored_cut_to_the_column() -> None:
    task = make()
    dispatch(T0)
    assert engine.abandon([task.pk], T0, "z" * 400) == 1
    assert Run.objects.get(task_id=task.pk).error == "z" * 297 + "..."


def test_plan_at_the_end_running_slot_still_sends_and_keeps_slots() -> None:
    """``end_running`` is the last instant a slot may run; the decisions carry the slot they are about."""
    last = make(start_running=T0 - timedelta(days=1), end_running=T0)
    decision = engine.plan(last, T0)
    assert (decision.action, decision.slot) == (engine.SEND, T0)
    ended = make(start_running=T0 - timedelta(days=1), end_running=T0 - timedelta(seconds=1))
    assert (engine.plan(ended, T0).action, engine.plan(ended, T0).slot) == (engine.FINISH, T0)
    broken = make()
    broken.schedule = "61 * * * *"
    assert (engine.plan(broken, T0).action, engine.plan(broken, T0).slot) == (engine.BROKEN, T0)


def test_claim_logs_skipped_finished_and_flagged_tasks(caplog: pytest.LogCaptureFixture) -> None:
    """A sent slot logs nothing; a skip and a finish are logged at INFO, a broken row at ERROR, each with
    the task's id and label and what decided it."""
    busy = make(allow_overlap=False, label="solo")
    dispatch(T0)
    end = T0 + timedelta(seconds=0.5)
    ended = make(start_running=T0 - timedelta(days=1), end_running=end, label="ended", due=T0 + timedelta(seconds=1))
    broken = make(label="moon", due=T0 + timedelta(seconds=1))
    Task.objects.filter(pk=broken.pk).update(schedule="every full moon")
    make(label="fine", due=T0 + timedelta(seconds=1))
    caplog.clear()
    with caplog.at_level("INFO", logger="sisy_celery.engine"):
        dispatch(T0 + timedelta(seconds=1))
    slot = (T0 + timedelta(seconds=1)).isoformat()
    skipped, finished = sorted(logged(caplog, "INFO"), key=lambda message: f"id={busy.pk} " not in message)
    assert skipped.startswith(f"sisy task id={busy.pk} label='solo': slot {slot} skipped")
    assert skipped.endswith(f"(next {(T0 + timedelta(seconds=2)).isoformat()})")
    assert finished.startswith(f"sisy task id={ended.pk} label='ended' finished: end_running {end.isoformat()} ")
    problem = Task.objects.get(pk=broken.pk).problem
    assert problem and logged(caplog, "ERROR") == [
        f"sisy task id={broken.pk} label='moon' flagged and not scheduled: {problem}"]


def test_unsettled_counts_only_the_tasks_asked_for() -> None:
    a, b = make(), make()
    dispatch(T0)
    assert engine.unsettled_counts([a.pk]) == {a.pk: 1}
    assert engine.unsettled_counts([]) == {}


def test_a_beat_whose_read_is_overtaken_by_another_claim_wins_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without row locks (SQLite) claim_due writes conditionally: a beat that read a due row another beat
    has claimed since neither inserts a second run nor moves ``next_run`` again. (The conditional
    path is taken on every database here, PostgreSQL included, where SKIP LOCKED would be used.)"""
    monkeypatch.setattr(connection.features, "has_select_for_update_skip_locked", False)
    task = make()
    plan = engine.plan
    overtaken: list[engine.Batch] = []

    def other_beat_first(*args: Any) -> engine.Decision:
        """Beat B claims the rows beat A has just read, before A decides."""
        monkeypatch.setattr(engine, "plan", plan)
        overtaken.append(engine.claim_due(T0, 100, "beat-b:2"))
        return plan(*args)

    monkeypatch.setattr(engine, "plan", other_beat_first)
    batch = engine.claim_due(T0, 100, BEAT)
    assert (batch.examined, batch.runs, batch.decisions) == (1, [], [])
    assert [Run.objects.get(pk=run.pk).beat for run in overtaken[0].runs] == ["beat-b:2"]
    assert runs_of(task) == [(T0, Run.CLAIMED)]
    assert Task.objects.get(pk=task.pk).next_run == T0 + timedelta(seconds=1)


def test_a_finish_decision_lost_to_another_beat_is_not_won() -> None:
    ended = make(start_running=T0 - timedelta(days=1), end_running=T0 - timedelta(seconds=1))
    stale = engine.plan(Task.objects.get(pk=ended.pk), T0)
    assert stale.action == engine.FINISH
    dispatch(T0)
    assert engine._write_conditional([stale]) == []


def test_the_locked_writer_applies_every_decision_to_its_own_row() -> None:
    """The locked path's writer (PostgreSQL, rows held by the claim's SKIP LOCKED select) writes rows due
    together with one UPDATE per set of values: each row still gets exactly its own decision."""
    sends = [make() for _ in range(2)]
    minute = make(schedule="* * * * *")
    solo = make(allow_overlap=False)
    ended = make(start_running=T0 - timedelta(days=1), end_running=T0 - timedelta(seconds=1))
    broken = make()
    broken.schedule = "61 * * * *"
    decisions = [engine.plan(task, T0) for task in (*sends, minute, ended, broken)] + [engine.plan(solo, T0, 1)]
    assert [d.action for d in decisions] == [engine.SEND] * 3 + [engine.FINISH, engine.BROKEN, engine.SKIP]
    with transaction.atomic():
        assert engine._write_locked(decisions) == decisions
    rows = {task.pk: task for task in Task.objects.all()}
    assert ended.pk not in rows
    assert [(rows[t.pk].next_run, rows[t.pk].running) for t in sends] == [(T0 + timedelta(seconds=1), True)] * 2
    assert (rows[minute.pk].next_run, rows[minute.pk].running) == (T0 + timedelta(minutes=1), True)
    assert (rows[solo.pk].next_run, rows[solo.pk].running) == (T0 + timedelta(seconds=1), False)
    assert (rows[broken.pk].next_run, rows[broken.pk].problem) == (FAR_FUTURE, decisions[4].problem)
    assert decisions[4].problem


def test_publish_of_nothing_sends_nothing() -> None:
    stub = StubDispatcher()
    assert engine.publish([], stub, T0) == 0 and stub.sent == []


def test_a_late_publish_does_not_step_back_a_run_already_started() -> None:
    """Beat's publish marks only runs still claimed: a copy published by another beat may have started."""
    task = make()
    batch = engine.claim_due(T0, 100, BEAT)
    assert isinstance(start(task, T0, T0 + timedelta(seconds=1)), engine.Started)
    assert engine.publish(batch.runs, StubDispatcher(), T0 + timedelta(seconds=2)) == 1
    run = Run.objects.get(task_id=task.pk)
    assert (run.state, run.published_at) == (Run.STARTED, None)


def test_a_refused_message_settles_only_its_run_and_names_the_default_queue(
        caplog: pytest.LogCaptureFixture) -> None:
    bad, waiting_run = make(label="nightly"), make()
    batch = engine.claim_due(T0, 100, BEAT)
    now = T0 + timedelta(seconds=1)
    with caplog.at_level("ERROR", logger="sisy_celery.engine"):
        sent = engine.publish([run for run in batch.runs if run.task_id == bad.pk], StubDispatcher(refuse=[bad.pk]),
                              now)
    assert sent == 0
    run = Run.objects.get(task_id=bad.pk)
    assert (run.state, run.finished_at, run.error) == (Run.LOST, now, "refused by the broker: ACCESS_REFUSED")
    assert runs_of(waiting_run) == [(T0, Run.CLAIMED)], "another task's claimed run is not touched"
    bad.refresh_from_db()
    assert bad.problem == "The broker refused the message for queue '(default)': ACCESS_REFUSED"
    (message,) = logged(caplog, "ERROR")
    assert message.startswith(f"sisy task id={bad.pk} label='nightly' queue='' ")
    assert message.endswith("(ACCESS_REFUSED)")


def test_park_leaves_a_run_that_already_started_alone() -> None:
    """A refusal reported for a run another beat's copy already started flags the task, not the run."""
    task = make(queue="gone")
    batch = engine.claim_due(T0, 100, BEAT)
    assert isinstance(start(task, T0, T0), engine.Started)
    engine.park(batch.runs[0], "NOT_FOUND", T0 + timedelta(seconds=1))
    assert runs_of(task) == [(T0, Run.STARTED)]
    task.refresh_from_db()
    assert task.next_run == FAR_FUTURE and task.problem.endswith("'gone': NOT_FOUND") and task.running


def test_claim_stale_takes_over_only_stale_claimed_runs_up_to_the_limit(caplog: pytest.LogCaptureFixture) -> None:
    old = [make(schedule="* * * * *", label=f"old{n}") for n in range(2)]
    published = make(schedule="* * * * *")
    engine.claim_due(T0, 100, BEAT)
    engine.publish([r for r in Run.objects.select_related("task") if r.task_id == published.pk], StubDispatcher(), T0)
    fresh = make(due=T0 + timedelta(seconds=8))
    engine.claim_due(T0 + timedelta(seconds=8), 100, "beat-c:3")
    now = T0 + timedelta(seconds=11)
    with caplog.at_level("WARNING", logger="sisy_celery.engine"):
        stale = engine.claim_stale(now, 10, "beat-b:2", 1)
    assert [run.task_id for run in stale] == [old[0].pk] and stale[0].task.label == "old0"
    beats = {task_id: (state, beat, claimed_at) for task_id, state, beat, claimed_at
             in Run.objects.values_list("task_id", "state", "beat", "claimed_at")}
    assert beats == {old[0].pk: (Run.CLAIMED, "beat-b:2", now), old[1].pk: (Run.CLAIMED, BEAT, T0),
                     published.pk: (Run.PUBLISHED, BEAT, T0),
                     fresh.pk: (Run.CLAIMED, "beat-c:3", T0 + timedelta(seconds=8))}
    (message,) = logged(caplog, "WARNING")
    assert message.startswith(f"sisy task id={old[0].pk} label='old0': run for slot {T0.isoformat()} "
                              f"was claimed by {BEAT} ")
    assert message.endswith("publishing it now")
    # taken over just now: not stale again for another ``older_than``
    assert [run.task_id for run in engine.claim_stale(now + timedelta(seconds=5), 10, "beat-d:4", 100)] == [
        old[1].pk]


def test_a_claimed_run_of_a_deleted_task_is_revoked_with_its_reason() -> None:
    task = make()
    engine.claim_due(T0, 100, BEAT)
    Task.objects.filter(pk=task.pk).delete()
    now = T0 + timedelta(seconds=11)
    assert engine.claim_stale(now, 10, BEAT, 100) == []
    run = Run.objects.get(task_id=task.pk)
    assert (run.state, run.finished_at, run.error) == (
        Run.REVOKED, now, "its task was deleted before the run was published")


def test_lapse_records_when_and_why_and_respects_the_limit(caplog: pytest.LogCaptureFixture) -> None:
    queued, running = make(), make()
    for second in range(2):  # more runs than tasks: run and task ids differ
        dispatch(T0 + timedelta(seconds=second))
    start(running, T0, T0)
    start(running, T0 + timedelta(seconds=1), T0 + timedelta(seconds=1))
    now = T0 + timedelta(seconds=400)
    with caplog.at_level("WARNING", logger="sisy_celery.engine"):
        assert engine.lapse(now, 3) == 3
    lost = {(r.task_id, r.slot): r for r in Run.objects.filter(state=Run.LOST)}
    assert len(lost) == 3 and Run.objects.exclude(state=Run.LOST).count() == 1
    published_why = "not started by any worker before its lease lapsed (message lost, or no worker)"
    started_why = "its worker stopped renewing the lease (worker lost)"
    for run in lost.values():
        assert (run.finished_at, run.lease_until) == (now, None)
        assert run.error == (published_why if run.task_id == queued.pk else started_why)
    messages = logged(caplog, "WARNING")
    assert len(messages) == 3
    for (task_pk, slot), run in lost.items():
        suffix = f"{published_why}" if task_pk == queued.pk else f"{started_why} (w1)"
        assert f"sisy task id={task_pk}: run for slot {slot.isoformat()} lost: {suffix}" in messages


def test_a_lease_renewed_while_lapse_decides_keeps_its_run(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """lapse reads the lapsed runs, then settles each only if its lease is still lapsed: a worker that
    renews between the read and the write keeps its run."""
    task = make()
    dispatch(T0)
    started = start(task, T0, T0)
    now = T0 + timedelta(seconds=400)
    atomic = transaction.atomic

    def renewed_first() -> Any:
        assert engine.renew([started], now) == 1
        return atomic()

    monkeypatch.setattr(engine, "transaction", SimpleNamespace(atomic=renewed_first))
    with caplog.at_level("WARNING", logger="sisy_celery.engine"):
        assert engine.lapse(now, 100) == 0, "the renewed run is not counted as lost"
    assert caplog.records == [], "nor logged as lost"
    run = Run.objects.get(task_id=task.pk)
    assert (run.state, run.lease_until) == (Run.STARTED, now + timedelta(seconds=300))
    assert Task.objects.get(pk=task.pk).running


def test_a_late_outcome_is_recorded_with_its_time_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    task = make()
    dispatch(T0)
    started = start(task, T0, T0)
    engine.lapse(T0 + timedelta(seconds=400), 100)
    caplog.clear()
    with caplog.at_level("WARNING", logger="sisy_celery.engine"):
        assert not engine.settle(started, "FAILURE", "boom", T0 + timedelta(seconds=401), task)
    run = Run.objects.get(task_id=task.pk)
    assert (run.state, run.finished_at) == (Run.FAILED, T0 + timedelta(seconds=401))
    assert run.error == "finished after its lease had lapsed; not counted as an iteration. boom"
    (message,) = logged(caplog, "WARNING")
    assert message.startswith(f"sisy task id={task.pk}: run for slot {T0.isoformat()} finished after its lease")
    assert message.endswith("it uses no iteration")


def test_settle_an_unknown_celery_state_as_failed() -> None:
    task = make()
    dispatch(T0)
    assert engine.settle(start(task, T0, T0), "REVOKED", "", T0 + timedelta(seconds=1), task)
    assert Run.objects.get(task_id=task.pk).state == Run.FAILED
    assert Task.objects.get(pk=task.pk).last_status == "REVOKED"


def test_settle_touches_only_the_run_it_names() -> None:
    """Two tasks' runs of the same slot, and two slots of one task, started at the same instant."""
    a, b = make(), make()
    dispatch(T0)
    dispatch(T0 + timedelta(seconds=1))
    now = T0 + timedelta(seconds=2)
    started = {(task.pk, slot): start(task, slot, now) for task in (a, b) for slot in (T0, T0 + timedelta(seconds=1))}
    assert engine.settle(started[(a.pk, T0)], "SUCCESS", "", now, a)
    assert dict(Run.objects.filter(task_id=a.pk).values_list("slot", "state")) == {
        T0: Run.SUCCEEDED, T0 + timedelta(seconds=1): Run.STARTED}
    assert set(Run.objects.filter(task_id=b.pk).values_list("state", flat=True)) == {Run.STARTED}
    # the task still has a run going, the other task is untouched
    assert (Task.objects.get(pk=a.pk).running, Task.objects.get(pk=b.pk).last_status) == (True, "")


def test_settle_counts_an_iteration_and_records_the_outcome() -> None:
    task, other = make(iterations=2), make()
    dispatch(T0)
    started = start(task, T0, T0 + timedelta(seconds=0.5))
    assert engine.settle(started, "SUCCESS", "", T0 + timedelta(seconds=1), task)
    task.refresh_from_db()
    assert (task.iterations, task.last_status, task.last_run, task.running, task.enabled) == (
        1, "SUCCESS", T0 + timedelta(seconds=0.5), False, True)
    assert Task.objects.get(pk=other.pk).running, "another task's unsettled run keeps only that task running"


def test_settle_logs_the_finish_by_iterations_and_by_end_running(caplog: pytest.LogCaptureFixture) -> None:
    counted = make(iterations=1)
    ending = make(start_running=T0 - timedelta(days=1), end_running=T0 + timedelta(seconds=0.5))
    dispatch(T0)
    with caplog.at_level("INFO", logger="sisy_celery.engine"):
        assert run_to_end(counted, T0, T0 + timedelta(seconds=1))
        assert dispatch(T0 + timedelta(seconds=1)).runs == []
        assert run_to_end(ending, T0, T0 + timedelta(seconds=1))
    assert not Task.objects.filter(pk__in=[counted.pk, ending.pk]).exists()
    finishes = [message for message in logged(caplog, "INFO") if "finished:" in message]
    assert finishes == [f"sisy task id={counted.pk} finished: its last iteration ran",
                        f"sisy task id={ending.pk} finished: its end_running has passed"]


def test_end_running_waits_for_every_run_and_only_for_a_passed_end() -> None:
    task = make(start_running=T0 - timedelta(days=1), end_running=T0 + timedelta(seconds=1.5))
    early = make(schedule="* * * * *", start_running=T0 - timedelta(days=1), end_running=T0 + timedelta(days=1))
    dispatch(T0)
    dispatch(T0 + timedelta(seconds=1))
    first, second = (start(task, slot, T0 + timedelta(seconds=1)) for slot in (T0, T0 + timedelta(seconds=1)))
    assert run_to_end(early, T0, T0 + timedelta(seconds=1))
    assert Task.objects.filter(pk=early.pk).exists(), "end_running has not passed"
    dispatch(T0 + timedelta(seconds=2))  # the next slot is past the end: nothing claimed
    assert engine.settle(first, "SUCCESS", "", T0 + timedelta(seconds=3), task)
    assert Task.objects.filter(pk=task.pk).exists(), "a run is still going"
    assert engine.settle(second, "SUCCESS", "", T0 + timedelta(seconds=3), task)
    assert not Task.objects.filter(pk=task.pk).exists()


def test_not_started_says_why() -> None:
    task = make()
    dispatch(T0)
    unknown = start(task, T0 + timedelta(seconds=5), T0)
    assert unknown == engine.NotStarted(engine.UNKNOWN, "no run of this task was dispatched for that slot")
    started = start(task, T0, T0)
    assert start(task, T0, T0) == engine.NotStarted(
        engine.RUNNING, "another attempt of this run is running", lease_until=T0 + timedelta(seconds=300))
    engine.settle(started, "SUCCESS", "", T0, task)
    assert start(task, T0, T0) == engine.NotStarted(engine.SETTLED, "the run is already succeeded")
    dispatch(T0 + timedelta(seconds=1))
    engine.abandon([task.pk], T0 + timedelta(seconds=1), "cleared by admin")
    assert start(task, T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)) == engine.NotStarted(
        engine.SETTLED, "the run is already lost (cleared by admin)")


def test_a_run_that_can_never_start_is_revoked_with_the_reason() -> None:
    solo, off = make(allow_overlap=False), make()
    dispatch(T0)
    assert isinstance(start(solo, T0, T0), engine.Started)
    Run.objects.create(task=solo, slot=T0 + timedelta(seconds=1), state=Run.PUBLISHED, claimed_at=T0)
    Task.objects.filter(pk=off.pk).update(enabled=False)
    now = T0 + timedelta(seconds=1)
    overlap = "another run of this task is running and overlap is off"
    disabled = "the task is disabled or finished"
    assert start(solo, T0 + timedelta(seconds=1), now) == engine.NotStarted(engine.OVERLAP, overlap)
    assert start(off, T0, now) == engine.NotStarted(engine.DISABLED, disabled)
    revoked = Run.objects.filter(state=Run.REVOKED)
    assert {(r.task_id, r.error, r.finished_at, r.lease_until) for r in revoked} == {
        (solo.pk, overlap, now, None), (off.pk, disabled, now, None)}


def test_overlap_off_is_held_back_only_by_another_live_started_run_of_the_same_task() -> None:
    solo, other = make(allow_overlap=False), make(due=T0 - timedelta(seconds=30))
    dispatch(T0)
    assert isinstance(start(other, T0 - timedelta(seconds=30), T0), engine.Started), "another task's run"
    # a second run waiting besides the first, both published with live leases
    Run.objects.create(task=solo, slot=T0 + timedelta(seconds=1), state=Run.PUBLISHED, claimed_at=T0,
                       lease_until=T0 + timedelta(seconds=300))
    assert isinstance(start(solo, T0, T0), engine.Started)
    # its own copy is a running attempt, not an overlap, and revokes nothing
    assert start(solo, T0, T0).why == engine.RUNNING
    assert runs_of(solo)[0] == (T0, Run.STARTED)
    # the first's worker died (lease lapsed, not yet settled by beat): the waiting run may start
    assert isinstance(start(solo, T0 + timedelta(seconds=1), T0 + timedelta(seconds=301)), engine.Started)


def test_renew_extends_exactly_the_named_started_runs() -> None:
    task = make()
    dispatch(T0)
    dispatch(T0 + timedelta(seconds=1))
    now = T0 + timedelta(seconds=2)
    first, second = (start(task, slot, now) for slot in (T0, T0 + timedelta(seconds=1)))
    assert engine.renew([first], now + timedelta(seconds=10)) == 1
    assert dict(Run.objects.values_list("slot", "lease_until")) == {
        T0: now + timedelta(seconds=310), T0 + timedelta(seconds=1): now + timedelta(seconds=300)}
    assert engine.renew([first, second], now + timedelta(seconds=20)) == 2
    engine.lapse(now + timedelta(seconds=400), 100)
    assert engine.renew([first, second], now + timedelta(seconds=401)) == 0
    assert set(Run.objects.values_list("lease_until", flat=True)) == {None}


def test_revoke_records_when_and_why() -> None:
    task = make()
    dispatch(T0)
    assert engine.revoke(task.pk, T0, T0 + timedelta(seconds=3), "expired before it started")
    run = Run.objects.get(task_id=task.pk)
    assert (run.state, run.finished_at, run.lease_until, run.error) == (
        Run.REVOKED, T0 + timedelta(seconds=3), None, "expired before it started")
    assert not Task.objects.get(pk=task.pk).running


def test_abandon_settles_only_the_unsettled_runs_of_the_tasks_named() -> None:
    task, other = make(), make()
    dispatch(T0)
    run_to_end(task, T0, T0)
    dispatch(T0 + timedelta(seconds=1))
    start(task, T0 + timedelta(seconds=1), T0 + timedelta(seconds=1))
    now = T0 + timedelta(seconds=2)
    assert engine.abandon([task.pk], now, "cleared by admin") == 1
    rows = {(r.task_id, r.slot): (r.state, r.finished_at, r.lease_until, r.error) for r in Run.objects.all()}
    assert rows[(task.pk, T0)] == (Run.SUCCEEDED, T0, None, "")
    assert rows[(task.pk, T0 + timedelta(seconds=1))] == (Run.LOST, now, None, "cleared by admin")
    assert rows[(other.pk, T0 + timedelta(seconds=1))][0] == Run.PUBLISHED


def test_waiting_counts_runs_published_long_ago_and_not_started() -> None:
    claimed, published, started = (make(schedule="* * * * *") for _ in range(3))
    batch = engine.claim_due(T0, 100, BEAT)
    engine.publish([run for run in batch.runs if run.task_id != claimed.pk], StubDispatcher(), T0)
    start(started, T0, T0 + timedelta(seconds=1))
    recent = make(due=T0 + timedelta(seconds=5))
    dispatch(T0 + timedelta(seconds=5))
    assert runs_of(recent) == [(T0 + timedelta(seconds=5), Run.PUBLISHED)]
    now = T0 + timedelta(seconds=30)
    # claimed but not published, or started: no worker is awaited
    assert [engine.waiting(now, seconds) for seconds in (20, 25, 29, 30)] == [2, 1, 1, 0]


def test_the_run_ledger_keeps_only_the_indexes_its_queries_use() -> None:
    """Each run is written two to four times (claim, publish, start, settle), and every index costs
    each write: the run table has its key, the unique (task, slot), (task, state) and (state,
    claimed_at), and no index of task alone (the two that lead with it serve those lookups)."""
    with connection.cursor() as cursor:
        found = connection.introspection.get_constraints(cursor, Run._meta.db_table)
    indexed = sorted(tuple(info["columns"]) for info in found.values()
                     if info["index"] or info["unique"] or info["primary_key"])
    assert indexed == sorted([("id",), ("task_id", "slot"), ("task_id", "state"), ("state", "claimed_at")])


@pytest.mark.postgresql  # elsewhere the claim reads through the ORM as it is
def test_the_claims_own_read_gives_what_the_orm_reads(settings: Any) -> None:
    """On PostgreSQL the claim reads its rows with psycopg's timestamp loader and parses each distinct
    JSON text once: every value must be what Django's loaders give, zone included."""
    plain = make()
    odd = make(due=T0 + timedelta(microseconds=123457), label="é ☃", queue="q",
               priority=3, expires=30, allow_overlap=False, iterations=4)
    Task.objects.filter(pk=odd.pk).update(
        _extra_data={"nested": [1, 2.5, None, True, {"ü": "\\n\"quoted\""}], "big": 2**70},
        start_running=datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        end_running=datetime(2200, 1, 1, tzinfo=UTC))
    same_callable = make()
    read = (Task.objects.due(T0 + timedelta(seconds=1)).annotate(unsettled=Value(0))
            .values_list(*engine.DUE_COLUMNS, "unsettled"))
    fast = [tuple(row) for row in engine._read_due(read)]
    assert fast == list(read) and len(fast) == 3
    assert all(value.tzinfo == UTC and value.utcoffset() == timedelta(0)
               for row in fast for value in row if isinstance(value, datetime))
    by_pk, func_info = {row[0]: row for row in fast}, engine.DUE_COLUMNS.index("_func_info")
    assert by_pk[plain.pk][func_info] is by_pk[same_callable.pk][func_info], "one parse of one JSON text"
