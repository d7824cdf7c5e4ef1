from django.apps import AppConfig


class SisyConfig(AppConfig):
    name = "sisy_celery"
    label = "sisy_celery"
    verbose_name = "Scheduled tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks, signals  # noqa: F401  (registers checks and worker signal handlers)

        checks.refuse_unknown_scheduler()
