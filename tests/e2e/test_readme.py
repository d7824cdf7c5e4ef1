"""The README's quick start, run as written: a fresh ``django-admin startproject`` on Redis and SQLite.

The blocks are read from README.md (each follows a ``<!-- quickstart -->`` line), in the
README's order, so the README cannot drift from what works:

- ``sh`` blocks: each line runs in a shell in the project directory, with this repository's
  venv first on PATH (``python``, ``django-admin``, ``celery``). ``python -m venv`` and
  ``pip install`` lines are not run (the package is already installed here, editable); the
  extras they name are checked against the installed metadata instead. ``createsuperuser`` runs
  with ``--noinput``; ``celery … worker`` and ``celery … beat`` start in the background.
- ``python`` blocks whose first line names a file (``# proj/celery.py``) write that file, or add
  to its end (``(add at the end)``); ``# python manage.py shell`` blocks run in ``manage.py shell``.
- the ``text`` block is the admin's add form: its fields are posted as a logged-in user would,
  then the task is sent with the action *Run selected tasks now*.

The only change made to the README's text is the Redis database number: the broker is a Redis
database of this test's own.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import require_service
from tests.e2e.harness import REDIS, ROOT, RedisBroker, _die_with_parent, wait_for

pytestmark = pytest.mark.e2e

BLOCK = re.compile(r"^<!-- quickstart -->\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.MULTILINE | re.DOTALL)
README_BROKER = "redis://127.0.0.1:6379/0"
BIN = Path(sys.executable).parent
ADMIN = {"DJANGO_SUPERUSER_USERNAME": "admin", "DJANGO_SUPERUSER_PASSWORD": "admin-pw",
         "DJANGO_SUPERUSER_EMAIL": "admin@example.com"}
#: the admin form's fields as the README names them
FORM_FIELDS = {"Callable": "callable", "Schedule": "schedule", "User data": "userdata"}
#: what the add form holds when the user leaves a field as it is
FORM_DEFAULTS = {
    "label": "", "pk_override": "", "enabled": "on", "timezone": "", "start_running_0": "", "start_running_1": "",
    "end_running_0": "", "end_running_1": "", "wait_for_schedule": "on", "iterations": "0", "allow_overlap": "on",
    "userdata": "{}", "queue": "", "priority": "", "expires": "",
}
#: run in ``manage.py shell``: post the add form, then "Run selected tasks now"; prints what happened
ADMIN_SCRIPT = """
import json, sys
from django.test import Client
from django.test.utils import setup_test_environment
from django.urls import reverse
from sisy_celery.models import Task

setup_test_environment()
client = Client()
assert client.login(username={username!r}, password={password!r})
add = client.post(reverse("admin:sisy_celery_task_add"), {data!r})
errors = add.context["adminform"].form.errors if add.status_code == 200 else {{}}
task = Task.objects.filter(_func_info__func_path={path!r}, schedule={schedule!r}).first()
sent = client.post(reverse("admin:sisy_celery_task_changelist"),
                   {{"action": "run_tasks_now", "_selected_action": [task.pk]}}, follow=True) if task else None
print(json.dumps({{"add": add.status_code, "errors": errors, "task": task and task.pk,
                  "messages": [str(m) for m in sent.context["messages"]] if sent else []}}))
"""


def quickstart() -> list[tuple[str, str]]:
    """(language, body) of each quick-start block of README.md, in order."""
    blocks = [(m["lang"], m["body"]) for m in BLOCK.finditer((ROOT / "README.md").read_text())]
    assert blocks, "README.md has no <!-- quickstart --> blocks"
    return blocks


def commands(body: str) -> list[str]:
    """The commands of a shell block, without comments."""
    return [line.split(" #")[0].strip() for line in body.splitlines() if line.strip() and not line.startswith("#")]


class Project:
    """The project directory, the environment its commands run in, and the processes they started."""

    def __init__(self, path: Path, broker: str) -> None:
        self.path = path
        self.broker = broker
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith(("DJANGO_", "CELERY_", "SISY_", "PYTHON"))}
        self.env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONUNBUFFERED="1", **ADMIN)
        self.processes: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.outputs: list[str] = []

    def run(self, command: str) -> str:
        done = subprocess.run(["bash", "-c", command], cwd=self.path, env=self.env, capture_output=True, text=True,
                              timeout=300)
        output = f"$ {command}\n{done.stdout}{done.stderr}"
        self.outputs.append(output)
        assert done.returncode == 0, output
        return done.stdout + done.stderr

    def background(self, name: str, command: str) -> None:
        log = self.path / f"{name}.log"
        with open(log, "wb") as out:
            self.processes[name] = (subprocess.Popen(shlex.split(command), cwd=self.path, env=self.env, stdout=out,
                                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                                     start_new_session=True), log)

    def log(self, name: str) -> str:
        return self.processes[name][1].read_text(errors="replace")

    def stop(self) -> dict[str, int]:
        for popen, _ in self.processes.values():
            popen.terminate()
        codes = {}
        for name, (popen, _) in self.processes.items():
            try:
                codes[name] = popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, 9)
                codes[name] = popen.wait()
        return codes

    def query(self, sql: str) -> list[tuple]:
        with sqlite3.connect(self.path / "db.sqlite3", timeout=20) as conn:
            return conn.execute(sql).fetchall()


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    require_service("Redis", REDIS["host"], REDIS["port"])
    broker = RedisBroker("redis")
    project = Project(tmp_path / "mysite", broker.acquire())
    project.path.mkdir()
    try:
        yield project
    finally:
        project.stop()
        broker.release()


def hellos(log: str, name: str) -> list[str]:
    """The slots (HH:MM:SS) of the worker's ``Hello NAME, slot …`` lines."""
    return re.findall(rf"Hello {name}, slot (\d\d:\d\d:\d\d)", log)


def test_readme_quickstart_runs_a_task_end_to_end(project: Project) -> None:
    admin_fields: dict[str, str] = {}
    shell_task = ""
    for lang, body in quickstart():
        first = body.splitlines()[0]
        if lang == "sh":
            for command in commands(body):
                if command.startswith(("python -m venv", "pip install")):
                    for extra in re.findall(r"\[(\w+)\]", command):
                        requires = importlib.metadata.requires("sisy-celery") or []
                        assert any(f'extra == "{extra}"' in r for r in requires), f"no extra [{extra}]: {requires}"
                elif " worker" in command or " beat" in command:
                    project.background("worker" if " worker" in command else "beat", command)
                elif command.endswith("createsuperuser"):
                    project.run(f"{command} --noinput")
                else:
                    project.run(command)
        elif lang == "python" and first == "# python manage.py shell":
            project.run(f"python manage.py shell -c {shlex.quote(body)}")
            shell_task = body
        elif lang == "python":
            target = project.path / first.lstrip("# ").split()[0]
            if "(add at the end)" in first:
                assert body.count(README_BROKER) <= 1
                text = body.replace(README_BROKER, project.broker)
                target.write_text(target.read_text() + "\n" + text + "\n")
            else:
                target.write_text(body + "\n")
        elif lang == "text":
            for line in body.splitlines():
                label, _, value = line.partition(":")
                admin_fields[FORM_FIELDS[label.strip()]] = value.strip()
        else:
            raise AssertionError(f"unknown quick-start block {lang!r}:\n{body}")

    settings = (project.path / "proj" / "settings.py").read_text()
    assert project.broker in settings and README_BROKER not in settings, "the broker is this test's own Redis db"
    migrate = next(out for out in project.outputs if "manage.py migrate" in out.splitlines()[0])
    assert "System check identified" not in migrate, migrate
    assert "Applying sisy_celery.0001_initial... OK" in migrate
    assert set(project.processes) == {"worker", "beat"}, "the README starts a worker and beat"

    # beat took sisy's scheduler from CELERY_BEAT_SCHEDULER (the README gives no -S)
    wait_for(lambda: "sisy beat " in project.log("beat"), 30, "beat to start sisy's scheduler")
    assert ". scheduler -> sisy_celery.scheduler.Scheduler" in project.log("beat")

    # the shell's task (N runs, S seconds apart, as the README creates it), then finished and removed
    runs = int(re.search(r"iterations=(\d+)", shell_task)[1])
    every = timedelta(seconds=int(re.search(r'schedule="every (\d+)s"', shell_task)[1]))
    greeted = re.search(r'"name": "(\w+)"', shell_task)[1]
    slots = wait_for(lambda: len(hellos(project.log("worker"), greeted)) >= runs and hellos(project.log("worker"), greeted),
                     60, f"{runs} 'Hello {greeted}' runs in the worker's log")
    times = [datetime.strptime(slot, "%H:%M:%S") for slot in slots]
    assert [b - a for a, b in zip(times, times[1:])] == [every] * (runs - 1), slots
    wait_for(lambda: project.query("SELECT COUNT(*) FROM sisy_celery_task")[0][0] == 0, 20,
             "the finished task to be removed")
    wait_for(lambda: [row[0] for row in project.query("SELECT status FROM django_celery_results_taskresult")]
             == ["SUCCESS"] * runs, 20, f"{runs} successful results in django-celery-results")

    # the admin's task: the add form as the README fills it, then "Run selected tasks now"
    assert set(admin_fields) == set(FORM_FIELDS.values())
    script = ADMIN_SCRIPT.format(username=ADMIN["DJANGO_SUPERUSER_USERNAME"],
                                 password=ADMIN["DJANGO_SUPERUSER_PASSWORD"],
                                 data={**FORM_DEFAULTS, **admin_fields}, path=admin_fields["callable"],
                                 schedule=admin_fields["schedule"])
    result = json.loads(project.run(f"python manage.py shell -c {shlex.quote(script)}").strip().splitlines()[-1])
    assert result["add"] == 302 and result["errors"] == {}, result
    added, sent = result["messages"]
    assert "was added successfully" in added and f"(id {result['task']}) sent: Celery task id " in sent, result
    who = json.loads(admin_fields["userdata"])["name"]
    wait_for(lambda: hellos(project.log("worker"), who), 20, f"'Hello {who}' in the worker's log")

    codes = project.stop()
    assert codes == {"worker": 0, "beat": 0}, codes
    for process in ("worker", "beat"):
        assert "Traceback" not in project.log(process), project.log(process)
    # beat logs each publish at INFO ("published N run(s)"): the shell task's runs, and the admin's
    # task's first slot too if the machine was slow enough for it to come due ("Run now" is the web's)
    published = sum(int(n) for n in re.findall(r"published (\d+) run\(s\)", project.log("beat")))
    assert published >= runs, f"beat published {published} run(s); the shell's task ran {runs} times"
    print(f"\nREADME quick start in {project.path} (broker {project.broker}):")
    print(f"  worker: 'Hello {greeted}' at {', '.join(slots)} ({runs} runs), then the task was removed; "
          f"'Hello {who}' at {', '.join(hellos(project.log('worker'), who))} after the admin's 'Run now'; "
          f"{sent}")
    print(f"  beat: {published} run(s) published by sisy_celery.Scheduler "
          f"(from CELERY_BEAT_SCHEDULER); exit codes {codes}")
