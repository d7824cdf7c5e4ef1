"""Celery app of the worker benchmark: the example project's app plus a plain no-op task to compare with.

With BENCH_QUERY_LOG set, the worker (solo pool) counts every SQL statement it runs and writes
the total to that file when it shuts down.
"""
import os

from celery.signals import worker_ready, worker_shutdown

from proj.celery import app

__all__ = ["app", "noop"]


@app.task(name="bench.noop")
def noop():
    return None


_LOG = os.environ.get("BENCH_QUERY_LOG")
_count = [0]


def _counter(execute, sql, params, many, context):
    _count[0] += 1
    return execute(sql, params, many, context)


if _LOG:
    @worker_ready.connect
    def _install(**kwargs):
        from django.db import connection

        connection.execute_wrappers.append(_counter)

    @worker_shutdown.connect
    def _write(**kwargs):
        with open(_LOG, "w") as out:
            out.write(str(_count[0]))
