"""sisy-celery: run Python callables on cron schedules with Celery, configured in Django."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Scheduler", "DEFAULT_SCHEDULE", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing sisy_celery never touches models before Django is set up.
    if name == "Scheduler":
        from .scheduler import Scheduler

        return Scheduler
    if name == "DEFAULT_SCHEDULE":
        from .conf import default_schedule

        return default_schedule()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
