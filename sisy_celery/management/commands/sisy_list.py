"""``manage.py sisy_list``: the next tasks to run, fast on any number of tasks."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from sisy_celery.models import HAS_NOT_RUN, Task

COLUMNS = ("pk", "label", "schedule", "enabled", "next_run", "last_run")
HEADERS = ("ID", "LABEL", "SCHEDULE", "ENABLED", "NEXT RUN", "LAST RUN")
LABEL_WIDTH = 40


def moment(value: datetime) -> str:
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S %Z")


class Command(BaseCommand):
    help = ("List tasks: enabled ones by next run, then disabled ones. Each part is read through "
            "the (enabled, next_run) index with a LIMIT, so the command stays fast with millions of tasks.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--limit", type=int, default=100, help="Show at most this many tasks (default 100).")

    def handle(self, *args: Any, limit: int, **options: Any) -> None:
        if limit < 1:
            raise CommandError("--limit must be at least 1.")
        rows = self.fetch(True, limit + 1)
        if len(rows) <= limit:
            rows += self.fetch(False, limit + 1 - len(rows))
        table = [HEADERS] + [self.cells(row) for row in rows[:limit]]
        widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
        for line in table:
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if len(rows) > limit:
            self.stdout.write(f"(first {limit} tasks shown; use --limit to see more)")

    @staticmethod
    def fetch(enabled: bool, count: int) -> list[tuple[Any, ...]]:
        return list(Task.objects.filter(enabled=enabled).order_by("next_run").values_list(*COLUMNS)[:count])

    @staticmethod
    def cells(row: tuple[Any, ...]) -> tuple[str, ...]:
        pk, label, schedule, enabled, next_run, last_run = row
        if len(label) > LABEL_WIDTH:
            label = label[:LABEL_WIDTH - 1] + "…"
        return (
            str(pk), label, schedule, "yes" if enabled else "no",
            moment(next_run) if enabled else "-",
            moment(last_run) if last_run > HAS_NOT_RUN else "never",
        )
