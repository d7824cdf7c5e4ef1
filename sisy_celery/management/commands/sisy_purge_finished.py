"""``manage.py sisy_purge_finished``: delete the finished tasks SISY_KEEP_FINISHED_TASKS kept, and old runs."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from sisy_celery.models import Run, Task


class Command(BaseCommand):
    help = ("Delete tasks that finished (iterations used up or end_running passed) and were kept disabled "
            "because SISY_KEEP_FINISHED_TASKS is on. Tasks a user disabled are never touched, and run "
            "history stays. With --runs, delete settled runs of the ledger instead (beat also does this "
            "after SISY_RUN_RETENTION).")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", type=float, default=0.0, metavar="DAYS",
                            help="Only tasks that finished more than DAYS days ago (default 0).")
        parser.add_argument("--dry-run", action="store_true", help="Count the tasks but delete nothing.")
        parser.add_argument("--runs", action="store_true",
                            help="Delete settled runs claimed more than --older-than days ago instead of tasks.")

    def handle(self, *args: Any, older_than: float, dry_run: bool, runs: bool, **options: Any) -> None:
        if older_than < 0:
            raise CommandError("--older-than must be 0 or more.")
        cutoff = timezone.now() - timedelta(days=older_than)
        if runs:
            rows, what = Run.objects.filter(state__in=Run.SETTLED, claimed_at__lte=cutoff), "settled run(s)"
        else:
            rows, what = Task.objects.filter(enabled=False, running=False, finished_at__lte=cutoff), "finished task(s)"
        if dry_run:
            self.stdout.write(f"{rows.count()} {what} would be deleted.")
            return
        deleted = rows.delete()[0]
        self.stdout.write(f"{deleted} {what} deleted.")
