"""The Task admin with Django's test client: views, form errors, actions, run now, history, permissions."""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone as dt_timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth.models import Permission, User
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext, override_settings
from django.urls import reverse
from django.utils import timezone
from django_celery_results.models import TaskResult

from sisy_celery import admin as sisy_admin, conf, engine, schedules
from sisy_celery.callables import CallableError, get_func_info
from sisy_celery.dispatch import TASK_NAME, BrokerUnavailable, Dispatcher, Outgoing
from sisy_celery.models import (FAR_FUTURE, HAS_NOT_RUN, BeatProcess, Run, Task, check_userdata, queue_problem,
                                task_with_callable)
from sisy_celery.tasks import run_callable
from tests import celery_app
from tests.testapp import jobs, models as test_models
from tests.testapp.models import UuidWidget, Widget

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:sisy_celery_task_changelist"
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.fixture(autouse=True)
def empty_broker() -> None:
    celery_app.purge()


def make_task(label: str = "job", the_callable: Any = jobs.job, **fields: Any) -> Task:
    state = {k: fields.pop(k) for k in ("problem", "finished_at", "last_status", "last_run") if k in fields}
    task = task_with_callable(the_callable, label=label, **fields)
    task.save()
    if state:
        Task.objects.filter(pk=task.pk).update(**state)
        task.refresh_from_db()
    return task


def make_busy(task: Task) -> Run:
    """Give ``task`` a run that a worker has started and still holds (its lease is live)."""
    now = timezone.now()
    run = engine.claim_now(task, now, "test")
    assert isinstance(engine.start(task, run.slot, "celery@busy", now), engine.Started)
    task.refresh_from_db()
    assert task.running
    run.refresh_from_db()
    return run


T0 = datetime(2030, 1, 1, tzinfo=dt_timezone.utc)


def ran(task: Task, n: int, state: str = "SUCCESS", error: str = "", late: float = 1, took: float = 2) -> Run:
    """Run the slot ``T0 + n`` minutes of ``task`` through the ledger as beat and a worker would: started
    ``late`` seconds after its slot by ``celery@host<n>``, settled ``took`` seconds later as ``state``."""
    slot = T0 + timedelta(minutes=n)
    run = engine.claim_now(task, slot, "test")
    started = engine.start(task, slot, f"celery@host{n}", slot + timedelta(seconds=late))
    assert isinstance(started, engine.Started)
    assert engine.settle(started, state, error, started.started_at + timedelta(seconds=took),
                         Task.objects.get(pk=task.pk))
    run.refresh_from_db()
    return run


class RefusingDispatcher:
    """A broker that refuses each message on its own, as for a queue it does not have."""

    def publish(self, messages: Any) -> list[tuple[Outgoing, str]]:
        return [(outgoing, "NOT_FOUND - no queue") for outgoing in messages]


def change_url(task: Task) -> str:
    return reverse("admin:sisy_celery_task_change", args=[task.pk])


def run_url(task: Task) -> str:
    return reverse("admin:sisy_celery_task_run", args=[task.pk])


def texts(response: Any) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def form_data(**overrides: str) -> dict[str, str]:
    data = {
        "label": "", "callable": "tests.testapp.jobs.job", "pk_override": "", "enabled": "on",
        "schedule": "*/5 * * * *", "timezone": "", "start_running_0": "", "start_running_1": "",
        "end_running_0": "", "end_running_1": "", "wait_for_schedule": "on", "iterations": "0",
        "allow_overlap": "on", "userdata": "{}", "queue": "", "priority": "", "expires": "",
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def errors(response: Any) -> dict[str, list[str]]:
    return {name: list(errs) for name, errs in response.context["adminform"].form.errors.items()}


def staff(username: str, *codenames: str) -> Client:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="sisy_celery",
                                                        codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


# -- changelist ----------------------------------------------------------------------------------


def test_changelist_columns(admin_client: Client) -> None:
    task = make_task("every half minute", schedule="* * * * * */30", timezone="Europe/Paris", iterations=3,
                     last_status="SUCCESS", last_run=timezone.now() - timedelta(minutes=5))
    make_task("never ran", the_callable=jobs.no_params, schedule="0 9 * * 1-5")
    response = admin_client.get(reverse(CHANGELIST))
    assert response.status_code == 200
    page = response.content.decode()
    assert "every half minute" in page and "never ran" in page
    assert '<code class="sisy-callable">tests.<wbr>testapp.<wbr>jobs.<wbr>job</code>' in page
    assert '<code class="sisy-callable">tests.<wbr>testapp.<wbr>jobs.<wbr>no_params</code>' in page
    assert '<code class="sisy-schedule">* * * * * */30</code><div class="quiet">Every 30 seconds</div>' in page
    assert "At 09:00, Monday through Friday" in page
    assert '<div class="sisy-zone">Europe/Paris</div><div class="sisy-left">3 runs left</div>' in page
    assert '<div class="sisy-zone">UTC <span class="quiet">(default)</span></div></td>' in page
    assert f'<time datetime="{task.next_run.isoformat()}" title="{local_paris(task.next_run)}">in ' in page
    assert (f'title="{local_paris(task.last_run)}">5\xa0minutes ago</time>'
            '<div class="sisy-status sisy-status-success">SUCCESS</div>') in page
    assert '<td class="field-last_run_summary">never</td>' in page
    assert '<td class="field-state_display">enabled</td>' in page
    for gone in ("Time zone", "Iterations left", "Last result", "column-running"):
        assert gone not in page


def test_one_off_tasks_are_told_apart() -> None:
    """A task Task.run_once made runs once whatever its schedule says; a task that waits for its
    schedule, or has run and has one iteration left, runs on its schedule."""
    later = timezone.now() + timedelta(hours=3)
    assert sisy_admin.is_one_off(Task.run_once(jobs.job, delay_until=later))
    assert sisy_admin.is_one_off(Task.run_once(jobs.job, schedule="0 9 * * *"))
    assert sisy_admin.is_one_off(Task.run_iterations(jobs.job, iterations=1, run_immediately=True))
    assert not sisy_admin.is_one_off(Task.run_iterations(jobs.job, iterations=1, schedule="0 9 * * *"))
    assert not sisy_admin.is_one_off(Task.run_iterations(jobs.job, iterations=2, run_immediately=True))
    assert not sisy_admin.is_one_off(make_task(iterations=1, wait_for_schedule=False,
                                               last_run=timezone.now() - timedelta(hours=1)))


def test_run_once_task_is_described_as_once(admin_client: Client) -> None:
    later = timezone.now() + timedelta(hours=3)
    once = Task.run_once(jobs.job, label="one-off", delay_until=later, timezone="Asia/Tokyo")
    assert once.schedule == "* * * * * *" and once.next_run == later
    tokyo = later.astimezone(ZoneInfo("Asia/Tokyo")).strftime("%Y-%m-%d %H:%M:%S %Z")
    page = admin_client.get(reverse(CHANGELIST)).content.decode()
    cell = page[page.index('<td class="field-schedule_display">'):]
    assert cell.startswith(f'<td class="field-schedule_display">Once, <time datetime="{later.isoformat()}" '
                           f'title="{tokyo}">in 2\xa0hours</time><div class="sisy-zone">Asia/Tokyo</div></td>')
    assert "Every second" not in page and "* * * * * *" not in page

    change = admin_client.get(change_url(once)).content.decode()
    preview = change[change.index('class="sisy-preview"'):]
    assert preview.startswith(f'class="sisy-preview" data-once="1"><p>Once, <time datetime="{later.isoformat()}"')
    assert "the task runs once, and its schedule is not used" in preview and "Every second" not in change

    make_busy(once)
    cell = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert '<td class="field-schedule_display">Once, running<div class="sisy-zone">' in cell
    finished = timezone.now() - timedelta(minutes=2)
    Task.objects.filter(pk=once.pk).update(running=False, enabled=False, finished_at=finished)
    page = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert f'Once, finished <time datetime="{finished.isoformat()}"' in page and ">2\xa0minutes ago</time>" in page


def test_changelist_state_column_merges_the_flags(admin_client: Client) -> None:
    make_busy(make_task("busy"))
    make_task("off", enabled=False)
    make_task("done", enabled=False, finished_at=timezone.now())
    page = admin_client.get(reverse(CHANGELIST)).content.decode()
    states = re.findall(r'<td class="field-state_display">(.*?)</td>', page)
    assert sorted(states) == ['disabled', 'enabled<div class="sisy-running">running</div>', 'finished']


def local_paris(moment: datetime) -> str:
    return moment.astimezone(ZoneInfo("Europe/Paris")).strftime("%Y-%m-%d %H:%M:%S %Z")


def test_changelist_shows_problem_and_disabled(admin_client: Client) -> None:
    make_task("broken", problem="Module 'gone' not found")
    make_task("off", enabled=False)
    page = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert 'title="Module &#x27;gone&#x27; not found">problem</span>' in page


@pytest.mark.parametrize("query, shown, hidden", [
    ("enabled__exact=0", {"off", "done"}, {"on", "busy", "broken", "solo"}),
    ("running__exact=1", {"busy"}, {"on", "off", "broken", "done", "solo"}),
    ("allow_overlap__exact=0", {"solo"}, {"on", "off", "busy", "broken", "done"}),
    ("state=finished", {"done"}, {"on", "off", "busy", "broken", "solo"}),
    ("state=problem", {"broken"}, {"on", "off", "busy", "done", "solo"}),
    ("q=no_params", {"solo"}, {"on", "off", "busy", "broken", "done"}),
    ("q=JOBS.NO_PARAMS", {"solo"}, {"on", "off", "busy", "broken", "done"}),
    ("q=bus", {"busy"}, {"on", "off", "broken", "done", "solo"}),
])
def test_changelist_filters_and_search(admin_client: Client, query: str, shown: set[str], hidden: set[str]) -> None:
    make_task("on")
    make_task("off", enabled=False)
    make_busy(make_task("busy"))
    make_task("broken", problem="bad")
    make_task("done", enabled=False, finished_at=timezone.now())
    make_task("solo", the_callable=jobs.no_params, allow_overlap=False)
    response = admin_client.get(reverse(CHANGELIST) + "?" + query)
    assert response.status_code == 200
    labels = {task.label for task in response.context["cl"].result_list}
    assert labels == shown
    assert not labels & hidden


def changelist_queries(client: Client, query: str = "") -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(reverse(CHANGELIST) + query)
    assert response.status_code == 200
    return [q["sql"] for q in captured.captured_queries]


def task_counts(queries: list[str]) -> int:
    """How many of ``queries`` count rows of the task table."""
    return sum(re.search(r'SELECT COUNT\(.*FROM "SISY_CELERY_TASK"', sql.upper()) is not None for sql in queries)


def bulk_tasks(count: int, start: int = 0) -> None:
    info = get_func_info(jobs.job)
    now = timezone.now()
    Task.objects.bulk_create([
        Task(label=f"bulk {i}", schedule="* * * * * */10" if i % 2 else "@hourly", _func_info=info,
             next_run=now + timedelta(seconds=i), last_run=now - timedelta(hours=1),
             enabled=bool(i % 3), timezone="Asia/Tokyo" if i % 5 == 0 else "")
        for i in range(start, start + count)
    ], batch_size=500)


@pytest.mark.parametrize("query", ["", "?enabled__exact=1", "?q=bulk", "?state=problem&running__exact=0"])
def test_changelist_queries_do_not_grow_with_rows(admin_client: Client, query: str) -> None:
    bulk_tasks(10)
    few = changelist_queries(admin_client, query)
    bulk_tasks(990, start=10)
    assert Task.objects.count() == 1000
    many = changelist_queries(admin_client, query)
    assert len(many) == len(few)
    # session, user, runs waiting for a worker, (PostgreSQL: row estimate,) count, one page of rows
    assert len(many) <= 6
    # show_full_result_count is off: one COUNT for the paginator, never a second full-table one.
    assert task_counts(many) <= 1


def test_unfiltered_count_of_many_tasks_is_estimated_on_postgresql(admin_client: Client,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    bulk_tasks(30)
    monkeypatch.setattr(sisy_admin.EstimatedCountPaginator, "exact_below", 10)
    postgres = connection.vendor == "postgresql"
    if postgres:
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE sisy_celery_task")
    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(reverse(CHANGELIST))
    sql = [q["sql"].upper() for q in captured.captured_queries]
    assert response.context["cl"].result_count == 30
    assert task_counts(sql) == (0 if postgres else 1)
    assert any("RELTUPLES" in q for q in sql) == postgres
    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(reverse(CHANGELIST) + "?enabled__exact=1")
    assert response.context["cl"].result_count == 20  # filtered: always an exact count
    assert task_counts([q["sql"] for q in captured.captured_queries]) == 1


def test_changelist_page_has_100_rows_with_1000_tasks(admin_client: Client) -> None:
    bulk_tasks(1000)
    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(reverse(CHANGELIST))
    assert len(response.context["cl"].result_list) == 100
    assert len(captured.captured_queries) <= 6
    assert response.content.decode().count('class="action-select"') == 100


# -- schedule descriptions and the preview -----------------------------------------------------------


@pytest.mark.parametrize("cron, text", [
    ("* * * * *", "Every minute"),
    ("30 2 * * 1-5", "At 02:30, Monday through Friday"),
    ("* * * * * */30", "Every 30 seconds"),
    ("0 * * * * */30", "Every 30 seconds, at 0 minutes past the hour"),
    ("15 10 * * * 0", "At 10:15"),
    ("15 10 * * * 5", "At 10:15:05"),
    ("@daily", "At 00:00"),
])
def test_describe_schedule(cron: str, text: str) -> None:
    assert sisy_admin.describe_schedule(cron) == text


def test_describe_schedule_invalid_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sisy_admin.describe_schedule("61 * * * *") == ""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ValueError("cannot describe")

    sisy_admin.describe_schedule.cache_clear()
    monkeypatch.setattr(sisy_admin, "ExpressionDescriptor", refuse)
    try:
        assert sisy_admin.describe_schedule("0 9 * * 1 */15") == "minute 0, hour 9, day of week 1, second */15"
    finally:
        sisy_admin.describe_schedule.cache_clear()


def test_preview_view_lists_next_runs_in_zone(admin_client: Client) -> None:
    url = reverse("admin:sisy_celery_task_preview")
    response = admin_client.get(url, {"schedule": "0 9 * * *", "timezone": "Europe/Paris"})
    assert response.status_code == 200
    data = response.json()
    assert data["description"] == "At 09:00"
    assert data["timezone"] == "Europe/Paris"
    assert len(data["runs"]) == 5
    runs = [datetime.fromisoformat(run["at"]) for run in data["runs"]]
    expected = schedules.next_run("0 9 * * *", runs[0] - timedelta(seconds=1), "Europe/Paris")
    assert runs[0] == expected and runs[0] > timezone.now()
    assert all(r.astimezone(ZoneInfo("Europe/Paris")).hour == 9 for r in runs)
    assert all((b - a) >= timedelta(hours=23) for a, b in zip(runs, runs[1:]))
    assert data["runs"][0]["local"].endswith(("CET", "CEST")) and data["runs"][0]["relative"].startswith("in ")


def test_preview_view_names_the_bad_field(admin_client: Client) -> None:
    url = reverse("admin:sisy_celery_task_preview")
    response = admin_client.get(url, {"schedule": "* 25 * * *"})
    assert response.status_code == 400
    with pytest.raises(ValueError) as api:
        schedules.validate("* 25 * * *")
    assert response.json() == {"field": "schedule", "error": str(api.value)}
    assert "field 2 (hour)" in response.json()["error"]
    response = admin_client.get(url, {"schedule": "* * * * *", "timezone": "Mars/Olympus"})
    assert response.status_code == 400
    assert response.json()["field"] == "timezone" and "Mars/Olympus" in response.json()["error"]


# -- add and change forms ----------------------------------------------------------------------------


# The worker settles the run in autocommit, as a worker process does (it closes stale connections first).
@pytest.mark.django_db(transaction=True)
def test_add_form_creates_a_working_task(admin_client: Client) -> None:
    response = admin_client.get(reverse("admin:sisy_celery_task_add"))
    assert response.status_code == 200
    page = response.content.decode()
    assert 'name="callable"' in page and "_func_info" not in page and 'name="_extra_data"' not in page
    assert 'class="sisy-preview"' in page and "schedule_preview.js" in page

    response = admin_client.post(reverse("admin:sisy_celery_task_add"), form_data(
        label="nightly", schedule="30 2 * * *", timezone="Europe/Paris", userdata='{"account": 42}',
        iterations="3", allow_overlap=None, queue="reports", priority="5", expires="60",
    ))
    assert response.status_code == 302, errors(response)
    task = Task.objects.get(label="nightly")
    assert task._func_info == get_func_info(jobs.job)
    assert task.userdata == {"account": 42}
    assert (task.iterations, task.allow_overlap, task.queue, task.priority, task.expires) == (3, False, "reports", 5, 60)
    assert (task.start_running, task.end_running) == (HAS_NOT_RUN, FAR_FUTURE)
    local = task.next_run.astimezone(ZoneInfo("Europe/Paris"))
    assert (local.hour, local.minute) == (2, 30) and task.next_run > timezone.now()

    run = engine.claim_now(task, timezone.now(), "test")
    assert run_callable.apply(args=[task.pk, task._func_info, task._extra_data, run.slot.isoformat()]).get() == "ok"
    name, message = test_models.CALLS[0]
    assert name == "job" and message["task"].pk == task.pk and message["userdata"] == {"account": 42}
    assert message["scheduled_for"] == run.slot
    run.refresh_from_db()
    assert run.state == Run.SUCCEEDED


def test_add_form_defaults_label_and_takes_window(admin_client: Client) -> None:
    response = admin_client.post(reverse("admin:sisy_celery_task_add"), form_data(
        wait_for_schedule=None, start_running_0="2031-01-02", start_running_1="08:00:00",
        end_running_0="2031-02-01", end_running_1="00:00:00",
    ))
    assert response.status_code == 302, errors(response)
    task = Task.objects.get()
    assert task.label == "tests.testapp.jobs.job"
    assert task.start_running == datetime(2031, 1, 2, 8, tzinfo=dt_timezone.utc)
    assert task.end_running == datetime(2031, 2, 1, tzinfo=dt_timezone.utc)
    assert task.next_run == task.start_running  # wait_for_schedule off: first run at the window start


def test_add_form_model_method_with_primary_key(admin_client: Client) -> None:
    widget = Widget.objects.create(name="w")
    response = admin_client.post(reverse("admin:sisy_celery_task_add"), form_data(
        callable="tests.testapp.models.Widget.touch", pk_override=str(widget.pk)))
    assert response.status_code == 302, errors(response)
    task = Task.objects.get()
    assert task._func_info == get_func_info(widget.touch)
    assert task._func_info["model_pk"] == widget.pk

    uuid_widget = UuidWidget.objects.create()
    response = admin_client.post(reverse("admin:sisy_celery_task_add"), form_data(
        label="uuid", callable="tests.testapp.models.UuidWidget.touch", pk_override=str(uuid_widget.pk)))
    assert response.status_code == 302, errors(response)
    assert Task.objects.get(label="uuid")._func_info["model_pk"] == str(uuid_widget.pk)


@pytest.mark.parametrize("overrides, field, message", [
    ({"callable": "tests.testapp.models.Widget.touch"}, "pk_override",
     "is a method of the model testapp.Widget: enter the primary key"),
    ({"callable": "tests.testapp.models.Widget.touch", "pk_override": "999"}, "pk_override",
     "testapp.Widget with primary key '999' does not exist."),
    ({"callable": "tests.testapp.models.Widget.touch", "pk_override": "abc"}, "pk_override",
     "'abc' is not a valid primary key for testapp.Widget."),
    ({"pk_override": "1"}, "pk_override", "Leave this empty"),
])
def test_add_form_primary_key_errors(admin_client: Client, overrides: dict[str, str], field: str,
                                     message: str) -> None:
    response = admin_client.post(reverse("admin:sisy_celery_task_add"), form_data(**overrides))
    assert response.status_code == 200
    assert any(message in error for error in errors(response)[field])
    assert not Task.objects.exists()


def json_error(text: str) -> json.JSONDecodeError:
    """The error json gives for ``text`` (its wording changes between Python versions)."""
    with pytest.raises(json.JSONDecodeError) as exc:
        json.loads(text)
    return exc.value


def api_error(func: Any, *args: Any) -> str:
    with pytest.raises(ValueError) as exc:
        func(*args)
    return str(exc.value)


@pytest.mark.parametrize("overrides, field, expected", [
    ({"schedule": "61 * * * *"}, "schedule", lambda: api_error(schedules.validate, "61 * * * *")),
    ({"schedule": "* * * 13 *"}, "schedule", lambda: api_error(schedules.validate, "* * * 13 *")),
    ({"callable": "tests.testapp.jobs.nope"}, "callable",
     lambda: api_error(get_func_info, "tests.testapp.jobs.nope")),
    ({"callable": "tests.testapp.jobs.two_params"}, "callable",
     lambda: api_error(get_func_info, "tests.testapp.jobs.two_params")),
    ({"callable": "tests.testapp.jobs.lam"}, "callable", lambda: api_error(get_func_info, "tests.testapp.jobs.lam")),
    ({"callable": "os.system"}, "callable", lambda: api_error(get_func_info, "os.system")),
    ({"callable": "tests.testapp.jobs"}, "callable", lambda: api_error(get_func_info, "tests.testapp.jobs")),
    ({"userdata": '{"a": 1,}'}, "userdata",
     lambda: "User data is not valid JSON: {0.msg} (line 1, column {0.colno}).".format(json_error('{"a": 1,}'))),
    ({"userdata": "[1, 2]"}, "userdata", lambda: api_error(check_userdata, [1, 2])),
    ({"userdata": '{"x": NaN}'}, "userdata", lambda: api_error(check_userdata, {"x": float("nan")})),
    ({"timezone": "Mars/Olympus"}, "timezone", lambda: "Unknown time zone 'Mars/Olympus'"),
    ({"end_running_0": "2000-01-01", "end_running_1": "00:00:00", "start_running_0": "2001-01-01",
      "start_running_1": "00:00:00"}, "end_running", lambda: "end_running must be after start_running."),
    ({"priority": "256"}, "priority", lambda: "Ensure this value is less than or equal to 255."),
])
def test_add_form_errors_name_the_problem(admin_client: Client, overrides: dict[str, str], field: str,
                                          expected: Any) -> None:
    response = admin_client.post(reverse("admin:sisy_celery_task_add"), form_data(**overrides))
    assert response.status_code == 200
    found = errors(response).get(field, [])
    assert any(expected() in error for error in found), found
    assert not Task.objects.exists()


@pytest.mark.parametrize("queue, reason", [
    ("amq.x", "names starting with 'amq.' are reserved by AMQP brokers"),
    ("_kombu.binding.celery", "clashes with the keys kombu keeps in Redis"),
    ("two words", "use only letters, digits and . _ : @ -"),
])
def test_form_refuses_a_queue_name_brokers_refuse(admin_client: Client, queue: str, reason: str) -> None:
    response = admin_client.post(reverse("admin:sisy_celery_task_add"), form_data(label="routed", queue=queue))
    assert response.status_code == 200
    assert errors(response) == {"queue": [queue_problem(queue)]}
    assert reason in queue_problem(queue)
    assert not Task.objects.exists()

    task = make_task("routed", queue="reports")
    response = admin_client.post(change_url(task), form_data(label="routed", queue=queue))
    assert response.status_code == 200
    assert errors(response) == {"queue": [queue_problem(queue)]}
    task.refresh_from_db()
    assert task.queue == "reports"


def test_bad_cron_error_names_the_field(admin_client: Client) -> None:
    response = admin_client.post(reverse("admin:sisy_celery_task_add"), form_data(schedule="0 9 * * 8"))
    assert response.status_code == 200
    assert "field 5 (day of week) &#x27;8&#x27; is not valid" in response.content.decode()


@override_settings(SISY_ALLOWED_MODULES=["billing"])
def test_add_form_refuses_disallowed_module(admin_client: Client) -> None:
    response = admin_client.post(reverse("admin:sisy_celery_task_add"), form_data())
    assert response.status_code == 200
    (error,) = errors(response)["callable"]
    assert "'tests.testapp.jobs.job' is not allowed" in error and "SISY_ALLOWED_MODULES ['billing']" in error
    assert not Task.objects.exists()


@override_settings(SISY_ALLOWED_MODULES=["tests.testapp.jobs"])
def test_add_form_refuses_path_leading_outside_allowed_module(admin_client: Client) -> None:
    """An allowed module re-exporting a model from elsewhere does not widen the allow-list."""
    widget = Widget.objects.create(name="w")
    path = "tests.testapp.jobs.models.Widget.touch"
    with pytest.raises(CallableError) as api:
        get_func_info(path, pk_override=widget.pk)
    response = admin_client.post(reverse("admin:sisy_celery_task_add"), form_data(
        callable=path, pk_override=str(widget.pk)))
    assert response.status_code == 200
    assert errors(response)["callable"] == [str(api.value)]
    assert "module 'tests.testapp.models' is not under SISY_ALLOWED_MODULES" in str(api.value)
    # Refused before the primary key is looked up: no probing of models outside the allow-list.
    response = admin_client.post(reverse("admin:sisy_celery_task_add"), form_data(
        callable=path, pk_override="12345"))
    assert list(errors(response)) == ["callable"] and "is not allowed" in errors(response)["callable"][0]
    assert not Task.objects.exists()


def test_change_page_shows_form_preview_and_state(admin_client: Client) -> None:
    task = make_task("weekly", schedule="0 9 * * 1", timezone="America/New_York", userdata={"k": [1, 2]})
    make_busy(task)
    response = admin_client.get(change_url(task))
    assert response.status_code == 200
    form = response.context["adminform"].form
    assert form.initial["callable"] == "tests.testapp.jobs.job"
    assert json.loads(form.initial["userdata"]) == {"k": [1, 2]}
    assert form.initial["start_running"] is None and form.initial["end_running"] is None
    page = response.content.decode()
    preview = page[page.index('class="sisy-preview"'):]
    preview = preview[:preview.index("</ol>")]
    assert preview.count("<li>") == 5
    first = schedules.next_run("0 9 * * 1", timezone.now(), "America/New_York")
    assert first.astimezone(ZoneInfo("America/New_York")).strftime("%Y-%m-%d %H:%M:%S %Z") in preview
    assert "At 09:00, only on Monday" in preview
    assert "Run now" in page and run_url(task) in page
    running = page[page.index("field-running"):]
    assert 'alt="True"' in running[:running.index("field-problem")]
    history = page[page.index('id="sisy-run-history"'):]
    assert "celery@busy" in history and "No runs recorded yet." not in history
    assert "No runs recorded yet." in admin_client.get(change_url(make_task("idle"))).content.decode()


@pytest.mark.parametrize("field", ["next_run_display", "last_run_display", "finished_display", "created_display",
                                   "modified_display"])
def test_change_page_shows_every_date_in_one_format(admin_client: Client, field: str) -> None:
    now = timezone.now()
    task = make_task("dated", timezone="Asia/Tokyo", last_run=now - timedelta(minutes=5), finished_at=now)
    before = timezone.now()
    page = admin_client.get(change_url(task)).content.decode()
    after = timezone.now()
    cell = page[page.index(f"field-{field}"):]
    cell = cell[cell.index('<div class="readonly">') + len('<div class="readonly">'):cell.index("</div>")]
    moment = getattr(Task.objects.get(pk=task.pk), field.replace("_display", "_at").replace("_run_at", "_run"))
    absolute = moment.astimezone(ZoneInfo("Asia/Tokyo")).strftime("%Y-%m-%d %H:%M:%S %Z")
    assert cell in {f'<time datetime="{moment.isoformat()}" title="{absolute}">{sisy_admin.relative(moment, now)}</time>'
                    for now in (before, after)}


def test_change_form_edits_schedule_and_ignores_func_info(admin_client: Client) -> None:
    task = make_task("edit me", schedule="0 0 1 1 *")
    old_next = task.next_run
    evil = {"func_type": "function", "module_name": "os", "func_name": "system", "func_path": "os.system"}
    response = admin_client.post(change_url(task), form_data(
        label="edited", schedule="*/10 * * * *", userdata='{"n": 1}', _func_info=json.dumps(evil)))
    assert response.status_code == 302, errors(response)
    task.refresh_from_db()
    assert task.label == "edited" and task.schedule == "*/10 * * * *"
    assert task._func_info == get_func_info(jobs.job)
    assert task.userdata == {"n": 1}
    assert task.next_run != old_next and task.next_run - timezone.now() <= timedelta(minutes=10)


def test_change_form_of_model_method_keeps_primary_key(admin_client: Client) -> None:
    widget = Widget.objects.create(name="w")
    task = make_task("widget", the_callable=widget.touch)
    response = admin_client.get(change_url(task))
    assert response.context["adminform"].form.initial["pk_override"] == widget.pk
    response = admin_client.post(change_url(task), form_data(
        label="widget", callable="tests.testapp.models.Widget.touch", pk_override=str(widget.pk)))
    assert response.status_code == 302, errors(response)
    task.refresh_from_db()
    assert task._func_info == get_func_info(widget.touch)


# -- actions -------------------------------------------------------------------------------------


def action(client: Client, name: str, *tasks: Task, **kwargs: Any) -> Any:
    return client.post(reverse(CHANGELIST), {"action": name, "_selected_action": [t.pk for t in tasks]},
                       follow=True, **kwargs)


def test_enable_action_schedules_from_now(admin_client: Client) -> None:
    task = make_task("off", schedule="*/5 * * * *", enabled=False)
    stale = timezone.now() - timedelta(days=2)
    Task.objects.filter(pk=task.pk).update(next_run=stale, finished_at=timezone.now())
    response = action(admin_client, "enable_tasks", task)
    assert "1 task(s) enabled." in texts(response)
    task.refresh_from_db()
    assert task.enabled and task.finished_at is None
    assert timezone.now() < task.next_run <= timezone.now() + timedelta(minutes=5)


def test_disable_action(admin_client: Client) -> None:
    first, second = make_task("a"), make_task("b")
    response = action(admin_client, "disable_tasks", first, second)
    assert "2 task(s) disabled." in texts(response)
    assert not Task.objects.filter(enabled=True).exists()


def test_clear_running_action(admin_client: Client) -> None:
    stuck = make_task("stuck")
    make_busy(stuck)
    engine.claim_now(stuck, timezone.now() + timedelta(seconds=1), "test")  # claimed, never published
    idle = make_task("idle")
    done = ran(idle, 1)
    response = action(admin_client, "clear_running", stuck, idle)
    assert "Running flag cleared on 1 task(s)." in texts(response)
    stuck.refresh_from_db()
    assert not stuck.running
    runs = list(Run.objects.filter(task_id=stuck.pk).values_list("state", "error", "lease_until"))
    assert runs == [(Run.LOST, "cleared by admin in the admin", None)] * 2
    assert not Run.objects.filter(task_id=stuck.pk, finished_at__isnull=True).exists()
    assert Run.objects.get(pk=done.pk).state == Run.SUCCEEDED  # a settled run is left as it was
    # The run left waiting to be sent no longer blocks the task.
    (text,) = texts(action(admin_client, "run_tasks_now", stuck))
    assert f"stuck (id {stuck.pk}) sent" in text


def published_run(task: Task) -> Run:
    """The one message on the broker is that of the task's one run, which the ledger has as published."""
    (message,) = celery_app.published()
    run = Run.objects.get(task_id=task.pk)
    assert run.state == Run.PUBLISHED and run.lease_until > timezone.now()
    assert message.headers["task"] == TASK_NAME
    assert message.headers["id"] == run.celery_id
    assert message.headers["periodic_task_name"] == task.result_tag
    assert message.payload[0] == [task.pk, task._func_info, task._extra_data, run.slot.isoformat()]
    return run


def test_run_now_action_sends_and_claims(admin_client: Client) -> None:
    task = make_task("now", iterations=2)
    response = action(admin_client, "run_tasks_now", task)
    (text,) = texts(response)
    match = re.search(rf"now \(id {task.pk}\) sent: Celery task id ({UUID_RE})\.", text)
    assert match, text
    run = published_run(task)
    assert run.celery_id == match.group(1)
    assert run.beat == "admin:admin"
    task.refresh_from_db()
    assert task.running and task.iterations == 2  # an iteration is used when the run settles


def test_run_now_action_busy_is_a_warning(admin_client: Client) -> None:
    task = make_task("solo", allow_overlap=False)
    busy = make_busy(task)
    response = action(admin_client, "run_tasks_now", task)
    (message,) = list(get_messages(response.wsgi_request))
    assert message.level_tag == "warning" and "already running" in str(message)
    assert celery_app.published() == []
    assert list(Run.objects.filter(task_id=task.pk).values_list("pk", "state")) == [(busy.pk, Run.STARTED)]
    assert Task.objects.get(pk=task.pk).running


def test_run_now_view_confirms_then_sends(admin_client: Client) -> None:
    task = make_task("button")
    response = admin_client.get(run_url(task))
    assert response.status_code == 200
    assert "Yes, run it now" in response.content.decode()
    assert celery_app.published() == [] and not Run.objects.exists()

    response = admin_client.post(run_url(task), follow=True)
    assert response.redirect_chain == [(change_url(task), 302)]
    (text,) = texts(response)
    celery_id = re.search(rf"Celery task id ({UUID_RE})", text).group(1)
    assert published_run(task).celery_id == celery_id
    assert celery_id in response.content.decode()
    assert Task.objects.get(pk=task.pk).running


def test_run_now_with_broker_down_is_an_error_and_revokes_the_run(admin_client: Client,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    task = make_task("unlucky", iterations=1)

    def broker_down(self: Dispatcher, messages: Any) -> list[tuple[Outgoing, str]]:
        raise BrokerUnavailable("[Errno 111] Connection refused")

    monkeypatch.setattr(Dispatcher, "publish", broker_down)
    response = admin_client.post(run_url(task), follow=True)
    (message,) = list(get_messages(response.wsgi_request))
    assert message.level_tag == "error"
    assert str(message) == "unlucky (id %d) not sent: the broker is unreachable ([Errno 111] Connection refused)." % task.pk
    run = Run.objects.get(task_id=task.pk)
    assert (run.state, run.error) == (Run.REVOKED, "not sent: the broker was unreachable")
    task.refresh_from_db()
    assert (task.running, task.iterations) == (False, 1)
    # The revoked run blocks nothing: with the broker back, the task is sent.
    monkeypatch.undo()
    admin_client.post(run_url(task))
    (sent,) = celery_app.published()
    assert sent.headers["id"] == Run.objects.get(task_id=task.pk, state=Run.PUBLISHED).celery_id


def test_run_now_view_unknown_task_redirects(admin_client: Client) -> None:
    response = admin_client.post(reverse("admin:sisy_celery_task_run", args=[999]))
    assert response.status_code == 302 and response.url == reverse("admin:index")
    assert celery_app.published() == [] and not Run.objects.exists()


def test_run_now_refuses_disallowed_callable(admin_client: Client) -> None:
    task = make_task("legacy")
    with override_settings(SISY_ALLOWED_MODULES=["billing"]):
        response = admin_client.post(run_url(task), follow=True)
        (message,) = list(get_messages(response.wsgi_request))
        assert message.level_tag == "error" and "is not allowed" in str(message)
        response = action(admin_client, "run_tasks_now", task)
        assert any("is not allowed" in text for text in texts(response))
    assert celery_app.published() == []
    assert not Run.objects.exists()
    assert not Task.objects.get(pk=task.pk).running


# -- run history ---------------------------------------------------------------------------------


def result(run: Run, status: str = "SUCCESS", **fields: Any) -> TaskResult:
    """The django-celery-results row a worker stores for ``run``."""
    return TaskResult.objects.create(task_id=run.celery_id, periodic_task_name=f"sisy:{run.task_id}",
                                     task_name=TASK_NAME, status=status, worker=run.worker, **fields)


def cells(section: str) -> list[list[str]]:
    """The text of each cell of each body row of the run history table."""
    body = section[section.index("<tbody>"):section.index("</tbody>")]
    return [[" ".join(re.sub(r"<[^>]+>", " ", cell).split()) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def test_run_history_reads_the_ledger_with_results_in_two_queries(admin_client: Client) -> None:
    task = make_task("history", timezone="Europe/Paris")
    ran(make_task("other"), 99)
    ok = ran(task, 1, late=0.25, took=1)
    failed = ran(task, 2, "FAILURE", "RuntimeError: boom", late=3, took=2)
    waiting = engine.claim_now(task, T0 + timedelta(minutes=3), "test")
    failed_result = result(failed, "FAILURE", traceback="RuntimeError: boom")
    result(ok)
    context = sisy_admin.TaskAdmin(Task, sisy_admin.admin.site)
    request = Client().get("/").wsgi_request
    request.user = User.objects.create_superuser("root", password="pw")
    with CaptureQueriesContext(connection) as captured:
        history = context.run_history(request, task)
    assert len(captured.captured_queries) == 2  # the runs, then their results
    assert [item["run"].pk for item in history["runs"]] == [waiting.pk, failed.pk, ok.pk]
    assert [item["lateness"] for item in history["runs"]] == ["", "3.000 s", "0.250 s"]
    assert [item["duration"] for item in history["runs"]] == ["", "2.000 s", "1.000 s"]
    assert history["runs"][0]["url"] == ""

    page = admin_client.get(change_url(task)).content.decode()
    section = page[page.index('id="sisy-run-history"'):]
    assert "<th scope=\"col\">Late by</th>" in section
    soon = " ".join(sisy_admin.relative(T0, timezone.now()).split())  # slots minutes apart, years ahead
    assert cells(section) == [
        [soon, "claimed", "", "", "", waiting.celery_id],
        [soon, "failed RuntimeError: boom", "3.000 s", "2.000 s", "celery@host2", failed.celery_id],
        [soon, "succeeded", "0.250 s", "1.000 s", "celery@host1", ok.celery_id],
    ]
    # The slot in the one date format: relative, the absolute time in the task's zone on hover.
    assert re.findall(r'<td><time datetime="[^"]+" title="([^"]+)">', section) == [
        "2030-01-01 01:03:00 CET", "2030-01-01 01:02:00 CET", "2030-01-01 01:01:00 CET"]
    assert '<div class="errornote sisy-run-error">RuntimeError: boom</div>' in section
    link = reverse("admin:django_celery_results_taskresult_change", args=[failed_result.pk])
    assert f'<a href="{link}">{failed.celery_id}</a>' in section
    assert "celery@host99" not in section


def test_run_history_shows_a_lost_runs_reason_and_a_restarted_runs_attempt(admin_client: Client) -> None:
    task = make_task("unlucky")
    slot = T0 + timedelta(minutes=1)
    run = engine.claim_now(task, slot, "test")
    engine.start(task, run.slot, "celery@dead", slot)
    lapsed = slot + timedelta(seconds=conf.running_timeout() + 1)
    assert isinstance(engine.start(task, run.slot, "celery@second", lapsed), engine.Started)
    lost = engine.claim_now(task, slot + timedelta(minutes=1), "test")
    engine.publish([lost], RefusingDispatcher(), slot + timedelta(minutes=1))
    rows = cells(admin_client.get(change_url(task)).content.decode())
    assert [row[1] for row in rows] == [
        "lost refused by the broker: NOT_FOUND - no queue", "started (attempt 2)"]
    assert rows[1][4] == "celery@second"


def test_run_history_pages(admin_client: Client) -> None:
    task = make_task("many runs")
    for n in range(sisy_admin.RUNS_PER_PAGE + 5):
        ran(task, n)
    first = admin_client.get(change_url(task)).context
    assert len(first["runs"]) == sisy_admin.RUNS_PER_PAGE
    assert (first["runs_previous"], first["runs_next"]) == (None, 2)
    assert first["runs"][0]["run"].worker == f"celery@host{sisy_admin.RUNS_PER_PAGE + 4}"
    second = admin_client.get(change_url(task) + "?runs_page=2").context
    assert [item["run"].worker for item in second["runs"]] == [f"celery@host{n}" for n in range(4, -1, -1)]
    assert (second["runs_previous"], second["runs_next"]) == (1, None)
    assert "Older" in admin_client.get(change_url(task)).content.decode()
    assert admin_client.get(change_url(task) + "?runs_page=x").context["runs_page"] == 1
    assert "No older runs." in admin_client.get(change_url(task) + "?runs_page=3").content.decode()
    # A page past any offset the database can take is an empty page, not a server error.
    far = admin_client.get(change_url(task) + "?runs_page=" + "9" * 30)
    assert far.status_code == 200 and "No older runs." in far.content.decode()


# -- permissions and CSRF ------------------------------------------------------------------------


def test_anonymous_is_sent_to_login(client: Client) -> None:
    task = make_task()
    for url in (reverse(CHANGELIST), change_url(task), run_url(task), reverse("admin:sisy_celery_task_preview")):
        response = client.get(url)
        assert response.status_code == 302 and response.url.startswith(reverse("admin:login")), url
    response = client.post(run_url(task))
    assert response.status_code == 302 and response.url.startswith(reverse("admin:login"))
    assert not Run.objects.exists() and not Task.objects.get(pk=task.pk).running


def test_view_only_staff_cannot_edit_or_run() -> None:
    task = make_task("guarded", userdata={"a": 1})
    viewer = staff("viewer", "view_task")
    page = viewer.get(change_url(task))
    assert page.status_code == 200
    content = page.content.decode()
    assert 'name="callable"' not in content and 'name="_save"' not in content and "Run now" not in content
    assert '<code class="sisy-callable">tests.<wbr>testapp.<wbr>jobs.<wbr>job</code>' in content
    assert viewer.post(change_url(task), form_data(label="hacked")).status_code == 403
    assert viewer.get(run_url(task)).status_code == 403
    assert viewer.post(run_url(task)).status_code == 403
    assert viewer.get(reverse("admin:sisy_celery_task_preview"), {"schedule": "* * * * *"}).status_code == 403
    for name in ("run_tasks_now", "enable_tasks", "disable_tasks", "clear_running"):
        response = viewer.post(reverse(CHANGELIST), {"action": name, "_selected_action": [task.pk]})
        assert response.status_code == 403, name
    assert viewer.get(reverse("admin:sisy_celery_task_add")).status_code == 403
    listing = viewer.get(reverse(CHANGELIST))
    assert listing.status_code == 200 and "run_tasks_now" not in listing.content.decode()
    task.refresh_from_db()
    assert (task.label, task.enabled, task.running) == ("guarded", True, False)
    assert not Run.objects.exists()
    assert celery_app.published() == []


def test_staff_without_permissions_gets_403() -> None:
    task = make_task()
    nobody = staff("nobody")
    for url in (reverse(CHANGELIST), change_url(task), run_url(task), reverse("admin:sisy_celery_task_preview")):
        assert nobody.get(url).status_code == 403, url


def test_change_permission_is_enough_to_run() -> None:
    task = make_task()
    editor = staff("editor", "view_task", "change_task")
    response = editor.post(run_url(task), follow=True)
    assert any("Celery task id" in text for text in texts(response))
    assert editor.get(reverse("admin:sisy_celery_task_preview"), {"schedule": "* * * * *"}).status_code == 200


def test_csrf_is_enforced(admin_user: User) -> None:
    task = make_task()
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    assert client.post(run_url(task)).status_code == 403
    response = client.post(reverse(CHANGELIST), {"action": "run_tasks_now", "_selected_action": [task.pk]})
    assert response.status_code == 403
    assert client.post(change_url(task), form_data(label="x")).status_code == 403
    assert not Run.objects.exists() and not Task.objects.get(pk=task.pk).running
    assert celery_app.published() == []


# -- beat processes ------------------------------------------------------------------------------


def test_beat_process_admin_is_read_only(admin_client: Client) -> None:
    now = timezone.now()
    beat = BeatProcess.objects.create(ident="host:1", hostname="host", pid=1, started_at=now - timedelta(hours=1),
                                      last_tick=now - timedelta(seconds=5))
    listing = admin_client.get(reverse("admin:sisy_celery_beatprocess_changelist")).content.decode()
    assert "host:1" in listing
    assert re.findall(r'<th[^>]*class="[^"]*column-(\w+)', listing) == [
        "ident", "hostname", "pid", "started", "last_tick_display"]  # one "last tick" column
    utc = "%Y-%m-%d %H:%M:%S UTC"
    assert f'title="{beat.last_tick.strftime(utc)}">5 seconds ago</time>' in listing
    assert f'title="{beat.started_at.strftime(utc)}">1\xa0hour ago</time>' in listing
    view = admin_client.get(reverse("admin:sisy_celery_beatprocess_change", args=[beat.pk])).content.decode()
    assert f'title="{beat.last_tick.strftime(utc)}">5 seconds ago</time>' in view
    BeatProcess.objects.filter(pk=beat.pk).update(stopped_at=now - timedelta(seconds=2))
    view = admin_client.get(reverse("admin:sisy_celery_beatprocess_change", args=[beat.pk])).content.decode()
    assert f'title="{(now - timedelta(seconds=2)).strftime(utc)}">2 seconds ago</time>' in view
    assert admin_client.get(reverse("admin:sisy_celery_beatprocess_add")).status_code == 403
    page = admin_client.get(reverse("admin:sisy_celery_beatprocess_change", args=[beat.pk]))
    assert page.status_code == 200 and 'name="_save"' not in page.content.decode()
    response = admin_client.post(reverse("admin:sisy_celery_beatprocess_change", args=[beat.pk]),
                                 {"ident": "changed", "hostname": "x", "pid": "2"})
    assert response.status_code == 403
    assert BeatProcess.objects.get(pk=beat.pk).ident == "host:1"
