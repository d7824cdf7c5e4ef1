"""Run Python code inside the example project, with Django set up (used by the e2e harness).

    python driver.py             serve: one JSON request per stdin line, one JSON reply per stdout line
    python driver.py -c CODE     run CODE once and print its JSON reply

A request is ``{"code": "...", "params": {...}}``. The code runs with ``params``,
``Task``, ``task_with_callable``, ``jobs`` (the example's callables), ``Run``,
``Account``, ``timezone``, ``timedelta`` and ``datetime`` in scope; whatever it
assigns to ``result`` is sent back (JSON, datetimes as ISO strings). The reply is
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "<traceback>"}``.
Anything the code prints goes to stderr, so stdout carries only replies.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any, TextIO


def namespace() -> dict[str, Any]:
    from datetime import datetime, timedelta

    from django.utils import timezone
    from jobs import jobs
    from jobs.models import Account, Run

    from sisy_celery.models import Task, task_with_callable

    return {"Task": Task, "task_with_callable": task_with_callable, "jobs": jobs, "Run": Run,
            "Account": Account, "timezone": timezone, "timedelta": timedelta, "datetime": datetime}


def execute(code: str, params: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    scope = {**base, "params": params, "result": None}
    try:
        exec(compile(code, "<e2e>", "exec"), scope)
        return {"ok": True, "result": scope["result"]}
    except BaseException:  # report every failure to the caller, keep serving
        return {"ok": False, "error": traceback.format_exc()}


def reply(out: TextIO, answer: dict[str, Any]) -> None:
    out.write(json.dumps(answer, default=_plain) + "\n")
    out.flush()


def _plain(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def main(argv: list[str]) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints of the code go to the log

    import django

    django.setup()
    base = namespace()
    if len(argv) >= 2 and argv[0] == "-c":
        answer = execute(argv[1], {}, base)
        reply(out, answer)
        return 0 if answer["ok"] else 1
    for line in sys.stdin:
        if line.strip():
            request = json.loads(line)
            reply(out, execute(request["code"], request.get("params") or {}, base))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
