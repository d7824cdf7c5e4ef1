"""The beat scheduler without processes: an injected clock and a dispatcher stub that can fail.

What beat decides around the engine: when to claim, that a broker outage ends in one late run
rather than a backlog, that a dead beat's runs are published again, that leases are judged only
after the database has been seen for a whole lease, and that an idle tick is one query.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone
import threading
from collections import Counter
from typing import Any

import pytest
from django.db import DatabaseError, connection
from django.test.utils import CaptureQueriesContext

from sisy_celery import engine
from sisy_celery.models import Run, Task, task_with_callable
from sisy_celery.scheduler import Scheduler
from tests import celery_app
from tests.test_engine import StubDispatcher
from tests.testapp import jobs

pytestmark = pytest.mark.django_db

UTC = dt_timezone.utc
T0 = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


class StubScheduler(Scheduler):
    """Beat on an injected clock, publishing through ``stub`` (kept across reconnects)."""

    stub: StubDispatcher
    clock: Clock

    def now(self) -> datetime:
        return self.clock()

    @property
    def dispatcher(self) -> Any:
        return self.stub


def scheduler(clock: Clock, dispatcher: StubDispatcher) -> StubScheduler:
    beat = StubScheduler(app=celery_app.app, lazy=True)
    beat.clock, beat.stub = clock, dispatcher
    beat._upkeep_at = float("inf")  # upkeep only where a test asks for it
    return beat


def every_second(**fields: Any) -> Task:
    task = task_with_callable(jobs.job, schedule="* * * * * *", **fields)
    task.save()
    Task.objects.filter(pk=task.pk).update(next_run=T0)
    return task


def test_a_tick_claims_publishes_and_sleeps_until_the_next_slot() -> None:
    clock, stub = Clock(T0 + timedelta(seconds=0.25)), StubDispatcher()
    task = every_second()
    beat = scheduler(clock, stub)
    assert beat.tick_database() == pytest.approx(0.75)
    assert [(m.args[0], m.args[3]) for m in stub.sent] == [(task.pk, T0.isoformat())]
    assert Run.objects.get().state == Run.PUBLISHED


def test_an_idle_tick_is_one_query() -> None:
    every_second()
    Task.objects.update(next_run=T0 + timedelta(hours=1))
    beat = scheduler(Clock(T0), StubDispatcher())
    with CaptureQueriesContext(connection) as queries:
        wait = beat.tick_database()
    assert len(queries.captured_queries) == 1 and wait == 1.0


def test_a_burst_is_claimed_small_first_then_in_full_batches(monkeypatch: pytest.MonkeyPatch,
                                                             settings: Any) -> None:
    """The first claim of a burst takes ``first_claim`` rows, so its messages go out before the rest
    is claimed; the next claims take SISY_BEAT_BATCH_SIZE rows, until a claim finds no more."""
    settings.SISY_BEAT_BATCH_SIZE = 3
    for _ in range(7):
        every_second()
    claims = []
    claim_due = engine.claim_due

    def counted(now: datetime, limit: int, beat: str) -> engine.Batch:
        batch = claim_due(now, limit, beat)
        claims.append((limit, len(batch.runs)))
        return batch

    monkeypatch.setattr(engine, "claim_due", counted)
    stub = StubDispatcher()
    beat = scheduler(Clock(T0), stub)
    beat.first_claim = 2
    waits = [beat.tick_database() for _ in range(4)]
    assert claims == [(2, 2), (3, 3), (3, 2)]
    assert waits[:2] == [0.0, 0.0] and waits[2] > 0, "beat ticks again at once while a claim was full"
    assert len(stub.sent) == 7
    beat.clock.advance(1)
    beat.tick_database()
    assert claims[3:] == [(2, 2)], "the next burst starts small again"


@pytest.mark.parametrize("upkeep", [False, True])
def test_a_broker_outage_ends_in_one_late_run_not_a_backlog(upkeep: bool, caplog: pytest.LogCaptureFixture) -> None:
    """With upkeep on every tick too: its publish (of no run left claimed by a dead beat) must not
    drop the runs kept for the broker's return."""
    clock, down = Clock(T0), StubDispatcher(down_at=0)
    task = every_second()
    beat = scheduler(clock, down)
    waits = []
    for _ in range(5):  # five ticks, a second apart, with the broker down
        if upkeep:
            beat._upkeep_at = 0.0
        waits.append(beat.tick_database())
        clock.advance(1)
    assert "dispatching resumed" not in caplog.text, "nothing was published while the broker was down"
    assert all(wait > 0 for wait in waits) and waits[1] > waits[0], "beat backs off"
    # nothing new was claimed while the first run could not be published
    assert list(Run.objects.values_list("slot", "state")) == [(T0, Run.CLAIMED)]
    up = StubDispatcher()
    beat.stub = up
    beat.tick_database()
    # the late run goes first, then one run for the slots missed meanwhile (coalesced: it carries
    # the first of them), and the task is back on its grid
    assert [m.args[3] for m in up.sent] == [T0.isoformat(), (T0 + timedelta(seconds=1)).isoformat()]
    assert set(Run.objects.values_list("state", flat=True)) == {Run.PUBLISHED}
    assert Task.objects.get(pk=task.pk).next_run == clock() + timedelta(seconds=1)


def test_runs_a_dead_beat_left_claimed_are_published_by_another() -> None:
    clock = Clock(T0)
    every_second()
    engine.claim_due(T0, 100, "dead:1")  # claimed, never published: its beat was killed
    survivor_stub = StubDispatcher()
    survivor = scheduler(clock, survivor_stub)
    clock.advance(Scheduler.republish_after + 1)
    survivor._upkeep_at = 0.0
    survivor.tick_database()
    runs = dict(Run.objects.values_list("slot", "beat"))
    assert runs[T0] == survivor.ident, "the dead beat's run was taken over"
    assert T0.isoformat() in [m.args[3] for m in survivor_stub.sent]
    assert set(Run.objects.values_list("state", flat=True)) == {Run.PUBLISHED}


def test_leases_are_judged_only_after_a_whole_lease_with_the_database() -> None:
    clock = Clock(T0)
    task = every_second(allow_overlap=False)
    beat = scheduler(clock, StubDispatcher())
    beat.tick_database()
    engine.start(Task.objects.get(pk=task.pk), T0, "w1", T0)
    clock.advance(400)  # the worker went silent; its lease lapsed long ago
    beat._upkeep_at = 0.0
    beat.tick_database()
    assert Run.objects.get(slot=T0).state == Run.STARTED, "judged lapsed before beat saw a whole lease"
    beat._lapse_after = 0.0
    beat._upkeep_at = 0.0
    beat.tick_database()
    assert Run.objects.get(slot=T0).state == Run.LOST


def test_a_database_error_backs_off_and_holds_lease_judgement(monkeypatch: pytest.MonkeyPatch) -> None:
    beat = scheduler(Clock(T0), StubDispatcher())
    beat._lapse_after = 0.0

    def broken() -> None:
        raise DatabaseError("server closed the connection unexpectedly")

    monkeypatch.setattr(beat, "earliest_next_run", broken)
    first, second = beat.tick_database(), beat.tick_database()
    assert 0 < first < second
    assert beat._lapse_after > 0.0, "a lapse is judged again only after a whole lease with the database"


class GatedDispatcher(StubDispatcher):
    """A stub whose first publish waits until ``gate`` is set (or 5 s pass): it shows whether
    beat goes on claiming while a batch is being published. Records each call's thread."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = threading.Event()
        self.waited_out = False
        self.threads: list[str] = []

    def publish(self, messages: Any) -> list:
        self.threads.append(threading.current_thread().name)
        if len(self.threads) == 1:
            self.waited_out = not self.gate.wait(5)
        return super().publish(messages)


def burst(settings: Any, tasks: int = 7) -> list[Task]:
    settings.SISY_BEAT_BATCH_SIZE = 3
    return [every_second() for _ in range(tasks)]


def states() -> Counter:
    return Counter(Run.objects.values_list("state", flat=True))


def test_a_burst_batch_is_published_while_the_next_is_claimed(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    tasks = burst(settings)
    stub = GatedDispatcher()
    beat = scheduler(Clock(T0), stub)
    beat.first_claim = 2
    claim_due = engine.claim_due

    def claim_then_open(now: datetime, limit: int, by: str) -> engine.Batch:
        batch = claim_due(now, limit, by)
        if Run.objects.count() > 2:  # the second claim is committed: let the first batch's publish go
            stub.gate.set()
        return batch

    monkeypatch.setattr(engine, "claim_due", claim_then_open)
    assert beat.tick_database() == 0.0
    assert states() == {Run.CLAIMED: 2}, "the first batch is marked only after the next claim"
    assert beat.tick_database() == 0.0
    assert not stub.waited_out, "the second batch was claimed while the first one was being published"
    assert states() == {Run.PUBLISHED: 2, Run.CLAIMED: 3}
    assert beat.tick_database() > 0, "the burst is over"
    assert states() == {Run.PUBLISHED: 7}, "the last batch is published and marked before its tick ends"
    assert sorted(m.args[0] for m in stub.sent) == [task.pk for task in tasks], "each slot once"
    assert set(stub.threads) == {"sisy-publish_0"}, "only the publishing thread uses the dispatcher"
    beat.close()


def test_a_broker_failure_in_a_burst_keeps_the_batch_and_the_one_claimed_after_it(settings: Any) -> None:
    tasks = burst(settings)
    clock, down = Clock(T0), StubDispatcher(down_at=0)
    beat = scheduler(clock, down)
    beat.first_claim = 2
    assert beat.tick_database() == 0.0, "the failure is known only when the batch is finished"
    assert beat.tick_database() > 0, "beat backs off"
    assert states() == {Run.CLAIMED: 5} and len(beat._unsent) == 5
    kept = [run.task_id for run in beat._unsent]
    clock.advance(0.5)
    assert beat.tick_database() > 0 and Run.objects.count() == 5, "nothing new is claimed while the broker is down"
    beat.stub = up = StubDispatcher()
    while beat.tick_database() == 0.0:
        pass
    sent = [m.args[0] for m in up.sent]
    assert sent[:5] == kept, "the kept runs go first"
    assert sorted(sent) == [task.pk for task in tasks], "then the rest, each slot once"
    assert states() == {Run.PUBLISHED: 7}


def test_a_stopping_beat_marks_the_batch_it_is_publishing(settings: Any) -> None:
    burst(settings)
    stub = StubDispatcher()
    beat = scheduler(Clock(T0), stub)
    beat.first_claim = 2
    assert beat.tick_database() == 0.0
    beat.close()
    assert states() == {Run.PUBLISHED: 2} and len(stub.sent) == 2
    assert beat._sender is None, "the publishing thread is shut down"
