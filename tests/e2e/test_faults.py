"""Fault injection: real worker and beat processes of the example project, with beats and workers
killed (``kill -9``), the database and the brokers cut off at a proxy, broken rows, forged messages and a
clock that crosses DST changes.

Every test runs every-second (or every-few-seconds) tasks whose callables record each run in
``jobs_run`` (task id, slot, start, end, pid), injects its fault, waits for the recovery and then
checks the slots of a window: each slot that should have run ran exactly once (after an outage:
one catch-up run per task, then back on the cron grid), nothing overlaps where overlap is off,
iteration counts are exact and no task row is lost. Each fault prints one line

    FAULT <name>: slots expected E / dispatched D / duplicated U / lost L

(visible with ``-s``), and the lines are repeated in a summary at the end of the session.

Slow: selected with ``-m slow``; ``make test`` runs them with the other e2e tests.
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sisy_celery.scheduler import Scheduler
from tests.e2e.harness import UTC, Proc, Run, Stack, logged_at, now, overlaps, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SECOND = timedelta(seconds=1)
#: SISY_HEARTBEAT_FREQUENCY of the stacks
HEARTBEAT = SECOND
#: SISY_RUNNING_TIMEOUT of the tests that need a lease to lapse
LEASE = 3
SENT = re.compile(r"sisy task id=(\d+) label=.* sent for slot (\S+) ")


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
    doubled: list[tuple[int, datetime]] = field(default_factory=list, repr=False)

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

    ``once``: each of these slots runs exactly once. ``window``: an outage of the task: at least one
    run (the coalesced catch-up) among these slots, any of them at most once. ``maybe``: slots at
    the blurry edge of a fault (due while it was being injected): at most once each.
    """

    once: dict[int, set[datetime]] = field(default_factory=lambda: defaultdict(set))
    windows: dict[int, list[tuple[datetime, datetime]]] = field(default_factory=lambda: defaultdict(list))
    maybe: dict[int, set[datetime]] = field(default_factory=lambda: defaultdict(set))

    def each(self, pk: int, slots: Iterable[datetime]) -> None:
        self.once[pk].update(slots)

    def window(self, pk: int, first: datetime, last: datetime) -> None:
        self.windows[pk].append((first, last))

    def may(self, pk: int, slots: Iterable[datetime]) -> None:
        self.maybe[pk].update(slots)

    def tasks(self) -> set[int]:
        return set(self.once) | set(self.windows) | set(self.maybe)


def grid(first: datetime, last: datetime, step: int = 1) -> list[datetime]:
    """The slots of an every-``step``-seconds schedule from ``first`` to ``last`` (both included)."""
    start = int(first.timestamp()) + (-int(first.timestamp()) % step)
    if datetime.fromtimestamp(start, UTC) < first:
        start += step
    return [datetime.fromtimestamp(t, UTC) for t in range(start, int(last.timestamp()) + 1, step)]


def sent_messages(stack: Stack) -> Counter[tuple[int, datetime]]:
    """(task id, slot) of every message the beats of ``stack`` logged as published, with counts."""
    sent: Counter[tuple[int, datetime]] = Counter()
    for proc in stack.processes:
        if proc.kind == "beat":
            for match in SENT.finditer(proc.text()):
                sent[(int(match.group(1)), datetime.fromisoformat(match.group(2)))] += 1
    return sent


def tally(stack: Stack, summary: FaultSummary, fault: str, expect: Expect, notes: Iterable[str] = ()) -> Tally:
    """Count the window's slots against ``expect``, print the tally and add it to the summary."""
    result = Tally(fault, notes=list(notes))
    runs: dict[int, Counter[datetime]] = defaultdict(Counter)
    for run in stack.runs():
        runs[run.task_id][run.slot] += 1
    sent = sent_messages(stack)
    for pk in expect.tasks():
        counted = runs[pk]
        ranges = expect.windows[pk]
        inside = expect.once[pk] | expect.maybe[pk]
        for slot in expect.once[pk]:
            result.expected += 1
            if counted[slot] == 0:
                result.missing.append((pk, slot))
        for first, last in ranges:
            result.expected += 1
            if not any(first <= slot <= last for slot in counted):
                result.missing.append((pk, (first, last)))
        relevant = [slot for slot in counted if slot in inside or any(a <= slot <= b for a, b in ranges)]
        result.doubled += [(pk, slot) for slot in relevant for _ in range(counted[slot] - 1)]
        result.dispatched += sum(n for (task, slot), n in sent.items()
                                 if task == pk and (slot in inside or any(a <= slot <= b for a, b in ranges)))
    result.lost, result.duplicated = len(result.missing), len(result.doubled)
    if result.missing or result.doubled:
        print(f"  lost: {sorted(result.missing, key=str)[:20]}\n  duplicated: {sorted(result.doubled)[:20]}")
    summary.add(result)
    return result


def unexpected_runs(stack: Stack, expect: Expect, first: datetime, last: datetime) -> list[Run]:
    """Runs of the expected tasks with a slot in [first, last] that ``expect`` does not allow."""
    found = []
    for run in stack.runs():
        if run.task_id not in expect.tasks() or not first <= run.slot <= last:
            continue
        allowed = (run.slot in expect.once[run.task_id] or run.slot in expect.maybe[run.task_id]
                   or any(a <= run.slot <= b for a, b in expect.windows[run.task_id]))
        if not allowed:
            found.append(run)
    return found


def skipped_slots(stack: Stack) -> set[tuple[int, datetime]]:
    """(task id, slot) that beat skipped because a run of the task was still going."""
    pattern = re.compile(r"sisy task id=(\d+) label=.*: slot (\S+) skipped, a run is still going")
    return {(int(m.group(1)), datetime.fromisoformat(m.group(2))) for m in pattern.finditer(logs(stack, "beat"))}


def catch_ups(runs: list[Run], first: datetime, last: datetime) -> list[datetime]:
    return sorted({run.slot for run in runs if first <= run.slot <= last})


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


def stop_all(stack: Stack, quiet: float = 2.0, timeout: float = 30) -> None:
    """Stop the beats, let the workers finish what was sent (no new run for ``quiet`` seconds),
    then stop the workers."""
    for proc in stack.processes:
        if proc.kind == "beat" and proc.alive():
            stack.stop(proc)
    try:
        deadline = time.monotonic() + timeout
        count, since = -1, time.monotonic()
        while time.monotonic() - since < quiet:
            current = stack.query("SELECT count(*) AS n FROM jobs_run")[0]["n"]
            if current != count:
                count, since = current, time.monotonic()
            if time.monotonic() > deadline:
                raise AssertionError(f"runs were still being recorded after {timeout}s")
            time.sleep(0.2)
    finally:
        for proc in stack.processes:
            if proc.alive():
                stack.stop(proc)


def busy_rows(stack: Stack, pks: Iterable[int]) -> list[dict[str, Any]]:
    """Rows of ``pks`` that still count a run in flight."""
    return [row for pk in pks if (row := stack.task(pk)) and (row["in_flight"] or row["running"])]


def sleep_until(moment: datetime) -> None:
    time.sleep(max(0.0, (moment - now()).total_seconds()))


def dispatched_past(stack: Stack, moment: datetime, timeout: float = 30) -> None:
    """Wait until a beat of ``stack`` has logged a message for a slot later than ``moment``: it
    dispatches slots in order, so every slot up to ``moment`` has had its turn."""
    wait_for(lambda: any(slot > moment for _, slot in sent_messages(stack)), timeout,
             f"beat to dispatch a slot after {moment.time()}")


def whole_second(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


def logs(stack: Stack, kind: str | None = None) -> str:
    return "\n".join(proc.text() for proc in stack.processes if kind is None or proc.kind == kind)


def ready_at(proc: Proc) -> datetime:
    """When the process logged that it was ready (the harness's readiness line)."""
    moment = logged_at(proc, proc.ready)
    assert moment is not None, f"{proc.kind} {proc.name} never logged {proc.ready!r}"
    return moment


class LogWatch:
    """Follow a process log from its start, cheaply enough to poll every few milliseconds."""

    def __init__(self, proc: Proc) -> None:
        self.handle = open(proc.log, "rb")
        self.buffer = b""

    def count(self, needle: bytes) -> int:
        self.buffer += self.handle.read()
        return self.buffer.count(needle)

    def close(self) -> None:
        self.handle.close()


def kill_during_burst(stack: Stack, beat: Proc, slot: datetime, burst: int, after: int = 10,
                      timeout: float = 10) -> int:
    """``kill -9`` beat once it has published ``after`` of the ``burst`` messages of ``slot``.

    Returns how many messages of the slot it had logged as published when it died.
    """
    needle = f"sent for slot {slot.isoformat()} ".encode()
    watch = LogWatch(beat)
    try:
        deadline = time.monotonic() + timeout
        while watch.count(needle) < after:
            if time.monotonic() > deadline:
                raise AssertionError(f"beat did not publish {after} messages for {slot} in {timeout}s")
            time.sleep(0.001)
        stack.kill(beat)
    finally:
        watch.close()
    return beat.text().count(needle.decode())


# -- 1. beat killed mid-dispatch ------------------------------------------------------------


def test_beat_killed_during_a_burst_and_restarted(stack: Stack, summary: FaultSummary) -> None:
    burst, step = 150, 5
    # A lease longer than the worker may need to work through a burst on a small machine: a
    # message still queued when its lease lapses would be superseded (see docs/operations.md).
    stack.up(env={"SISY_RUNNING_TIMEOUT": "10"})
    start = now()
    specs = [{"label": f"burst {n}", "schedule": f"* * * * * */{step}"} for n in range(burst)]
    specs += [every_second("every second"), every_second("no overlap", allow_overlap=False),
              every_second("twelve times", iterations=12)]
    pks = create_tasks(stack, specs)
    created = now()
    bursty, (second, no_overlap, twelve) = pks[:burst], pks[burst:]
    beat = stack.processes[-1]

    # All tasks are due together at a multiple of 5 s: the beat claims ~150 rows, then publishes.
    slot = grid(now() + 1.5 * SECOND, now() + 10 * SECOND, step)[0]
    published = kill_during_burst(stack, beat, slot, burst + 3, timeout=(slot - now()).total_seconds() + 10)
    killed = now()
    sent_then = {pk for (pk, s) in sent_messages(stack) if s == slot}
    assert 10 <= published < burst, f"the kill landed after the burst ({published} of {burst + 3} sent)"

    again = stack.beat("b2")
    restarted = ready_at(again)
    end = whole_second(slot + 3 * step * SECOND)
    dispatched_past(stack, end)
    stop_all(stack)

    unsent = [pk for pk in pks if pk not in sent_then]
    # The restarted beat hands back the claims that were never published and sends them first.
    resume = whole_second(restarted) + 3 * SECOND
    skipped = skipped_slots(stack)
    expect = Expect()
    for pk in bursty:
        first = min([run.slot for run in stack.runs(pk)] + [slot])  # created before `slot`
        expect.each(pk, grid(first, end, step))  # the slot of the kill included
    for pk in (second, no_overlap):
        first = min(run.slot for run in stack.runs(pk))
        assert first <= created + 2 * SECOND, f"task {pk} ran first at {first}"
        # Before the kill and after the restart every second (but slots skipped by the task without
        # overlap while its run was still going); in between one run, the slot of the kill or,
        # if that was sent, the catch-up of the slots missed while beat was down.
        expect.each(pk, [s for s in grid(first, slot) if (pk, s) not in skipped])
        expect.may(pk, grid(slot + SECOND, resume))
        expect.each(pk, [s for s in grid(resume + SECOND, end) if (pk, s) not in skipped])
    unpublished = [pk for pk in unsent if (pk, slot) not in skipped]  # claimed to be sent, not sent
    recovered = again.text().count("was claimed but never published")
    result = tally(stack, summary, "1 beat kill -9 mid-dispatch, restarted", expect,
                   [f"{published} of {burst + 3} messages of the burst published before the kill",
                    f"{len(unpublished)} claimed and not published: {recovered} handed back by the restarted beat",
                    f"{len([s for s in skipped if s[0] == no_overlap])} slot(s) of the task without overlap "
                    f"skipped while its run was going"])

    assert result.duplicated == 0
    assert unexpected_runs(stack, expect, whole_second(start), end) == []
    assert len(stack.runs(twelve)) == 12 and stack.task(twelve) is None, "iterations are exact"
    assert not overlaps(stack.runs(no_overlap))
    for pk in (second, no_overlap):
        window = catch_ups(stack.runs(pk), slot + SECOND, whole_second(restarted))
        assert len(window) <= 1, f"task {pk}: slots missed while beat was down ran {window}, not once"
    # Only the slots of the group whose leases were written when the kill came can be lost.
    assert all(lost == slot for _, lost in result.missing), result.missing
    assert result.lost < Scheduler.publish_group, f"{result.lost} slot(s) lost"
    # Every claim still marked was handed back (one more message may have gone out unlogged).
    assert recovered + result.lost in (len(unpublished), len(unpublished) - 1), (recovered, result.lost, unpublished)
    rows = stack.query("SELECT count(*) AS n FROM sisy_celery_task")[0]["n"]
    assert rows == len(pks) - 1, "no task row lost (the twelve-times task finished)"


# -- 2. three beats, two of them killed ------------------------------------------------------


def active_beat(stack: Stack, beats: list[Proc]) -> Proc:
    """The live beat that published the latest message (the one to kill to hurt most)."""
    latest: tuple[str, Proc] | None = None
    for proc in beats:
        if proc.alive():
            stamps = re.findall(r"^\[([\d\- :,]+) INFO sisy_celery.beat\] .* sent for slot ", proc.text(), re.M)
            if stamps and (latest is None or stamps[-1] > latest[0]):
                latest = (stamps[-1], proc)
    assert latest is not None, "no beat has published anything"
    return latest[1]


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
    for _ in range(2):
        # Each kill once the beats have dispatched four more seconds of slots since the last event.
        dispatched_past(stack, kills[-1] + 4 * SECOND if kills else created + 4 * SECOND)
        victim = active_beat(stack, beats)
        stack.kill(victim)
        kills.append(now())
    end = whole_second(now()) + 5 * SECOND
    wait_for(lambda: stack.task(fifteen) is None, 20, "the fifteen-times task to finish")
    dispatched_past(stack, end)
    survivors = [proc for proc in beats if proc.alive()]
    assert len(survivors) == 1
    stop_all(stack)

    skipped = skipped_slots(stack)
    expect = Expect()
    for pk in pairs:
        first = min(run.slot for run in stack.runs(pk))
        assert first <= created + step * SECOND
        expect.each(pk, grid(first, end, step))
    for pk in (first_a, first_b, no_overlap):
        first = min(run.slot for run in stack.runs(pk))
        assert first <= created + 2 * SECOND
        expect.each(pk, [s for s in grid(first, end) if (pk, s) not in skipped])
    result = tally(stack, summary, "2 three beats, two killed (kill -9) while running", expect,
                   [f"killed at {', '.join(k.strftime('%H:%M:%S.%f')[:-3] for k in kills)}",
                    f"{logs(stack, 'beat').count('claimed but never published')} unpublished claim(s) taken over"])

    assert result.duplicated == 0
    assert unexpected_runs(stack, expect, created, end) == []
    assert len(stack.runs(fifteen)) == 15 and stack.task(fifteen) is None, "iterations are exact"
    assert not overlaps(stack.runs(no_overlap))
    # Live beats carry on at once: nothing is lost but, if a kill lands between writing the leases
    # of a group of claims and publishing them, the rest of that group.
    assert result.lost < 2 * Scheduler.publish_group, result.missing
    for pk in (first_a, first_b):
        slots = sorted({run.slot for run in stack.runs(pk)})
        longest = max(b - a for a, b in zip(slots, slots[1:]))
        assert longest <= SECOND + HEARTBEAT, f"task {pk}: a gap of {longest} between two runs"


# -- 3. a worker killed in the middle of a slow run without overlap -------------------------


def running_on(stack: Stack, pk: int, workers: list[Proc], after: datetime) -> tuple[Proc, datetime, datetime]:
    """The worker running task ``pk`` now (its result is STARTED), when the run started and its slot."""
    def started() -> tuple[Proc, datetime, datetime] | None:
        row = stack.task(pk)
        if not row or not row["in_flight"] or row["last_run"] <= after:
            return None
        for result in stack.results(pk):
            if result["status"] == "STARTED":
                name = result["worker"].split("@")[0]
                for proc in workers:
                    if proc.name == name and proc.alive():
                        return proc, row["last_run"], row["claimed_slot"]
        return None

    return wait_for(started, 15, f"a run of task {pk} to start")


def overlapping(spans: list[tuple[datetime, datetime]]) -> list[tuple[Any, Any]]:
    spans = sorted(spans)
    return [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]


@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "acks-late"])
def test_worker_killed_during_a_slow_run_without_overlap(stack: Stack, make_stack: Any, summary: FaultSummary,
                                                         acks_late: bool) -> None:
    # acks_late on RabbitMQ: the broker requeues the unacknowledged message as soon as the killed
    # worker's connection drops, and the lease (6 s) outlives that, so the run is delivered again
    # before beat could take the claim for lost. (Redis redelivers only after its visibility
    # timeout, from a periodic sweep whose timing kombu does not bound; docs/operations.md.)
    lease = 6 if acks_late else LEASE
    env = {"SISY_RUNNING_TIMEOUT": str(lease)}
    if acks_late:
        stack = make_stack("postgres", "amqp")
        env.update(CELERY_TASK_ACKS_LATE="1")
    workers = stack.up(workers=2, env=env)[:2]
    slow, three = create_tasks(stack, [
        every_second("slow", func="slow", allow_overlap=False, userdata={"seconds": 2}),
        every_second("three slow", func="slow", allow_overlap=False, userdata={"seconds": 1}, iterations=3),
    ])
    created = now()

    victim, started, interrupted = running_on(stack, slow, workers, created)
    sleep_until(started + SECOND)
    stack.kill(victim)
    killed = now()
    stack.worker("w3", env=env)  # two workers again
    # Not blocked forever: a run starts once the lease lapses, or the interrupted one is redelivered.
    wait_for(lambda: [r for r in stack.runs(slow) if r.started > killed], lease + 10, "a run after the kill")
    # Carry on until the three-times task is done and two runs of the slow one have finished since.
    wait_for(lambda: stack.task(three) is None and len([r for r in stack.runs(slow) if r.started > killed]) >= 2,
             30, "the three-times task to finish and two runs of the slow task after the kill")
    stop_all(stack, quiet=3)

    runs = stack.runs(slow)
    beat_log = logs(stack, "beat")
    sent = sorted(slot for (pk, slot), n in sent_messages(stack).items() for _ in range(n) if pk == slow)
    reruns = [run for run in runs if run.slot == interrupted]
    expect = Expect()
    expect.each(slow, [slot for slot in sent if slot != interrupted])
    if acks_late:
        expect.each(slow, [interrupted])  # delivered again and run to the end, once
        note = f"interrupted run (slot {interrupted.time()}) redelivered {len(reruns)} time(s)"
    else:
        expect.may(slow, [interrupted])  # early acknowledgement: the broker has forgotten it
        note = f"interrupted run (slot {interrupted.time()}) not redelivered (early ack); lease lapsed and reclaimed"
    result = tally(stack, summary, f"3 worker kill -9 during a slow run without overlap, "
                                   f"{'acks_late' if acks_late else 'early ack'}", expect,
                   [note, f"killed {(killed - started).total_seconds():.1f}s into the run"])

    spans = [(run.started, run.finished) for run in runs] + [(started, killed)]
    assert overlapping(spans) == [], "two runs of the task without overlap ran at the same time"
    assert result.duplicated == 0 and result.lost == 0
    assert unexpected_runs(stack, expect, created - SECOND, now()) == []
    after = [run for run in runs if run.started > killed]
    assert after[0].started - killed < timedelta(seconds=lease + 3), "it runs again within the lease"
    assert len(stack.runs(three)) == 3 and stack.task(three) is None, "iterations are exact"
    assert not busy_rows(stack, [slow]), "nothing is left in flight"
    if acks_late:
        assert len(reruns) == 1 and reruns[0].started > killed
        assert "running lease lapsed" not in beat_log, "the redelivered run kept its claim"
    else:
        assert reruns == []
        assert f"id={slow} label='slow': running lease lapsed" in beat_log, "the lapsed lease is logged"


# -- 4. the database goes away while beat and workers run -----------------------------------


def outage_expectations(stack: Stack, pks: list[int], first_slots: dict[int, datetime], down: datetime,
                        resumed: datetime, end: datetime) -> Expect:
    """Every slot before the outage and after beat resumed runs once (but the slots beat skipped
    while a run was going); the slots in between are coalesced into at least one catch-up run."""
    skipped = skipped_slots(stack)
    expect = Expect()
    for pk in pks:
        expect.each(pk, [s for s in grid(first_slots[pk], whole_second(down) - SECOND) if (pk, s) not in skipped])
        expect.window(pk, whole_second(down), whole_second(resumed) + SECOND)
        expect.each(pk, [s for s in grid(whole_second(resumed) + 2 * SECOND, end) if (pk, s) not in skipped])
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
    dispatched_past(stack, end)
    assert worker.alive() and beat.alive()
    stop_all(stack)

    expect = outage_expectations(stack, [second, no_overlap], first_slots, down, resumed, end)
    beat_log = beat.text()
    result = tally(stack, summary, fault, expect,
                   [f"down {down.time()}, beat dispatching again {resumed.time()}",
                    f"{beat_log.count('handed back')} hand-back(s) of unsent slots logged"])
    assert f"{component} unavailable" in beat_log and "dispatching resumed" in beat_log
    assert result.duplicated == 0 and result.lost == 0
    assert unexpected_runs(stack, expect, min(first_slots.values()), end) == []
    for pk in (second, no_overlap):
        window = catch_ups(stack.runs(pk), whole_second(down) + SECOND, whole_second(resumed) - SECOND)
        assert len(window) <= 1, f"task {pk}: slots due while the {component} was down ran {window}"
    assert len(stack.runs(ten)) == 10, "iterations are exact"
    assert not overlaps(stack.runs(no_overlap))


def test_database_connections_killed_and_refused_while_beat_and_workers_run(make_stack: Any,
                                                                            summary: FaultSummary) -> None:
    stack = make_stack("postgres", "redis", proxied=("database",))
    outage_test(stack, summary, "4 PostgreSQL cut at a proxy: connections reset, new ones refused, 4 s",
                lambda: stack.outage("database"), "database")


# -- 5. the broker cut while beat runs ---------------------------------------------------------


def test_redis_cut_while_beat_runs(make_stack: Any, summary: FaultSummary) -> None:
    stack = make_stack("postgres", "redis", proxied=("broker",))
    outage_test(stack, summary, "5a Redis cut at a proxy: connections reset, new ones refused, 4 s",
                lambda: stack.outage("broker"), "broker")


def test_rabbitmq_cut_while_beat_runs(make_stack: Any, summary: FaultSummary) -> None:
    stack = make_stack("postgres", "amqp", proxied=("broker",))
    outage_test(stack, summary, "5b RabbitMQ cut at a proxy: connections reset, new ones refused, 4 s",
                lambda: stack.outage("broker"), "broker")


# -- 6. rows broken behind the API's back -------------------------------------------------------

GONE_MODULE = ('{"func_type": "function", "module_name": "jobs.gone", "func_name": "record", '
               '"func_path": "jobs.gone.record"}')


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
    dispatched_past(stack, end)
    assert beat.alive() and worker.alive()
    stop_all(stack)

    expect = Expect()
    for pk in (good_a, good_b):
        first = min(run.slot for run in stack.runs(pk))
        expect.each(pk, grid(first, end))
    result = tally(stack, summary, "6 broken rows (module gone, bad schedule, bad zone, func info not a dict, "
                                   "deleted instance)", expect,
                   [f"{len(problems)} of {len(labels)} broken rows flagged"])
    assert result.duplicated == 0 and result.lost == 0
    late = [(run.slot, run.started) for pk in (good_a, good_b) for run in stack.runs(pk)
            if run.slot > broken and run.started - run.slot > 1.5 * SECOND]
    assert late == [], "the good tasks kept firing on time"
    all_logs = logs(stack)
    for pk, label in labels.items():
        assert stack.runs(pk) == [], f"{label} ran"
        assert f"id={pk} label={label!r}" in all_logs, f"the problem of {label!r} is logged with its id and label"
    assert "99 99" in problems[schedule] and "Mars/Olympus" in problems[zone]
    assert "jobs.gone" in problems[missing]
    for pk in (schedule, zone):  # parked: not sent again until fixed
        assert stack.task(pk)["next_run"].year == 2217
    assert not busy_rows(stack, labels), "no broken row is left in flight"


# -- 7. forged messages ---------------------------------------------------------------------

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


def test_forged_messages_are_refused_and_change_nothing(stack: Stack, summary: FaultSummary) -> None:
    worker, beat = stack.up()
    good, slow, quiet, outside = create_tasks(stack, [
        every_second("good"),
        every_second("slow", func="slow", allow_overlap=False, userdata={"seconds": 5}),
        {"label": "quiet", "schedule": "* * * * * *", "iterations": 5, "enabled": False},
        {"label": "outside", "schedule": "* * * * * *", "enabled": False},
    ])
    record = stack.task(good)["_func_info"]
    # A row pointing outside SISY_ALLOWED_MODULES, as a raw write would leave it (the API refuses it).
    stack.query("UPDATE sisy_celery_task SET _func_info = %s::jsonb WHERE id = %s", (json.dumps(CANARY), outside))
    running = wait_for(lambda: (row := stack.task(slow)) and row["in_flight"] == 1 and row["last_run"].year > 2000
                       and row, 15, "a slow run to start")
    before = {pk: stack.task(pk) for pk in (quiet, outside)}
    slot = whole_second(now()).isoformat()
    forged = {
        "callable outside the allow-list, row differs": forge(stack, quiet, CANARY, {}, slot),
        "callable outside the allow-list, row matches": forge(stack, outside, CANARY, {}, slot),
        "allowed callable, row differs": forge(stack, quiet, SLOW, {"seconds": 0}, slot),
        # the very slot the running run was claimed for, as a copy of a real message would have it
        "differs from a running task without overlap": forge(stack, slow, record, {}, running["claimed_slot"].isoformat()),
        "function info not a dict": forge(stack, quiet, "jobs.jobs.record", {}, slot),
        "unknown task": forge(stack, 10 ** 9, record, {}, slot),
        "task id not a number": forge(stack, "1 OR 1=1", record, {}, slot),
        "slot not a date": forge(stack, quiet, stack.task(quiet)["_func_info"], {}, "yesterday"),
        "missing arguments": forge(stack, quiet),
    }
    outcomes = wait_for(lambda: all_settled(stack, forged), 20, "the worker to settle every forged message")
    during = stack.task(slow)
    still_running = not [run for run in stack.runs(slow) if run.slot == running["claimed_slot"]]
    # A finished run's message delivered again, as a broker does when it never got the acknowledgement
    # (same message id, flagged redelivered; kombu's Redis transport keeps the flag as it is sent).
    done = wait_for(lambda: [run for run in stack.runs(good) if run.slot < now() - 2 * SECOND], 10,
                    "a finished run of the good task")[-1]
    again = sent_id(stack, good, done.slot)
    forge(stack, good, record, {}, done.slot.isoformat(), task_id=again, delivery_info={"redelivered": True})
    wait_for(lambda: "delivered again after its run had finished" in worker.text(), 15, "the redelivery to be skipped")
    end = whole_second(now()) + 2 * SECOND
    dispatched_past(stack, end)
    stop_all(stack)

    ran = [run for run in stack.runs() if run.task_id in (quiet, outside)]
    ran += [run for run in stack.runs(slow) if run.slot == datetime.fromisoformat(slot)
            and run.slot != running["claimed_slot"]]
    canary = (Path(stack.workdir) / "var" / "canary").exists()
    expect = Expect()
    expect.each(good, grid(min(run.slot for run in stack.runs(good)), end))
    result = tally(stack, summary, f"7 forged sisy.run_callable messages ({len(forged)} kinds, and a finished "
                                   f"run's message delivered again)", expect,
                   [f"{len(forged)} forged message(s) sent, {len(ran) + canary} ran",
                    "outcomes: " + ", ".join(f"{kind}: {outcome}" for kind, outcome in outcomes.items())])
    assert result.duplicated == 0 and result.lost == 0
    assert not canary, "a callable outside the allow-list ran"
    assert ran == [], "a forged message ran"
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
    if still_running:
        assert during["in_flight"] == 1 and during["running"], "a forged message released the claim of a running task"
    assert f"id={slow} label='slow': the refused message for" in worker.text(), "it matched no claim"
    assert not overlaps(stack.runs(slow))
    assert worker.text().count("sisy refused") >= len(forged) - 2, "each refusal is logged"
    assert "no longer exists" in worker.text()
    assert [run.slot for run in stack.runs(good)].count(done.slot) == 1, "a redelivered finished run ran again"


def sent_id(stack: Stack, pk: int, slot: datetime) -> str:
    """The message id beat logged when it published the run of task ``pk`` for ``slot``."""
    pattern = re.compile(rf"sisy task id={pk} label=.* sent for slot {re.escape(slot.isoformat())} \(id (\S+)\)")
    match = pattern.search(logs(stack, "beat"))
    assert match, f"no message of task {pk} for {slot} in the beat logs"
    return match.group(1)


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


# -- 8. a clock that crosses DST changes ---------------------------------------------------------

NEW_YORK = "America/New_York"
SPRING = datetime(2027, 3, 14, 7, 0, tzinfo=UTC)  # 02:00 EST -> 03:00 EDT: 02:xx does not exist
FALL = datetime(2027, 11, 7, 6, 0, tzinfo=UTC)  # 02:00 EDT -> 01:00 EST: 01:xx happens twice


def shifted_window(stack: Stack, change: datetime, schedules: dict[str, str], before: int = 6,
                   after: int = 8) -> tuple[dict[str, int], Proc]:
    """Run a beat whose clock reaches ``change - before`` seconds about when it starts, with tasks
    of ``schedules`` (label -> cron, in New York) that may start from then; stop it ``after`` s past."""
    start_fake = change - (before + 3) * SECOND  # beat has 7 s to start
    offset = (start_fake - (now() + 4 * SECOND)).total_seconds()
    pks = create_tasks(stack, [{"label": label, "schedule": cron, "timezone": NEW_YORK,
                                "start_running": (change - before * SECOND).isoformat()}
                               for label, cron in schedules.items()])
    beat = stack.beat(f"shifted-{change:%m}", scheduler="proj.testing.ShiftedScheduler",
                      env={"SISY_TEST_CLOCK_OFFSET": repr(offset)})
    fake_started = ready_at(beat) + timedelta(seconds=offset)
    assert fake_started < change - before * SECOND, f"beat started too late on its clock ({fake_started})"
    dispatched_past(stack, change + after * SECOND, timeout=before + after + 15)
    stack.stop(beat)
    return dict(zip(schedules, pks)), beat


def test_dst_changes_follow_the_cron_rule(stack: Stack, summary: FaultSummary) -> None:
    worker = stack.worker()
    step = 2 * SECOND
    spring, _ = shifted_window(stack, SPRING, {
        "wildcard hour": "* * * * * */2",
        "hour 1": "* 1 * * * */2",
        "hour 2 (skipped)": "* 2 * * * */2",
        "02:30:00 (skipped)": "30 2 * * * 0",
        "hour 3": "* 3 * * * */2",
    })
    stack.query("UPDATE sisy_celery_task SET enabled = false")
    fall, _ = shifted_window(stack, FALL, {
        "wildcard hour": "* * * * * */2",
        "hour 1": "* 1 * * * */2",
        "minute 0 of stepped hour": "0 */1 * * * */2",
        "minute 0 of hour 1": "0 1 * * * */2",
    })
    assert worker.alive()
    stop_all(stack)

    six, eight = 6 * SECOND, 8 * SECOND
    expected = {
        spring["wildcard hour"]: grid(SPRING - six, SPRING + eight, 2),
        spring["hour 1"]: grid(SPRING - six, SPRING - step, 2),       # 01:59:54 .. 01:59:58 EST
        spring["hour 2 (skipped)"]: [SPRING],                         # first instant after the gap, once
        spring["02:30:00 (skipped)"]: [SPRING],
        spring["hour 3"]: grid(SPRING, SPRING + eight, 2),            # 03:00:00 EDT on
        fall["wildcard hour"]: grid(FALL - six, FALL + eight, 2),     # both copies of 01:xx
        fall["hour 1"]: grid(FALL - six, FALL - step, 2),             # first copy only
        fall["minute 0 of stepped hour"]: grid(FALL, FALL + eight, 2),  # second copy of 01:00 too
        fall["minute 0 of hour 1"]: [],                               # its 01:00 ran in the first copy
    }
    expect = Expect()
    for pk, slots in expected.items():
        expect.each(pk, slots)
    result = tally(stack, summary, "8 DST in America/New_York on a shifted clock (spring forward, fall back)",
                   expect, ["fixed hour in the gap: once after it; fixed hour repeated: once; wildcard: both copies"])
    window = {pk: sorted(run.slot for run in stack.runs(pk)) for pk in expected}
    for pk, slots in expected.items():
        change = SPRING if pk in spring.values() else FALL
        seen = [slot for slot in window[pk] if change - six <= slot <= change + eight]
        assert seen == slots, f"task {pk}: ran {[s.isoformat() for s in seen]}, expected {[s.isoformat() for s in slots]}"
    assert result.duplicated == 0 and result.lost == 0
    assert stack.task(fall["minute 0 of hour 1"])["next_run"] == datetime(2027, 11, 8, 6, 0, tzinfo=UTC)
