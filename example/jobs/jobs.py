"""Demo callables: a plain function, a slow job, a job without arguments."""
import time

from django.utils import timezone

from .models import Run


def record(message):
    """Record that this slot ran."""
    Run.record(message)


def slow(message):
    """Take a while (userdata 'seconds'); scheduled with allow_overlap=False it never overlaps."""
    started = timezone.now()
    time.sleep(float(message["userdata"].get("seconds", 3)))
    Run.record(message, started=started)


def no_arguments():
    """Callables may take no parameters at all."""
    return "ok"
