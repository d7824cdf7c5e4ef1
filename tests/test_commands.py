"""The management commands: sisy_list, sisy_run, sisy_status and sisy_purge_finished."""
from __future__ import annotations

import re
from datetime import datetime, timedelta
from io import StringIO
from typing import Any
from unittest import mock

import pytest
from django.core.management import call_command, load_command_class
from django.core.management.base import CommandError
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext, override_settings
from django.utils import timezone
from django_celery_results.models import TaskResult

from sisy_celery import engine
from sisy_celery.callables import get_func_info
from sisy_celery.dispatch import TASK_NAME, BrokerUnavailable, Dispatcher, Outgoing
from sisy_celery.models import BeatProcess, Run, Task, task_with_callable
from tests import celery_app
from tests.testapp import jobs

pytestmark = pytest.mark.django_db

UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.fixture(autouse=True)
def empty_broker() -> None:
    celery_app.purge()


def run(name: str, *args: str) -> str:
    out = StringIO()
    call_command(name, *args, stdout=out)
    return out.getvalue()


def make_task(label: str, **fields: Any) -> Task:
    state = {k: fields.pop(k) for k in ("finished_at",) if k in fields}
    task = task_with_callable(jobs.job, label=label, **fields)
    task.save()
    if state:
        Task.objects.filter(pk=task.pk).update(**state)
        task.refresh_from_db()
    return task


def exit_status(name: str, *args: str) -> tuple[int, str]:
    """Run a command as manage.py would, returning its exit status and stderr."""
    command = load_command_class("sisy_celery", name)
    command.stderr._out = err = StringIO()
    command.stdout._out = StringIO()
    # run_from_argv closes every connection when it ends, the test database's one included.
    with mock.patch.object(connections, "close_all"):
        try:
            command.run_from_argv(["manage.py", name, *args])
        except SystemExit as exc:
            return int(exc.code), err.getvalue()
    return 0, err.getvalue()


# -- sisy_list -----------------------------------------------------------------------------------


def local(moment: datetime) -> str:
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S %Z")


def test_list_enabled_by_next_run_then_disabled() -> None:
    now = timezone.now()
    late = make_task("late", schedule="0 0 1 1 *")
    soon = make_task("soon", schedule="* * * * * */5")
    off = make_task("off", enabled=False)
    Task.objects.filter(pk=late.pk).update(last_run=now - timedelta(days=1))
    lines = [re.split(r"\s{2,}", line) for line in run("sisy_list").splitlines()]
    assert lines[0] == ["ID", "LABEL", "SCHEDULE", "ENABLED", "NEXT RUN", "LAST RUN", "PROBLEM"]
    assert [line[1] for line in lines[1:]] == ["soon", "late", "off"]
    assert lines[1] == [str(soon.pk), "soon", "* * * * * */5", "yes", local(soon.next_run), "never", "-"]
    assert lines[2] == [str(late.pk), "late", "0 0 1 1 *", "yes", local(late.next_run), local(now - timedelta(days=1)),
                        "-"]
    assert lines[3] == [str(off.pk), "off", off.schedule, "no", "-", "never", "-"]


def test_list_limit_reads_few_rows_whatever_the_table_size() -> None:
    info = get_func_info(jobs.job)
    now = timezone.now()
    Task.objects.bulk_create([Task(label=f"t{i}", schedule="* * * * *", _func_info=info, enabled=i % 2 == 0,
                                   next_run=now + timedelta(seconds=i)) for i in range(1000)], batch_size=500)
    with CaptureQueriesContext(connection) as captured:
        out = run("sisy_list", "--limit", "5")
    lines = out.splitlines()
    assert [line.split()[1] for line in lines[1:6]] == ["t0", "t2", "t4", "t6", "t8"]
    assert lines[6] == "(first 5 tasks shown; use --limit to see more)"
    (query,) = [q["sql"] for q in captured.captured_queries]
    assert "LIMIT 6" in query and "ORDER BY" in query and "COUNT" not in query.upper()
    assert len(run("sisy_list").splitlines()) == 1 + 100 + 1


def test_list_fills_up_with_disabled_tasks_and_checks_limit() -> None:
    make_task("a")
    make_task("b", enabled=False)
    make_task("c", enabled=False)
    lines = run("sisy_list", "--limit", "2").splitlines()
    assert [line.split()[1] for line in lines[1:3]] == ["a", "b"]
    assert lines[-1].startswith("(first 2 tasks shown")
    assert len(run("sisy_list", "--limit", "3").splitlines()) == 4
    with pytest.raises(CommandError, match="--limit must be at least 1"):
        run("sisy_list", "--limit", "0")


def test_list_empty() -> None:
    assert run("sisy_list").splitlines() == ["ID  LABEL  SCHEDULE  ENABLED  NEXT RUN  LAST RUN  PROBLEM"]


# -- sisy_run ------------------------------------------------------------------------------------


def published_run(task: Task) -> Run:
    """The one message on the broker is that of the task's one run, which the ledger has as published."""
    (message,) = celery_app.published()
    run = Run.objects.get(task_id=task.pk)
    assert run.state == Run.PUBLISHED
    assert message.headers["task"] == TASK_NAME
    assert message.headers["id"] == run.celery_id
    assert message.headers["periodic_task_name"] == task.result_tag
    assert message.payload[0] == [task.pk, task._func_info, task._extra_data, run.slot.isoformat()]
    return run


@pytest.mark.parametrize("by", ["id", "label"])
def test_run_by_id_or_label(by: str) -> None:
    task = make_task("nightly report", iterations=2)
    out = run("sisy_run", str(task.pk) if by == "id" else "nightly report")
    match = re.fullmatch(rf"Task {task.pk} \(nightly report\) sent: Celery task id ({UUID_RE})\n", out)
    assert match, out
    sent = published_run(task)
    assert (sent.celery_id, sent.beat) == (match.group(1), "sisy_run")
    task.refresh_from_db()
    assert task.running


def test_run_numeric_label_when_no_such_id() -> None:
    task = make_task("2024")
    assert f"Task {task.pk} (2024) sent" in run("sisy_run", "2024")


def test_run_errors() -> None:
    with pytest.raises(CommandError, match=r"No task with id or label 'nope'"):
        run("sisy_run", "nope")
    first, second = make_task("twin"), make_task("twin")
    with pytest.raises(CommandError, match=rf"Label 'twin' is ambiguous: tasks {first.pk}, {second.pk} have it"):
        run("sisy_run", "twin")
    busy = make_task("solo", allow_overlap=False)
    now = timezone.now()
    started = engine.start(busy, engine.claim_now(busy, now, "test").slot, "celery@busy", now)
    assert isinstance(started, engine.Started)
    with pytest.raises(CommandError, match="already running"):
        run("sisy_run", str(busy.pk))
    assert celery_app.published() == []
    assert list(Run.objects.values_list("task_id", "state")) == [(busy.pk, Run.STARTED)]
    assert exit_status("sisy_run", "nope")[0] == 1


def test_run_with_broker_down(monkeypatch: pytest.MonkeyPatch) -> None:
    task = make_task("unlucky")

    def broker_down(self: Dispatcher, messages: Any) -> list[tuple[Outgoing, str]]:
        raise BrokerUnavailable("Connection refused")

    monkeypatch.setattr(Dispatcher, "publish", broker_down)
    with pytest.raises(CommandError, match=r"not sent: the broker is unreachable \(Connection refused\)"):
        run("sisy_run", "unlucky")
    revoked = Run.objects.get(task_id=task.pk)
    assert (revoked.state, revoked.error) == (Run.REVOKED, "not sent: the broker was unreachable")
    task.refresh_from_db()
    assert not task.running
    monkeypatch.undo()  # the broker is back: the revoked run blocks nothing
    assert f"Task {task.pk} (unlucky) sent" in run("sisy_run", "unlucky")
    assert celery_app.published()[0].headers["id"] == Run.objects.get(task_id=task.pk, state=Run.PUBLISHED).celery_id


def test_run_refuses_callable_outside_allow_list() -> None:
    task = make_task("legacy")
    with override_settings(SISY_ALLOWED_MODULES=["billing"]), pytest.raises(CommandError, match="is not allowed"):
        run("sisy_run", str(task.pk))
    assert celery_app.published() == []
    assert not Run.objects.exists() and not Task.objects.get(pk=task.pk).running


# -- sisy_status ---------------------------------------------------------------------------------


def beat(ident: str, age: float) -> BeatProcess:
    now = timezone.now()
    return BeatProcess.objects.create(ident=ident, hostname=ident.split(":")[0], pid=int(ident.split(":")[1]),
                                      started_at=now - timedelta(hours=1), last_tick=now - timedelta(seconds=age))


def test_status_without_beats_fails() -> None:
    with pytest.raises(CommandError, match=r"No beat has reported within the last 60 s \(none has reported\)"):
        run("sisy_status")
    status, err = exit_status("sisy_status")
    assert status == 1 and "No beat has reported" in err


def test_status_alive_and_dead() -> None:
    beat("old:1", 600)
    beat("new:2", 3)
    out = run("sisy_status")
    lines = out.splitlines()
    assert re.fullmatch(r"alive +new:2  started .*  last report 3\.\d s ago", lines[0]), lines[0]
    assert re.fullmatch(r"dead +old:1  started .*  last report 600\.\d s ago", lines[1]), lines[1]
    assert lines[2] == "OK: 1 beat(s) reported within the last 60 s."
    assert exit_status("sisy_status")[0] == 0
    with pytest.raises(CommandError, match=r"its latest report was 3\.\d s ago"):
        run("sisy_status", "--max-age", "1")
    assert exit_status("sisy_status", "--max-age", "1")[0] == 1


@override_settings(SISY_HEARTBEAT_FREQUENCY=60)
def test_status_default_allows_for_a_slow_heartbeat() -> None:
    beat("slow:1", 90)  # an idle beat with a 60 s heartbeat may report this rarely
    assert "OK: 1 beat(s) reported within the last 125 s." in run("sisy_status")


# -- sisy_purge_finished -------------------------------------------------------------------------


@override_settings(SISY_KEEP_FINISHED_TASKS=True)
def test_purge_deletes_only_kept_finished_tasks() -> None:
    finished = make_task("finished", iterations=1)
    last = settled(finished, timezone.now())  # its last iteration: the task finishes and is kept
    old = make_task("old", finished_at=timezone.now() - timedelta(days=10), enabled=False)
    user_disabled = make_task("user disabled", enabled=False)
    enabled = make_task("enabled")
    TaskResult.objects.create(task_id="r1", periodic_task_name=finished.result_tag, status="SUCCESS")
    finished.refresh_from_db()
    assert (finished.enabled, finished.finished_at is not None) == (False, True)

    assert run("sisy_purge_finished", "--dry-run") == "2 finished task(s) would be deleted.\n"
    assert Task.objects.count() == 4
    assert run("sisy_purge_finished", "--older-than", "5") == "1 finished task(s) deleted.\n"
    assert not Task.objects.filter(pk=old.pk).exists()
    assert run("sisy_purge_finished") == "1 finished task(s) deleted.\n"
    assert set(Task.objects.values_list("pk", flat=True)) == {user_disabled.pk, enabled.pk}
    assert TaskResult.objects.filter(periodic_task_name=finished.result_tag).exists()
    assert Run.objects.get(pk=last).state == Run.SUCCEEDED  # run history stays
    with pytest.raises(CommandError, match="--older-than must be 0 or more"):
        run("sisy_purge_finished", "--older-than", "-1")


def settled(task: Task, slot: datetime, state: str = "SUCCESS") -> int:
    """Run the slot of ``task`` through the ledger, started at its slot and settled a second later."""
    run_id = engine.claim_now(task, slot, "test").pk
    started = engine.start(task, slot, "celery@w", slot)
    assert isinstance(started, engine.Started)
    assert engine.settle(started, state, "", slot + timedelta(seconds=1), Task.objects.get(pk=task.pk))
    return run_id


def test_purge_runs_deletes_settled_runs_claimed_before_the_cutoff() -> None:
    task = make_task("daily")
    now = timezone.now()
    old = [settled(task, now - timedelta(days=10)), settled(task, now - timedelta(days=9), "FAILURE")]
    revoked = engine.claim_now(task, now - timedelta(days=8), "test")
    assert engine.revoke(task.pk, revoked.slot, revoked.slot, "revoked before it started")
    lost = engine.claim_now(task, now - timedelta(days=7), "test")
    assert engine.abandon([task.pk], lost.slot, "cleared by an operator") == 1
    gone = make_task("gone")
    old += [revoked.pk, lost.pk, settled(gone, now - timedelta(days=6))]
    gone.delete()  # the history of a deleted task outlives it, and is purged like any other
    recent = settled(task, now - timedelta(days=1))
    running = engine.claim_now(task, now - timedelta(days=20), "test")  # old, but not settled
    assert isinstance(engine.start(task, running.slot, "celery@w", running.slot), engine.Started)
    assert Run.objects.filter(pk__in=old).count() == 5

    assert run("sisy_purge_finished", "--runs", "--older-than", "5", "--dry-run") == "5 settled run(s) would be deleted.\n"
    assert Run.objects.count() == 7
    assert run("sisy_purge_finished", "--runs", "--older-than", "5") == "5 settled run(s) deleted.\n"
    assert set(Run.objects.values_list("pk", flat=True)) == {recent, running.pk}
    assert run("sisy_purge_finished", "--runs") == "1 settled run(s) deleted.\n"
    assert list(Run.objects.values_list("pk", "state")) == [(running.pk, Run.STARTED)]
    assert list(Task.objects.values_list("pk", flat=True)) == [task.pk]  # tasks are not touched


@override_settings(SISY_KEEP_FINISHED_TASKS=True)
def test_re_enabled_task_is_no_longer_finished() -> None:
    task = make_task("again", iterations=1)
    Task.objects.filter(pk=task.pk).finish()
    task.refresh_from_db()
    task.enabled = True
    task.save()
    task.refresh_from_db()
    assert task.finished_at is None
    task.enabled = False
    task.save()
    assert run("sisy_purge_finished") == "0 finished task(s) deleted.\n"
    assert Task.objects.filter(pk=task.pk).exists()
