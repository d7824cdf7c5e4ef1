"""Example project settings, driven by environment variables.

SISY_DATABASE_URL: sqlite:///path (default: var/db.sqlite3 beside this project),
    postgres://user@host:port/name or mysql://user@host:port/name.
CELERY_BROKER_URL: default kombu's filesystem transport under var/broker (no server);
    redis://127.0.0.1:6379/0 or amqp://guest:guest@127.0.0.1:5672// work too.
CELERY_BROKER_VISIBILITY_TIMEOUT: seconds after which Redis redelivers an unacknowledged message
    (with CELERY_TASK_ACKS_LATE=1, the run of a killed worker); Redis's default is one hour.
SISY_TIMEZONE: the zone cron is read in (default: TIME_ZONE).

Static files: with WhiteNoise installed (the ``example`` extra, as in the Docker image) the app
serves the collected, hashed and compressed files of STATIC_ROOT itself; run
``manage.py collectstatic`` first. Without it only DEBUG's runserver serves them (``make demo``).
"""
import importlib.util
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("SISY_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)

DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("Set DJANGO_SECRET_KEY: with DJANGO_DEBUG=0 there is no default key (see README).")
    SECRET_KEY = "sisy-celery-example-debug-only"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",")

# Browser protections (manage.py check --deploy). The admin's pages, the run-now confirmation
# among them, are never shown in a frame of another site.
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
SESSION_COOKIE_HTTPONLY = True
# DJANGO_HTTPS=1 once the site is served over HTTPS (a proxy terminating TLS in front of the
# loopback port): cookies only over HTTPS, HTTP redirected, HSTS. Off by default because the
# compose file publishes plain HTTP on 127.0.0.1 only; see README, Deployment.
HTTPS = os.environ.get("DJANGO_HTTPS", "0") == "1"
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = SECURE_SSL_REDIRECT = HTTPS
SECURE_HSTS_SECONDS = 31536000 if HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    CSRF_TRUSTED_ORIGINS = [f"https://{host}" for host in ALLOWED_HOSTS if host]
USE_TZ = True
TIME_ZONE = os.environ.get("TIME_ZONE", "UTC")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_results",
    "sisy_celery",
    "jobs",
]
# Workers, beats and management commands need no static files, so WhiteNoise is optional: without
# it only DEBUG's runserver serves the admin's CSS.
WHITENOISE = importlib.util.find_spec("whitenoise") is not None
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    *(["whitenoise.middleware.WhiteNoiseMiddleware"] if WHITENOISE else []),
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "proj.urls"
WSGI_APPLICATION = "proj.wsgi.application"
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
STATIC_ROOT = VAR_DIR / "static"
if WHITENOISE:
    # Names carry a hash of the content, so browsers may keep them for ever; gzip and brotli copies
    # are made by collectstatic, not on each request.
    STORAGES = {
        "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
        "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def database_from_url(url: str) -> dict:
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": unquote(parsed.path) or str(VAR_DIR / "db.sqlite3"),
            # Several processes share the file: wait for locks, take write locks up front.
            "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE",
                        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"},
        }
    engines = {"postgres": "postgresql", "postgresql": "postgresql", "mysql": "mysql", "mariadb": "mysql"}
    if parsed.scheme not in engines:
        raise ValueError(f"SISY_DATABASE_URL scheme {parsed.scheme!r} is not one of sqlite, postgres, mysql")
    config = {
        "ENGINE": f"django.db.backends.{engines[parsed.scheme]}",
        "NAME": parsed.path.lstrip("/"),
        "USER": unquote(parsed.username or ""),
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": parsed.hostname or "",
        "PORT": str(parsed.port or ""),
        "CONN_MAX_AGE": 60,
        "CONN_HEALTH_CHECKS": True,
    }
    if config["ENGINE"].endswith("mysql"):
        config["OPTIONS"] = {"charset": "utf8mb4"}
    return config


DATABASES = {"default": database_from_url(os.environ.get("SISY_DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}"))}
if DATABASES["default"]["ENGINE"].endswith("mysql"):
    import pymysql

    pymysql.install_as_MySQLdb()

BROKER_DIR = VAR_DIR / "broker"
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "filesystem://")
if CELERY_BROKER_URL.startswith("filesystem"):
    CELERY_BROKER_TRANSPORT = "proj.brokers:FilesystemTransport"  # whole messages only (see brokers.py)
    for sub in ("queue", "processed", "control"):
        (BROKER_DIR / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
        "polling_interval": 0.1,
    }
if CELERY_BROKER_URL.startswith(("redis://", "rediss://")) and os.environ.get("CELERY_BROKER_VISIBILITY_TIMEOUT"):
    # Redis hands an unacknowledged message (task_acks_late, worker killed) to another worker after
    # this many seconds, found by a sweep every second. Keep it above the longest run: a message
    # whose run is still going is delivered again as well.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": float(os.environ["CELERY_BROKER_VISIBILITY_TIMEOUT"]),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
CELERY_BEAT_SCHEDULER = "sisy_celery.Scheduler"  # `celery -A proj beat` needs no -S
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
CELERY_TASK_TRACK_STARTED = True
CELERY_TIMEZONE = TIME_ZONE
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TASK_ACKS_LATE = os.environ.get("CELERY_TASK_ACKS_LATE", "0") == "1"

SISY_HEARTBEAT_FREQUENCY = float(os.environ.get("SISY_HEARTBEAT_FREQUENCY", "1"))
SISY_RUNNING_TIMEOUT = float(os.environ.get("SISY_RUNNING_TIMEOUT", "30"))
SISY_ALLOWED_MODULES = ["jobs"]
SISY_KEEP_FINISHED_TASKS = os.environ.get("SISY_KEEP_FINISHED_TASKS", "0") == "1"
if os.environ.get("SISY_TIMEZONE"):
    SISY_TIMEZONE = os.environ["SISY_TIMEZONE"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "[%(asctime)s %(levelname)s %(name)s] %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"sisy_celery": {"handlers": ["console"], "level": os.environ.get("SISY_LOG_LEVEL", "INFO"),
                                "propagate": False}},
}
