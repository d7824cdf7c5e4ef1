"""Test-only hooks for the end-to-end fault tests. Do not use them in production.

``ShiftedScheduler`` is ``sisy_celery.Scheduler`` with its clock moved by
``SISY_TEST_CLOCK_OFFSET`` seconds (float, may be negative), so a test can run
beat across a DST change without waiting for one:

    SISY_TEST_CLOCK_OFFSET=8640000 celery -A proj beat -S proj.testing.ShiftedScheduler

``canary`` is a callable outside ``SISY_ALLOWED_MODULES`` (``['jobs']``): if a
worker ever runs it, it leaves the file ``canary`` in ``SISY_VAR_DIR``.
"""
import os
from datetime import timedelta
from pathlib import Path

from sisy_celery.scheduler import Scheduler


class ShiftedScheduler(Scheduler):
    """sisy's scheduler on a clock ``SISY_TEST_CLOCK_OFFSET`` seconds away from real time."""

    def now(self):
        return super().now() + timedelta(seconds=float(os.environ.get("SISY_TEST_CLOCK_OFFSET", "0")))


def canary(message):
    """Must never run: it is not under SISY_ALLOWED_MODULES."""
    from django.conf import settings

    Path(settings.VAR_DIR, "canary").write_text(repr(message.get("scheduled_for")))
