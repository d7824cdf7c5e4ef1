"""Settings of the benchmark: the example project plus django-celery-beat, the baseline it is compared with."""
from proj.settings import *  # noqa: F401,F403
from proj.settings import INSTALLED_APPS

INSTALLED_APPS = INSTALLED_APPS + ["django_celery_beat"]
# The benchmark measures the scheduler, not the console: per-send INFO lines are not printed
# (django-celery-beat's are not either, since celery's logging is not set up in-process).
LOGGING = {"version": 1, "disable_existing_loggers": False,
           "loggers": {"sisy_celery": {"level": "WARNING"}, "celery": {"level": "WARNING"}}}
