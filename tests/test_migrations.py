"""Migration 0005 carries claims in flight over to the run ledger and reschedules rows that an unknown
SISY_TIMEZONE had parked."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

UTC = dt_timezone.utc
FAR_FUTURE = datetime(2217, 12, 31, 23, 59, tzinfo=UTC)
FUNC = {"func_type": "function", "module_name": "tests.testapp.jobs", "func_name": "job",
        "func_path": "tests.testapp.jobs.job"}
BEFORE = [("sisy_celery", "0004_lease_index")]
AFTER = [("sisy_celery", "0005_run_ledger")]


@pytest.fixture
def at_0004(transactional_db: None):
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    yield MigrationExecutor(connection).loader.project_state(BEFORE).apps
    MigrationExecutor(connection).migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())


def test_claims_in_flight_become_runs_and_parked_rows_are_rescheduled(at_0004) -> None:
    Task = at_0004.get_model("sisy_celery", "Task")
    now = timezone.now()
    slot = now.replace(microsecond=0) - timedelta(seconds=3)

    def task(label: str, **fields: object) -> int:
        return Task.objects.create(label=label, schedule="* * * * *", _func_info=FUNC, **fields).pk

    unpublished = task("unpublished", in_flight=1, running=True, claimed_slot=slot,
                       lease_expires=datetime(1970, 6, 1, tzinfo=UTC), next_run=now + timedelta(minutes=1))
    published = task("published", in_flight=1, running=True, claimed_slot=slot,
                     lease_expires=now + timedelta(minutes=10), next_run=now + timedelta(minutes=1))
    idle = task("idle", next_run=now + timedelta(minutes=1))
    parked = task("parked", next_run=FAR_FUTURE, problem="Unknown time zone 'Mars/Olympus': use an IANA name")
    own_zone = task("own zone", timezone="Mars/Olympus", next_run=FAR_FUTURE,
                    problem="Unknown time zone 'Mars/Olympus': use an IANA name")

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(AFTER)
    apps = executor.loader.project_state(AFTER).apps
    Task, Run = apps.get_model("sisy_celery", "Task"), apps.get_model("sisy_celery", "Run")

    runs = {run.task_id: run for run in Run.objects.all()}
    assert set(runs) == {unpublished, published}
    assert (runs[unpublished].state, runs[unpublished].slot) == ("claimed", slot)
    assert runs[unpublished].claimed_at < now - timedelta(hours=1), "published again by the first beat"
    assert (runs[published].state, runs[published].slot) == ("published", slot)
    assert runs[published].lease_until >= now + timedelta(minutes=10)
    running = dict(Task.objects.values_list("pk", "running"))
    assert running == {unpublished: True, published: True, idle: False, parked: False, own_zone: False}
    rescheduled = Task.objects.get(pk=parked)
    assert rescheduled.problem == "" and now < rescheduled.next_run <= now + timedelta(minutes=1)
    assert Task.objects.get(pk=own_zone).next_run == FAR_FUTURE, "a row's own bad zone stays its problem"
