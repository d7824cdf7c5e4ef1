"""Django system checks for sisy-celery's settings (sisy_celery/checks.py)."""
from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from celery import Celery, _state as celery_state
from django.conf import settings as django_settings
from django.core.checks import Error, Warning, run_checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from sisy_celery import conf
from sisy_celery.checks import (
    check_beat_scheduler, check_celery_app, check_result_backend, check_settings, configured_app, refuse_to_start,
)
from tests import celery_app
from tests.conftest import skip_unless

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _allow_list(settings):
    """pytest-django runs tests with DEBUG = False, where no allow-list is an error (E008)."""
    settings.SISY_ALLOWED_MODULES = ["tests.testapp"]


def sisy_messages() -> list:
    """The messages of sisy-celery's registered checks, as `manage.py check` runs them."""
    return [m for m in run_checks() if m.id and m.id.startswith("sisy_celery.")]


def only(expected_id: str):
    messages = sisy_messages()
    assert [m.id for m in messages] == [expected_id], [str(m) for m in messages]
    message = messages[0]
    assert message.hint
    return message


def test_good_settings_give_no_messages():
    assert sisy_messages() == []
    assert check_settings() == []


@override_settings(DEBUG=False, SISY_ALLOWED_MODULES=["tests.testapp"], SISY_DEFAULT_SCHEDULE="*/5 * * * *",
                   SISY_TIMEZONE="Europe/Paris", SISY_HEARTBEAT_FREQUENCY=0.5, SISY_RUNNING_TIMEOUT=60,
                   SISY_BEAT_BATCH_SIZE=10)
def test_good_production_settings_give_no_messages():
    assert sisy_messages() == []


@pytest.mark.parametrize("schedule, detail", [
    ("* * *", "it has 3 fields"),
    ("* 25 * * *", "field 2 (hour) '25' is not valid"),
    ("", "it must be a non-empty string"),
    (5, "it must be a non-empty string"),
])
def test_bad_default_schedule(schedule, detail):
    with override_settings(SISY_DEFAULT_SCHEDULE=schedule):
        message = only("sisy_celery.E001")
    assert isinstance(message, Error)
    assert message.msg.startswith("SISY_DEFAULT_SCHEDULE is not a valid cron string: Invalid cron schedule")
    assert detail in message.msg
    assert message.hint == "Set it to a cron string such as '* * * * *' or remove it."


@pytest.mark.parametrize("overrides, name", [
    ({"SISY_TIMEZONE": "Mars/Olympus"}, "Mars/Olympus"),
    ({"CELERY_TIMEZONE": "Atlantis/Capital"}, "Atlantis/Capital"),
    ({"SISY_TIMEZONE": "Nowhere", "CELERY_TIMEZONE": "UTC"}, "Nowhere"),
])
def test_unknown_time_zone(overrides, name):
    with override_settings(**overrides):
        message = only("sisy_celery.E002")
    assert message.msg == (f"The time zone {name!r} (from SISY_TIMEZONE, CELERY_TIMEZONE or TIME_ZONE) is unknown.")
    assert "IANA zone name" in message.hint


@pytest.mark.parametrize("allowed", [
    "tests.testapp", ["tests..testapp"], [""], [None], [".tests"], ["tests.testapp."], 42, {"tests": True},
    ["tests-app"], "*", ["*"], ["__all__"], "__ALL__",
])
def test_bad_allow_list(allowed):
    with override_settings(SISY_ALLOWED_MODULES=allowed):
        message = only("sisy_celery.E003")
    assert message.msg == f"SISY_ALLOWED_MODULES must be a list of dotted module prefixes or '__all__', got {allowed!r}."
    assert message.hint == "For example SISY_ALLOWED_MODULES = ['billing.jobs', 'reports']."


@pytest.mark.parametrize("allowed", [[], ["tests"], ("a.b", "c"), ["tests.testapp.jobs"], "__all__"])
def test_good_allow_lists(allowed):
    with override_settings(SISY_ALLOWED_MODULES=allowed, DEBUG=False):
        assert sisy_messages() == []


@pytest.mark.parametrize("setting, code", [
    ("SISY_HEARTBEAT_FREQUENCY", "E004"), ("SISY_RUNNING_TIMEOUT", "E005"), ("SISY_BEAT_BATCH_SIZE", "E006"),
])
@pytest.mark.parametrize("value", [0, -1, -0.5, "10", None, True, float("nan"), float("inf")])
def test_numbers_must_be_positive(setting, code, value):
    with override_settings(**{setting: value}):
        message = only(f"sisy_celery.{code}")
    assert message.msg.startswith(f"{setting} must be ")
    assert message.msg.endswith(f"got {value!r}.")
    assert "Remove it to use the default" in message.hint


@pytest.mark.parametrize("value", [0.5, 2.5, 1e9 + 0.5])
def test_batch_size_must_be_a_whole_number(value):
    # int(0.5) would be 0: beat would claim no rows at all.
    with override_settings(SISY_BEAT_BATCH_SIZE=value):
        message = only("sisy_celery.E006")
    assert message.msg == f"SISY_BEAT_BATCH_SIZE must be a whole number greater than 0, got {value!r}."
    assert message.hint == "Remove it to use the default (1000) or set a positive number."


@pytest.mark.parametrize("setting, value", [
    ("SISY_HEARTBEAT_FREQUENCY", 0.25), ("SISY_HEARTBEAT_FREQUENCY", 3600), ("SISY_RUNNING_TIMEOUT", 5.5),
    ("SISY_BEAT_BATCH_SIZE", 1), ("SISY_BEAT_BATCH_SIZE", 50.0),
])
def test_good_numbers(setting, value):
    with override_settings(**{setting: value}):
        assert sisy_messages() == []


def test_heartbeat_defaults_to_one_second(settings):
    """A new task is noticed within a second unless the project says otherwise (the original waited 60 s)."""
    del settings.SISY_HEARTBEAT_FREQUENCY
    assert conf.heartbeat_frequency() == 1.0
    assert sisy_messages() == []


@override_settings(USE_TZ=False)
def test_use_tz_false():
    message = only("sisy_celery.E007")
    assert message.msg == "sisy-celery needs USE_TZ = True: schedules are evaluated in real time zones."
    assert message.hint == "Set USE_TZ = True (the Django default)."


@override_settings(DEBUG=False, SISY_ALLOWED_MODULES=None)
def test_no_allow_list_in_production_is_an_error():
    message = only("sisy_celery.E008")
    assert isinstance(message, Error)
    assert message.msg.startswith("SISY_ALLOWED_MODULES is not set: with DEBUG off no callable may be scheduled")
    assert message.hint == ("List the module prefixes your scheduled callables live in, e.g. SISY_ALLOWED_MODULES = "
                            "['billing.jobs']; to allow every module, say so: SISY_ALLOWED_MODULES = '__all__'.")


@override_settings(DEBUG=False, SISY_ALLOWED_MODULES=None)
def test_no_allow_list_in_production_stops_manage_py_commands():
    # runserver, like every command that runs the checks, refuses to start.
    with pytest.raises(SystemCheckError, match=r"sisy_celery.E008"):
        call_command("check", stdout=io.StringIO(), stderr=io.StringIO())


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_no_allow_list_in_production_stops_runserver(tmp_path):
    # runserver itself, not only `check`: it exits with the fix instead of serving.
    settings = 'del SISY_ALLOWED_MODULES\nDEBUG = False\nALLOWED_HOSTS = ["127.0.0.1"]'
    try:
        done = django_command(tmp_path, settings, "runserver", "--noreload", f"127.0.0.1:{free_port()}", timeout=60)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"runserver started without SISY_ALLOWED_MODULES and DEBUG off: {expired.stdout!r}")
    assert done.returncode != 0
    assert "(sisy_celery.E008) SISY_ALLOWED_MODULES is not set" in done.stderr
    assert "SISY_ALLOWED_MODULES = '__all__'" in done.stderr


UNSET_SETTINGS = """
from tests.settings import *  # noqa: F403
del SISY_ALLOWED_MODULES
DEBUG = False
"""


def start_celery(command: list[str], tmp_path: Path, settings: str) -> subprocess.CompletedProcess:
    """Run ``celery <command>`` of the test app with ``settings`` as its settings module, to its exit."""
    (tmp_path / "start_settings.py").write_text(settings)
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="start_settings",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tests.celery_app", *command,
                           *(["-s", str(tmp_path / "schedule")] if "beat" in command else [])],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize("command", [["beat", "-S", "sisy_celery.Scheduler"], ["worker", "-P", "solo"]])
def test_no_allow_list_in_production_stops_beat_and_worker(command, tmp_path):
    done = start_celery(command, tmp_path, UNSET_SETTINGS)
    assert done.returncode != 0
    assert "(sisy_celery.E008) SISY_ALLOWED_MODULES is not set" in done.stdout + done.stderr
    assert "SISY_ALLOWED_MODULES = '__all__'" in done.stdout + done.stderr


@pytest.mark.django_db
def test_beat_and_worker_start_check_passes_with_good_settings():
    assert refuse_to_start("beat") is None


@override_settings(DEBUG=True, SISY_ALLOWED_MODULES=None)
def test_no_allow_list_while_debugging_is_fine():
    assert sisy_messages() == []


@override_settings(DEBUG=False, SISY_ALLOWED_MODULES=None, USE_TZ=False, SISY_BEAT_BATCH_SIZE=0,
                   SISY_DEFAULT_SCHEDULE="bad")
def test_several_problems_are_all_reported():
    assert sorted(m.id for m in sisy_messages()) == [
        "sisy_celery.E001", "sisy_celery.E006", "sisy_celery.E007", "sisy_celery.E008",
    ]
    assert all(m.hint for m in sisy_messages())


@override_settings(SISY_HEARTBEAT_FREQUENCY=0)
def test_manage_py_check_fails_on_errors():
    with pytest.raises(SystemCheckError, match=r"sisy_celery.E004"):
        call_command("check", stdout=io.StringIO(), stderr=io.StringIO())


# -- the project around sisy: result backend app, Celery app, beat scheduler, migrations -----------------


def django_command(tmp_path: Path, settings: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m django ARGS`` in a fresh process on tests.settings changed by ``settings``."""
    (tmp_path / "changed_settings.py").write_text(f"from tests.settings import *\n{settings}\n")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "changed_settings",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "django", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("backend", ["django-db", "django-cache"])
def test_result_backend_without_its_app(backend):
    installed = [app for app in django_settings.INSTALLED_APPS if app != "django_celery_results"]
    with override_settings(INSTALLED_APPS=installed, CELERY_RESULT_BACKEND=backend):
        (message,) = check_result_backend()
    assert isinstance(message, Error) and message.id == "sisy_celery.E010"
    assert message.msg == f"CELERY_RESULT_BACKEND is {backend!r} but 'django_celery_results' is not in INSTALLED_APPS."
    assert "Add 'django_celery_results' to INSTALLED_APPS" in message.hint


def test_other_result_backends_need_no_app():
    installed = [app for app in django_settings.INSTALLED_APPS if app != "django_celery_results"]
    with override_settings(INSTALLED_APPS=installed, CELERY_RESULT_BACKEND="redis://127.0.0.1:6379/0"):
        assert check_result_backend() == []
    with override_settings(CELERY_RESULT_BACKEND="django-db"):
        assert check_result_backend() == []


def test_missing_result_backend_app_is_one_error_not_a_traceback(tmp_path):
    done = django_command(tmp_path, "INSTALLED_APPS = [a for a in INSTALLED_APPS if a != 'django_celery_results']",
                          "check")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert "(sisy_celery.E010) CELERY_RESULT_BACKEND is 'django-db' but 'django_celery_results' is not in " \
           "INSTALLED_APPS." in done.stderr


def test_celerys_fallback_app_is_refused():
    fallback = Celery("default", fixups=[], set_as_current=False)  # as celery._state makes it
    with pytest.raises(ImproperlyConfigured) as caught:
        configured_app(fallback)
    assert str(caught.value).startswith("sisy-celery found no Celery app of this project")
    assert "import it in proj/__init__.py with `from .celery import app as celery_app`" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("app", [celery_app.app, Celery("proj", set_as_current=False),
                                 Celery(set_as_current=False)])
def test_a_project_app_passes(app):
    assert configured_app(app) is None


def test_check_warns_when_the_current_app_is_the_fallback():
    fallback = Celery("default", fixups=[], set_as_current=False)
    previous = celery_state.get_current_app()
    celery_state._set_current_app(fallback)
    try:
        (message,) = check_celery_app()
    finally:
        celery_state._set_current_app(previous)
    assert isinstance(message, Warning) and message.id == "sisy_celery.W010"
    assert message.msg.startswith("sisy-celery found no Celery app of this project")
    assert check_celery_app() == []


def test_a_project_without_a_celery_app_is_warned_by_manage_py_check(tmp_path):
    done = django_command(tmp_path, "", "check")
    assert done.returncode == 0, done.stderr
    assert "(sisy_celery.W010) sisy-celery found no Celery app of this project" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["sisy_celery.Scheduler", "sisy_celery.scheduler:Scheduler",
                                  "celery.beat:PersistentScheduler"])
def test_beat_scheduler_setting_that_resolves(name):
    with override_settings(CELERY_BEAT_SCHEDULER=name):
        assert check_beat_scheduler() == []


def without_peer_scheduler() -> None:
    """The 'django' alias names no scheduler only where django-celery-beat (which registers it) is absent."""
    skip_unless(importlib.util.find_spec("django_celery_beat") is None,
                "django-celery-beat is installed here (make bench installs it), so its 'django' alias resolves")


@pytest.mark.parametrize("name, problem", [
    ("django", "is not a Celery beat scheduler class (a bare name is the alias of a scheduler package, "
               "and none of that name is installed)"),
    ("sisy_celery.conf", "is not a Celery beat scheduler class"),
    ("sisy_celery.Schedular", "cannot be imported (module 'sisy_celery' has no attribute 'Schedular')"),
    ("django_celery_beat.schedulers:DatabaseScheduler", "cannot be imported (No module named 'django_celery_beat')"),
])
def test_beat_scheduler_setting_that_does_not(name, problem):
    without_peer_scheduler()
    with override_settings(CELERY_BEAT_SCHEDULER=name):
        (message,) = check_beat_scheduler()
    assert message.id == "sisy_celery.E011" and message.msg == f"CELERY_BEAT_SCHEDULER {name!r} {problem}."
    assert "CELERY_BEAT_SCHEDULER = 'sisy_celery.Scheduler'" in message.hint


SCHEDULER_SETTINGS = """
from tests.settings import *  # noqa: F403
CELERY_BEAT_SCHEDULER = {setting!r}
"""


@pytest.mark.parametrize("option, setting", [
    (["-S", "django"], "sisy_celery.Scheduler"),  # the peer's habit on the command line
    ([], "django"),  # the same alias in the setting, beat started without -S
    (["-S", "sisy_celery.Schedular"], "sisy_celery.Scheduler"),
])
def test_beat_with_a_scheduler_that_is_no_scheduler_stops_in_one_line(option, setting, tmp_path):
    without_peer_scheduler()
    done = start_celery(["beat", *option], tmp_path, SCHEDULER_SETTINGS.format(setting=setting))
    output = done.stdout + done.stderr
    name = option[1] if option else setting
    assert done.returncode == 1, output
    assert f"celery beat cannot start: the scheduler {name!r} (from -S or CELERY_BEAT_SCHEDULER)" in output
    assert "use -S sisy_celery.Scheduler" in output and "Traceback" not in output


MIGRATION_PROBE = ("from sisy_celery.checks import unapplied_migrations; "
                   "print(unapplied_migrations() or 'all applied')")


def probe_migrations(tmp_path: Path, database: str) -> str:
    """What unapplied_migrations() says in a fresh process (the last line: shell may print a notice)."""
    done = django_command(tmp_path, database, "shell", "-c", MIGRATION_PROBE)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_unapplied_migrations_say_to_run_migrate(tmp_path):
    database = "DATABASES = {'default': {'ENGINE': 'django.db.backends.sqlite3', 'NAME': 'fresh.sqlite3'}}"
    names = sorted(path.stem for path in (ROOT / "sisy_celery" / "migrations").glob("0*.py"))
    assert probe_migrations(tmp_path, database) == (
        f"sisy_celery's tables on database 'default' are not migrated ({len(names)} migration(s) not applied: "
        f"{', '.join(names)}): run `python manage.py migrate`."
    )
    assert django_command(tmp_path, database, "migrate", "-v0", "sisy_celery", names[0]).returncode == 0
    assert f"({len(names) - 1} migration(s) not applied: {', '.join(names[1:])})" in probe_migrations(tmp_path, database)
    assert django_command(tmp_path, database, "migrate", "-v0").returncode == 0
    assert probe_migrations(tmp_path, database) == "all applied"


UNMIGRATED_SETTINGS = """
from tests.settings import *  # noqa: F403
DATABASES = {'default': {'ENGINE': 'django.db.backends.sqlite3', 'NAME': 'fresh.sqlite3'}}
"""


@pytest.mark.parametrize("command", [["beat", "-S", "sisy_celery.Scheduler"], ["worker", "-P", "solo"]])
def test_beat_and_worker_started_before_migrate_say_so_in_one_line(command, tmp_path):
    done = start_celery(command, tmp_path, UNMIGRATED_SETTINGS)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "sisy_celery's tables on database 'default' are not migrated" in output
    assert "run `python manage.py migrate`" in output and "Traceback" not in output


@pytest.mark.django_db
def test_run_now_from_a_process_without_its_celery_app_claims_nothing():
    from sisy_celery.models import Run, task_with_callable
    from sisy_celery.tasks import run_now
    from tests.testapp import jobs

    task = task_with_callable(jobs.job, label="unsent")
    task.save()
    fallback = Celery("default", set_as_current=False)
    fallback.fixups = []
    with pytest.raises(ImproperlyConfigured, match="proj/celery.py"):
        run_now(task, app=fallback)
    assert not Run.objects.filter(task_id=task.pk).exists()
