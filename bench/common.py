"""Shared by the benchmark's orchestrator (run.py) and its measuring processes (probe.py)."""
from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
EXAMPLE = ROOT / "example"

PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/11")
EVERY_MINUTE = "* * * * *"
QUEUE = "celery"  # Celery's default queue, where beat's messages go
# The example settings refuse DJANGO_DEBUG=0 without a key; one per benchmark run, shared by its processes.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(50)


def db_url(name: str) -> str:
    return f"{PG}/{name}"


def child_env(db: str, **extra: str) -> dict[str, str]:
    """Environment of a measuring process: the example project on database ``db`` and the bench Redis."""
    env = {**os.environ}
    env.update(
        SISY_DATABASE_URL=db_url(db),
        CELERY_BROKER_URL=REDIS,
        DJANGO_SETTINGS_MODULE="bench_settings",
        PYTHONPATH=os.pathsep.join([str(BENCH), str(EXAMPLE), str(ROOT)]),
        SISY_HEARTBEAT_FREQUENCY="1",
        SISY_VAR_DIR=str(EXAMPLE / "var" / "bench"),
        PYTHONUNBUFFERED="1",
        TIME_ZONE="UTC",
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=SECRET_KEY,
    )
    env.update(extra)
    return env


@contextmanager
def unconfirmed_publishing() -> Iterator[None]:
    """A variant of the Dispatcher that is not shipped, to measure what publisher confirms cost on
    RabbitMQ: the channel is not put in confirm mode, and a batch counts as published once its
    frames are written (as kombu's and Celery's publish do)."""
    from sisy_celery.dispatch import _AmqpTransport

    def confirming(self: _AmqpTransport) -> None:
        self.tag, self.lowest, self.unconfirmed, self.nacked = 0, 1, {}, []

    shipped = _AmqpTransport._confirming, _AmqpTransport._wait_confirms
    _AmqpTransport._confirming = confirming
    _AmqpTransport._wait_confirms = lambda self: self.unconfirmed.clear()
    try:
        yield
    finally:
        _AmqpTransport._confirming, _AmqpTransport._wait_confirms = shipped


def emit(**record: object) -> None:
    """One result line for the orchestrator (probes print JSON lines prefixed with '@@')."""
    print("@@" + json.dumps(record, default=str), flush=True)


def ceil_minute(ts: float, margin: float = 0.0) -> float:
    """The first whole minute at or after ``ts + margin`` (epoch seconds)."""
    t = ts + margin
    return float(int(-(-t // 60)) * 60)


def decode_message(raw: bytes) -> list:
    """The args of one Celery message as kombu's Redis transport stores it."""
    payload = json.loads(raw)
    body = payload["body"]
    if payload.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return json.loads(body)[0]


class FakeClock:
    """Real time shifted by an offset: ``set(target)`` makes "now" equal ``target`` at once."""

    def __init__(self) -> None:
        self.offset = 0.0

    def set(self, target: float) -> None:
        self.offset = target - time.time()

    def ts(self) -> float:
        return time.time() + self.offset


def setup_paths() -> None:
    for path in (str(ROOT), str(EXAMPLE), str(BENCH)):
        if path not in sys.path:
            sys.path.insert(0, path)
