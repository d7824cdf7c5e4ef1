"""Measuring processes of the benchmark; run.py starts one per measurement and reads its '@@' lines.

    probe.py ours  N S1 B    sisy_celery.Scheduler on a seeded database (fake clock)
    probe.py beat  B T0 CAP  one of several sisy beats on the same burst (fake clock)
    probe.py dcb   N         django-celery-beat's DatabaseScheduler (real clock)
    probe.py raw   COUNT SIZE    raw kombu publishes to the bench Redis
    probe.py worker-prep M   M sisy.run_callable and M plain no-op messages for the worker benchmark
"""
from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import contextlib  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from datetime import datetime, timedelta, timezone as dt_timezone  # noqa: E402

from common import (  # noqa: E402
    EVERY_MINUTE, FakeClock, ceil_minute, emit, setup_paths, unconfirmed_publishing,
)

setup_paths()
UTC = dt_timezone.utc
IDLE_TICKS = 50


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would include the parent's peak, as
    Linux carries it across fork and exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def django_setup() -> None:
    import django

    django.setup()


@contextlib.contextmanager
def profiled(name: str):
    """With BENCH_PROFILE=DIR, write a cProfile of the block to DIR/<name>.prof (for finding why)."""
    folder = os.environ.get("BENCH_PROFILE")
    if not folder:
        yield
        return
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        profile.dump_stats(os.path.join(folder, f"{name}-{os.getpid()}.prof"))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def measure_idle(tick, cpu_ticks: int = IDLE_TICKS, query_ticks: int = 10) -> dict:
    """CPU of idle ticks (no query capture, which would slow them down), then queries of idle ticks."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    cpu = []
    for _ in range(cpu_ticks):
        start = time.process_time()
        tick()
        cpu.append((time.process_time() - start) * 1000)
    queries = []
    sample = ""
    for _ in range(query_ticks):
        with CaptureQueriesContext(connection) as captured:
            tick()
        queries.append(len(captured.captured_queries))
        sample = sample or "; ".join(q["sql"][:60] for q in captured.captured_queries)
    return {"idle_cpu_ms": statistics.median(cpu), "idle_cpu_ms_p90": percentile(cpu, 0.9),
            "idle_queries": statistics.median(queries), "idle_queries_max": max(queries), "idle_sql": sample}


def start_beat(scheduler_class, app, imported: float):
    """Construct a scheduler and run its first tick, as `celery beat` does; time it."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    start, cpu = time.perf_counter(), time.process_time()
    with CaptureQueriesContext(connection) as captured:
        beat = scheduler_class(app=app, lazy=True)
        beat.setup_schedule()
        beat.tick()
    return beat, {"startup_s": time.perf_counter() - start, "startup_cpu_s": time.process_time() - cpu,
                  "process_to_first_tick_s": time.perf_counter() - PROCESS_START,
                  "import_s": imported - PROCESS_START, "startup_queries": len(captured.captured_queries),
                  "rss_mb": peak_rss_mb()}


def loop(tick, now_ts, until, cap_ts: float, sync=None) -> int:
    """Celery beat's service loop: tick, sleep what it says; stop at ``until()`` or at ``cap_ts``."""
    ticks = 0
    while not until() and now_ts() < cap_ts:
        wait = tick()
        ticks += 1
        if wait and wait > 0:
            time.sleep(max(0.0, min(wait, cap_ts - now_ts())))
        if sync is not None:
            sync()
    return ticks


def burst_stats(published: list[tuple[float, float, object]], boundary: float, expected: int) -> dict:
    """published: (time published, slot, task) with times on the scheduler's clock."""
    in_burst = [p for p in published if p[1] == boundary]
    late = [p[0] - p[1] for p in in_burst]
    slots = [p[1] for p in published]
    return {
        "expected": expected,
        "published": len(in_burst),
        "first_s": min(late) if late else None,
        "last_s": max(late) if late else None,
        "p50_s": percentile(late, 0.5) if late else None,
        "p99_s": percentile(late, 0.99) if late else None,
        "in_slot_order": slots == sorted(slots),
        "unique": len({p[2] for p in in_burst}) == len(in_burst),
    }


# -- sisy_celery ------------------------------------------------------------------------

def fake_clock_scheduler(clock: FakeClock):
    """Scheduler subclass on the fake clock, recording (time, slot, task id) of every publish group.

    ``django.utils.timezone.now`` is shifted too, so ``Task.save()`` in this process (the
    "edit" below) lives on the same clock as beat, as a web process would.
    """
    from django.utils import timezone

    from sisy_celery import engine
    from sisy_celery.scheduler import Scheduler

    real_now = timezone.now

    def now() -> datetime:
        return real_now() + timedelta(seconds=clock.offset)

    timezone.now = now

    class BenchScheduler(Scheduler):
        published: list = []

        def now(self) -> datetime:
            return now()

    send_group = engine.send

    def recorded(runs, dispatcher):
        """Each publish group is recorded when its messages are out on the broker (in beat's
        publishing thread; a claimed batch is several groups, marked published after)."""
        refused = send_group(runs, dispatcher)
        out = clock.ts()
        BenchScheduler.published.extend((out, run.slot.timestamp(), run.task_id) for run in runs)
        return refused

    engine.send = recorded
    return BenchScheduler


def ours(n: int, s1: float, boundary: float) -> None:
    django_setup()
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from proj.celery import app
    from sisy_celery.models import Task

    clock = FakeClock()
    scheduler_class = fake_clock_scheduler(clock)
    clock.set(s1 - 15)
    imported = time.perf_counter()

    beat, startup = start_beat(scheduler_class, app, imported)
    emit(phase="startup", **startup)

    idle = measure_idle(beat.tick)
    beat._upkeep_at = 0.0  # one tick that also does upkeep and writes the health record (every upkeep_every s)
    with CaptureQueriesContext(connection) as captured:
        start = time.process_time()
        beat.tick()
        status_cpu = (time.process_time() - start) * 1000
    emit(phase="idle", **idle, status_tick_queries=len(captured.captured_queries), status_tick_cpu_ms=status_cpu)

    # An edit made 2 s before a slot: a daily task becomes every-minute at S1 - 2 s.
    edited = Task.objects.exclude(schedule=EVERY_MINUTE).order_by("pk").first()
    clock.set(s1 - 5)

    def edit() -> None:
        task = Task.objects.get(pk=edited.pk)
        task.schedule = EVERY_MINUTE
        task.save()
        from django.db import connection as thread_connection

        thread_connection.close()

    timer = threading.Timer(3.0, edit)
    timer.start()
    beat.published.clear()
    loop(beat.tick, clock.ts, lambda: any(p[2] == edited.pk for p in beat.published), s1 + 60)
    timer.join()
    honoured = [p for p in beat.published if p[2] == edited.pk]
    emit(phase="edit", edit_k_s=2.0, honoured_s=(honoured[0][0] - s1) if honoured else None,
         slot_ok=bool(honoured) and honoured[0][1] == s1)

    # The burst: every every-minute task (and the edited one) is due at B.
    expected = Task.objects.filter(schedule=EVERY_MINUTE).count()
    beat.published.clear()
    gc.collect()
    clock.set(boundary - 1.0)
    cpu = time.process_time()
    with profiled("ours-burst"):
        loop(beat.tick, clock.ts, lambda: len(beat.published) >= expected, boundary + 60)
    burst_cpu = time.process_time() - cpu
    stats = burst_stats(beat.published, boundary, expected)
    emit(phase="burst", boundary=boundary, burst_cpu_s=burst_cpu, **stats)

    # Steady state after the burst: ticks on the heartbeat until the next slot, sampled for 10 s.
    window = 10.0
    cpu, started = time.process_time(), time.time()
    ticks = loop(beat.tick, time.time, lambda: False, started + window)
    idle_cpu_per_s = (time.process_time() - cpu) / (time.time() - started)
    emit(phase="steady", window_s=window, ticks=ticks, idle_cpu_per_s=idle_cpu_per_s,
         cpu_per_slot_s=burst_cpu / max(1, stats["published"]))


def beat_member(boundary: float, t0: float, cap: float) -> None:
    """One of several beats on the same burst; the clock reads boundary - 1 at real time t0."""
    django_setup()
    from proj.celery import app

    clock = FakeClock()
    scheduler_class = fake_clock_scheduler(clock)
    clock.offset = (boundary - 1.0) - t0
    beat = scheduler_class(app=app, lazy=True)
    beat.setup_schedule()
    beat.tick()
    beat.producer.connection.ensure_connection()
    beat.published.clear()
    time.sleep(max(0.0, t0 - 0.5 - time.time()))
    cpu = time.process_time()

    def done() -> bool:
        # Finished once the burst is over: past the boundary and nothing left due for 0.5 s.
        return clock.ts() > boundary + 0.5 and (not beat.published or clock.ts() - beat.published[-1][0] > 0.5)

    with profiled("beat-member"):
        loop(beat.tick, clock.ts, done, boundary + cap)
    times = [p[0] - boundary for p in beat.published]
    emit(phase="member", published=len(beat.published), first_s=min(times) if times else None,
         last_s=max(times) if times else None, cpu_s=time.process_time() - cpu, pid=os.getpid())


# -- django-celery-beat -------------------------------------------------------------------

def dcb(n: int, cap: float) -> None:
    django_setup()
    from django.utils import timezone
    from django_celery_beat.models import CrontabSchedule, PeriodicTask
    from django_celery_beat.schedulers import DatabaseScheduler

    from proj.celery import app

    imported = time.perf_counter()
    beat, startup = start_beat(DatabaseScheduler, app, imported)
    emit(phase="startup", **startup, loaded=len(beat._schedule))

    idle = measure_idle(beat.tick, 10, 3)  # fewer: at 1M rows one idle tick takes about a second
    start = time.perf_counter()
    beat._heap = None  # what a reload costs after the initial one: is_due() on every loaded entry
    beat.tick()
    emit(phase="idle", **idle, heap_rebuild_s=time.perf_counter() - start)
    rebuild = time.perf_counter() - start

    published: list = []
    original_apply = beat.apply_entry

    def apply_entry(entry, producer=None):
        result = original_apply(entry, producer=producer)
        published.append((time.time(), entry.name))
        return result

    beat.apply_entry = apply_entry

    def sync() -> None:
        if beat.should_sync():
            beat._do_sync()

    every = CrontabSchedule.objects.get(minute="*", hour="*", day_of_week="*", day_of_month="*",
                                        month_of_year="*")
    # The edit: 2 s before the slot S1, a daily task becomes every-minute (as just run, so that
    # the new schedule, not a catch-up, is what fires).
    edited = PeriodicTask.objects.exclude(crontab=every).exclude(name__startswith="celery.").order_by("pk").first()
    s1 = ceil_minute(time.time(), 5)

    def edit() -> None:
        task = PeriodicTask.objects.get(pk=edited.pk)
        task.crontab = every
        task.last_run_at = timezone.now()
        task.save()
        from django.db import connection as thread_connection

        thread_connection.close()

    timer = threading.Timer(s1 - 2 - time.time(), edit)
    timer.start()
    loop(beat.tick, time.time, lambda: any(p[1] == edited.name for p in published), s1 + cap, sync)
    timer.join()
    honoured = [p for p in published if p[1] == edited.name]
    emit(phase="edit", edit_k_s=2.0, honoured_s=(honoured[0][0] - s1) if honoured else None, cap_s=cap)

    # The burst at the next whole minute B: as if every every-minute task had last run at B - 1 s.
    # Both the rows and the loaded entries are set (an UPDATE without signals: no reload), and
    # the heap is rebuilt before B.
    boundary = ceil_minute(time.time(), 5 + 2 * rebuild)
    last = utc(boundary - 1)
    PeriodicTask.objects.filter(crontab=every).update(last_run_at=last)
    names = set(PeriodicTask.objects.filter(crontab=every).values_list("name", flat=True))
    for name, entry in beat.schedule.items():
        if name in names:
            entry.last_run_at = entry.model.last_run_at = last
    expected = sum(1 for name in beat.schedule if name in names)
    beat._heap = None
    beat.tick()
    published.clear()
    gc.collect()
    time.sleep(max(0.0, boundary - 1 - time.time()))
    cpu = time.process_time()
    loop(beat.tick, time.time, lambda: len(published) >= expected, boundary + cap, sync)
    burst_cpu = time.process_time() - cpu
    triples = [(t, boundary, name) for t, name in published if name in names]
    stats = burst_stats(triples, boundary, expected)
    emit(phase="burst", boundary=boundary, burst_cpu_s=burst_cpu, cap_s=cap, **stats)

    window = 10.0
    cpu, started = time.process_time(), time.time()
    ticks = loop(beat.tick, time.time, lambda: False, started + window, sync)
    emit(phase="steady", window_s=window, ticks=ticks,
         idle_cpu_per_s=(time.process_time() - cpu) / (time.time() - started),
         cpu_per_slot_s=burst_cpu / max(1, stats["published"]))


# -- the physical reference and the worker ------------------------------------------------

def raw(count: int, size: int) -> None:
    """Publish ``count`` messages whose stored size is ``size`` bytes, from one process, as fast as possible.

    As Celery publishes to a plain direct queue: through the default exchange, straight to the queue.
    """
    import redis
    from kombu import Connection, Exchange, Queue

    from common import REDIS

    client = redis.Redis.from_url(REDIS)
    queue = Queue("bench_raw", Exchange("bench_raw", "direct"), "bench_raw")
    with Connection(REDIS) as conn:
        producer = conn.Producer(serializer="json")
        body = "x" * size
        producer.publish(body, exchange="", routing_key="bench_raw", declare=[queue])
        stored = len(client.lindex("bench_raw", 0))
        body = "x" * max(1, size - (stored - size) * 3 // 4)  # the body is stored base64-encoded
        producer.publish(body, exchange="", routing_key="bench_raw")
        stored = len(client.lindex("bench_raw", 0))
        client.delete("bench_raw")
        start = time.perf_counter()
        for _ in range(count):
            producer.publish(body, exchange="", routing_key="bench_raw", retry=False)
        elapsed = time.perf_counter() - start
    published = client.llen("bench_raw")
    client.delete("bench_raw")

    # The same through Celery's send_task, with the arguments of a sisy message: what Celery adds.
    django_setup()
    from proj.celery import app
    from sisy_celery.tasks import TASK_NAME

    args = [1, {"func_type": "function", "module_name": "jobs.jobs", "func_name": "no_arguments",
                "func_path": "jobs.jobs.no_arguments"}, {}, utc(time.time()).isoformat()]
    with app.producer_or_acquire() as producer:
        app.send_task(TASK_NAME, args=args, queue="bench_raw", producer=producer)
        client.delete("bench_raw")
        start = time.perf_counter()
        for _ in range(count):
            app.send_task(TASK_NAME, args=args, queue="bench_raw", producer=producer,
                          headers={"periodic_task_name": "sisy:1"})
        celery_elapsed = time.perf_counter() - start
    celery_size = len(client.lindex("bench_raw", 0))
    client.delete("bench_raw")
    emit(phase="raw", count=count, published=published, seconds=elapsed, rate=count / elapsed, stored_size=stored,
         celery_rate=count / celery_elapsed, celery_size=celery_size)


def worker_prep(m: int) -> None:
    django_setup()
    from proj.celery import app
    from sisy_celery import engine
    from sisy_celery.dispatch import Dispatcher
    from sisy_celery.models import FAR_FUTURE, Task, task_with_callable

    tasks = []
    for i in range(m):
        task = task_with_callable("jobs.jobs.no_arguments", label=f"worker bench {i}", queue="bench_sisy")
        task.next_run = FAR_FUTURE
        tasks.append(task)
    Task.objects.bulk_create(tasks, batch_size=1000)
    now = datetime.now(UTC)
    # One ledger run per task, claimed and published as "run now" does (a worker starts only runs
    # the ledger knows).
    runs = [engine.claim_now(task, now, "bench") for task in Task.objects.filter(label__startswith="worker bench ")]
    dispatcher = Dispatcher(app)
    for start in range(0, len(runs), 500):
        engine.publish(runs[start:start + 500], dispatcher, now)
    dispatcher.close()
    with app.producer_or_acquire() as producer:
        for _ in range(m):
            app.send_task("bench.noop", queue="bench_plain", producer=producer)
    emit(phase="worker-prep", messages=m)


def main(argv: list[str]) -> None:
    kind, args = argv[0], argv[1:]
    if kind == "ours":
        ours(int(args[0]), float(args[1]), float(args[2]))
    elif kind == "beat":
        confirms = os.environ.get("BENCH_PUBLISH_CONFIRMS", "1") != "0"
        with contextlib.nullcontext() if confirms else unconfirmed_publishing():
            beat_member(float(args[0]), float(args[1]), float(args[2]))
    elif kind == "dcb":
        dcb(int(args[0]), float(args[1]))
    elif kind == "raw":
        raw(int(args[0]), int(args[1]))
    elif kind == "worker-prep":
        worker_prep(int(args[0]))
    else:
        raise SystemExit(f"unknown probe {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
