"""Health and start-up: sisy_status per beat, stopped and silent beats, runs waiting for a worker,
sisy_list's problems, and beat refusing to start on a global misconfiguration."""
from __future__ import annotations

import io
import socket
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test.utils import override_settings
from django.utils import timezone

from sisy_celery import engine
from sisy_celery.models import FAR_FUTURE, BeatProcess, Run, Task, task_with_callable
from sisy_celery.scheduler import Scheduler
from tests import celery_app
from tests.testapp import jobs

pytestmark = pytest.mark.django_db


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def beat(ident: str, age: float, stopped: bool = False) -> BeatProcess:
    now = timezone.now()
    host, pid = ident.split(":")
    return BeatProcess.objects.create(ident=ident, hostname=host, pid=int(pid), started_at=now - timedelta(hours=1),
                                      last_tick=now - timedelta(seconds=age), stopped_at=now if stopped else None)


def test_status_per_beat_tells_alive_stopped_and_dead() -> None:
    beat("web1:10", 2)
    beat("web2:20", 3, stopped=True)
    beat("web3:30", 600)
    out, _ = run("sisy_status")
    assert "alive    web1:10" in out and "stopped  web2:20" in out and "dead     web3:30" in out
    assert "OK: 1 beat(s) reported" in out
    assert "OK: 1 beat(s) on or named 'web1' reported" in run("sisy_status", "--beat", "web1")[0]
    for name in ("web2", "web3:30", "nowhere"):
        with pytest.raises(CommandError) as caught:
            run("sisy_status", "--beat", name)
        assert caught.value.returncode == 1 and f"No beat on or named {name!r}" in str(caught.value)


def test_status_this_host() -> None:
    beat(f"{socket.gethostname()}:1", 600)
    beat("elsewhere:2", 1)
    with pytest.raises(CommandError, match="No beat on or named .* has reported"):
        run("sisy_status", "--this-host")
    assert "OK: 1 beat(s)" in run("sisy_status")[0]


def test_status_bad_arguments_exit_2() -> None:
    with pytest.raises(CommandError) as caught:
        run("sisy_status", "--max-age", "0")
    assert caught.value.returncode == 2


def test_status_and_admin_warn_about_runs_no_worker_started(admin_client: object) -> None:
    beat("web1:10", 1)
    task = task_with_callable(jobs.job, label="waiting")
    task.save()
    now = timezone.now()
    run_ = engine.claim_now(task, now - timedelta(seconds=120), "test")
    Run.objects.filter(pk=run_.pk).update(state=Run.PUBLISHED, claimed_at=now - timedelta(seconds=120))
    out, err = run("sisy_status")
    assert "WARNING: 1 run(s) were published more than 60 s ago" in err and "OK:" in out
    with pytest.raises(CommandError, match="1 run\\(s\\) wait for a worker") as caught:
        run("sisy_status", "--strict")
    assert caught.value.returncode == 1
    assert "OK:" in run("sisy_status", "--waiting-after", "300")[0]
    response = admin_client.get("/admin/sisy_celery/task/")
    assert "1 run(s) were published more than 60 s ago" in response.content.decode()


def test_beat_marks_itself_stopped_and_forgets_silent_beats() -> None:
    scheduler = Scheduler(app=celery_app.app, lazy=True)
    now = timezone.now()
    scheduler.record_status(now)
    assert BeatProcess.objects.get(ident=scheduler.ident).stopped_at is None
    scheduler.close()
    assert BeatProcess.objects.get(ident=scheduler.ident).stopped_at is not None
    beat("old:1", 2 * 24 * 3600)
    beat("recent:2", 3600)
    scheduler.forget_beats(now)
    assert sorted(BeatProcess.objects.values_list("ident", flat=True)) == sorted([scheduler.ident, "recent:2"])


def test_list_shows_and_filters_problems() -> None:
    good = task_with_callable(jobs.job, label="good")
    bad = task_with_callable(jobs.job, label="bad")
    good.save()
    bad.save()
    Task.objects.filter(pk=bad.pk).update(problem="The broker refused the message for queue 'x': ACCESS_REFUSED",
                                          next_run=FAR_FUTURE)
    out, _ = run("sisy_list")
    lines = out.splitlines()
    assert "PROBLEM" in lines[0]
    assert any(line.startswith(f"{bad.pk} ") and "ACCESS_REFUSED" in line for line in lines)
    assert any(line.startswith(f"{good.pk} ") and line.rstrip().endswith("-") for line in lines)
    only, _ = run("sisy_list", "--problems")
    assert "bad" in only and "good" not in only


@pytest.mark.parametrize("settings", [{"SISY_TIMEZONE": "Mars/Olympus_Mons"}, {"SISY_RUNNING_TIMEOUT": 0}])
def test_beat_refuses_to_start_on_a_global_misconfiguration_and_changes_no_row(settings: dict) -> None:
    task = task_with_callable(jobs.job, label="innocent")
    task.save()
    before = Task.objects.values("next_run", "problem").get(pk=task.pk)
    with override_settings(**settings), pytest.raises(SystemExit) as caught:
        Scheduler(app=celery_app.app, lazy=True)
    assert "sisy beat cannot start" in str(caught.value) and "sisy_celery.E00" in str(caught.value)
    assert Task.objects.values("next_run", "problem").get(pk=task.pk) == before
