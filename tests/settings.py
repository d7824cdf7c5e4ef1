"""Settings for the test suite: SQLite by default, PostgreSQL with SISY_TEST_DB=postgres."""
import os
import secrets

SECRET_KEY = "sisy-celery-tests"
DEBUG = True
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_results",
    "sisy_celery",
    "tests.testapp",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if os.environ.get("SISY_TEST_DB") == "postgres":
    # A name of this run's own (pytest-django creates and at the end drops test_<NAME>), so that
    # test sessions sharing the server never meet in one database.
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("SISY_PG_NAME") or f"sisy_{os.getpid()}_{secrets.token_hex(3)}",
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": "5432",
    }}
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}

CELERY_BROKER_URL = "memory://"
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
SISY_HEARTBEAT_FREQUENCY = 1
# Any module: the tests schedule callables of the stdlib and Django as well as their own.
SISY_ALLOWED_MODULES = "__all__"
