"""Hostile and malformed input to the public API: clear ValueError or success, nothing else.

Every generated call either works (and the task can be read back intact) or raises
ValueError (Django's ValidationError is one too) whose message names the offending
argument; no other exception type escapes and nothing is saved on error.
"""
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
from django.test import override_settings
from django.utils import timezone
from hypothesis import HealthCheck, given, settings, strategies as st

from sisy_celery.models import Task, task_with_callable

pytestmark = pytest.mark.django_db

HYPOTHESIS = settings(max_examples=120, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

cron_field = st.one_of(
    st.sampled_from(["*", "*/5", "0", "1-5", "L", "mon", "59", "60", "-1", "*/0", "a", "", "1,2,3", "?", "H"]),
    st.text(max_size=6),
)
cron = st.one_of(
    st.lists(cron_field, min_size=0, max_size=8).map(" ".join),
    st.text(max_size=40),
    st.sampled_from(["@daily", "@reboot", "* * * * * *", "0 0 31 2 *", "\x00", "* * * * *\n* * * * *"]),
)
# Finite floats stay within +-1e15: PostgreSQL's JSON column keeps larger whole-number floats only
# approximately (documented in the README). NaN and infinities are generated, and must be refused.
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(),
                      st.floats(min_value=-1e15, max_value=1e15),
                      st.sampled_from([float("nan"), float("inf"), float("-inf")]),
                      st.text(max_size=20))
userdata = st.one_of(
    st.none(),
    st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                 max_leaves=20),
    st.dictionaries(st.text(max_size=8), json_leaf, max_size=4),
    st.builds(lambda: {"bad": object()}),
    st.builds(lambda: {"set": {1, 2}}),
    st.builds(lambda: {1: "int key"}),
    st.builds(lambda: _deep(2000)),
    st.builds(lambda: {"big": "x" * 200_000}),
)
dotted = st.one_of(
    st.sampled_from([
        "os.system", "__import__", "builtins.eval", "builtins.exec", "..jobs.job", ".jobs", "tests.testapp.jobs.job",
        "tests.testapp.jobs.lam", "tests.testapp.jobs.make_closure", "tests.testapp.jobs.Holder",
        "tests.testapp.jobs", "tests.testapp.models.Widget.exploding", "tests.testapp.models.Widget.touch",
        "subprocess.call", "x" * 5000, "a." * 300 + "b", "tests.testapp.jobs.job\x00", "tests testapp.job",
        "tests.testapp.jobs.Holder.Inner.nested", "tests.testapp.jobs.__dict__", "sys.modules",
    ]),
    st.text(max_size=60),
)
label = st.one_of(st.none(), st.text(max_size=300), st.just("x" * 256), st.just("nul\x00label"))
delay = st.one_of(
    st.none(),
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)),
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(dt_timezone.utc)),
    st.builds(lambda s: timezone.now() + timedelta(seconds=s), st.integers(-10, 10**6)),
    st.sampled_from(["tomorrow", 0, 1.5]),
)


def _deep(n):
    value: dict = {}
    for _ in range(n):
        value = {"d": value}
    return value


ARGUMENT_WORDS = ("schedule", "cron", "userdata", "delay_until", "label", "callable", "module", "path",
                  "function", "lambda", "class", "member", "signature", "allowed", "import", "attribute", "name", "iterations")


def _assert_clear(exc: BaseException) -> None:
    assert isinstance(exc, ValueError), f"{type(exc).__name__} escaped: {exc!r}"
    text = str(exc).lower()
    assert any(word in text for word in ARGUMENT_WORDS), f"message names no argument: {exc}"


@HYPOTHESIS
@given(schedule=cron, data=userdata, name=label)
def test_task_with_callable_gives_clear_errors(schedule, data, name):
    before = Task.objects.count()
    try:
        task = task_with_callable("tests.testapp.jobs.job", label=name, schedule=schedule, userdata=data)
        task.save()
    except Exception as exc:  # noqa: BLE001 - the type is what is under test
        _assert_clear(exc)
        assert Task.objects.count() == before
        return
    stored = Task.objects.get(pk=task.pk)
    assert stored.schedule == schedule
    assert stored.userdata == (data or {})
    assert stored.label == (name or "tests.testapp.jobs.job")


@HYPOTHESIS
@given(path=dotted)
@override_settings(SISY_ALLOWED_MODULES=["tests.testapp"])
def test_dotted_paths_give_clear_errors(path):
    before = Task.objects.count()
    try:
        task = Task.run_once(path)
    except Exception as exc:  # noqa: BLE001
        _assert_clear(exc)
        assert Task.objects.count() == before
        return
    assert task.callable_path == path
    # Module-level functions callable as f(message) or f(): the only kind a path may name here.
    assert path in {"tests.testapp.jobs.job", "tests.testapp.jobs.make_closure"}, f"{path!r} was accepted"


@HYPOTHESIS
@given(when=delay, iterations=st.one_of(st.integers(-3, 5), st.sampled_from([True, 1.5, "2", None])))
def test_run_iterations_arguments_give_clear_errors(when, iterations):
    before = Task.objects.count()
    try:
        task = Task.run_iterations("tests.testapp.jobs.job", iterations=iterations, delay_until=when)
    except Exception as exc:  # noqa: BLE001
        _assert_clear(exc)
        assert Task.objects.count() == before
        return
    assert isinstance(iterations, int) and not isinstance(iterations, bool) and iterations >= 0
    if when is not None:
        assert when > task.created_at and task.start_running == when
        assert task.next_run >= when


def test_os_system_and_builtins_are_refused_by_allow_list(settings):
    settings.SISY_ALLOWED_MODULES = ["tests.testapp"]
    for path in ("os.system", "builtins.eval", "subprocess.call"):
        with pytest.raises(ValueError, match="SISY_ALLOWED_MODULES"):
            task_with_callable(path)
    assert Task.objects.count() == 0
