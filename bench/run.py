"""`make bench`: sisy_celery's Scheduler at 10k / 100k / 1M tasks, side by side with django-celery-beat.

Every figure printed is measured by this run. Environment:
  BENCH_SIZES              task counts (default 10000,100000,1000000)
  BENCH_DCB_STARTUP_CAP    seconds django-celery-beat may take to load before it is stopped (240)
  BENCH_DCB_CAP            seconds after a slot it may take to honour an edit / publish a burst (60)
  BENCH_WORKER_MESSAGES    messages per worker throughput run (2000)
  BENCH_PG / BENCH_REDIS   server URLs (postgres://postgres@127.0.0.1:5432, redis://127.0.0.1:6379/11)
  BENCH_DISPATCH_AMQP      RabbitMQ URL of the bursts published there (default: a virtual host of the
                           benchmark's own, as bench/dispatch.py makes it)

The measurements are saved in bench/last-results.json; `python bench/run.py --report [FILE]` prints
their table again.
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone as dt_timezone
from pathlib import Path

import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH, EVERY_MINUTE, EXAMPLE, PG, QUEUE, REDIS, ceil_minute, child_env, db_url, decode_message,
)

UTC = dt_timezone.utc
PY = sys.executable
TEMPLATE = "sisy_bench_template"
SIZES = [int(s) for s in os.environ.get("BENCH_SIZES", "10000,100000,1000000").split(",") if s.strip()]
DCB_STARTUP_CAP = float(os.environ.get("BENCH_DCB_STARTUP_CAP", "240"))
DCB_CAP = float(os.environ.get("BENCH_DCB_CAP", "60"))
WORKER_MESSAGES = int(os.environ.get("BENCH_WORKER_MESSAGES", "2000"))
FUNC_INFO = ('{"func_type": "function", "module_name": "jobs.jobs", "func_name": "no_arguments", '
             '"func_path": "jobs.jobs.no_arguments"}')
HAS_NOT_RUN = "1970-01-01 00:00:00+00"
FAR_FUTURE = "2217-12-31 23:59:00+00"
NEVER = "2100-01-01 00:00:00+00"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def every_minute_count(n: int) -> int:
    """20% of the tasks run every minute, at most 20,000 (so 2% of 1M)."""
    return min(n // 5, 20000)


# -- databases ------------------------------------------------------------------------------

def admin() -> psycopg.Connection:
    return psycopg.connect(db_url("postgres"), autocommit=True)


def drop(name: str) -> None:
    with admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fresh(name: str) -> None:
    drop(name)
    with admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')


def make_template() -> None:
    drop(TEMPLATE)
    with admin() as conn:
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    subprocess.run([PY, "manage.py", "migrate", "-v0"], cwd=EXAMPLE, env=child_env(TEMPLATE), check=True)


def fmt_ts(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S+00")


def layout(n: int, s1: float, boundary: float):
    """Which rows run every minute, and the (hour, minute) of the daily rest, avoiding the measured minutes.

    Yields (index, None) for every-minute rows and (index, (hour, minute)) for daily ones.
    """
    every = every_minute_count(n)
    step = n / every if every else n + 1
    busy = set()
    t = s1 - 180
    while t <= boundary + 600:  # the single- and multi-beat bursts use the minutes after B
        stamp = datetime.fromtimestamp(t, UTC)
        busy.add((stamp.hour, stamp.minute))
        t += 60
    free = [(h, m) for h in range(24) for m in range(60) if (h, m) not in busy]
    rng = random.Random(n)
    marks = {int(k * step) for k in range(every)}
    for i in range(n):
        yield i, None if i in marks else rng.choice(free)


def next_daily(hour: int, minute: int, after: datetime) -> datetime:
    candidate = after.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return candidate if candidate > after else candidate + timedelta(days=1)


def seed_ours(name: str, n: int, s1: float, boundary: float) -> float:
    """COPY n Task rows with next_run computed directly: every-minute rows due at S1 + 60 = B."""
    started = time.perf_counter()
    fresh(name)
    b = datetime.fromtimestamp(boundary, UTC)
    now = fmt_ts(datetime.now(UTC))
    daily_next: dict = {}
    buf = io.StringIO()
    for i, hm in layout(n, s1, boundary):
        if hm is None:
            schedule, next_run = EVERY_MINUTE, fmt_ts(b)
        else:
            if hm not in daily_next:
                daily_next[hm] = fmt_ts(next_daily(hm[0], hm[1], b))
            schedule, next_run = f"{hm[1]} {hm[0]} * * *", daily_next[hm]
        buf.write(f"bench {i}\t{schedule}\tt\t{HAS_NOT_RUN}\t{FAR_FUTURE}\tt\t0\tt\t\t\t\\N\t\\N\t{now}\t{now}\t"
                  f"{HAS_NOT_RUN}\t{next_run}\t{FUNC_INFO}\t{{}}\tf\t\t\n")
    columns = ("label, schedule, enabled, start_running, end_running, wait_for_schedule, iterations, "
               "allow_overlap, timezone, queue, priority, expires, created_at, modified_at, last_run, next_run, "
               "_func_info, _extra_data, running, last_status, problem")
    with psycopg.connect(db_url(name), autocommit=True) as conn:
        with conn.cursor().copy(f"COPY sisy_celery_task ({columns}) FROM STDIN") as copy:
            copy.write(buf.getvalue())
        conn.execute("ANALYZE sisy_celery_task")
    return time.perf_counter() - started


def seed_dcb(name: str, n: int) -> float:
    """The same distribution as django-celery-beat rows: one shared every-minute crontab, daily crontabs.

    last_run_at is far ahead so nothing is due until the probe sets up the measured slots.
    """
    started = time.perf_counter()
    fresh(name)
    now = fmt_ts(datetime.now(UTC))
    with psycopg.connect(db_url(name), autocommit=True) as conn:
        crontab = "django_celery_beat_crontabschedule"
        fields = "(minute, hour, day_of_week, day_of_month, month_of_year, timezone)"
        every_id = conn.execute(f"INSERT INTO {crontab} {fields} VALUES ('*', '*', '*', '*', '*', 'UTC') "
                                "RETURNING id").fetchone()[0]
        ids = {}
        for h in range(24):
            for m in range(60):
                ids[(h, m)] = conn.execute(f"INSERT INTO {crontab} {fields} VALUES (%s, %s, '*', '*', '*', 'UTC') "
                                           "RETURNING id", (str(m), str(h))).fetchone()[0]
        buf = io.StringIO()
        # The measured minutes of the DCB run are real ones; the daily rows never come due in it.
        for i, hm in layout(n, 0, 0):
            cron = every_id if hm is None else ids[hm]
            buf.write(f"bench {i}\tbench.noop\t[]\t{{}}\t\\N\t\\N\t\\N\t\\N\tt\t{NEVER}\t0\t{now}\t\t{cron}\t"
                      f"\\N\t\\N\tf\t\\N\t\\N\t{{}}\t\\N\t\\N\n")
        columns = ("name, task, args, kwargs, queue, exchange, routing_key, expires, enabled, last_run_at, "
                   "total_run_count, date_changed, description, crontab_id, interval_id, solar_id, one_off, "
                   "start_time, priority, headers, clocked_id, expire_seconds")
        with conn.cursor().copy(f"COPY django_celery_beat_periodictask ({columns}) FROM STDIN") as copy:
            copy.write(buf.getvalue())
        conn.execute("ANALYZE")
    return time.perf_counter() - started


# -- running probes -----------------------------------------------------------------------------

def peak_rss_of(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def probe(args: list[str], db: str, timeout: float, first_timeout: float | None = None, **env: str) -> dict:
    """Run probe.py (``env`` added to its environment); return its '@@' records by phase. Stopped (and
    marked) when it overruns."""
    process = subprocess.Popen([PY, str(BENCH / "probe.py"), *args], cwd=EXAMPLE, env=child_env(db, **env),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records: dict = {}
    errors: list[str] = []

    def read_out() -> None:
        for line in process.stdout:
            if line.startswith("@@"):
                record = json.loads(line[2:])
                records[record["phase"]] = record

    def read_err() -> None:
        for line in process.stderr:
            errors.append(line)

    threads = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    rss = None
    while process.poll() is None:
        elapsed = time.monotonic() - started
        if (first_timeout is not None and not records and elapsed > first_timeout) or elapsed > timeout:
            rss = peak_rss_of(process.pid)
            process.send_signal(signal.SIGKILL)
            process.wait()
            records["stopped"] = {"after_s": elapsed, "rss_mb": rss, "during": "startup" if not records else "run"}
            break
        rss = peak_rss_of(process.pid) or rss
        time.sleep(0.2)
    for thread in threads:
        thread.join(timeout=5)
    if process.returncode not in (0, -signal.SIGKILL):
        tail = "".join(errors[-30:])
        raise RuntimeError(f"probe {args} failed ({process.returncode}):\n{tail}")
    return records


def queue_check(client: redis.Redis, queue: str = QUEUE) -> dict:
    """Read every message in the queue: (task, slot) pairs must be unique."""
    raw = client.lrange(queue, 0, -1)
    pairs = Counter()
    for message in raw:
        args = decode_message(message)
        pairs[(args[0], args[3])] += 1
    sizes = sorted(len(m) for m in raw)
    return {**tally(pairs), "size": sizes[len(sizes) // 2] if sizes else 0,
            "slots": Counter(slot for _, slot in pairs)}


def tally(pairs: Counter) -> dict:
    """Messages counted by (task, slot): how many, and how many are copies of another."""
    return {"messages": sum(pairs.values()), "duplicates": sum(c - 1 for c in pairs.values() if c > 1)}


# -- the benchmark ------------------------------------------------------------------------------

def run_size(n: int, client: redis.Redis, keep: bool) -> dict:
    boundary = ceil_minute(time.time(), 3600)
    result: dict = {"n": n, "every": every_minute_count(n), "boundary": boundary}
    s1 = boundary - 60
    ours_db = f"sisy_bench_ours_{n}"
    log(f"N={n:,}: seeding sisy_celery (COPY)")
    result["ours_seed_s"] = seed_ours(ours_db, n, s1, boundary)
    client.flushdb()
    log(f"N={n:,}: running sisy_celery.Scheduler")
    result["ours"] = probe(["ours", str(n), str(s1), str(boundary)], ours_db, timeout=600)
    check = queue_check(client)
    iso = datetime.fromtimestamp(boundary, UTC).isoformat()
    result["ours_queue"] = {"messages": check["messages"], "duplicates": check["duplicates"],
                            "size": check["size"], "at_boundary": check["slots"].get(iso, 0)}
    client.flushdb()
    if not keep:
        drop(ours_db)

    dcb_db = f"sisy_bench_dcb_{n}"
    log(f"N={n:,}: seeding django-celery-beat (COPY)")
    result["dcb_seed_s"] = seed_dcb(dcb_db, n)
    log(f"N={n:,}: running django-celery-beat DatabaseScheduler (load cap {DCB_STARTUP_CAP:g} s, "
        f"slot cap {DCB_CAP:g} s)")
    result["dcb"] = probe(["dcb", str(n), str(DCB_CAP)], dcb_db, timeout=DCB_STARTUP_CAP + 5 * DCB_CAP + 300,
                          first_timeout=DCB_STARTUP_CAP)
    client.flushdb()
    drop(dcb_db)
    return result


def amqp_queue_check(url: str, expected: int, queue: str = QUEUE) -> dict:
    """Consume every message of the RabbitMQ queue (waiting up to 30 s for ``expected`` of them): (task,
    slot) pairs must be unique. Then delete the queue."""
    from kombu import Connection

    pairs: Counter = Counter()
    with Connection(url) as conn:
        channel = conn.default_channel

        def count(message) -> None:
            args = json.loads(message.body)[0]
            pairs[(args[0], args[3])] += 1

        channel.basic_qos(0, 1000, False)
        tag = channel.basic_consume(queue, no_ack=True, callback=count)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=1.0 if sum(pairs.values()) >= expected else 5.0)
            except TimeoutError:
                if sum(pairs.values()) >= expected:
                    break
        channel.basic_cancel(tag)
        channel.queue_delete(queue)
    return tally(pairs)


def multi_beat(n: int, boundary: float, client: redis.Redis, beats: int, slots: int | None = None,
               broker: str = REDIS, **env: str) -> dict:
    """`beats` Scheduler processes on the same burst of the every-minute rows of the N-task database
    (the first ``slots`` of them, the others off until 2100), publishing to ``broker``.

    ``boundary`` lies in the minutes the seeded daily rows avoid, so only the every-minute rows are due.
    """
    name = f"sisy_bench_ours_{n}"
    at = datetime.fromtimestamp(boundary, UTC)
    with psycopg.connect(db_url(name), autocommit=True) as conn:
        conn.execute("UPDATE sisy_celery_task SET next_run = %s, running = false WHERE schedule = %s",
                     (NEVER if slots else at, EVERY_MINUTE))
        if slots:
            conn.execute("UPDATE sisy_celery_task SET next_run = %s WHERE id IN (SELECT id FROM sisy_celery_task "
                         "WHERE schedule = %s ORDER BY id LIMIT %s)", (at, EVERY_MINUTE, slots))
        expected = conn.execute("SELECT count(*) FROM sisy_celery_task WHERE next_run = %s", (at,)).fetchone()[0]
        conn.execute("DELETE FROM sisy_celery_run")
    client.flushdb()
    t0 = time.time() + 6.0
    outputs: list[dict] = []
    threads = [threading.Thread(target=lambda: outputs.append(
        probe(["beat", str(boundary), str(t0), "60"], name, timeout=120, CELERY_BROKER_URL=broker, **env)))
        for _ in range(beats)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    members = [o["member"] for o in outputs if "member" in o]
    check = queue_check(client) if broker == REDIS else amqp_queue_check(broker, expected)
    client.flushdb()
    published = sum(m["published"] for m in members)
    last = max((m["last_s"] for m in members if m["last_s"] is not None), default=None)
    first = min((m["first_s"] for m in members if m["first_s"] is not None), default=None)
    return {"beats": beats, "expected": expected, "published": published, "first_s": first, "last_s": last,
            "rate": published / last if last else None, "per_beat": [m["published"] for m in members],
            "queue_messages": check["messages"], "duplicates": check["duplicates"]}


def rabbitmq_bursts(n: int, boundary: float, client: redis.Redis) -> dict:
    """One beat on a 2,000- and a 20,000-slot burst of the N-task database, publishing to RabbitMQ
    (the virtual host of bench/dispatch.py): with publisher confirms, as shipped, and without them (a
    variant that is not shipped, to show what they cost); then raw kombu's publish rate to the same
    broker, for the ratios. ``boundary`` is the first of four free minutes."""
    import dispatch as publish_only

    url = publish_only.amqp_url()
    bursts = []
    for slots in (2000, 20000):
        for confirms in (True, False):
            log(f"RabbitMQ: one beat on a {slots:,}-slot burst, publisher confirms {'on' if confirms else 'off'}")
            burst = multi_beat(n, boundary + 60 * len(bursts), client, 1, slots=slots, broker=url,
                               BENCH_PUBLISH_CONFIRMS="1" if confirms else "0")
            bursts.append({**burst, "slots": slots, "confirms": confirms})
    log("RabbitMQ: raw kombu publish rate")
    slot = datetime.fromtimestamp(boundary, UTC)
    best = 0.0
    try:
        for _round in range(2):
            seconds = publish_only.raw_kombu(url, publish_only.runs(20000, slot), {"periodic_task_name": "sisy:1"})
            if publish_only.settled_length(url, 20000) != 20000:
                raise RuntimeError("raw kombu: RabbitMQ does not hold all 20,000 messages")
            publish_only.purge(url)
            best = max(best, 20000 / seconds)
    finally:
        with publish_only.Connection(url) as conn:
            conn.default_channel.queue_delete(publish_only.QUEUE)
    return {"n": n, "bursts": bursts, "raw_rate": best}


def drain(db: str, kind: str, queue: str, task_name: str, m: int, pool: list[str], env: dict) -> float:
    """Start a worker on ``queue``, wait until it has run ``m`` tasks; return the seconds from the
    first start to the last finish (from the result rows, so worker startup is not counted)."""
    log_path = BENCH / f".worker-{kind}.log"
    with open(log_path, "w") as worker_log:
        worker = subprocess.Popen(
            [PY, "-m", "celery", "-A", "bench_celery", "worker", "-Q", queue, *pool, "-l", "warning",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"{kind}@%h"],
            cwd=EXAMPLE, env=env, stdout=worker_log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        done = 0
        with psycopg.connect(db_url(db), autocommit=True) as conn:
            while time.monotonic() < deadline and worker.poll() is None and done < m:
                time.sleep(0.2)
                done = conn.execute("SELECT count(*) FROM django_celery_results_taskresult "
                                    "WHERE task_name = %s AND status = 'SUCCESS'", (task_name,)).fetchone()[0]
            span = conn.execute("SELECT extract(epoch FROM max(date_done) - min(date_created)) FROM "
                                "django_celery_results_taskresult WHERE task_name = %s", (task_name,)).fetchone()[0]
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    tail = log_path.read_text()[-3000:]
    log_path.unlink()
    if done < m:
        raise RuntimeError(f"worker ran {done}/{m} {kind} messages:\n{tail}")
    return float(span)


def worker_bench(client: redis.Redis, rounds: int = 2) -> dict:
    """Drain M sisy.run_callable and M plain no-op messages with a real `celery worker -c 2`.

    The kinds alternate for ``rounds`` rounds and each keeps its best round (the machine is shared).
    Then a solo-pool worker counts the SQL statements of 200 runs of each kind.
    """
    kinds = (("sisy", "bench_sisy", "sisy.run_callable"), ("plain", "bench_plain", "bench.noop"))
    out: dict = {"messages": WORKER_MESSAGES, "rounds": rounds}
    db = "sisy_bench_worker"
    for round_ in range(rounds + 1):
        counting = round_ == rounds
        m = 200 if counting else WORKER_MESSAGES
        fresh(db)
        client.flushdb()
        probe(["worker-prep", str(m)], db, timeout=300)
        for kind, queue, task_name in kinds:
            if counting:
                query_log = BENCH / f".queries-{kind}"
                drain(db, kind, queue, task_name, m, ["-P", "solo"], child_env(db, BENCH_QUERY_LOG=str(query_log)))
                out[f"{kind}_queries"] = int(query_log.read_text()) / m
                query_log.unlink()
            else:
                seconds = drain(db, kind, queue, task_name, m, ["-c", "2"], child_env(db))
                out.setdefault(f"{kind}_rates", []).append(m / seconds)
        drop(db)
    for kind, _, _ in kinds:
        out[f"{kind}_rate"] = max(out[f"{kind}_rates"])
    return out


# -- report ------------------------------------------------------------------------------------

def f(value, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}{unit}"


def ratio(dcb, ours, higher_is_better: bool = False) -> str:
    """How many times better sisy_celery is: dcb / ours for times and costs, ours / dcb for rates."""
    if higher_is_better:
        dcb, ours = ours, dcb
    if dcb is None or ours is None or ours == 0:
        return "-"
    return f"{dcb / ours:,.1f}x"


def report(results: list[dict], raw: dict, beats: list[dict], worker: dict, meta: dict,
           rabbit: dict | None = None) -> str:
    lines = ["", "=" * 100, "sisy-celery scheduler benchmark vs django-celery-beat "
             f"(machine: {meta['cores']} cores, PostgreSQL + Redis on localhost)",
             f"load average at the start {meta['load_at_start']}, at the end {meta['load_at_end']}; "
             f"{meta['version']}", "=" * 100]
    goals: list[tuple[str, bool | None, str]] = []
    for r in results:
        o, d = r["ours"], r["dcb"]
        os_, ds = o.get("startup", {}), d.get("startup", {})
        oi, di = o.get("idle", {}), d.get("idle", {})
        ob, db = o.get("burst", {}), d.get("burst", {})
        oe, de = o.get("edit", {}), d.get("edit", {})
        ost, dst = o.get("steady", {}), d.get("steady", {})
        stopped = d.get("stopped")
        due_per_min = r["every"] + (r["n"] - r["every"]) / 1440
        o_min = (ost.get("idle_cpu_per_s", 0) * 60 + ost.get("cpu_per_slot_s", 0) * due_per_min) if ost else None
        d_min = (dst.get("idle_cpu_per_s", 0) * 60 + dst.get("cpu_per_slot_s", 0) * due_per_min) if dst else None
        o_rate = ob["published"] / ob["last_s"] if ob.get("last_s") else None
        d_rate = db["published"] / db["last_s"] if db.get("last_s") else None
        d_note = ""
        if stopped:
            d_note = (f"  (django-celery-beat stopped after {stopped['after_s']:.0f} s during {stopped['during']}, "
                      f"RSS {f(stopped['rss_mb'], ' MB', 0)})")
        lines += ["", f"N = {r['n']:,} tasks ({r['every']:,} every minute, the rest daily){d_note}",
                  f"{'metric':44} {'sisy_celery':>16} {'django-celery-beat':>20} {'ratio (+)':>11}",
                  "-" * 94]

        def row(label, ov, dv, unit="", digits=2, rat=True, higher_is_better=False):
            shown = ratio(dv, ov, higher_is_better) if rat and not isinstance(dv, str) else ""
            lines.append(f"{label:44} {f(ov, unit, digits):>16} {f(dv, unit, digits):>20} {shown:>11}")

        row("seed (COPY)", r["ours_seed_s"], r["dcb_seed_s"], " s", rat=False)
        row("startup: construct + first tick", os_.get("startup_s"),
            ds.get("startup_s") if ds else f"> {DCB_STARTUP_CAP:.0f} s", " s", 3)
        row("  process start to first tick (imports incl.)", os_.get("process_to_first_tick_s"),
            ds.get("process_to_first_tick_s"), " s", 3)
        row("  SQL queries until first tick", os_.get("startup_queries"), ds.get("startup_queries"), "", 0)
        row("peak RSS at first tick", os_.get("rss_mb"),
            ds.get("rss_mb") if ds else (stopped or {}).get("rss_mb"), " MB", 1)
        row("rows loaded in memory", 0, ds.get("loaded"), "", 0, rat=False)
        row("idle tick CPU (median)", oi.get("idle_cpu_ms"), di.get("idle_cpu_ms"), " ms", 3)
        row("idle tick SQL queries (median / max)", f"{f(oi.get('idle_queries'), '', 0)} / {f(oi.get('idle_queries_max'), '', 0)}",
            f"{f(di.get('idle_queries'), '', 0)} / {f(di.get('idle_queries_max'), '', 0)}" if di else None, rat=False)
        row("  tick that writes the health record: queries", oi and o["idle"].get("status_tick_queries"), None, "", 0,
            rat=False)
        row("edit 2 s before a slot honoured (after slot)", oe.get("honoured_s"),
            de.get("honoured_s") if de.get("honoured_s") is not None else (f"> {DCB_CAP:.0f} s" if de else None),
            " s", 3)
        row("burst: slots due at the boundary", ob.get("expected"), db.get("expected"), "", 0, rat=False)
        row("burst: published (cap 60 s)", ob.get("published"), db.get("published"), "", 0, rat=False)
        row("burst: first out after slot", ob.get("first_s"), db.get("first_s"), " s", 3)
        row("burst: last out after slot", ob.get("last_s"),
            db.get("last_s") if db.get("published") == db.get("expected") else (
                f"> {DCB_CAP:.0f} s" if db else None), " s", 3)
        row("burst: lateness p50", ob.get("p50_s"), db.get("p50_s"), " s", 3)
        row("burst: lateness p99", ob.get("p99_s"),
            db.get("p99_s") if db.get("published", 0) >= 0.99 * db.get("expected", 1) else (
                f"> {DCB_CAP:.0f} s" if db else None), " s", 3)
        row("burst: dispatch rate", o_rate, d_rate, " /s", 0, higher_is_better=True)
        row("burst: beat CPU", ob.get("burst_cpu_s"), db.get("burst_cpu_s"), " s", 2)
        row("beat CPU per minute, steady state (*)", o_min, d_min, " s", 2)
        q = r["ours_queue"]
        lines.append(f"  queue check (sisy): {q['messages']:,} messages, {q['at_boundary']:,} for the burst slot, "
                     f"{q['duplicates']} duplicate (task, slot) pairs; in slot order: {ob.get('in_slot_order')}")
        r["o_rate"] = o_rate
        n = r["n"]
        goals.append((f"N={n:,}: idle tick <= 2 SQL queries and <= 2 ms CPU",
                      oi.get("idle_queries_max", 99) <= 2 and oi.get("idle_cpu_ms", 99) <= 2,
                      f"{f(oi.get('idle_queries_max'), '', 0)} queries (max), {f(oi.get('idle_cpu_ms'), ' ms', 3)}; "
                      f"health-record tick every 10 s: {oi and o['idle'].get('status_tick_queries')} queries"))
        goals.append((f"N={n:,}: startup to first tick <= 0.5 s", (os_.get("startup_s") or 99) <= 0.5,
                       f"{f(os_.get('startup_s'), ' s', 3)}"))
        if n >= 1000000:
            goals.append((f"N={n:,}: {r['every']:,} due a minute all published within the minute",
                           ob.get("published") == ob.get("expected") and (ob.get("last_s") or 99) < 60,
                           f"{ob.get('published')}/{ob.get('expected')} in {f(ob.get('last_s'), ' s', 2)}"))
    rss = {r["n"]: r["ours"].get("startup", {}).get("rss_mb") for r in results}
    if len(rss) > 1:
        low, high = min(rss), max(rss)
        grow = (rss[high] or 0) - (rss[low] or 0)
        goals.append((f"peak RSS grows <= 20 MB from {low:,} to {high:,}", grow <= 20, f"{grow:+.1f} MB"))
    lines += ["", "(+) how many times better sisy_celery is: django-celery-beat / sisy_celery for times and "
              "costs, sisy_celery / django-celery-beat for rates.",
              "(*) steady state, extrapolated: CPU of the idle ticks of a 10 s window x 6, plus CPU per "
              "published slot in the burst x slots due per minute (every-minute rows + daily rows / 1440);",
              "    more than 60 s means one core cannot keep up with the schedule."]

    lines += ["", f"Physical reference: raw kombu publishes to the same Redis, one process, "
              f"{raw['stored_size']} bytes stored per message (sisy messages: "
              f"{results[0]['ours_queue']['size']} bytes): {raw['rate']:,.0f} /s"]
    lines.append(f"  Celery send_task of the same sisy message ({raw['celery_size']} bytes), no database: "
                 f"{raw['celery_rate']:,.0f} /s = {100 * raw['celery_rate'] / raw['rate']:.0f}% of raw")
    for r in results:
        if r.get("o_rate"):
            lines.append(f"  N={r['n']:,}: sisy burst dispatch {r['o_rate']:,.0f} /s = "
                         f"{100 * r['o_rate'] / raw['rate']:.0f}% of raw")
    bursts = [r for r in results if r["every"] == 20000 and r.get("o_rate")]
    if bursts:
        worst = min(bursts, key=lambda r: r["o_rate"])
        goals.append(("Redis: one beat's 20,000-slot burst >= 3x raw kombu", worst["o_rate"] >= 3 * raw["rate"],
                      f"lowest {worst['o_rate'] / raw['rate']:.2f}x (N={worst['n']:,})"))
    small = next((r["ours"].get("burst", {}) for r in results if r["every"] == 2000), None)
    if small:
        goals.append(("Redis: a 2,000-slot burst all out within 0.5 s, median lateness < 0.25 s",
                      (small.get("last_s") or 99) <= 0.5 and (small.get("p50_s") or 99) < 0.25,
                      f"last {f(small.get('last_s'), ' s', 3)}, median {f(small.get('p50_s'), ' s', 3)}"))
    big = next((r for r in results if r["every"] == 20000 and r["n"] < 1000000), None)
    if big:
        ob = big["ours"].get("burst", {})
        limit = 20000 / (0.8 * raw["rate"]) + 1
        goals.append((f"N={big['n']:,}: 20,000 slots all published within 20000/(0.8 x raw)+1 = {limit:.2f} s, "
                      "in slot order, first within 0.2 s",
                      ob.get("published") == ob.get("expected") and (ob.get("last_s") or 99) <= limit
                      and ob.get("in_slot_order") and (ob.get("first_s") or 99) <= 0.2,
                      f"last {f(ob.get('last_s'), ' s', 2)}, first {f(ob.get('first_s'), ' s', 3)}, "
                      f"order {ob.get('in_slot_order')}"))
    if beats:
        lines += ["", f"Several beats on one burst ({beats[0]['expected']:,} slots, separate processes, "
                  "same database and Redis)", f"{'beats':>6} {'published':>10} {'per beat':>22} {'last out':>9} "
                  f"{'combined rate':>14} {'% of raw':>9} {'duplicates':>11}"]
        for b in beats:
            lines.append(f"{b['beats']:>6} {b['published']:>10,} {str(b['per_beat']):>22} {f(b['last_s'], ' s'):>9} "
                         f"{f(b['rate'], ' /s', 0):>14} {f(100 * (b['rate'] or 0) / raw['rate'], '%', 0):>9} "
                         f"{b['duplicates']:>11}  (queue holds {b['queue_messages']:,})")
        best = max(beats, key=lambda b: b["rate"] or 0)
        goals.append(("burst dispatch rate >= 80% of raw kombu publish rate", (best["rate"] or 0) >= 0.8 * raw["rate"],
                      f"best {f(best['rate'], ' /s', 0)} with {best['beats']} beat(s) = "
                      f"{100 * (best['rate'] or 0) / raw['rate']:.0f}% of {raw['rate']:,.0f} /s"))
        one, two = (next((b for b in beats if b["beats"] == k), None) for k in (1, 2))
        if one and two and one["rate"] and two["rate"]:
            goals.append(("two beats on one burst >= 1.7x one beat", two["rate"] >= 1.7 * one["rate"],
                          f"{two['rate'] / one['rate']:.2f}x"))
        goals.append(("several beats: no slot published twice", all(b["duplicates"] == 0 and
                      b["published"] == b["expected"] for b in beats), "checked in the Redis queue"))
    if rabbit:
        raw_rate = rabbit["raw_rate"]
        lines += ["", f"RabbitMQ: one beat on a burst (N={rabbit['n']:,} database), raw kombu "
                  f"Producer.publish to the same broker {raw_rate:,.0f} /s (frames written, no confirms)",
                  f"{'slots':>7} {'publisher confirms':>19} {'first out':>10} {'last out':>9} {'rate':>10} "
                  f"{'x raw':>6} {'duplicates':>11}"]
        for b in rabbit["bursts"]:
            lines.append(f"{b['expected']:>7,} {'on (shipped)' if b['confirms'] else 'off (variant)':>19} "
                         f"{f(b['first_s'], ' s', 3):>10} {f(b['last_s'], ' s', 3):>9} {f(b['rate'], ' /s', 0):>10} "
                         f"{(b['rate'] or 0) / raw_rate:>5.2f}x {b['duplicates']:>11}  (queue holds "
                         f"{b['queue_messages']:,})")
        shipped = [b for b in rabbit["bursts"] if b["confirms"]]
        worst = min((b["rate"] or 0) / raw_rate for b in shipped)
        goals.append(("RabbitMQ: one beat's burst >= 1.5x raw kombu", worst >= 1.5,
                      f"lowest {worst:.2f}x (publisher confirms on)"))
        goals.append(("RabbitMQ: every slot published once", all(
            b["duplicates"] == 0 and b["published"] == b["expected"] == b["queue_messages"] for b in rabbit["bursts"]),
            "checked in the RabbitMQ queue"))
    if worker:
        lines += ["", f"Worker: {worker['messages']:,} messages, `celery worker -c 2` (prefork), django-db results, "
                  f"best of {worker['rounds']} alternating rounds (sisy: "
                  f"{', '.join(f'{r:,.0f}' for r in worker['sisy_rates'])} /s; plain: "
                  f"{', '.join(f'{r:,.0f}' for r in worker['plain_rates'])} /s)",
                  f"  sisy.run_callable on a no-op callable: {worker['sisy_rate']:,.0f} runs/s, "
                  f"{worker['sisy_queries']:.1f} SQL queries per run (solo pool, 200 runs)",
                  f"  plain Celery no-op task:               {worker['plain_rate']:,.0f} runs/s, "
                  f"{worker['plain_queries']:.1f} SQL queries per run (the result backend's)",
                  f"  ratio: {100 * worker['sisy_rate'] / worker['plain_rate']:.0f}% of plain; sisy's own queries "
                  f"per run: {worker['sisy_queries'] - worker['plain_queries']:.1f}"]
        goals.append(("worker throughput >= 60% of plain Celery no-op", worker["sisy_rate"] >= 0.6 * worker["plain_rate"],
                      f"{100 * worker['sisy_rate'] / worker['plain_rate']:.0f}%"))
        goals.append(("worker <= 3 queries per run (beyond the result backend's)",
                      worker["sisy_queries"] - worker["plain_queries"] <= 3,
                      f"{worker['sisy_queries'] - worker['plain_queries']:.1f} own, {worker['sisy_queries']:.1f} in all"))
    lines += ["", "Goals"]
    for text, met, figure in goals:
        lines.append(f"  [{'met' if met else 'NOT met':7}] {text}: {figure}")
    return "\n".join(lines)


def source_version() -> str:
    """The commit measured, and whether the package differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=BENCH.parent, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " + uncommitted changes in sisy_celery/" if git("status", "--porcelain", "--", "sisy_celery") else ""
    return f"commit {commit}{dirty}"


def load_now() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


RESULTS_JSON = BENCH / "last-results.json"


def main() -> int:
    if sys.argv[1:2] == ["--report"]:
        saved = json.loads(Path(sys.argv[2] if len(sys.argv) > 2 else RESULTS_JSON).read_text())
        print(report(saved["results"], saved["raw"], saved["beats"], saved["worker"], saved["meta"],
                     saved.get("rabbit")))
        return 0
    started = time.monotonic()
    load_at_start = load_now()
    client = redis.Redis.from_url(REDIS)
    client.ping()
    with admin():
        pass
    log(f"sizes {SIZES}; PostgreSQL {PG}, Redis {REDIS}")
    make_template()
    burst_n = next((n for n in SIZES if every_minute_count(n) == 20000), max(SIZES))
    results = [run_size(n, client, keep=(n == burst_n)) for n in SIZES]

    log("raw kombu publish rate")
    size = results[0]["ours_queue"]["size"] or 1000
    raw = probe(["raw", "20000", str(size)], TEMPLATE, timeout=300)["raw"]

    beats = []
    seeded = next(r for r in results if r["n"] == burst_n)["boundary"]
    for count in (1, 2, 3):
        log(f"{count} beat(s) on the {every_minute_count(burst_n):,}-slot burst")
        beats.append(multi_beat(burst_n, seeded + 60 * count, client, count))
    rabbit = rabbitmq_bursts(burst_n, seeded + 60 * 4, client)
    drop(f"sisy_bench_ours_{burst_n}")

    log("worker throughput")
    worker = worker_bench(client)
    drop(TEMPLATE)
    client.flushdb()
    meta = {"cores": os.cpu_count(), "load_at_start": load_at_start, "load_at_end": load_now(),
            "version": source_version(), "seconds": time.monotonic() - started}
    RESULTS_JSON.write_text(json.dumps({"results": results, "raw": raw, "beats": beats, "worker": worker,
                                        "meta": meta, "rabbit": rabbit}, default=str))
    print(report(results, raw, beats, worker, meta, rabbit))
    print(f"\n(benchmark took {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
