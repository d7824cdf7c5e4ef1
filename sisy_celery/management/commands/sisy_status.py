"""``manage.py sisy_status``: which beats are alive; exits 1 when none is (a liveness probe)."""
from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from sisy_celery import conf
from sisy_celery.models import BeatProcess
from sisy_celery.scheduler import Scheduler

DEFAULT_MAX_AGE = 60.0
SHOWN = 20


def default_max_age() -> float:
    """60 s, or longer when SISY_HEARTBEAT_FREQUENCY lets an idle beat tick less often than that."""
    return max(DEFAULT_MAX_AGE, 2 * conf.heartbeat_frequency() + Scheduler.status_every)


class Command(BaseCommand):
    help = ("Print the beat processes that have reported and how long ago each ticked. Exits with "
            "status 1 when none has ticked within --max-age seconds, so it can serve as a liveness probe.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--max-age", type=float, default=None,
            help="Seconds since a beat's last tick for it to count as alive (default 60, or twice "
                 "SISY_HEARTBEAT_FREQUENCY plus 10 when that is longer).",
        )

    def handle(self, *args: Any, max_age: float | None, **options: Any) -> None:
        max_age = default_max_age() if max_age is None else max_age
        if max_age <= 0:
            raise CommandError("--max-age must be greater than 0.")
        now = timezone.now()
        beats = list(BeatProcess.objects.order_by("-last_tick")[:SHOWN])
        alive = 0
        for beat in beats:
            age = (now - beat.last_tick).total_seconds()
            alive += age <= max_age
            started = timezone.localtime(beat.started_at).strftime("%Y-%m-%d %H:%M:%S %Z")
            self.stdout.write(f"{'alive' if age <= max_age else 'stale'}  {beat.ident}  started {started}"
                              f"  last tick {age:.1f} s ago")
        if not alive:
            seen = (f"the latest tick was {(now - beats[0].last_tick).total_seconds():.1f} s ago" if beats
                    else "no beat has reported yet")
            raise CommandError(f"No beat has ticked within the last {max_age:g} s ({seen}).", returncode=1)
        self.stdout.write(f"OK: {alive} beat(s) ticked within the last {max_age:g} s.")
