"""`make demo`: the main job on embedded defaults (SQLite + kombu's filesystem broker).

Migrates a fresh database, creates a few tasks through the public API, starts one
Celery worker and one beat with ``sisy_celery.Scheduler``, prints each run as it
happens, then stops both processes cleanly and prints a summary.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
VAR = HERE / "var" / "demo"
SECONDS = float(os.environ.get("SISY_DEMO_SECONDS", "30"))


def main() -> int:
    shutil.rmtree(VAR, ignore_errors=True)
    VAR.mkdir(parents=True)
    env = {**os.environ, "SISY_VAR_DIR": str(VAR), "DJANGO_SETTINGS_MODULE": "proj.settings",
           "SISY_HEARTBEAT_FREQUENCY": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SISY_DATABASE_URL", None)
    env.pop("CELERY_BROKER_URL", None)
    os.environ.update(env)
    sys.path.insert(0, str(HERE))
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=HERE, env=env, check=True)

    import django

    django.setup()
    from django.utils import timezone
    from jobs.jobs import record, slow
    from jobs.models import Account, Run

    from sisy_celery.models import Task, task_with_callable

    account = Account.objects.create(name="ACME Ltd")
    task_with_callable(record, label="every 2 seconds", schedule="* * * * * */2").save()
    Task.run_iterations(account.accrue_interest, iterations=3, label="interest x3",
                        schedule="* * * * * */5", userdata={"amount": 10})
    task_with_callable(slow, label="slow, no overlap", schedule="* * * * * *",
                       allow_overlap=False, userdata={"seconds": 4}).save()
    Task.run_once(record, delay_until=timezone.now() + timedelta(seconds=10), label="once, after 10 s")
    print("Tasks created:")
    for task in Task.objects.order_by("pk"):
        print(f"  #{task.pk} {task.label!r:22} {task.schedule!r:18} next run {timezone.localtime(task.next_run):%H:%M:%S}")

    celery = [sys.executable, "-m", "celery", "-A", "proj"]
    logs = {name: open(VAR / f"{name}.log", "w") for name in ("worker", "beat")}
    processes = {
        "worker": subprocess.Popen(celery + ["worker", "-l", "info", "-c", "2", "-n", "demo@%h"], cwd=HERE,
                                   env=env, stdout=logs["worker"], stderr=subprocess.STDOUT),
        "beat": subprocess.Popen(celery + ["beat", "-S", "sisy_celery.Scheduler", "-l", "info",
                                           "-s", str(VAR / "beat-schedule")], cwd=HERE,
                                 env=env, stdout=logs["beat"], stderr=subprocess.STDOUT),
    }
    print(f"\nWorker (pid {processes['worker'].pid}) and beat (pid {processes['beat'].pid}) started; "
          f"watching runs for {SECONDS:g} s (logs in {VAR}).\n")
    print(f"  {'finished':8}  {'task':22} {'slot':8}  worker")
    seen = 0
    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline:
            for run in Run.objects.order_by("pk")[seen:]:
                seen += 1
                print(f"  {timezone.localtime(run.finished):%H:%M:%S}  {run.label!r:22} "
                      f"{timezone.localtime(run.slot):%H:%M:%S}  {run.worker} pid {run.pid}", flush=True)
            time.sleep(0.25)
    finally:
        for name, process in processes.items():
            process.send_signal(signal.SIGTERM)
        for name, process in processes.items():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
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
    print(f"  interest credited: {account.balance} (3 runs x 10)")
    print(f"  duplicate slots: {duplicates}; overlapping slow runs: {overlaps}")
    print(f"  tasks left: {', '.join(t.label for t in Task.objects.order_by('pk'))} "
          f"(finished one-off and 3-iteration tasks are removed)")
    codes = {name: p.returncode for name, p in processes.items()}
    print(f"  worker and beat stopped (exit codes {codes['worker']}, {codes['beat']})")
    return 0 if duplicates == 0 and overlaps == 0 and runs else 1


if __name__ == "__main__":
    sys.exit(main())
