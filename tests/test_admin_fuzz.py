"""No input to the Task admin answers 500: arbitrary text in every field of the add and change forms.

Hypothesis fills each field with any text, or with a dotted path to a real object of Django, the
standard library or the project (functions, classes, inherited methods, properties, managers,
modules), and the admin must answer a page (200, the form with its errors) or a redirect (saved).
"""
from __future__ import annotations

import importlib
import inspect
import os
from functools import lru_cache

from django.contrib.admin.utils import quote
from django.contrib.auth.models import User
from django.test import override_settings
from django.urls import reverse
from hypothesis import HealthCheck, example, given, settings, strategies as st
from hypothesis.extra.django import TestCase

from sisy_celery.models import Task, task_with_callable
from tests.testapp import jobs
from tests.testapp.models import Widget

# Modules whose members are offered as dotted paths: importing them has no side effect.
MODULES = [
    "os", "os.path", "json", "functools", "subprocess", "shutil", "datetime", "collections", "logging",
    "django.db.models", "django.db.models.base", "django.db.transaction", "django.contrib.auth.models",
    "django.core.management", "django.utils.timezone", "django_celery_results.models",
    "sisy_celery.models", "sisy_celery.callables", "sisy_celery.tasks", "sisy_celery.schedules",
    "tests.testapp.jobs", "tests.testapp.models", "tests.testapp.vendor",
]
FIELDS = [
    "label", "schedule", "timezone", "start_running_0", "start_running_1", "end_running_0", "end_running_1",
    "iterations", "queue", "priority", "expires", "callable", "pk_override", "userdata",
]
CHECKBOXES = ["enabled", "wait_for_schedule", "allow_overlap"]
BIG_NUMBERS = ["99999999999999999999", "-9223372036854775809", "9223372036854775807", "0", "-1", "1e3", "１"]
EXAMPLES = int(os.environ.get("SISY_HYPOTHESIS_EXAMPLES", 150))


@lru_cache(maxsize=None)
def real_paths() -> tuple[str, ...]:
    """Dotted paths to the members of MODULES, and to the members of their classes (inherited too)."""
    paths = set(MODULES)
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            paths.add(f"{name}.{attr}")
            if inspect.isclass(value):
                paths.update(f"{name}.{attr}.{member}" for member in dir(value))
    paths.update(f"tests.testapp.jobs.some_widget.{member}" for member in dir(Widget))
    return tuple(sorted(paths))


@lru_cache(maxsize=None)
def model_member_paths() -> tuple[str, ...]:
    """Members of a few models, most of them inherited from Django: the paths a model method takes."""
    models = ["tests.testapp.models.Widget", "tests.testapp.models.Touchable", "sisy_celery.models.Task",
              "django.contrib.auth.models.User", "django.db.models.Model"]
    return tuple(p for p in real_paths() if p.rsplit(".", 1)[0] in models)


def field_values() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=60),
        st.sampled_from(real_paths()),
        st.sampled_from(model_member_paths()),
        st.sampled_from(["", " ", "0", "-1", "1", "99999999999999999999", "1e400", "nan", "null", "{}", "[]",
                         '{"a": 1}', '{"a": NaN}', "2026-01-01", "12:00", "25:61", "9999-12-31", "0001-01-01",
                         "* * * * *", "5-5 * * * *", "0 0 */2 * 1", "* * * * * 30-30", "@daily", "@reboot",
                         "UTC", "Europe/Paris", "../etc/passwd", "\x00", "1" * 300, "é" * 600]),
    )


form_data = st.fixed_dictionaries(
    {name: field_values() for name in FIELDS},
    optional={name: st.sampled_from(["on", "off", "", "\x00"]) for name in CHECKBOXES},
)

FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# A form that saves; the examples change one field of it.
GOOD = {"label": "ok", "enabled": "on", "schedule": "5-5 * * * *", "timezone": "", "iterations": "0",
        "queue": "", "priority": "", "expires": "", "callable": "tests.testapp.jobs.job",
        "pk_override": "", "userdata": "{}", "start_running_0": "", "start_running_1": "",
        "end_running_0": "", "end_running_1": ""}


def known_cases(test):
    """Paths that once answered 500 or come close: methods inherited from Django's Model, abstract models."""
    for callable, pk in [
        ("tests.testapp.models.Widget.delete", "1"),  # inherited from Model
        ("tests.testapp.models.Widget.delete", ""),
        ("django.db.models.Model.delete", "1"),  # a model without _meta
        ("tests.testapp.models.Touchable.base_touch", "1"),  # abstract
        ("django.contrib.auth.models.AbstractUser.clean", "x"),
        ("sisy_celery.models.Task.run_once", ""),
    ]:
        test = example(dict(GOOD, callable=callable, pk_override=pk))(test)
    return test


class AdminFormFuzz(TestCase):
    """Every example runs in its own transaction, with a superuser and one existing task."""

    @classmethod
    def setUpTestData(cls) -> None:
        cls.user = User.objects.create_superuser("fuzz", "fuzz@example.com", "pw")
        Widget.objects.create(name="fuzz")
        cls.task = task_with_callable(jobs.job, label="existing")
        cls.task.save()

    def post(self, url: str, data: dict[str, str]) -> None:
        self.client.force_login(self.user)
        response = self.client.post(url, data)
        self.assertIn(response.status_code, (200, 302), (url, data))

    @FUZZ
    @given(form_data)
    @known_cases
    def test_add_form(self, data: dict[str, str]) -> None:
        self.post(reverse("admin:sisy_celery_task_add"), data)

    @FUZZ
    @given(form_data)
    @known_cases
    def test_change_form(self, data: dict[str, str]) -> None:
        self.post(reverse("admin:sisy_celery_task_change", args=[self.task.pk]), data)

    @FUZZ
    @given(form_data)
    def test_add_form_with_an_allow_list(self, data: dict[str, str]) -> None:
        with override_settings(SISY_ALLOWED_MODULES=["tests.testapp.jobs", "tests.testapp.models"]):
            self.post(reverse("admin:sisy_celery_task_add"), data)

    @FUZZ
    @given(st.text(max_size=60) | st.sampled_from(["5-5 * * * *", "0 0 */2 * 1", "@daily"]), st.text(max_size=40))
    def test_schedule_preview(self, schedule: str, zone: str) -> None:
        self.client.force_login(self.user)
        response = self.client.get(reverse("admin:sisy_celery_task_preview"), {"schedule": schedule, "timezone": zone})
        self.assertIn(response.status_code, (200, 400), (schedule, zone))

    @FUZZ
    @given(st.sampled_from(["enable_tasks", "disable_tasks", "run_tasks_now", "clear_running", "delete_selected"])
           | st.text(max_size=20),
           st.lists(st.text(max_size=20) | st.just("existing") | st.sampled_from(BIG_NUMBERS), max_size=3))
    def test_actions(self, action: str, selected: list[str]) -> None:
        ids = [str(self.task.pk) if value == "existing" else value for value in selected]
        self.client.force_login(self.user)
        response = self.client.post(reverse("admin:sisy_celery_task_changelist"),
                                    {"action": action, "_selected_action": ids, "index": "0"})
        # 403: an action name the user may not run (or that does not exist) is refused as forbidden.
        self.assertIn(response.status_code, (200, 302, 403), (action, ids))

    @FUZZ
    @given(st.text(min_size=1, max_size=30).filter(lambda t: "/" not in t) | st.sampled_from(BIG_NUMBERS),
           st.sampled_from(["run", "change", "delete", "history"]), st.booleans())
    @example("99999999999999999999", "run", True)
    @example("99999999999999999999", "change", False)
    def test_views_of_any_object_id(self, object_id: str, view: str, post: bool) -> None:
        self.client.force_login(self.user)
        url = reverse(f"admin:sisy_celery_task_{view}", args=[quote(object_id)])  # as the admin builds its links
        response = self.client.post(url, GOOD if view == "change" else {"post": "yes"}) if post else self.client.get(url)
        self.assertIn(response.status_code, (200, 302), (view, object_id))

    def test_a_valid_post_is_saved(self) -> None:
        # The fuzzing above must be able to reach a saved task: the same form with good values redirects.
        self.client.force_login(self.user)
        response = self.client.post(reverse("admin:sisy_celery_task_add"), GOOD)
        self.assertEqual(response.status_code, 302)
        self.assertTrue(Task.objects.filter(label="ok").exists())

    def test_an_action_on_a_selection_that_is_not_task_ids_does_nothing(self) -> None:
        self.client.force_login(self.user)
        for selected in ([""], ["abc"], [str(self.task.pk), "99999999999999999999"]):
            response = self.client.post(reverse("admin:sisy_celery_task_changelist"),
                                        {"action": "disable_tasks", "_selected_action": selected, "index": "0"},
                                        follow=True)
            self.assertContains(response, "The selection is not a list of task ids; nothing was done.")
        self.task.refresh_from_db()
        self.assertTrue(self.task.enabled)
