import pytest
from tests.testapp import jobs
from tests.testapp.models import Widget

from sisy_celery.models import HAS_NOT_RUN, Task, task_with_callable

pytestmark = pytest.mark.django_db


def test_run_once_returns_saved_task():
    task = Task.run_once(jobs.job, userdata={"a": 1})
    assert task.pk is not None
    assert task.label == "tests.testapp.jobs.job"
    assert task.iterations == 1
    assert task.next_run > HAS_NOT_RUN


def test_instance_method_round_trip():
    w = Widget.objects.create(name="x")
    task = task_with_callable(w.touch)
    task.save()
    assert task.funcinfo["model_pk"] == w.pk
    task.userdata["k"] = "v"
    task.save()
    assert Task.objects.get(pk=task.pk).userdata == {"k": "v"}
