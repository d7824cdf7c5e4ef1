"""The Task model and the API kept from the original sisy: task_with_callable, run_iterations, run_once."""
from __future__ import annotations

import io
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone as dt_timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.db import connection
from django.test import override_settings
from django.utils import timezone

import sisy_celery
from sisy_celery import models as sisy_models
from sisy_celery.models import FAR_FUTURE, HAS_NOT_RUN, Task, task_with_callable, taskinfo_with_label
from tests.testapp import jobs
from tests.testapp.models import SlugWidget, UuidWidget, Widget

pytestmark = pytest.mark.django_db
UTC = dt_timezone.utc
JOB = "tests.testapp.jobs.job"


def fresh(task: Task) -> Task:
    return Task.objects.get(pk=task.pk)


# -- constants and module attributes --------------------------------------------------------------


def test_has_not_run_and_far_future():
    assert HAS_NOT_RUN == datetime(1970, 1, 1, 0, 0, tzinfo=UTC)
    assert FAR_FUTURE == datetime(2217, 12, 31, 23, 59, tzinfo=UTC)
    task = Task()
    assert task.last_run == task.next_run == task.start_running == HAS_NOT_RUN
    assert task.end_running == FAR_FUTURE


def test_default_schedule_attribute_follows_settings():
    assert sisy_models.DEFAULT_SCHEDULE == "* * * * *"
    assert sisy_celery.DEFAULT_SCHEDULE == "* * * * *"
    with override_settings(SISY_DEFAULT_SCHEDULE="*/5 * * * *"):
        assert sisy_models.DEFAULT_SCHEDULE == "*/5 * * * *"
        assert sisy_celery.DEFAULT_SCHEDULE == "*/5 * * * *"
        from sisy_celery.models import DEFAULT_SCHEDULE

        assert DEFAULT_SCHEDULE == "*/5 * * * *"
    with pytest.raises(AttributeError, match="module 'sisy_celery.models' has no attribute 'NOPE'"):
        sisy_models.NOPE  # noqa: B018


# -- task_with_callable ----------------------------------------------------------------------------


def test_task_with_callable_returns_an_unsaved_task():
    task = task_with_callable(jobs.job)
    assert task.pk is None and task._state.adding
    assert Task.objects.count() == 0
    assert task.label == JOB
    assert task.schedule == "* * * * *"
    assert task.userdata == {}
    assert task.funcinfo == {"func_type": "function", "module_name": "tests.testapp.jobs", "func_name": "job",
                             "func_path": JOB}
    assert task.next_run == HAS_NOT_RUN
    task.save()
    assert Task.objects.count() == 1


def test_task_with_callable_label_and_schedule():
    task = task_with_callable(JOB, label="nightly", schedule="30 2 * * *", userdata={"a": [1, 2]})
    assert (task.label, task.schedule, task.userdata) == ("nightly", "30 2 * * *", {"a": [1, 2]})


def test_label_defaults_to_the_dotted_path_of_each_kind():
    widget = Widget.objects.create(name="w")
    assert task_with_callable(jobs.Holder.class_job).label == "tests.testapp.jobs.Holder.class_job"
    assert task_with_callable(widget.touch).label == "tests.testapp.models.Widget.touch"
    assert task_with_callable("tests.testapp.models.Widget.touch", pk_override=widget.pk).label == \
        "tests.testapp.models.Widget.touch"


@override_settings(SISY_DEFAULT_SCHEDULE="*/5 * * * *")
def test_schedule_defaults_to_the_setting():
    assert task_with_callable(jobs.job).schedule == "*/5 * * * *"
    assert Task().schedule == "*/5 * * * *"


@override_settings(SISY_DEFAULT_SCHEDULE="not a cron")
def test_broken_default_schedule_is_reported_at_creation():
    with pytest.raises(ValueError, match=r"Invalid cron schedule 'not a cron': it has 3 fields"):
        task_with_callable(jobs.job)


@pytest.mark.parametrize("schedule, message", [
    ("61 * * * *", "Invalid cron schedule '61 * * * *': field 1 (minute) '61' is not valid."),
    ("* * * * * * *", "it has 7 fields"),
    ("0 0 31 2 *", "no date ever matches it"),
    ("", "it must be a non-empty string"),
])
def test_invalid_cron_is_refused(schedule, message):
    with pytest.raises(ValueError) as info:
        task_with_callable(jobs.job, schedule=schedule)
    assert message in str(info.value)


def test_text_a_column_cannot_hold_is_refused_on_every_database():
    schedule = ",".join(str(m) for m in range(0, 60, 2)) + " * * * *"
    assert len(schedule) > 80
    with pytest.raises(ValueError, match=r"schedule '0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,'\.\.\. is longer than "
                                         r"80 characters\."):
        task_with_callable(jobs.job, schedule=schedule)
    with pytest.raises(ValueError, match="label 'xxxx.*is longer than 255 characters"):
        task_with_callable(jobs.job, label="x" * 256)
    task = Task.run_iterations(jobs.job)
    task.queue = "q" * 201
    with pytest.raises(ValueError, match="queue 'qqq.*is longer than 200 characters"):
        task.save()
    with pytest.raises(ValueError, match=r"label must not contain NUL characters \(databases cannot store them\)\."):
        task_with_callable(jobs.job, label="a\x00b")
    task.queue = "\ud800"
    with pytest.raises(ValueError, match="queue must not contain lone surrogate characters"):
        task.save()


@pytest.mark.parametrize("userdata, expected", [(None, {}), ({}, {}), ({"a": {"b": [1, "x", None, True, 1.5]}},
                                                                        {"a": {"b": [1, "x", None, True, 1.5]}})])
def test_userdata_accepted(userdata, expected):
    task = task_with_callable(jobs.job, userdata=userdata)
    task.save()
    assert fresh(task).userdata == expected


@pytest.mark.parametrize("userdata, message", [
    ([1, 2], "userdata must be a dict of JSON-serializable data, got list"),
    ("text", "userdata must be a dict of JSON-serializable data, got str"),
    (set(), "userdata must be a dict of JSON-serializable data, got set"),
    ({"a": set()}, "userdata must be a dict of JSON-serializable data (Object of type set is not JSON serializable)"),
    ({"a": float("nan")}, "userdata must be a dict of JSON-serializable data (Out of range float values are not "
                          "JSON compliant"),
    ({"a": float("inf")}, "Out of range float values are not JSON compliant"),
    ({"a": object()}, "Object of type object is not JSON serializable"),
    ({"a": datetime(2026, 1, 1)}, "Object of type datetime is not JSON serializable"),
    ({1: "x"}, "userdata keys must be strings, got 1"),
    ({"a": [{"b": {2: 1}}]}, "userdata keys must be strings, got 2"),
    ({"a": "nul\x00"}, "userdata must not contain NUL characters (databases cannot store them)."),
    ({"nul\x00": 1}, "userdata must not contain NUL characters"),
    ({"a": ["\ud800"]}, "userdata must not contain lone surrogate characters (they are not valid Unicode"),
    ({"\udfff": 1}, "userdata must not contain lone surrogate characters"),
])
def test_userdata_refused(userdata, message):
    with pytest.raises(ValueError) as info:
        task_with_callable(jobs.job, userdata=userdata)
    assert message in str(info.value)


JSON_LEAVES = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text()
               # PostgreSQL's jsonb keeps numbers as decimals: a float such as 7.2e16 comes back as an int.
               | st.floats(min_value=-1e15, max_value=1e15))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(), inner, max_size=4), max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(), JSON_VALUES, max_size=5))
def test_property_userdata_comes_back_equal_or_is_refused(data):
    try:
        task = task_with_callable(jobs.job, userdata=data)
    except ValueError as exc:
        assert "userdata must not contain NUL characters" in str(exc)
        return
    task.save()
    assert fresh(task).userdata == data
    task.delete()


def test_userdata_setter_checks_too():
    task = task_with_callable(jobs.job)
    task.userdata = None
    assert task.userdata == {}
    with pytest.raises(ValueError, match="userdata must be a dict of JSON-serializable data, got list"):
        task.userdata = [1]


def test_task_with_callable_sets_other_fields():
    start = timezone.now() + timedelta(days=1)
    task = task_with_callable(jobs.job, allow_overlap=False, queue="slow", start_running=start, iterations=4,
                              timezone="Europe/Paris")
    assert (task.allow_overlap, task.queue, task.start_running, task.iterations, task.timezone) == (
        False, "slow", start, 4, "Europe/Paris")


def test_task_with_callable_refuses_unknown_fields_and_naive_dates():
    with pytest.raises(TypeError, match=r"task_with_callable\(\) got unknown field\(s\) \['next_run'\]"):
        task_with_callable(jobs.job, next_run=timezone.now())
    with pytest.raises(ValueError, match="start_running must be a timezone-aware datetime."):
        task_with_callable(jobs.job, start_running=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="end_running must be a timezone-aware datetime."):
        task_with_callable(jobs.job, end_running=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="start_running must be a timezone-aware datetime."):
        task_with_callable(jobs.job, start_running="2030-01-01T00:00:00Z")
    with pytest.raises(ValueError, match="Unknown time zone 'Mars/Base'"):
        task_with_callable(jobs.job, timezone="Mars/Base")


@pytest.mark.parametrize("fields, message", [
    ({"iterations": -1}, "iterations: Ensure this value is greater than or equal to 0."),
    ({"priority": 256}, "priority: Ensure this value is less than or equal to 255."),
    ({"expires": -5}, "expires: Ensure this value is greater than or equal to 0."),
    ({"allow_overlap": "maybe"}, "allow_overlap: “maybe” value must be either True or False."),
    ({"queue": "q" * 201}, "queue 'qqqq"),
    ({"timezone": "Mars/Base"}, "Unknown time zone 'Mars/Base'"),
    ({"start_running": datetime(2030, 1, 1, tzinfo=UTC), "end_running": datetime(2030, 1, 1, tzinfo=UTC)},
     "end_running must be after start_running."),
])
def test_task_with_callable_checks_the_fields(fields, message):
    with pytest.raises(ValueError) as info:
        task_with_callable(jobs.job, **fields)
    assert message in str(info.value)


def test_task_with_callable_refuses_what_a_worker_cannot_run():
    with pytest.raises(ValueError, match="is a lambda or a function defined inside another function"):
        task_with_callable(jobs.lam)
    with pytest.raises(ValueError, match="Widget instance is not saved"):
        task_with_callable(Widget(name="x").touch)


@pytest.mark.parametrize("make", [
    lambda: Widget.objects.create(name="w"),
    lambda: UuidWidget.objects.create(),
    lambda: SlugWidget.objects.create(slug="slug-1"),
])
def test_instance_methods_of_every_primary_key_type(make):
    obj = make()
    task = task_with_callable(obj.touch)
    task.save()
    stored = fresh(task).funcinfo
    assert stored["model_pk"] == (str(obj.pk) if isinstance(obj.pk, uuid.UUID) else obj.pk)
    assert stored["model"] == obj._meta.label


def test_pk_override_for_callables_and_strings():
    widget = Widget.objects.create(name="w")
    from_callable = task_with_callable(Widget.touch, pk_override=widget.pk)
    from_string = task_with_callable("tests.testapp.models.Widget.touch", pk_override=str(widget.pk))
    assert from_callable.funcinfo == from_string.funcinfo
    assert from_callable.funcinfo["model_pk"] == widget.pk


def test_taskinfo_with_label():
    Task.run_iterations(jobs.job, label="findme", iterations=0)
    assert taskinfo_with_label("findme")["func_path"] == JOB
    with pytest.raises(Task.DoesNotExist):
        taskinfo_with_label("missing")


# -- run_iterations and run_once -------------------------------------------------------------------


def test_run_iterations_returns_the_saved_task():
    before = timezone.now()
    task = Task.run_iterations(jobs.job, 3, "three times", userdata={"n": 1})
    assert isinstance(task, Task) and task.pk is not None and not task._state.adding
    stored = fresh(task)
    assert (stored.iterations, stored.label, stored.schedule, stored.userdata) == (3, "three times", "* * * * * *",
                                                                                  {"n": 1})
    # Default schedule: every second; the first slot is the next whole second.
    assert before <= stored.next_run <= timezone.now() + timedelta(seconds=1)
    assert stored.next_run.microsecond == 0


def test_run_iterations_zero_means_forever_and_bad_counts_are_refused():
    assert Task.run_iterations(jobs.job, iterations=0).iterations == 0
    for bad in (-1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match=r"iterations must be a whole number >= 0 \(0 = forever\), got"):
            Task.run_iterations(jobs.job, iterations=bad)
    assert Task.objects.count() == 1


def test_run_once_returns_the_saved_task_due_now():
    before = timezone.now()
    task = Task.run_once(jobs.job, userdata={"a": 1})
    stored = fresh(task)
    assert (stored.iterations, stored.label, stored.userdata, stored.wait_for_schedule) == (1, JOB, {"a": 1}, False)
    assert before <= stored.next_run <= timezone.now()
    assert Task.objects.due(timezone.now()).get() == task


def test_run_iterations_run_immediately():
    before = timezone.now()
    task = Task.run_iterations(jobs.job, 2, schedule="0 0 1 1 *", run_immediately=True)
    assert before <= fresh(task).next_run <= timezone.now()


def test_wait_for_schedule_false_runs_about_now():
    before = timezone.now()
    task = task_with_callable(jobs.job, schedule="0 0 1 1 *", wait_for_schedule=False)
    task.save()
    assert before <= fresh(task).next_run <= timezone.now()


def test_wait_for_schedule_true_waits_for_the_first_slot():
    task = task_with_callable(jobs.job, schedule="0 0 1 1 *")
    task.save()
    next_run = fresh(task).next_run
    assert (next_run.month, next_run.day, next_run.hour, next_run.minute) == (1, 1, 0, 0)
    assert next_run > timezone.now()


def _next_hour() -> datetime:
    return (timezone.now() + timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)


def test_delay_until_on_a_slot_runs_at_that_slot():
    start = _next_hour()
    task = Task.run_iterations(jobs.job, 5, schedule="0 * * * *", delay_until=start)
    stored = fresh(task)
    assert stored.start_running == start
    assert stored.next_run == start


def test_delay_until_between_slots_runs_at_the_next_slot():
    start = _next_hour() + timedelta(minutes=1)
    task = Task.run_iterations(jobs.job, 5, schedule="0 * * * *", delay_until=start)
    assert fresh(task).next_run == start + timedelta(minutes=59)


def test_run_once_with_delay_until_runs_at_delay_until():
    start = timezone.now() + timedelta(minutes=10, seconds=7, microseconds=5)
    task = Task.run_once(jobs.job, delay_until=start)
    stored = fresh(task)
    assert stored.start_running == stored.next_run == start


def test_delay_until_in_another_zone_is_the_same_instant():
    start = _next_hour().astimezone(ZoneInfo("Asia/Kolkata"))
    task = Task.run_iterations(jobs.job, 1, schedule="0 * * * *", delay_until=start)
    assert fresh(task).next_run == start


@pytest.mark.parametrize("delay_until, message", [
    (datetime(2099, 1, 1), "delay_until must be timezone-aware: use e.g. django.utils.timezone.now() + timedelta"),
    (datetime(2001, 1, 1, tzinfo=UTC), "delay_until 2001-01-01T00:00:00+00:00 is in the past: a task cannot start "
                                       "running in the past."),
    ("2099-01-01T00:00:00Z", "delay_until must be a datetime.datetime instance, got str."),
    (1893456000, "delay_until must be a datetime.datetime instance, got int."),
])
def test_delay_until_refused(delay_until, message):
    for create in (lambda: Task.run_once(jobs.job, delay_until=delay_until),
                   lambda: Task.run_iterations(jobs.job, 2, delay_until=delay_until)):
        with pytest.raises(ValueError) as info:
            create()
        assert message in str(info.value)
    assert Task.objects.count() == 0


def test_delay_until_now_is_in_the_past():
    with pytest.raises(ValueError, match="is in the past"):
        Task.run_once(jobs.job, delay_until=timezone.now())


# -- the saved row ----------------------------------------------------------------------------------


def test_str_shows_the_label():
    task = Task.run_iterations(jobs.job, label="Nightly report")
    assert str(task) == "Nightly report"
    assert str(Task.run_iterations(jobs.job)) == JOB
    assert str(Task(pk=7)) == "Task 7"


def test_save_without_callable_is_refused():
    with pytest.raises(ValueError, match=r"Task has no callable: create it with task_with_callable\(\)"):
        Task(label="x").save()


def test_save_validates_the_schedule_and_zone():
    task = Task.run_iterations(jobs.job)
    task.schedule = "* 99 * * *"
    with pytest.raises(ValueError, match=r"field 2 \(hour\) '99' is not valid"):
        task.save()
    task.schedule = "* * * * *"
    task.timezone = "Nowhere/City"
    with pytest.raises(ValueError, match="Unknown time zone 'Nowhere/City'"):
        task.save()
    assert fresh(task).schedule == "* * * * * *"


def test_full_clean_reports_fields():
    task = task_with_callable(jobs.job)
    task.schedule = "* 99 * * *"
    task.timezone = "Nowhere/City"
    task.end_running = task.start_running
    with pytest.raises(ValidationError) as info:
        task.full_clean()
    errors = info.value.message_dict
    assert "field 2 (hour) '99' is not valid" in errors["schedule"][0]
    assert "Unknown time zone 'Nowhere/City'" in errors["timezone"][0]
    assert errors["end_running"] == ["end_running must be after start_running."]


def test_userdata_mutation_then_save_persists():
    task = Task.run_iterations(jobs.job, userdata={"count": 1})
    task.userdata["k"] = "v"
    task.userdata["count"] += 1
    task.save()
    assert fresh(task).userdata == {"count": 2, "k": "v"}
    loaded = fresh(task)
    loaded.userdata["nested"] = {"list": [1]}
    loaded.save()
    again = fresh(task)
    again.userdata["nested"]["list"].append(2)
    again.save()
    assert fresh(task).userdata == {"count": 2, "k": "v", "nested": {"list": [1, 2]}}


def test_userdata_mutated_into_something_invalid_is_refused_at_save():
    task = Task.run_iterations(jobs.job)
    task.userdata["bad"] = {1, 2}
    with pytest.raises(ValueError, match="Object of type set is not JSON serializable"):
        task.save()


def test_save_writes_only_the_fields_this_copy_changed():
    task = Task.run_iterations(jobs.job, schedule="0 * * * *", iterations=5)
    stale = fresh(task)
    moved = datetime(2099, 1, 1, tzinfo=UTC)
    Task.objects.filter(pk=task.pk).update(next_run=moved, iterations=4, running=True)
    stale.label = "renamed"
    stale.save()
    stored = fresh(task)
    assert stored.label == "renamed"
    assert (stored.next_run, stored.iterations, stored.running) == (moved, 4, True)


def test_unchanged_save_touches_nothing_but_modified_at():
    task = Task.run_iterations(jobs.job)
    stale = fresh(task)
    Task.objects.filter(pk=task.pk).update(label="elsewhere", iterations=9)
    stale.save()
    stored = fresh(task)
    assert (stored.label, stored.iterations) == ("elsewhere", 9)
    assert stored.modified_at >= task.modified_at


def test_editing_the_schedule_recomputes_next_run():
    task = Task.run_iterations(jobs.job, schedule="0 0 1 1 *", iterations=0)
    first = fresh(task).next_run
    loaded = fresh(task)
    loaded.schedule = "* * * * *"
    before = timezone.now()
    loaded.save()
    assert before < fresh(task).next_run <= timezone.now() + timedelta(minutes=1)
    assert fresh(task).next_run != first


def test_editing_the_label_keeps_next_run():
    task = Task.run_iterations(jobs.job, schedule="0 0 1 1 *")
    loaded = fresh(task)
    Task.objects.filter(pk=task.pk).update(next_run=datetime(2090, 1, 1, tzinfo=UTC))
    loaded.label = "other"
    loaded.save()
    assert fresh(task).next_run == datetime(2090, 1, 1, tzinfo=UTC)


def test_editing_the_timezone_recomputes_next_run():
    task = Task.run_iterations(jobs.job, schedule="0 9 * * *", iterations=0)
    assert fresh(task).next_run.hour == 9
    loaded = fresh(task)
    loaded.timezone = "Asia/Tokyo"
    loaded.save()
    assert fresh(task).next_run.hour == 0  # 09:00 JST


def test_reenabling_recomputes_next_run_instead_of_catching_up():
    task = Task.run_iterations(jobs.job, schedule="0 0 1 1 *", iterations=0)
    Task.objects.filter(pk=task.pk).update(enabled=False, next_run=datetime(2001, 1, 1, tzinfo=UTC))
    loaded = fresh(task)
    loaded.enabled = True
    loaded.save()
    assert fresh(task).next_run > timezone.now()


def test_save_with_update_fields_still_recomputes_and_writes_next_run():
    task = Task.run_iterations(jobs.job, schedule="0 0 1 1 *", iterations=0)
    loaded = fresh(task)
    loaded.schedule = "* * * * *"
    loaded.label = "not written"
    loaded.save(update_fields=["schedule"])
    stored = fresh(task)
    assert stored.schedule == "* * * * *"
    assert stored.next_run <= timezone.now() + timedelta(minutes=1)
    assert stored.label == JOB
    # The label was not written, so a later plain save still writes it.
    loaded.save()
    assert fresh(task).label == "not written"


def test_refresh_from_db_then_save_does_not_write_stale_values():
    task = Task.run_iterations(jobs.job, schedule="0 0 1 1 *", iterations=5)
    task.refresh_from_db()
    Task.objects.filter(pk=task.pk).update(iterations=2)
    task.refresh_from_db()
    Task.objects.filter(pk=task.pk).update(iterations=1)
    task.label = "after refresh"
    task.save()
    stored = fresh(task)
    assert (stored.label, stored.iterations) == ("after refresh", 1)


def test_deferred_fields_are_saved_once_loaded():
    task = Task.run_iterations(jobs.job, schedule="0 0 1 1 *", iterations=5)
    partial = Task.objects.only("id", "label").get(pk=task.pk)
    partial.iterations = 7  # set while deferred: its database value is unknown, so it is written
    partial.label = "partial"
    partial.save()
    stored = fresh(task)
    assert (stored.label, stored.iterations) == ("partial", 7)
    lazy = Task.objects.only("id").get(pk=task.pk)
    assert lazy.iterations == 7  # loaded on access
    Task.objects.filter(pk=task.pk).update(label="moved on")
    lazy.iterations += 1
    lazy.save()
    stored = fresh(task)
    assert (stored.label, stored.iterations) == ("moved on", 8)


def test_per_task_timezone():
    task = Task.run_iterations(jobs.job, schedule="0 9 * * *", iterations=0, timezone="America/New_York")
    next_run = fresh(task).next_run
    local = next_run.astimezone(ZoneInfo("America/New_York"))
    assert (local.hour, local.minute) == (9, 0)
    assert next_run.utcoffset() == timedelta(0)
    assert task.zone == ZoneInfo("America/New_York")


@override_settings(SISY_TIMEZONE="Australia/Sydney")
def test_blank_task_timezone_uses_the_configured_zone():
    task = Task.run_iterations(jobs.job, schedule="30 8 * * *", iterations=0)
    local = fresh(task).next_run.astimezone(ZoneInfo("Australia/Sydney"))
    assert (local.hour, local.minute) == (8, 30)


def test_callable_path_and_result_tag():
    task = Task.run_iterations(jobs.job)
    assert task.callable_path == JOB
    assert task.result_tag == f"sisy:{task.pk}"


def test_due_queryset():
    now = timezone.now()
    late = Task.run_once(jobs.job)
    early = Task.run_once(jobs.job)
    Task.objects.filter(pk=early.pk).update(next_run=now - timedelta(hours=1))
    disabled = Task.run_once(jobs.job)
    Task.objects.filter(pk=disabled.pk).update(enabled=False)
    Task.run_iterations(jobs.job, schedule="0 0 1 1 *")
    assert list(Task.objects.due(timezone.now())) == [early, late]


# -- schema ----------------------------------------------------------------------------------------


def test_due_index_is_declared():
    indexes = {index.name: index.fields for index in Task._meta.indexes}
    assert indexes["sisy_task_enabled_next_idx"] == ["-enabled", "next_run"]
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, Task._meta.db_table)
    assert constraints["sisy_task_enabled_next_idx"]["columns"] == ["enabled", "next_run"]
    assert constraints["sisy_task_enabled_next_idx"]["index"] is True


@pytest.mark.postgresql  # EXPLAIN output is PostgreSQL's
def test_due_query_uses_the_index_on_postgresql():
    info = task_with_callable(jobs.job).funcinfo
    now = timezone.now()
    Task.objects.bulk_create(
        [Task(label=f"t{i}", _func_info=info, next_run=now + timedelta(minutes=i - 5)) for i in range(5000)],
        batch_size=1000,
    )
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {Task._meta.db_table}")
    plan = Task.objects.due(timezone.now()).explain()
    assert "sisy_task_enabled_next_idx" in plan, plan


def test_migrations_are_complete():
    out = io.StringIO()
    call_command("makemigrations", "sisy_celery", "--check", "--dry-run", stdout=out)
    with override_settings(SISY_DEFAULT_SCHEDULE="*/5 * * * *"):
        call_command("makemigrations", "sisy_celery", "--check", "--dry-run", stdout=out)
    call_command("makemigrations", "testapp", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()


def test_importing_the_package_does_not_import_models():
    root = Path(__file__).resolve().parent.parent
    code = ("import sisy_celery, sys; assert 'sisy_celery.models' not in sys.modules, sorted(sys.modules); "
            "print(sisy_celery.__version__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == sisy_celery.__version__


def test_instance_method_task_round_trip_and_userdata_on_a_new_task():
    widget = Widget.objects.create(name="x")
    task = task_with_callable(widget.touch)
    task.save()
    assert task.funcinfo["model_pk"] == widget.pk
    task.userdata["k"] = "v"
    task.save()
    assert fresh(task).userdata == {"k": "v"}
    assert fresh(task).funcinfo == task.funcinfo
