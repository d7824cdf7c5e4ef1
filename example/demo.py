"""`make demo`: the main job on embedded defaults (SQLite + kombu's filesystem broker).

Migrates a fresh database, creates a few tasks through the public API and an admin
user, starts one Celery worker, one beat with ``sisy_celery.Scheduler`` and the admin
(Django's development server), prints each run as it happens until Ctrl-C (or
``SISY_DEMO_SECONDS``), then stops the three processes cleanly and prints a summary.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
VAR = HERE / "var" / "demo"
SECONDS = float(os.environ.get("SISY_DEMO_SECONDS", "0"))  # 0: until Ctrl-C
ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin"  # a throwaway database of this demo only


def free_port(preferred: int) -> int:
    """``preferred`` if nothing listens there, else any free port."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(name: str, args: list[str], env: dict[str, str], logs: dict[str, IO[str]]) -> subprocess.Popen[bytes]:
    """Start ``args`` in its own session, so Ctrl-C reaches only this script, which stops it in order."""
    logs[name] = open(VAR / f"{name}.log", "w")
    return subprocess.Popen(args, cwd=HERE, env=env, stdout=logs[name], stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    """Celery's warm shutdown on SIGTERM; Django's development server stops cleanly on SIGINT."""
    for name, process in processes.items():
        process.send_signal(signal.SIGINT if name == "admin" else signal.SIGTERM)
    for process in processes.values():
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    shutil.rmtree(VAR, ignore_errors=True)
    VAR.mkdir(parents=True)
    port = free_port(int(os.environ.get("SISY_DEMO_PORT", "8000")))
    env = {**os.environ, "SISY_VAR_DIR": str(VAR), "DJANGO_SETTINGS_MODULE": "proj.settings",
           "SISY_HEARTBEAT_FREQUENCY": "1", "PYTHONUNBUFFERED": "1",
           "DJANGO_SUPERUSER_USERNAME": ADMIN_USER, "DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD,
           "DJANGO_SUPERUSER_EMAIL": "admin@example.com"}
    env.pop("SISY_DATABASE_URL", None)
    env.pop("CELERY_BROKER_URL", None)
    os.environ.update(env)
    sys.path.insert(0, str(HERE))
    manage = [sys.executable, "manage.py"]
    subprocess.run(manage + ["migrate", "-v0"], cwd=HERE, env=env, check=True)
    subprocess.run(manage + ["createsuperuser", "--noinput"], cwd=HERE, env=env, check=True,
                   stdout=subprocess.DEVNULL)

    import django

    django.setup()
    from django.utils import timezone
    from jobs.jobs import record, slow
    from jobs.models import Account, Run

    from sisy_celery.models import Task, task_with_callable

    account = Account.objects.create(name="ACME Ltd")
    task_with_callable(record, label="every 2 seconds", schedule="every 2s").save()
    Task.run_iterations(account.accrue_interest, iterations=3, label="interest x3",
                        schedule="* * * * * */5", userdata={"amount": 10})
    task_with_callable(slow, label="slow, no overlap", schedule="* * * * * *",
                       allow_overlap=False, userdata={"seconds": 4}).save()
    Task.run_once(record, delay_until=timezone.now() + timedelta(seconds=10), label="once, after 10 s")
    print("Tasks created:")
    for task in Task.objects.order_by("pk"):
        print(f"  #{task.pk} {task.label!r:22} {task.schedule!r:18} next run {timezone.localtime(task.next_run):%H:%M:%S}")

    celery = [sys.executable, "-m", "celery", "-A", "proj"]
    logs: dict[str, IO[str]] = {}
    processes = {
        "worker": start("worker", celery + ["worker", "-l", "info", "-c", "2", "-n", "demo@%h"], env, logs),
        "beat": start("beat", celery + ["beat", "-l", "info", "-s", str(VAR / "beat-schedule")], env, logs),
        "admin": start("admin", manage + ["runserver", f"127.0.0.1:{port}", "--noreload"], env, logs),
    }
    print(f"\nWorker (pid {processes['worker'].pid}), beat (pid {processes['beat'].pid}) and the admin "
          f"(pid {processes['admin'].pid}) started; logs in {VAR}.")
    print(f"Open http://127.0.0.1:{port}/admin/sisy_celery/task/ and log in as "
          f"{ADMIN_USER!r} with password {ADMIN_PASSWORD!r}.")
    print("Watching runs" + (f" for {SECONDS:g} s" if SECONDS else "; press Ctrl-C to stop") + ".\n")
    print(f"  {'finished':8}  {'task':22} {'slot':8}  worker")
    seen = 0
    deadline = time.monotonic() + SECONDS if SECONDS else float("inf")
    try:
        while time.monotonic() < deadline:
            for run in Run.objects.order_by("pk")[seen:]:
                seen += 1
                print(f"  {timezone.localtime(run.finished):%H:%M:%S}  {run.label!r:22} "
                      f"{timezone.localtime(run.slot):%H:%M:%S}  {run.worker} pid {run.pid}", flush=True)
            time.sleep(0.25)
    except KeyboardInterrupt:
        print("\nStopping the worker, beat and the admin ...")
    finally:
        # A second Ctrl-C while they stop would leave them running: ignore it until they are gone.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop(processes)
        for log in logs.values():
            log.close()

    runs = list(Run.objects.order_by("started"))
    per_task = Counter(run.label for run in runs)
    duplicates = sum(n - 1 for n in Counter((r.task_id, r.slot) for r in runs).values() if n > 1)
    slow_runs = [r for r in runs if r.label == "slow, no overlap"]
    overlaps = sum(1 for a, b in zip(slow_runs, slow_runs[1:]) if b.started < a.finished)
    print("\nSummary")
    for label, count in sorted(per_task.items()):
        print(f"  {label!r:22} {count:3d} run(s)")
    account.refresh_from_db()
    print(f"  interest credited: {account.balance} (10 per run, 3 runs at most)")
    print(f"  duplicate slots: {duplicates}; overlapping slow runs: {overlaps}")
    print(f"  tasks left: {', '.join(t.label for t in Task.objects.order_by('pk'))} "
          f"(finished one-off and 3-iteration tasks are removed)")
    codes = ", ".join(f"{name} {p.returncode}" for name, p in processes.items())
    print(f"  stopped (exit codes: {codes})")
    return 0 if duplicates == 0 and overlaps == 0 and runs else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before the processes started: nothing to stop
        print("\nDemo stopped.")
        sys.exit(130)
