"""``manage.py sisy_run <id|label>``: send one run of a task now, as the admin's "Run now" does."""
from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from sisy_celery.callables import CallableError, check_allowed
from sisy_celery.models import Task
from sisy_celery.dispatch import BrokerUnavailable
from sisy_celery.tasks import NotSent, TaskBusy, run_now


def find_task(value: str) -> Task:
    """The task with this id, else the one task with this label; CommandError otherwise."""
    if value.isdigit():
        task = Task.objects.filter(pk=int(value)).first()
        if task is not None:
            return task
    matches = list(Task.objects.filter(label=value).order_by("pk")[:5])
    if not matches:
        raise CommandError(f"No task with id or label {value!r}. `manage.py sisy_list` shows the tasks.")
    if len(matches) > 1:
        ids = ", ".join(str(task.pk) for task in matches)
        raise CommandError(f"Label {value!r} is ambiguous: tasks {ids}{' …' if len(matches) == 5 else ''} "
                           f"have it. Give the id instead.")
    return matches[0]


class Command(BaseCommand):
    help = ("Send one run of a task now through the same claim rules and routing as beat, and print "
            "its Celery task id. The argument is a task id or a task label.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("task", help="Task id, or its label.")

    def handle(self, *args: Any, task: str, **options: Any) -> None:
        found = find_task(task)
        try:
            check_allowed(found._func_info or {})
            celery_id = run_now(found, by="sisy_run")
        except (CallableError, TaskBusy, NotSent, ImproperlyConfigured) as exc:
            raise CommandError(f"Task {found.pk} ({found.label}) not sent: {exc}") from None
        except BrokerUnavailable as exc:  # run_now has revoked the run it claimed
            raise CommandError(f"Task {found.pk} ({found.label}) not sent: the broker is unreachable ({exc}).") from None
        self.stdout.write(f"Task {found.pk} ({found.label}) sent: Celery task id {celery_id}")
