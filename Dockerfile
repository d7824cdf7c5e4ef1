# The example project (example/) on sisy-celery: one image for web, worker, beat and migrate.
# See docker-compose.yml; `docker compose up --scale worker=3` runs three workers beside two beats.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY sisy_celery ./sisy_celery
# The package with the example extra (WhiteNoise, which serves the admin's static files), the
# drivers of the services compose runs (PostgreSQL, Redis), and gunicorn for the web service: the
# server belongs to the image, not to the package's dependencies.
RUN pip install ".[example]" "psycopg[binary]>=3.1" "redis>=5" "gunicorn>=22"

COPY example ./example
RUN useradd --create-home --uid 1000 sisy \
    && mkdir -p /var/lib/sisy \
    && chown sisy /var/lib/sisy
USER sisy
WORKDIR /app/example
ENV DJANGO_SETTINGS_MODULE=proj.settings \
    SISY_VAR_DIR=/var/lib/sisy
# The admin's static files, hashed and compressed into STATIC_ROOT (/var/lib/sisy/static) for WhiteNoise.
RUN python manage.py collectstatic --noinput

EXPOSE 8000
CMD ["gunicorn", "proj.wsgi", "--bind", "0.0.0.0:8000", "--workers", "2"]
