"""``manage.py sisy_list``: the next tasks to run, fast on any number of tasks."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from sisy_celery.models import HAS_NOT_RUN, Task

COLUMNS = ("pk", "label", "schedule", "enabled", "next_run", "last_run", "problem")
HEADERS = ("ID", "LABEL", "SCHEDULE", "ENABLED", "NEXT RUN", "LAST RUN", "PROBLEM")
LABEL_WIDTH = 40
PROBLEM_WIDTH = 60


def moment(value: datetime) -> str:
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S %Z")


class Command(BaseCommand):
    help = ("List tasks: enabled ones by next run, then disabled ones. Each part is read through "
            "the (enabled, next_run) index with a LIMIT, so the command stays fast with millions of tasks.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--limit", type=int, default=100, help="Show at most this many tasks (default 100).")
        parser.add_argument("--problems", action="store_true",
                            help="Only tasks with a problem (flagged and parked by beat or a worker).")

    def handle(self, *args: Any, limit: int, problems: bool, **options: Any) -> None:
        if limit < 1:
            raise CommandError("--limit must be at least 1.")
        rows = self.fetch(True, limit + 1, problems)
        if len(rows) <= limit:
            rows += self.fetch(False, limit + 1 - len(rows), problems)
        table = [HEADERS] + [self.cells(row) for row in rows[:limit]]
        widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
        for line in table:
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if len(rows) > limit:
            self.stdout.write(f"(first {limit} tasks shown; use --limit to see more)")

    @staticmethod
    def fetch(enabled: bool, count: int, problems: bool = False) -> list[tuple[Any, ...]]:
        rows = Task.objects.filter(enabled=enabled)
        if problems:
            rows = rows.exclude(problem="")
        return list(rows.order_by("next_run").values_list(*COLUMNS)[:count])

    @staticmethod
    def cells(row: tuple[Any, ...]) -> tuple[str, ...]:
        pk, label, schedule, enabled, next_run, last_run, problem = row
        if len(label) > LABEL_WIDTH:
            label = label[:LABEL_WIDTH - 1] + "…"
        problem = " ".join(problem.split())
        if len(problem) > PROBLEM_WIDTH:
            problem = problem[:PROBLEM_WIDTH - 1] + "…"
        return (
            str(pk), label, schedule, "yes" if enabled else "no",
            "-" if problem or not enabled else moment(next_run),
            moment(last_run) if last_run > HAS_NOT_RUN else "never",
            problem or "-",
        )
