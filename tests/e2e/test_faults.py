"""Fault injection: real worker and beat processes of the example project, with beats and workers
killed (``kill -9``), the database and the brokers taken away, copies of real messages pushed back
into the broker, broken rows, forged and expired messages, a queue the broker refuses and a
misspelled time zone.

Every test reads what happened from the run ledger (``sisy_celery_run``: one row per dispatched
slot) and from ``jobs_run`` (one row per callable that ran to its end), and checks it exactly:
each slot the ledger holds ran once (none if the run was revoked or lost), each slot that was due
has a ledger row, iteration counts are exact and nothing is left claimed. Where the contract
allows a loss (a worker killed with early acknowledgement), the lost runs are the ledger's rows
in state ``lost`` and everything else is still exact. Each fault prints one line

    FAULT <name>: slots expected E / dispatched D / duplicated U / lost L

(visible with ``-s``), and the lines are repeated in a summary at the end of the session.

Slow: selected with ``-m slow``; ``make test`` runs them with the other e2e tests.
"""
from __future__ import annotations

import base64
import json
import random
import re
import shutil
import socket
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sisy_celery.scheduler import Scheduler
from tests.conftest import skip_unless
from tests.e2e.harness import PG, REDIS, UTC, Proc, Stack, line_time, logged_at, now, overlaps, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SECOND = timedelta(seconds=1)
#: SISY_RUNNING_TIMEOUT of the tests that need a lease to lapse
LEASE = 3
UNSETTLED = ("claimed", "published", "started")


# -- the per-fault tally and the session summary -------------------------------------------


@dataclass
class Tally:
    """What happened to the slots of one fault's window."""

    fault: str
    expected: int = 0
    dispatched: int = 0
    duplicated: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)
    #: (task id, slot or window) of what was lost, and (task id, slot) of what ran twice
    missing: list[tuple[int, Any]] = field(default_factory=list, repr=False)
    doubled: list[tuple[int, Any]] = field(default_factory=list, repr=False)

    def line(self) -> str:
        text = (f"FAULT {self.fault}: slots expected {self.expected} / dispatched {self.dispatched} / "
                f"duplicated {self.duplicated} / lost {self.lost}")
        return text + "".join(f"; {note}" for note in self.notes)


class FaultSummary:
    """A pytest plugin that repeats every fault's tally at the end of the session."""

    name = "sisy-fault-summary"

    def __init__(self) -> None:
        self.tallies: list[Tally] = []

    def add(self, tally: Tally) -> None:
        self.tallies.append(tally)
        print(tally.line(), flush=True)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.tallies:
            terminalreporter.section("fault injection: slots per fault")
            for tally in self.tallies:
                terminalreporter.write_line(tally.line())


@pytest.fixture(scope="session")
def summary(request: pytest.FixtureRequest) -> FaultSummary:
    manager = request.config.pluginmanager
    plugin = manager.get_plugin(FaultSummary.name)
    if plugin is None:
        plugin = FaultSummary()
        manager.register(plugin, FaultSummary.name)
    return plugin


@dataclass
class Expect:
    """The slots a window should show, per task.

    ``once``: each of these slots runs exactly once, but the ``excused`` ones (a loss the contract
    allows, read from the ledger), which run at most once. ``window``: an outage of the task: the
    coalesced catch-up, between ``least`` and ``most`` runs among the slots of ``[first, last]``:
    exactly one, or at most one where beat logged a slot of the window skipped once the database
    was cut (``allow_overlap=False`` and the run claimed before the cut still waiting); for a broker
    outage also the runs claimed before their publish failed (``most`` = None: each slot at most once).
    """

    once: dict[int, set[datetime]] = field(default_factory=lambda: defaultdict(set))
    windows: dict[int, list[tuple[datetime, datetime, int, int | None]]] = field(
        default_factory=lambda: defaultdict(list))
    excused: set[tuple[int, datetime]] = field(default_factory=set)

    def each(self, pk: int, slots: Iterable[datetime]) -> None:
        self.once[pk].update(slots)

    def window(self, pk: int, first: datetime, last: datetime, least: int = 1, most: int | None = 1) -> None:
        self.windows[pk].append((first, last, least, most))

    def tasks(self) -> set[int]:
        return set(self.once) | set(self.windows)


def grid(first: datetime, last: datetime, step: int = 1) -> list[datetime]:
    """The slots of an every-``step``-seconds schedule from ``first`` to ``last`` (both included)."""
    start = int(first.timestamp()) + (-int(first.timestamp()) % step)
    if datetime.fromtimestamp(start, UTC) < first:
        start += step
    return [datetime.fromtimestamp(t, UTC) for t in range(start, int(last.timestamp()) + 1, step)]


def ran(stack: Stack) -> Counter[tuple[int, datetime]]:
    """How many times the callable of each (task id, slot) ran to its end (``jobs_run``)."""
    return Counter((run.task_id, run.slot) for run in stack.runs())


def tally(stack: Stack, summary: FaultSummary, fault: str, expect: Expect, notes: Iterable[str] = ()) -> Tally:
    """Count the window's slots against ``expect``, print the tally and add it to the summary.

    ``dispatched`` counts the expected slots the ledger shows published."""
    result = Tally(fault, notes=list(notes))
    counts = ran(stack)
    published = {(row["task_id"], row["slot"]) for row in stack.ledger() if row["state"] != "claimed"}
    for pk in expect.tasks():
        for slot in expect.once[pk]:
            result.expected += 1
            result.dispatched += (pk, slot) in published
            if counts[(pk, slot)] == 0 and (pk, slot) not in expect.excused:
                result.missing.append((pk, slot))
            result.doubled += [(pk, slot)] * (counts[(pk, slot)] - 1)
        for first, last, least, most in expect.windows[pk]:
            result.expected += least
            inside = [slot for (task, slot), n in counts.items() for _ in range(n) if task == pk and first <= slot <= last]
            result.dispatched += len([1 for task, slot in published if task == pk and first <= slot <= last])
            if len(inside) < least:
                result.missing.append((pk, (first, last)))
            extra = len(inside) - len(set(inside)) if most is None else len(inside) - most
            result.doubled += [(pk, (first, last))] * max(0, extra)
    result.lost, result.duplicated = len(result.missing), len(result.doubled)
    if result.missing or result.doubled:
        print(f"  lost: {sorted(result.missing, key=str)[:20]}\n  duplicated: {sorted(result.doubled, key=str)[:20]}")
    summary.add(result)
    return result


def ledger_mismatches(stack: Stack) -> list[str]:
    """Where the ledger and ``jobs_run`` disagree: a succeeded run whose callable did not run exactly
    once, a run that did not succeed but whose callable ran, a callable that ran with no ledger row,
    or a run left unsettled. Empty when every slot ran as the ledger says."""
    counts = ran(stack)
    rows = {(row["task_id"], row["slot"]): row for row in stack.ledger()}
    problems = []
    for key, row in rows.items():
        want = 1 if row["state"] == "succeeded" else 0
        if counts[key] != want:
            problems.append(f"task {key[0]} slot {key[1].isoformat()}: {row['state']} but ran {counts[key]} time(s)")
        if row["state"] in UNSETTLED:
            problems.append(f"task {key[0]} slot {key[1].isoformat()}: left {row['state']}")
    problems += [f"task {key[0]} slot {key[1].isoformat()}: ran {n} time(s) without a ledger row"
                 for key, n in counts.items() if key not in rows]
    return problems


def ledger_slots(stack: Stack, pk: int, *states: str) -> list[datetime]:
    return [row["slot"] for row in stack.ledger(pk) if not states or row["state"] in states]


def skipped_slots(stack: Stack) -> dict[tuple[int, datetime], datetime | None]:
    """{(task id, slot): when it was logged} for the slots beat skipped because a run of the task
    was still going."""
    pattern = re.compile(r"sisy task id=(\d+) label=.*: slot (\S+) skipped, a run is still going")
    skipped = {}
    for line in logs(stack, "beat").splitlines():
        match = pattern.search(line)
        if match:
            skipped[(int(match.group(1)), datetime.fromisoformat(match.group(2)))] = line_time(line)
    return skipped


def catch_ups(stack: Stack, pk: int, first: datetime, last: datetime) -> list[datetime]:
    return sorted({run.slot for run in stack.runs(pk) if first <= run.slot <= last})


# -- working with the stack -----------------------------------------------------------------


def create_tasks(stack: Stack, specs: list[dict[str, Any]]) -> list[int]:
    """Create tasks through the public API; each spec: callable name in ``jobs`` and keyword arguments."""
    return stack.run("""
        result = []
        for spec in params['specs']:
            spec = dict(spec)
            func = getattr(jobs, spec.pop('func', 'record'))
            iterations = spec.pop('iterations', None)
            if 'start_running' in spec:
                spec['start_running'] = datetime.fromisoformat(spec['start_running'])
            if iterations is not None:
                task = Task.run_iterations(func, iterations=iterations, **spec)
            else:
                task = task_with_callable(func, **spec)
                task.save()
            result.append(task.pk)
    """, specs=specs)


def every_second(label: str, **fields: Any) -> dict[str, Any]:
    return {"label": label, "schedule": "* * * * * *", **fields}


def count(stack: Stack, where: str, params: tuple[Any, ...] = ()) -> int:
    return stack.query(f"SELECT count(*) AS n FROM sisy_celery_run WHERE {where}", params)[0]["n"]


def stop_all(stack: Stack, timeout: float = 60) -> None:
    """Let the live beats publish whatever a dead beat left claimed, stop them, let the workers settle
    every run sent (nothing left unsettled), then stop the workers."""
    beats = [proc for proc in stack.processes if proc.kind == "beat" and proc.alive()]
    if beats:
        wait_for(lambda: count(stack, "state = 'claimed' AND claimed_at < %s", (now() - 2 * SECOND,)) == 0,
                 timeout, "the live beats to publish the runs left claimed")
    for proc in beats:
        stack.stop(proc)
    try:
        wait_for(lambda: count(stack, "state IN ('claimed', 'published', 'started')") == 0, timeout,
                 "the workers to settle every run sent")
    finally:
        for proc in stack.processes:
            if proc.alive():
                stack.stop(proc)


def sleep_until(moment: datetime) -> None:
    time.sleep(max(0.0, (moment - now()).total_seconds()))


def whole_second(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


def logs(stack: Stack, kind: str | None = None) -> str:
    return "\n".join(proc.text() for proc in stack.processes if kind is None or proc.kind == kind)


def ident(proc: Proc) -> str:
    """The name a beat process gives itself in the ledger (``Run.beat``)."""
    return f"{socket.gethostname()}:{proc.pid}"


def celery_id(stack: Stack, pk: int, slot: datetime) -> str:
    return stack.run("from sisy_celery.models import run_celery_id\n"
                     "result = run_celery_id(params['pk'], datetime.fromisoformat(params['slot']))",
                     pk=pk, slot=slot.isoformat())


def started_run(stack: Stack, pk: int, timeout: float = 20) -> dict[str, Any]:
    """The ledger row of a run of task ``pk`` that is going now."""
    return wait_for(lambda: next((r for r in stack.ledger(pk) if r["state"] == "started"), None), timeout,
                    f"a run of task {pk} to start")


def worker_of(row: dict[str, Any], workers: list[Proc]) -> Proc:
    """The worker process named by a ledger row (``name@host``)."""
    (proc,) = [proc for proc in workers if row["worker"].split("@")[0] == proc.name]
    return proc


# -- 1. beat killed at random instants during bursts -----------------------------------------

BURST = 2000
KILLS = 5


@dataclass
class Kill:
    """One burst and the beat killed in it: what had gone out, and the ledger as the dead beat left it."""

    tasks: tuple[int, int]
    due: datetime
    beat: str
    target: int
    sent: int
    claimed: int
    published: int
    left_claimed: set[tuple[int, datetime]]


def burst_progress(stack: Stack, first: int, last: int) -> tuple[int, int]:
    """(runs claimed, runs marked published) of the tasks ``first``..``last``."""
    row = stack.query("SELECT count(*) AS claimed, count(*) FILTER (WHERE state <> 'claimed') AS past"
                      " FROM sisy_celery_run WHERE task_id BETWEEN %s AND %s", (first, last))[0]
    return row["claimed"], row["past"]


#: due rows a beat claims per transaction in the burst test, each published in groups of the scheduler's size
BURST_BATCH = 1000


@pytest.mark.timeout(1500)
def test_beat_killed_at_random_instants_during_bursts(make_stack: Any, summary: FaultSummary) -> None:
    """Five bursts of 2,000 run-once tasks all due at one instant; in each, beat is killed (``kill -9``)
    once a random number of the burst's messages is in the broker, and another beat is started. The
    worker starts after the last kill (so the broker's queue counts the messages that went out).
    Every task runs exactly once; the copies of messages that went out unmarked run nothing.

    The kill comes with the beat's database cut at a proxy, so that the publish group that is out,
    or the next one of the same claimed batch, cannot be marked published: a kill alone lands after
    the beat marked what it sent more often than not, and the copies would then be left to chance."""
    import redis

    stack = make_stack("postgres", "redis", proxied=("database",))
    seed = random.randrange(10 ** 6)
    rng = random.Random(seed)
    group = Scheduler.publish_group
    # A lease longer than the worker needs for the whole backlog: a run waits its turn, it is not lost.
    env = {"SISY_RUNNING_TIMEOUT": "900", "SISY_BEAT_BATCH_SIZE": str(BURST_BATCH)}
    beat = stack.beat(env=env)
    # Run-once tasks parked far in the future, made due a burst at a time below.
    first_pk, last_pk = stack.run("""
        from sisy_celery.models import FAR_FUTURE
        tasks = []
        for i in range(params['size']):
            task = task_with_callable(jobs.record, label=f"burst {i // params['burst']}.{i % params['burst']}",
                                      schedule='0 0 1 1 *')
            task.iterations, task.wait_for_schedule, task.next_run = 1, False, FAR_FUTURE
            tasks.append(task)
        pks = [task.pk for task in Task.objects.bulk_create(tasks)]
        result = [min(pks), max(pks)]
    """, size=KILLS * BURST, burst=BURST)
    assert last_pk - first_pk + 1 == KILLS * BURST
    queue = redis.Redis(db=stack._broker.number, socket_timeout=5, **REDIS)
    kills: list[Kill] = []
    try:
        for n in range(KILLS):
            first, last = first_pk + n * BURST, first_pk + (n + 1) * BURST - 1
            before = queue.llen("celery")
            # A target within the first publish group of a claimed batch that has more than one: the
            # batch's next group is still to be sent and marked when the cut lands. (The first claim
            # of a burst takes Scheduler.first_claim rows, the next ones BURST_BATCH rows each.)
            target = rng.randrange(Scheduler.first_claim, BURST, BURST_BATCH) + rng.randrange(1, group)
            due = whole_second(now())
            stack.query("UPDATE sisy_celery_task SET start_running = %s, next_run = %s WHERE id BETWEEN %s AND %s",
                        (due, due, first, last))
            # (the queue may also hold runs of the previous burst that a later beat published again)
            wait_for(lambda: queue.llen("celery") - before >= target and burst_progress(stack, first, last)[0] > 0,
                     60, f"{target} messages and a claim of burst {n}", interval=0.001)
            with stack.outage("database"):
                stack.kill(beat)
            sent = queue.llen("celery") - before
            claimed, past = burst_progress(stack, first, last)
            left = {(row["task_id"], row["slot"]) for row in stack.query(
                "SELECT task_id, slot FROM sisy_celery_run WHERE task_id BETWEEN %s AND %s AND state = 'claimed'",
                (first, last))}
            kills.append(Kill((first, last), due, ident(beat), target, sent, claimed, past, left))
            beat = stack.beat(f"b{n + 2}", env=env)
        worker = stack.worker(env=env)
        drain = time.monotonic()
        wait_for(lambda: count(stack, "state IN ('claimed', 'published', 'started')") == 0, 900,
                 "every run of the bursts to settle")
        drain = time.monotonic() - drain
        # Copies may still wait in the queue once every run has settled; a copy the worker has
        # received (and logged) but not yet handed to its pool would go back to the broker at
        # shutdown, unrun. So stop once the broker holds none and none is reserved (unacked).
        wait_for(lambda: queue.llen("celery") == 0 and queue.hlen("unacked") == 0, 120,
                 "every copy to be taken from the broker and handed to the pool")
    finally:
        queue.close()
    stop_all(stack)

    runs = ran(stack)
    ledger = stack.ledger()
    republished = [row for row in ledger if any((row["task_id"], row["slot"]) in k.left_claimed and row["beat"] != k.beat
                                                for k in kills)]
    # a copy finds its run started or settled, or (mostly) its run-once task already finished and gone
    copies = len(re.findall(r"no longer exists; run for|not run: (?:the run is already succeeded|another attempt "
                            r"of this run is running)", worker.text()))
    received = len(re.findall(r"Task sisy\.run_callable\[\S+\] received", worker.text()))
    expect = Expect()
    for kill in kills:
        for pk in range(kill.tasks[0], kill.tasks[1] + 1):
            expect.each(pk, [kill.due])
    # mid-burst: the dead beat had claimed runs of its burst and not marked all of them published. A
    # kill is a signal sent by a process polling the broker: on a loaded machine it can land after
    # the burst's last group went out, and that burst then only checks exactly-once, which holds too.
    mid_burst = [k for k in kills if 0 < k.claimed and k.published < BURST]
    result = tally(stack, summary, f"1 beat kill -9 at random instants during {KILLS} bursts of {BURST} slots", expect,
                   [f"seed {seed}", f"{len(mid_burst)} of {KILLS} kills mid-burst",
                    "at each kill, messages out (target) / runs claimed / runs marked published: "
                    + ", ".join(f"{k.sent} ({k.target}) / {k.claimed} / {k.published}" for k in kills),
                    f"{len(republished)} run(s) left claimed were published by another beat",
                    f"{received} message(s) delivered, {copies} of them copies the worker dropped",
                    f"the worker ran the backlog in {drain:.0f}s"])

    assert mid_burst, "a kill landed mid-burst"
    assert republished, "a run left claimed by a killed beat was published by another beat"
    assert copies > 0, "a message that went out before a kill was published again, and its copy ran nothing"
    assert received == KILLS * BURST + copies, "every message beyond one per run was dropped"
    for kill in kills:
        first, last = kill.tasks
        rows = [row for row in ledger if first <= row["task_id"] <= last]
        assert len(rows) == BURST and len({row["task_id"] for row in rows}) == BURST, "one run per task"
        assert {row["slot"] for row in rows} == {kill.due}
        assert {(row["state"], row["attempt"]) for row in rows} == {("succeeded", 1)}
    assert result.lost == 0 and result.duplicated == 0, (result.missing[:10], result.doubled[:10])
    assert sum(runs.values()) == KILLS * BURST
    assert ledger_mismatches(stack) == [], "nothing is left claimed, every run ran once"
    assert stack.query("SELECT count(*) AS n FROM sisy_celery_task")[0]["n"] == 0, "every run-once task finished"


# -- 2. three beats, two of them killed ------------------------------------------------------


def active_beat(stack: Stack, beats: list[Proc]) -> Proc:
    """The live beat that claimed the latest run (the one to kill to hurt most)."""
    live = {ident(proc): proc for proc in beats if proc.alive()}
    rows = stack.query("SELECT beat FROM sisy_celery_run ORDER BY claimed_at DESC LIMIT 50")
    latest = next(row["beat"] for row in rows if row["beat"] in live)
    return live[latest]


def test_three_beats_two_killed_while_they_run(stack: Stack, summary: FaultSummary) -> None:
    burst, step = 40, 2
    worker, *beats = stack.up(beats=3, env={"SISY_RUNNING_TIMEOUT": str(LEASE)})
    specs = [{"label": f"every 2 s {n}", "schedule": f"* * * * * */{step}"} for n in range(burst)]
    specs += [every_second("every second A"), every_second("every second B"),
              every_second("no overlap", allow_overlap=False), every_second("fifteen times", iterations=15)]
    pks = create_tasks(stack, specs)
    created = now()
    pairs, (first_a, first_b, no_overlap, fifteen) = pks[:burst], pks[burst:]

    kills = []
    for pause in (4.2, 3.7):
        time.sleep(pause)
        victim = active_beat(stack, beats)
        stack.kill(victim)
        kills.append((now(), ident(victim)))
    end = whole_second(now()) + 5 * SECOND
    wait_for(lambda: stack.task(fifteen) is None, 20, "the fifteen-times task to finish")
    sleep_until(end + 1.5 * SECOND)
    survivors = [proc for proc in beats if proc.alive()]
    assert len(survivors) == 1
    stop_all(stack)

    skipped = skipped_slots(stack)
    expect = Expect()
    for pk in pairs:
        first = min(ledger_slots(stack, pk))
        assert first <= created + step * SECOND
        expect.each(pk, grid(first, end, step))
    for pk in (first_a, first_b, no_overlap):
        first = min(ledger_slots(stack, pk))
        assert first <= created + 2 * SECOND
        expect.each(pk, [s for s in grid(first, end) if (pk, s) not in skipped])
    ledger = stack.ledger()
    by_victims = [row for row in ledger if row["beat"] in {name for _, name in kills}]
    republished = len(re.findall(r"was claimed by \S+ but not published", logs(stack, "beat")))
    result = tally(stack, summary, "2 three beats, two killed (kill -9) while running", expect,
                   [f"killed at {', '.join(k.strftime('%H:%M:%S.%f')[:-3] for k, _ in kills)}",
                    f"{len(by_victims)} run(s) claimed by the killed beats",
                    f"{republished} run(s) left claimed published by a survivor"])

    assert by_victims, "the killed beats had claimed runs"
    assert result.duplicated == 0 and result.lost == 0
    assert ledger_mismatches(stack) == []
    in_window = {(row["task_id"], row["slot"]) for row in ledger if row["task_id"] in expect.once and row["slot"] <= end}
    assert in_window == {(pk, slot) for pk, slots in expect.once.items() for slot in slots}, "a slot ran that was not due"
    assert len(stack.runs(fifteen)) == 15 and stack.task(fifteen) is None, "iterations are exact"
    assert not overlaps(stack.runs(no_overlap))


# -- 3. a worker killed in the middle of a slow run without overlap -------------------------


def spans_overlap(spans: list[tuple[datetime, datetime]]) -> list[tuple[Any, Any]]:
    spans = sorted(spans)
    return [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]


def test_worker_killed_during_a_slow_run_early_ack(stack: Stack, summary: FaultSummary) -> None:
    """Early acknowledgement (Celery's default): the broker has forgotten the message, so the run is
    ``lost`` once its lease lapses; the task is free again and an iterations count stays exact."""
    env = {"SISY_RUNNING_TIMEOUT": str(LEASE)}
    workers = stack.up(workers=2, env=env)[:2]
    slow, three = create_tasks(stack, [
        every_second("slow", func="slow", allow_overlap=False, userdata={"seconds": 2}),
        every_second("three slow", func="slow", allow_overlap=False, userdata={"seconds": 1}, iterations=3),
    ])
    going = started_run(stack, slow)
    victim = worker_of(going, workers)
    sleep_until(going["started_at"] + SECOND)
    stack.kill(victim)
    killed = now()
    stack.worker("w3", env=env)  # two workers again
    lost = wait_for(lambda: next((r for r in stack.ledger(slow) if r["slot"] == going["slot"] and r["state"] == "lost"),
                                 None), LEASE + 15, "the interrupted run to be given up as lost")
    wait_for(lambda: [r for r in stack.runs(slow) if r.started > killed], 15, "a run after the kill")
    wait_for(lambda: stack.task(three) is None, 20, "the three-times task to finish")
    stop_all(stack)

    ledger = stack.ledger()
    given_up = {(row["task_id"], row["slot"]) for row in ledger if row["state"] == "lost"}
    expect = Expect()
    for pk in (slow, three):
        expect.each(pk, [row["slot"] for row in ledger if row["task_id"] == pk and row["state"] != "lost"])
    result = tally(stack, summary, "3a worker kill -9 during a slow run without overlap, early ack", expect,
                   [f"{len(given_up)} run(s) lost with the worker (ledger state lost): "
                    f"{sorted((pk, s.time().isoformat()) for pk, s in given_up)}",
                    f"killed {(killed - going['started_at']).total_seconds():.1f}s into the run"])

    assert given_up >= {(slow, going["slot"])}
    # lost: runs the killed worker had started, or messages it had taken and not started
    assert [row for row in ledger if row["state"] == "lost" and not (
        (row["worker"].startswith(f"{victim.name}@") and row["attempt"] == 1 and "stopped renewing" in row["error"])
        or (row["attempt"] == 0 and "not started" in row["error"]))] == []
    assert lost["finished_at"] >= going["lease_until"], "given up only once its lease had lapsed"
    assert result.duplicated == 0 and result.lost == 0
    assert ledger_mismatches(stack) == []
    assert [r for r in stack.runs() if (r.task_id, r.slot) in given_up] == []
    spans = [(run.started, run.finished) for run in stack.runs(slow)] + [(going["started_at"], killed)]
    assert spans_overlap(spans) == [], "two runs of the task without overlap ran at the same time"
    after = min(run.started for run in stack.runs(slow) if run.started > killed)
    assert after > lost["finished_at"], "the next run waited for the lease to lapse"
    assert len(stack.runs(three)) == 3 and stack.task(three) is None, "iterations are exact"
    assert f"task id={slow}: run for slot {going['slot'].isoformat()} lost: its worker stopped renewing" in \
        logs(stack, "beat"), "the lost run is logged"


@pytest.mark.parametrize("broker", ["amqp", "redis"])
def test_worker_killed_with_acks_late_is_redelivered(make_stack: Any, summary: FaultSummary, broker: str) -> None:
    """``task_acks_late``: the broker gives the killed worker's message to the other worker for real
    (RabbitMQ when the connection drops, Redis after its visibility timeout); the run starts again
    as attempt 2 once the first attempt's lease has lapsed, never while it might still run."""
    stack = make_stack("postgres", broker)
    env = {"SISY_RUNNING_TIMEOUT": "4", "CELERY_TASK_ACKS_LATE": "1"}
    if broker == "redis":
        env["CELERY_BROKER_VISIBILITY_TIMEOUT"] = "5"
    workers = stack.up(workers=2, env=env)[:2]
    (slow,) = create_tasks(stack, [every_second("slow", func="slow", allow_overlap=False, userdata={"seconds": 3})])
    going = started_run(stack, slow)
    victim = worker_of(going, workers)
    sleep_until(going["started_at"] + SECOND)
    stack.kill(victim)
    killed = now()
    first_lease = next(r for r in stack.ledger(slow) if r["slot"] == going["slot"])["lease_until"]
    again = wait_for(lambda: next((r for r in stack.ledger(slow) if r["slot"] == going["slot"]
                                   and r["state"] in ("succeeded", "lost", "failed")), None), 40,
                     "the interrupted run to settle")
    time.sleep(2)
    stop_all(stack)

    ledger = stack.ledger(slow)
    expect = Expect()
    expect.each(slow, [row["slot"] for row in ledger])
    result = tally(stack, summary, f"3b worker kill -9 during a slow run, acks_late, {broker} redelivers", expect,
                   [f"interrupted run: state {again['state']}, attempt {again['attempt']}, "
                    f"first attempt's lease until {first_lease.time()}, attempt 2 started "
                    f"{again['started_at'].time() if again['started_at'] else None}"])

    assert (again["state"], again["attempt"]) == ("succeeded", 2), f"redelivered and run as attempt 2: {again}"
    assert again["worker"] != going["worker"]
    assert again["started_at"] > first_lease, "attempt 2 started only after the first attempt's lease lapsed"
    assert result.duplicated == 0 and result.lost == 0
    assert ledger_mismatches(stack) == []
    assert [r.slot for r in stack.runs(slow)].count(going["slot"]) == 1
    spans = [(run.started, run.finished) for run in stack.runs(slow)] + [(going["started_at"], killed)]
    assert spans_overlap(spans) == [], "two runs of the task without overlap ran at the same time"


# -- 4. the database goes away ----------------------------------------------------------------


@contextmanager
def database_outage(stack: Stack) -> Iterator[None]:
    """The stack's database refuses connections and loses the open ones until the block ends
    (the server itself stays up for everyone else)."""
    import psycopg

    name = stack.db.name
    with psycopg.connect(dbname="postgres", autocommit=True, connect_timeout=5, **PG) as admin:
        admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        try:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
            # The harness's own connections were terminated too: open new ones.
            stack.db.close()
            stack._stop_driver()


def outage_expectations(stack: Stack, pks: list[int], first_slots: dict[int, datetime], down: datetime,
                        resumed: datetime, end: datetime, component: str) -> Expect:
    """Every slot claimed before the outage and every slot after beat resumed runs once (but the
    slots beat skipped while a run was going); the slots in between are coalesced into one catch-up
    run (a broker outage adds the runs claimed before their publish failed). A broker restarted
    without persistence loses the messages it held: those runs are ``lost`` in the ledger."""
    skipped = skipped_slots(stack)
    expect = Expect()
    for pk in pks:
        rows = stack.ledger(pk)
        last_before = max(row["slot"] for row in rows if row["claimed_at"] < down)
        expect.each(pk, [s for s in grid(first_slots[pk], last_before) if (pk, s) not in skipped])
        first, last = last_before + SECOND, whole_second(resumed)
        # Overlap off: when the database is back, the catch-up is skipped while the run claimed last
        # before the cut still waits (its worker could not start it during the outage).
        waited = component == "database" and any(
            task == pk and first <= slot <= last and at is not None and at > down
            for (task, slot), at in skipped.items())
        expect.window(pk, first, last, 0 if waited else 1, 1 if component == "database" else None)
        expect.each(pk, [s for s in grid(whole_second(resumed) + SECOND, end) if (pk, s) not in skipped])
        if component == "broker":
            expect.excused |= {(pk, row["slot"]) for row in rows if row["state"] == "lost"}
    return expect


def outage_test(stack: Stack, summary: FaultSummary, fault: str, outage: Any, component: str) -> None:
    """Every-second tasks (overlap on, overlap off, ten iterations) through a 4 s outage of
    ``component`` ('database' or 'broker'), made by the context manager ``outage()``."""
    worker, beat = stack.up(env={"SISY_RUNNING_TIMEOUT": str(LEASE)})
    second, no_overlap, ten = create_tasks(stack, [
        every_second("every second"), every_second("no overlap", allow_overlap=False),
        every_second("ten times", iterations=10)])
    wait_for(lambda: len(stack.runs(ten)) >= 3, 15, "three runs of each task")
    first_slots = {pk: min(run.slot for run in stack.runs(pk)) for pk in (second, no_overlap)}

    with outage():
        down = now()
        time.sleep(4)
    # Beat dispatches again as soon as it can (for a broker maybe before the block ended).
    resumed = wait_for(lambda: logged_at(beat, "dispatching resumed", down), 30, "beat to resume dispatching")
    wait_for(lambda: stack.task(ten) is None, 30, "the ten-times task to finish")
    first_after = wait_for(lambda: [r.slot for r in stack.runs(second) if r.started > resumed], 30,
                           "a run once the worker is connected again")[0]
    end = max(whole_second(resumed), first_after) + 5 * SECOND
    sleep_until(end + 1.5 * SECOND)
    assert worker.alive() and beat.alive()
    stop_all(stack)

    expect = outage_expectations(stack, [second, no_overlap], first_slots, down, resumed, end, component)
    beat_log = beat.text()
    lost = [(row["task_id"], row["slot"].time().isoformat(), row["error"][:40]) for row in stack.ledger()
            if row["state"] == "lost"]
    result = tally(stack, summary, fault, expect,
                   [f"down {down.time()}, beat dispatching again {resumed.time()}",
                    f"lost with the broker's messages (ledger state lost): {lost}",
                    f"{len(re.findall('but not published; publishing it now', beat_log))} run(s) left claimed "
                    f"published again"])
    assert f"{component} unavailable" in beat_log and "dispatching resumed" in beat_log
    assert result.duplicated == 0 and result.lost == 0
    assert ledger_mismatches(stack) == []
    lost_runs = {(row["task_id"], row["slot"]) for row in stack.ledger() if row["state"] == "lost"}
    assert lost_runs == expect.excused, "only a broker restart loses runs, with the messages it held"
    for pk in (second, no_overlap):
        in_window = [s for s in ledger_slots(stack, pk) if first_slots[pk] <= s <= end]
        assert set(in_window) <= expect.once[pk] | {s for a, b, _, _ in expect.windows[pk] for s in grid(a, b)}, \
            f"task {pk}: a slot ran that was not due"
    assert len(stack.runs(ten)) == 10, "iterations are exact"
    assert not overlaps(stack.runs(no_overlap))


def test_database_cut_while_beat_and_workers_run(make_stack: Any, summary: FaultSummary) -> None:
    stack = make_stack("postgres", "redis", proxied=("database",))
    outage_test(stack, summary, "4a PostgreSQL cut at a proxy: connections reset, new ones refused, 4 s",
                lambda: stack.outage("database"), "database")


def test_database_cut_right_after_the_callable_returned(stack: Stack, summary: FaultSummary) -> None:
    """The database goes away between the end of the callable and the worker's bookkeeping, for longer
    than a lease: the worker retries until it answers, the run is counted once and not repeated.

    The run's ledger row is locked from the test while its callable runs, so the worker's settlement
    waits on the lock; once the callable has recorded its run, the database is cut (which also ends
    the lock)."""
    import psycopg

    worker, beat = stack.up(env={"SISY_RUNNING_TIMEOUT": str(LEASE)})
    # Overlap off: no other run of the task is going (and needs the database) during the outage.
    (pk,) = create_tasks(stack, [{"label": "three slow", "func": "slow", "schedule": "* * * * * *", "iterations": 3,
                                  "allow_overlap": False, "userdata": {"seconds": 2}}])
    going = started_run(stack, pk)
    lock = psycopg.connect(dbname=stack.db.name, autocommit=True, connect_timeout=5, **PG)
    try:
        lock.execute("BEGIN")
        lock.execute("SELECT id FROM sisy_celery_run WHERE id = %s FOR UPDATE", (going["id"],))
        wait_for(lambda: [r for r in stack.runs(pk) if r.slot == going["slot"]], 15, "the callable to return")
        held = next(r for r in stack.ledger(pk) if r["slot"] == going["slot"])
        with database_outage(stack):
            down = now()
            time.sleep(LEASE + 2)
    finally:
        lock.close()
    wait_for(lambda: stack.task(pk) is None, 40, "the three-times task to finish")
    stop_all(stack)

    ledger = stack.ledger(pk)
    expect = Expect()
    expect.each(pk, [row["slot"] for row in ledger])
    retried = worker.text().count(f"could not record the end of the run for {going['slot'].isoformat()}")
    result = tally(stack, summary, f"4b PostgreSQL cut {LEASE + 2} s right after the callable returned, "
                                   f"lease {LEASE} s", expect,
                   [f"down {down.time()}", f"{retried} failed attempt(s) to record the run, then recorded"])

    assert held["state"] == "started", "the outage came after the callable and before the bookkeeping"
    assert retried >= 1, "the worker retried recording the run"
    assert [(row["state"], row["attempt"], row["error"]) for row in ledger] == [("succeeded", 1, "")] * 3
    assert len(stack.runs(pk)) == 3, "exactly three runs"
    assert result.duplicated == 0 and result.lost == 0
    assert ledger_mismatches(stack) == []


# -- 5. the broker restarted while beat runs --------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class PrivateRedis:
    """A ``redis-server`` of this test alone (same binary and options as CI's), so that restarting
    it cannot disturb other stacks or test sessions using the shared server."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir)], stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        wait_for(lambda: port_open(self.port), 10, f"redis-server on port {self.port}")

    def stop(self) -> None:
        """``SHUTDOWN NOSAVE``: every message still in Redis is gone, as after a crash."""
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], capture_output=True, timeout=10)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    skip_unless(shutil.which("redis-server") is not None, "redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_restarted_while_beat_runs(make_stack: Any, private_redis: PrivateRedis, summary: FaultSummary,
                                         tmp_path: Path) -> None:
    stack = Stack("postgres", private_redis.url, tmp_path / "stack")
    make_stack.stacks.append(stack)  # torn down, and its logs shown on failure, with the factory's
    stack.setup()

    @contextmanager
    def restart() -> Iterator[None]:
        private_redis.stop()
        try:
            yield
        finally:
            private_redis.start()

    outage_test(stack, summary, "5a Redis restarted (SHUTDOWN NOSAVE, back after 4 s)", restart, "broker")


def test_rabbitmq_cut_while_beat_runs(make_stack: Any, summary: FaultSummary) -> None:
    stack = make_stack("postgres", "amqp", proxied=("broker",))
    outage_test(stack, summary, "5b RabbitMQ cut at a proxy: connections reset, new ones refused, 4 s",
                lambda: stack.outage("broker"), "broker")


# -- 6. rows broken behind the API's back -------------------------------------------------------

GONE_MODULE = ('{"func_type": "function", "module_name": "jobs.gone", "func_name": "record", '
               '"func_path": "jobs.gone.record"}')


def good_tasks_keep_every_slot(stack: Stack, pks: Iterable[int], end: datetime) -> Expect:
    """Each of these every-second tasks runs every slot from its first to ``end``."""
    expect = Expect()
    for pk in pks:
        expect.each(pk, grid(min(ledger_slots(stack, pk)), end))
    return expect


def test_broken_rows_are_flagged_and_other_tasks_keep_firing_on_time(stack: Stack, summary: FaultSummary) -> None:
    worker, beat = stack.up()
    ids = stack.run("""
        gone = Account.objects.create(name='closed')
        specs = [('good A', jobs.record), ('good B', jobs.record), ('missing module', jobs.record),
                 ('broken schedule', jobs.record), ('broken zone', jobs.record), ('not a dict', jobs.record),
                 ('deleted instance', gone.accrue_interest)]
        tasks = [task_with_callable(func, label=label, schedule='* * * * * *') for label, func in specs]
        for task in tasks:
            task.save()
        gone.delete()
        result = [task.pk for task in tasks]
    """)
    good_a, good_b, missing, schedule, zone, not_a_dict, deleted = ids
    labels = {missing: "missing module", schedule: "broken schedule", zone: "broken zone",
              not_a_dict: "not a dict", deleted: "deleted instance"}
    # Broken as a bad data migration or a manual edit would leave them. The callable's module is
    # gone from the row and from the messages beat sends from now on, consistently.
    stack.query("UPDATE sisy_celery_task SET _func_info = %s::jsonb WHERE id = %s", (GONE_MODULE, missing))
    stack.query("UPDATE sisy_celery_task SET schedule = '99 99 * * *' WHERE id = %s", (schedule,))
    stack.query("UPDATE sisy_celery_task SET timezone = 'Mars/Olympus' WHERE id = %s", (zone,))
    stack.query("""UPDATE sisy_celery_task SET _func_info = '"jobs.jobs.record"'::jsonb WHERE id = %s""",
                (not_a_dict,))
    broken = now()

    def flagged() -> dict[int, str]:
        problems = {pk: (stack.task(pk) or {}).get("problem") for pk in labels}
        return problems if all(problems.values()) else {}

    problems = wait_for(flagged, 15, "every broken row to be flagged")
    end = whole_second(now()) + 4 * SECOND
    sleep_until(end + 1.5 * SECOND)
    assert beat.alive() and worker.alive()
    stop_all(stack)

    expect = good_tasks_keep_every_slot(stack, (good_a, good_b), end)
    result = tally(stack, summary, "6 broken rows (module gone, bad schedule, bad zone, func info not a dict, "
                                   "deleted instance)", expect,
                   [f"{len(problems)} of {len(labels)} broken rows flagged"])
    assert result.duplicated == 0 and result.lost == 0
    assert ledger_mismatches(stack) == []
    late = [(run.slot, run.started) for pk in (good_a, good_b) for run in stack.runs(pk)
            if run.slot > broken and run.started - run.slot > 1.5 * SECOND]
    assert late == [], "the good tasks kept firing on time"
    all_logs = logs(stack)
    for pk, label in labels.items():
        assert stack.runs(pk) == [], f"{label} ran"
        assert f"id={pk} label={label!r}" in all_logs, f"the problem of {label!r} is logged with its id and label"
        assert not stack.task(pk)["running"], f"{label} is left running"
    assert "99 99" in problems[schedule] and "Mars/Olympus" in problems[zone]
    assert "jobs.gone" in problems[missing]
    for pk in (schedule, zone):  # parked: not sent again until fixed
        assert stack.task(pk)["next_run"].year == 2217


def test_queue_refused_by_rabbitmq_parks_only_its_task(make_stack: Any, summary: FaultSummary) -> None:
    """A queue name RabbitMQ refuses (``amq.`` is reserved; the API refuses it, a raw write does not):
    that task's run is lost naming the refusal and the task is parked; the others keep every slot."""
    stack = make_stack("postgres", "amqp")
    worker, beat = stack.up()
    good_a, good_b, bad = create_tasks(stack, [every_second("good A"), every_second("good B"),
                                               every_second("reserved queue")])
    wait_for(lambda: ledger_slots(stack, bad, "succeeded"), 15, "a run of the task before its queue changes")
    stack.query("UPDATE sisy_celery_task SET queue = 'amq.x' WHERE id = %s", (bad,))
    wait_for(lambda: (stack.task(bad) or {}).get("problem"), 15, "the task to be flagged")
    end = whole_second(now()) + 4 * SECOND
    sleep_until(end + 1.5 * SECOND)
    assert beat.alive() and worker.alive()
    stop_all(stack)

    expect = good_tasks_keep_every_slot(stack, (good_a, good_b), end)
    refused = [row for row in stack.ledger(bad) if row["state"] != "succeeded"]
    result = tally(stack, summary, "6b queue 'amq.x' refused by RabbitMQ", expect,
                   [f"refused run: {[(r['state'], r['error'][:80]) for r in refused]}"])
    assert [row["state"] for row in refused] == ["lost"], "one run of the task is lost, the rest of it ran before"
    assert refused[0]["error"].startswith("refused by the broker") and refused[0]["slot"] == max(ledger_slots(stack, bad))
    row = stack.task(bad)
    assert "amq.x" in row["problem"] and row["next_run"].year == 2217 and not row["running"]
    assert result.duplicated == 0 and result.lost == 0
    assert ledger_mismatches(stack) == []
    assert f"id={bad} label='reserved queue' queue='amq.x' flagged" in beat.text()


# -- 7. forged, copied and expired messages ----------------------------------------------------

CANARY = {"func_type": "function", "module_name": "proj.testing", "func_name": "canary",
          "func_path": "proj.testing.canary"}
SLOW = {"func_type": "function", "module_name": "jobs.jobs", "func_name": "slow", "func_path": "jobs.jobs.slow"}


def forge(stack: Stack, *args: Any, **options: Any) -> str:
    """Publish a ``sisy.run_callable`` message straight to the stack's broker; return its id."""
    from celery import Celery

    app = Celery("forger", broker=stack.broker)
    try:
        return app.send_task("sisy.run_callable", args=list(args), **options).id
    finally:
        app.close()


def all_settled(stack: Stack, messages: dict[str, str]) -> dict[str, str] | None:
    """'STATUS exc_type' of each message's result, once every one has a final state."""
    outcomes = {}
    for kind, message_id in messages.items():
        rows = stack.query("SELECT status, result FROM django_celery_results_taskresult WHERE task_id = %s",
                           (message_id,))
        if not rows or rows[0]["status"] not in ("SUCCESS", "FAILURE"):
            return None
        result = json.loads(rows[0]["result"] or "null")
        error = result.get("exc_type") if isinstance(result, dict) else None
        outcomes[kind] = f"{rows[0]['status']} {error}" if error else rows[0]["status"]
    return outcomes


def test_forged_messages_are_refused_and_change_nothing(stack: Stack, summary: FaultSummary) -> None:
    worker, beat = stack.up()
    good, slow, quiet, outside = create_tasks(stack, [
        every_second("good"),
        every_second("slow", func="slow", allow_overlap=False, userdata={"seconds": 8}),
        {"label": "quiet", "schedule": "* * * * * *", "iterations": 5, "enabled": False},
        {"label": "outside", "schedule": "* * * * * *", "enabled": False},
    ])
    record = stack.task(good)["_func_info"]
    # A row pointing outside SISY_ALLOWED_MODULES, as a raw write would leave it (the API refuses it).
    stack.query("UPDATE sisy_celery_task SET _func_info = %s::jsonb WHERE id = %s", (json.dumps(CANARY), outside))
    going = started_run(stack, slow)
    before = {pk: stack.task(pk) for pk in (quiet, outside)}
    slot = whole_second(now()).isoformat()
    forged = {
        "callable outside the allow-list, row differs": forge(stack, quiet, CANARY, {}, slot),
        "callable outside the allow-list, row matches": forge(stack, outside, CANARY, {}, slot),
        "allowed callable, row differs": forge(stack, quiet, SLOW, {"seconds": 0}, slot),
        # the very slot of the run that is going, as a copy of its message would name it
        "differs from a running task without overlap": forge(stack, slow, record, {}, going["slot"].isoformat()),
        "function info not a dict": forge(stack, quiet, "jobs.jobs.record", {}, slot),
        "unknown task": forge(stack, 10 ** 9, record, {}, slot),
        "task id not a number": forge(stack, "1 OR 1=1", record, {}, slot),
        "slot not a date": forge(stack, quiet, stack.task(quiet)["_func_info"], {}, "yesterday"),
        "missing arguments": forge(stack, quiet),
    }
    outcomes = wait_for(lambda: all_settled(stack, forged), 20, "the worker to settle every forged message")
    during = next(r for r in stack.ledger(slow) if r["slot"] == going["slot"])
    running = stack.task(slow)["running"]
    end = whole_second(now()) + 2 * SECOND
    sleep_until(end + 1.5 * SECOND)
    stop_all(stack)

    ran_forged = [run for run in stack.runs() if run.task_id in (quiet, outside)]
    canary = (Path(stack.workdir) / "var" / "canary").exists()
    expect = good_tasks_keep_every_slot(stack, (good,), end)
    result = tally(stack, summary, f"7a forged sisy.run_callable messages ({len(forged)} kinds)", expect,
                   [f"{len(forged)} forged message(s) sent, {len(ran_forged) + canary} ran",
                    "outcomes: " + ", ".join(f"{kind}: {outcome}" for kind, outcome in outcomes.items())])
    assert result.duplicated == 0 and result.lost == 0
    assert ledger_mismatches(stack) == []
    assert not canary, "a callable outside the allow-list ran"
    assert ran_forged == [], "a forged message ran"
    for kind, outcome in outcomes.items():
        if kind == "unknown task":
            assert outcome == "SUCCESS", "a message for a task that does not exist is dropped"
        elif kind == "missing arguments":
            assert outcome == "FAILURE TypeError", "Celery refuses a call with missing arguments"
        else:
            assert outcome == "FAILURE RefusedMessage", f"{kind}: {outcome}"
    for pk, row in before.items():
        after = stack.task(pk)
        changed = {key for key in row if row[key] != after[key]}
        allowed = {"problem"} if pk == outside else set()  # the row itself is bad: flagged
        assert changed <= allowed, f"task {pk}: forged messages changed {changed}"
    assert stack.task(outside)["problem"], "the row outside the allow-list is flagged"
    assert during["state"] == "started" and running, "a forged message released the run of a running task"
    assert (during["attempt"], during["worker"]) == (going["attempt"], going["worker"])
    assert [(r["state"], r["attempt"]) for r in stack.ledger(slow) if r["slot"] == going["slot"]] == [("succeeded", 1)]
    assert f"sisy refused a message for task id={slow} label='slow': its function info" in worker.text()
    assert not overlaps(stack.runs(slow))
    assert worker.text().count("sisy refused") >= len(forged) - 2, "each refusal is logged"
    assert "no longer exists" in worker.text()


def queued_messages(stack: Stack) -> dict[tuple[int, datetime], bytes]:
    """The raw ``sisy.run_callable`` messages waiting in the stack's Redis queue, by (task id, slot)."""
    import redis

    client = redis.Redis(db=stack._broker.number, socket_timeout=5, **REDIS)
    try:
        raw = client.lrange("celery", 0, -1)
    finally:
        client.close()
    found = {}
    for data in raw:
        payload = json.loads(data)
        args = json.loads(base64.b64decode(payload["body"]))[0]
        found[(args[0], datetime.fromisoformat(args[3]))] = data
    return found


def push_back(stack: Stack, data: bytes) -> None:
    """LPUSH a raw message into the stack's Redis queue again: the broker delivers it once more."""
    import redis

    client = redis.Redis(db=stack._broker.number, socket_timeout=5, **REDIS)
    try:
        client.lpush("celery", data)
    finally:
        client.close()


def test_copies_of_real_messages_run_nothing(make_stack: Any, summary: FaultSummary) -> None:
    """Real messages read from the broker and pushed back (as a broker client's retry after a lost
    reply, or a replay, would deliver them): a copy of a run still going (overlap off), of a finished
    run, of a run of a disabled task and of a run of a finished task kept disabled runs nothing and
    counts nothing."""
    stack = make_stack("postgres", "redis", SISY_KEEP_FINISHED_TASKS="1")
    beat = stack.beat()
    going, done, disabled, finished = create_tasks(stack, [
        every_second("going", func="slow", allow_overlap=False, userdata={"seconds": 6}),
        every_second("finished run"), every_second("disabled"), every_second("kept when finished", iterations=2)])
    # No worker yet: the messages wait in the broker to be read.
    wait_for(lambda: len(ledger_slots(stack, disabled, "published")) >= 2
             and len(ledger_slots(stack, finished, "published")) == 2, 15, "messages waiting in the broker")
    stack.stop(beat)
    messages = queued_messages(stack)
    assert set(messages) == {(row["task_id"], row["slot"]) for row in stack.ledger()}, "one message per run"
    stack.run("task = Task.objects.get(pk=params['pk']); task.enabled = False; task.save()", pk=disabled)
    worker = stack.worker()
    wait_for(lambda: stack.task(finished)["finished_at"] is not None, 20, "the two-times task to finish")
    wait_for(lambda: count(stack, "task_id IN (%s, %s, %s) AND state IN ('claimed', 'published', 'started')",
                           (done, disabled, finished)) == 0, 20, "the runs of the other tasks to settle")
    current = started_run(stack, going)
    rows_before = {pk: stack.task(pk) for pk in (done, disabled, finished)}
    ledger_before = {(r["task_id"], r["slot"]): r for r in stack.ledger() if r["task_id"] != going}

    copies = {key: data for key, data in messages.items() if key[0] != going}
    copies[(going, current["slot"])] = messages[(going, current["slot"])]
    offset = len(worker.text())
    for data in copies.values():
        push_back(stack, data)

    def dropped() -> dict[tuple[int, datetime], str] | None:
        """Why the worker dropped each copy (a short reason, without the run's error)."""
        text = worker.text()[offset:]
        found = {}
        for pk, slot in copies:
            line = rf"sisy task id={pk} label=.*: message for {re.escape(slot.isoformat())} not run: ([^(\n]*)"
            found[(pk, slot)] = " ".join(re.findall(line, text)).strip()
        return found if all(found.values()) else None

    reasons = wait_for(dropped, 20, "the worker to drop every copy")
    during = next(r for r in stack.ledger(going) if r["slot"] == current["slot"])
    wait_for(lambda: next(r for r in stack.ledger(going) if r["slot"] == current["slot"])["state"] == "succeeded", 15,
             "the run that was going to end")
    stop_all(stack)

    expect = Expect()
    for pk in (going, done, finished):
        expect.each(pk, ledger_slots(stack, pk, "succeeded"))
    result = tally(stack, summary, "7b copies of real messages pushed back into Redis (run going, run finished, "
                                   "disabled task, finished task kept)", expect,
                   [f"{len(copies)} copies pushed back, each dropped: {sorted(Counter(reasons.values()).items())}"])

    assert during["state"] == "started", "the copy of the going run arrived while it was going"
    assert reasons == {key: "another attempt of this run is running" if key[0] == going
                       else f"the run is already {ledger_before[key]['state']}" for key in copies}
    assert {r["state"] for r in stack.ledger(disabled)} == {"revoked"}, "the disabled task's runs were revoked"
    assert stack.runs(disabled) == []
    assert len(stack.runs(finished)) == 2, "the finished task ran its two iterations only"
    assert result.duplicated == 0 and result.lost == 0
    assert ledger_mismatches(stack) == []
    assert all(r["attempt"] == 1 for r in stack.ledger() if r["state"] == "succeeded"), "no copy started a run"
    for pk, row in rows_before.items():
        assert stack.task(pk) == row, f"a copy changed task {pk}"
    for key, row in ledger_before.items():
        assert next(r for r in stack.ledger(key[0]) if r["slot"] == key[1]) == row, f"a copy changed the run {key}"


def test_expired_message_for_a_going_run_releases_nothing(stack: Stack, summary: FaultSummary) -> None:
    """An expired message naming the slot of a run that is going (a copy made to look expired), and one
    naming a slot with no run: Celery discards both as expired; neither settles nor frees anything."""
    worker, beat = stack.up()
    (slow,) = create_tasks(stack, [every_second("slow", func="slow", allow_overlap=False, userdata={"seconds": 5})])
    going = started_run(stack, slow)
    func_info = stack.task(slow)["_func_info"]
    past = now() - timedelta(minutes=1)
    elsewhere = whole_second(going["slot"]) + timedelta(minutes=5)
    expired = {
        "copy of the going run": forge(stack, slow, func_info, {}, going["slot"].isoformat(),
                                       task_id=celery_id(stack, slow, going["slot"]), expires=past),
        "slot without a run": forge(stack, slow, func_info, {}, elsewhere.isoformat(), expires=past),
    }
    wait_for(lambda: all(f"Discarding revoked task: sisy.run_callable[{message}]" in worker.text()
                         for message in expired.values()), 15, "the worker to discard the expired messages")
    during = next(r for r in stack.ledger(slow) if r["slot"] == going["slot"])
    running = stack.task(slow)["running"]
    wait_for(lambda: next(r for r in stack.ledger(slow) if r["slot"] == going["slot"])["state"] == "succeeded", 15,
             "the going run to end")
    end = whole_second(now())
    stop_all(stack)

    expect = Expect()
    expect.each(slow, ledger_slots(stack, slow, "succeeded"))
    result = tally(stack, summary, "7c expired messages for a going run and for a slot without a run", expect,
                   [f"{len(expired)} expired message(s) discarded"])
    assert (during["state"], during["attempt"], during["worker"]) == ("started", 1, going["worker"])
    assert running, "the task still counts its run as going"
    assert elsewhere not in ledger_slots(stack, slow), "an expired message made no run"
    assert {r["state"] for r in stack.ledger(slow)} == {"succeeded"}
    assert not overlaps(stack.runs(slow))
    assert result.duplicated == 0 and result.lost == 0
    assert ledger_mismatches(stack) == []
    assert all(row["slot"] <= end for row in stack.ledger(slow))


# -- 8. a global misconfiguration ---------------------------------------------------------------


def test_misspelled_timezone_stops_beat_and_worker_and_changes_no_row(stack: Stack, summary: FaultSummary) -> None:
    pks = create_tasks(stack, [every_second("every second"), {"label": "zoned", "schedule": "0 3 * * *",
                                                              "timezone": "Europe/Paris"}])
    before = {pk: stack.task(pk) for pk in pks}
    bad = {"SISY_TIMEZONE": "Europe/Pariss"}
    procs = [stack.beat("bad-zone", wait=False, env=bad), stack.worker("bad-zone", wait=False, env=bad)]
    codes = [proc.popen.wait(timeout=60) for proc in procs]
    for proc, code in zip(procs, codes):
        assert code != 0, f"{proc.kind} exited with {code}"
        assert f"sisy {proc.kind} cannot start" in proc.text() and "'Europe/Pariss'" in proc.text() \
            and "is unknown" in proc.text(), proc.tail()
    for pk, row in before.items():
        after = stack.task(pk)
        assert (after["problem"], after["next_run"], after["enabled"]) == (row["problem"], row["next_run"], True)
    assert stack.ledger() == [], "nothing was dispatched"

    # The rows are fine: with the zone spelled right the every-second task runs.
    stack.up(env={"SISY_TIMEZONE": "Europe/Paris"})
    wait_for(lambda: ledger_slots(stack, pks[0], "succeeded"), 15, "a run with the zone spelled right")
    stop_all(stack)
    expect = Expect()
    expect.each(pks[0], ledger_slots(stack, pks[0]))
    result = tally(stack, summary, "8 SISY_TIMEZONE misspelled: beat and worker refuse to start", expect,
                   [f"beat exit {codes[0]}, worker exit {codes[1]}, rows unchanged"])
    assert result.duplicated == 0 and result.lost == 0
    assert ledger_mismatches(stack) == []
