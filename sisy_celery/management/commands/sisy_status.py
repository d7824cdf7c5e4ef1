"""``manage.py sisy_status``: which beats are alive, and whether runs wait for a worker (a health check).

Exit codes: 0 healthy (the beat asked for, or at least one beat, reported within ``--max-age``);
1 not healthy (no such beat, it stopped, or it has been silent longer than ``--max-age``);
2 bad arguments. Runs published but not started for longer than ``--waiting-after`` are reported
as a warning; they change the exit code only with ``--strict``.
"""
from __future__ import annotations

import socket
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q
from django.utils import timezone

from sisy_celery import conf, engine
from sisy_celery.models import BeatProcess
from sisy_celery.scheduler import Scheduler

DEFAULT_MAX_AGE = 60.0
DEFAULT_WAITING_AFTER = 60.0
SHOWN = 20


def default_max_age() -> float:
    """60 s, or longer when SISY_HEARTBEAT_FREQUENCY lets an idle beat report less often than that."""
    return max(DEFAULT_MAX_AGE, 2 * conf.heartbeat_frequency() + Scheduler.upkeep_every)


class Command(BaseCommand):
    help = ("Print the beat processes that have reported, whether each is alive, stopped or dead, and how "
            "long ago it last reported; warn about runs no worker has started. Exit status 0 when the beat "
            "asked for (--beat, --this-host) or any beat is alive, 1 otherwise: use it as a liveness probe.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--max-age", type=float, default=None,
                            help="Seconds since a beat's last report for it to count as alive (default 60, or "
                                 "twice SISY_HEARTBEAT_FREQUENCY plus 5 when that is longer).")
        who = parser.add_mutually_exclusive_group()
        who.add_argument("--beat", metavar="NAME",
                         help="Only this beat: its host:pid as listed, or a host name (any beat on that host).")
        who.add_argument("--this-host", action="store_true", help="Only the beats of this host (a container's own).")
        parser.add_argument("--waiting-after", type=float, default=DEFAULT_WAITING_AFTER, metavar="SECONDS",
                            help="Warn about runs published this long ago and not started (default 60).")
        parser.add_argument("--strict", action="store_true", help="Exit 1 when such runs exist, too.")

    def handle(self, *args: Any, max_age: float | None, beat: str | None, this_host: bool, waiting_after: float,
               strict: bool, **options: Any) -> None:
        max_age = default_max_age() if max_age is None else max_age
        if max_age <= 0 or waiting_after <= 0:
            raise CommandError("--max-age and --waiting-after must be greater than 0.", returncode=2)
        now = timezone.now()
        beats = BeatProcess.objects.order_by("-last_tick")
        name = socket.gethostname() if this_host else beat
        if name:
            beats = beats.filter(Q(ident=name) | Q(hostname=name))
        alive = 0
        shown = list(beats[:SHOWN])
        for process in shown:
            age = (now - process.last_tick).total_seconds()
            state = "stopped" if process.stopped_at else "alive" if age <= max_age else "dead"
            alive += state == "alive"
            started = timezone.localtime(process.started_at).strftime("%Y-%m-%d %H:%M:%S %Z")
            self.stdout.write(f"{state:7}  {process.ident}  started {started}  last report {age:.1f} s ago")
        waiting = engine.waiting(now, waiting_after)
        if waiting:
            self.stderr.write(f"WARNING: {waiting} run(s) were published more than {waiting_after:g} s ago and no "
                              f"worker has started them: is a worker running and listening on their queues?")
        named = f" on or named {name!r}" if name else ""
        if not alive:
            seen = (f"its latest report was {(now - shown[0].last_tick).total_seconds():.1f} s ago"
                    + (" and it stopped" if shown[0].stopped_at else "") if shown else "none has reported")
            raise CommandError(f"No beat{named} has reported within the last {max_age:g} s ({seen}).", returncode=1)
        if strict and waiting:
            raise CommandError(f"{waiting} run(s) wait for a worker.", returncode=1)
        self.stdout.write(f"OK: {alive} beat(s){named} reported within the last {max_age:g} s.")
