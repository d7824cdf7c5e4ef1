"""``manage.py sisy_purge_finished``: delete the finished tasks SISY_KEEP_FINISHED_TASKS kept."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from sisy_celery.models import Task


class Command(BaseCommand):
    help = ("Delete tasks that finished (iterations used up or end_running passed) and were kept disabled "
            "because SISY_KEEP_FINISHED_TASKS is on. Tasks a user disabled are never touched, and run "
            "history (django-celery-results) stays.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", type=float, default=0.0, metavar="DAYS",
                            help="Only tasks that finished more than DAYS days ago (default 0).")
        parser.add_argument("--dry-run", action="store_true", help="Count the tasks but delete nothing.")

    def handle(self, *args: Any, older_than: float, dry_run: bool, **options: Any) -> None:
        if older_than < 0:
            raise CommandError("--older-than must be 0 or more.")
        cutoff = timezone.now() - timedelta(days=older_than)
        finished = Task.objects.filter(enabled=False, in_flight=0, finished_at__lte=cutoff)
        if dry_run:
            self.stdout.write(f"{finished.count()} finished task(s) would be deleted.")
            return
        deleted = finished.delete()[0]
        self.stdout.write(f"{deleted} finished task(s) deleted.")
