"""The scheduler and worker end to end: real ``celery beat -S sisy_celery.Scheduler`` and
``celery worker`` processes of the example project, checked through the database.

The main stack is PostgreSQL + Redis (migrated once per module, emptied between
tests); the basic scenario also runs on RabbitMQ, on the embedded default (SQLite
file + filesystem broker) and on MariaDB.
"""
from __future__ import annotations

import signal
import time
from collections import Counter
from datetime import timedelta

import pytest

from tests.e2e.harness import Stack, duplicate_slots, gaps, now, overlaps, wait_for

pytestmark = pytest.mark.e2e

SECOND = timedelta(seconds=1)
NO_ARGUMENTS = ('{"func_type": "function", "module_name": "jobs.jobs", "func_name": "no_arguments", '
                '"func_path": "jobs.jobs.no_arguments"}')
#: SISY_HEARTBEAT_FREQUENCY of the stacks: the longest beat goes without looking at the database
HEARTBEAT = SECOND


def create(stack: Stack, code: str, **params: object) -> int:
    """Run ``code`` (which leaves the new Task in ``task``) in the project; return the task's pk."""
    pk = stack.run(code + "\nresult = task.pk", **params)
    assert isinstance(pk, int), f"the task was not saved: pk {pk!r}"
    return pk


def every_second(stack: Stack, label: str = "every second", **fields: object) -> int:
    return create(stack, "task = task_with_callable(jobs.record, label=params['label'], schedule='* * * * * *', "
                         "**params['fields'])\ntask.save()", label=label, fields=fields)


def edit(stack: Stack, pk: int, **changes: object) -> None:
    """Change fields of a task the way a user does: load it, set attributes, ``save()``."""
    stack.run("task = Task.objects.get(pk=params['pk'])\n"
              "for name, value in params['changes'].items():\n    setattr(task, name, value)\ntask.save()",
              pk=pk, changes=changes)


def sent_slots(stack: Stack, pk: int) -> list[str]:
    """Slots the ledger says were published for task ``pk``."""
    return [slot for task, slot in stack.sent() if task == pk]


def settled(stack: Stack, pk: int) -> dict | None:
    """The task row once no run of it is unsettled and ``running`` is off (else None)."""
    row = stack.task(pk)
    unsettled = [r for r in stack.ledger(pk) if r["state"] in ("claimed", "published", "started")]
    return row if row and not unsettled and not row["running"] else None


# -- the main stack: PostgreSQL + Redis ----------------------------------------------------


def test_every_second_task_runs_once_per_second(stack: Stack) -> None:
    stack.up()
    created = now()
    pk = every_second(stack)

    wait_for(lambda: len(stack.runs(pk)) >= 6, 20, "six runs")

    runs = stack.runs(pk)
    slots = [run.slot for run in runs]
    assert not duplicate_slots(runs)
    assert not gaps(slots, SECOND), "every slot between the first and the last ran"
    assert all(slot.microsecond == 0 for slot in slots)
    assert created < slots[0] <= created + 2 * SECOND, "the first slot is the first second after creation"
    late = [(run.slot, run.started) for run in runs if not timedelta(0) <= run.started - run.slot < 1.5 * SECOND]
    assert not late, "each run starts on time, to the second"


def test_slots_fire_on_time_not_on_the_heartbeat(stack: Stack) -> None:
    pk = create(stack, "task = task_with_callable(jobs.record, label='every 2 s', schedule='* * * * * */2')\n"
                       "task.save()")
    _, beat = stack.up(env={"SISY_HEARTBEAT_FREQUENCY": "30"})
    started = now()

    wait_for(lambda: len([r for r in stack.runs(pk) if r.slot > started]) >= 3, 15, "three runs")

    runs = [run for run in stack.runs(pk) if run.slot > started]
    assert not gaps([run.slot for run in runs], 2 * SECOND)
    late = [(run.slot, run.started) for run in runs if run.started - run.slot >= SECOND]
    assert not late, "with a 30 s heartbeat, each slot still fires on time"
    assert "heartbeat 30s" in beat.text()


def test_first_run_right_away_without_waiting_for_the_schedule(stack: Stack) -> None:
    stack.up()
    created = now()
    pk = create(stack, "task = task_with_callable(jobs.record, label='yearly', schedule='0 0 1 1 *', "
                       "wait_for_schedule=False)\ntask.save()")

    runs = wait_for(lambda: stack.runs(pk), 10, "the first run")
    row = wait_for(lambda: settled(stack, pk), 10, "the run to finish")

    assert len(runs) == 1 and runs[0].started - created < 3 * SECOND
    assert row["next_run"].year == created.year + 1 and (row["next_run"].month, row["next_run"].day) == (1, 1)
    assert row["enabled"], "a task that runs forever is not finished by its first run"


def test_run_iterations_runs_exactly_n_times_then_is_removed(stack: Stack) -> None:
    stack.up()
    pk = create(stack, "task = Task.run_iterations(jobs.record, iterations=3, label='three times')")

    wait_for(lambda: stack.task(pk) is None, 20, "the task row to be removed after its last iteration")

    runs = stack.runs(pk)
    assert len(runs) == 3
    assert len(sent_slots(stack, pk)) == 3, "no fourth run was sent"
    assert not duplicate_slots(runs)
    assert not gaps([run.slot for run in runs], SECOND)
    assert [r["status"] for r in stack.results(pk)] == ["SUCCESS"] * 3


def test_iterations_are_exact_with_overlap_slow_runs_two_workers_and_two_beats(stack: Stack) -> None:
    stack.up(workers=2, beats=2)
    pk = create(stack, "task = Task.run_iterations(jobs.slow, iterations=3, label='slow x3', "
                       "userdata={'seconds': 2.5})")
    assert stack.task(pk)["allow_overlap"] is True

    wait_for(lambda: stack.task(pk) is None, 20, "the task to finish")

    runs = stack.runs(pk)
    assert len(runs) == 3
    assert len(sent_slots(stack, pk)) == 3, "no fourth run was sent"
    assert overlaps(runs), "with overlap allowed, slow runs of consecutive slots run side by side"
    assert not duplicate_slots(runs)


def test_task_finishes_when_end_running_has_passed(stack: Stack) -> None:
    stack.up()
    pk = create(stack, "task = task_with_callable(jobs.record, label='until', schedule='* * * * * *', "
                       "end_running=timezone.now() + timedelta(seconds=3))\ntask.save()")
    end = stack.task(pk)["end_running"]

    wait_for(lambda: stack.task(pk) is None, 10, "the task to be removed after end_running")

    slots = [run.slot for run in stack.runs(pk)]
    assert len(slots) >= 2 and not gaps(slots, SECOND)
    assert max(slots) <= end, "no slot after end_running ran"
    assert end - max(slots) < SECOND, "every slot up to end_running ran"


def test_finished_task_is_kept_disabled_with_keep_finished_tasks(stack: Stack) -> None:
    stack.up(env={"SISY_KEEP_FINISHED_TASKS": "1"})
    pk = create(stack, "task = Task.run_iterations(jobs.record, iterations=2, label='kept')")

    row = wait_for(lambda: (r := stack.task(pk)) and not r["enabled"] and r, 10, "the task to finish")

    assert len(stack.runs(pk)) == 2
    assert len(sent_slots(stack, pk)) == 2
    assert settled(stack, pk), "a kept finished task is not left running"
    assert [r["status"] for r in stack.results(pk)] == ["SUCCESS"] * 2, "its run history stays"
    assert row["last_status"] == "SUCCESS"


def test_run_once_runs_once_right_away(stack: Stack) -> None:
    stack.up()
    created = now()
    pk = create(stack, "task = Task.run_once(jobs.record, label='once')")

    wait_for(lambda: stack.task(pk) is None, 15, "the one-off task to be removed")

    runs = stack.runs(pk)
    assert len(runs) == 1
    assert len(sent_slots(stack, pk)) == 1
    assert runs[0].started - created < 3 * SECOND, "run_once does not wait for a cron slot"


def test_delay_until_is_honoured(stack: Stack) -> None:
    stack.up()
    pk = create(stack, "delay = timezone.now() + timedelta(seconds=3)\n"
                       "task = Task.run_once(jobs.record, label='delayed', delay_until=delay)")
    delay = stack.task(pk)["start_running"]

    wait_for(lambda: stack.task(pk) is None, 10, "the delayed task to run and be removed")

    runs = stack.runs(pk)
    assert len(runs) == 1
    assert runs[0].slot >= delay and runs[0].started >= delay, "nothing runs before delay_until"
    assert runs[0].started - delay < 2 * SECOND, "it runs soon after delay_until"


def test_slow_task_without_overlap_never_runs_concurrently(stack: Stack) -> None:
    # A 1 s running lease for 2 s runs: only the worker's renewals keep beat from taking the
    # task for dead and sending an overlapping run.
    _, beat = stack.up(env={"SISY_RUNNING_TIMEOUT": "1"})
    pk = create(stack, "task = task_with_callable(jobs.slow, label='slow', schedule='* * * * * *', "
                       "allow_overlap=False, userdata={'seconds': 2})\ntask.save()")

    wait_for(lambda: len(stack.runs(pk)) >= 3, 25, "three slow runs")
    stack.stop(beat)
    row = wait_for(lambda: settled(stack, pk), 10, "the last run to finish and release the task")

    runs = stack.runs(pk)
    assert len(runs) >= 3
    assert not overlaps(runs), "a run started while the previous one was still going"
    assert all(run.finished - run.started >= 2 * SECOND for run in runs)
    assert not duplicate_slots(runs)
    assert "skipped, a run is still going" in beat.text(), "slots due during a run were skipped"
    assert "stopped renewing the lease" not in beat.text(), "a long run was taken for a dead one"
    assert row["running"] is False
    assert {r["state"] for r in stack.ledger(pk)} == {"succeeded"}


def test_model_instance_method_runs_against_its_row(stack: Stack) -> None:
    stack.up()
    accounts = stack.run("""
        acme = Account.objects.create(name='ACME')
        other = Account.objects.create(name='Other')
        task = Task.run_iterations(acme.accrue_interest, iterations=2, label='interest', userdata={'amount': 10})
        result = [acme.pk, other.pk, task.pk]
    """)
    acme, other, pk = accounts

    wait_for(lambda: stack.task(pk) is None, 15, "both iterations to run")

    balances = {row["id"]: row["balance"] for row in stack.query("SELECT id, balance FROM jobs_account")}
    assert balances == {acme: 20, other: 0}
    assert len(stack.runs(pk)) == 2


def test_userdata_saved_while_running_reaches_the_next_runs(stack: Stack) -> None:
    stack.up()
    acme, pk = stack.run("""
        acme = Account.objects.create(name='ACME')
        task = task_with_callable(acme.accrue_interest, label='interest', schedule='* * * * * *',
                                  userdata={'amount': 1})
        task.save()
        result = [acme.pk, task.pk]
    """)
    wait_for(lambda: len(stack.runs(pk)) >= 2, 10, "two runs with amount 1")

    stack.run("task = Task.objects.get(pk=params['pk'])\ntask.userdata['amount'] = 100\ntask.save()", pk=pk)
    saved = now()
    wait_for(lambda: len([r for r in stack.runs(pk) if r.started > saved]) >= 2, 10, "two runs after the edit")
    edit(stack, pk, enabled=False)
    wait_for(lambda: settled(stack, pk), 10, "the last run to finish")

    runs = len(stack.runs(pk))
    balance = stack.query("SELECT balance FROM jobs_account WHERE id = %s", (acme,))[0]["balance"]
    big, rest = divmod(balance - runs, 99)  # each run added 1 or 100
    assert rest == 0 and 2 <= big <= runs - 2, f"balance {balance} after {runs} runs"
    assert stack.run("result = Task.objects.get(pk=params['pk']).userdata", pk=pk) == {"amount": 100}


def test_schedule_edited_while_beat_runs_takes_effect_within_a_heartbeat(stack: Stack) -> None:
    stack.up()
    pk = every_second(stack)
    wait_for(lambda: len(stack.runs(pk)) >= 3, 15, "three runs on the old schedule")

    edit(stack, pk, schedule="* * * * * */3")
    edited = now()
    wait_for(lambda: len([r for r in stack.runs(pk) if r.slot > edited + HEARTBEAT]) >= 2, 20,
             "two runs on the new schedule")

    runs = stack.runs(pk)
    before = [run.slot for run in runs if run.slot <= edited]
    after = [run.slot for run in runs if run.slot > edited + HEARTBEAT]
    assert not gaps(before, SECOND)
    assert all(slot.second % 3 == 0 for slot in after), f"slots after the edit are off the new grid: {after}"
    assert not gaps(after, 3 * SECOND)
    assert after[0] - edited <= 3 * SECOND + HEARTBEAT, "the new schedule took effect at once"
    assert not duplicate_slots(runs)


def test_disabled_task_stops_and_resumes_without_catching_up(stack: Stack) -> None:
    stack.up()
    pk = every_second(stack)
    control = every_second(stack, "control")  # stays enabled: shows which slots beat has dispatched
    wait_for(lambda: len(stack.runs(pk)) >= 3, 15, "three runs")

    edit(stack, pk, enabled=False)
    disabled = now()
    wait_for(lambda: len([r for r in stack.runs(control) if r.slot > disabled + HEARTBEAT]) >= 2, 10,
             "two slots after disabling to run for the control task")
    assert [r.slot for r in stack.runs(pk) if r.slot > disabled + HEARTBEAT] == [], "runs after disabling"
    assert settled(stack, pk), "the disabled task is not left running"

    edit(stack, pk, enabled=True)
    enabled = now()
    wait_for(lambda: len([r for r in stack.runs(pk) if r.slot > enabled]) >= 2, 10, "runs after enabling again")

    runs = stack.runs(pk)
    assert not [r.slot for r in runs if disabled + HEARTBEAT < r.slot <= enabled], "no catch-up of disabled time"
    assert not duplicate_slots(runs)
    assert not gaps([r.slot for r in runs if r.slot > enabled], SECOND)


@pytest.mark.parametrize("beats", [2, 3])
def test_several_beats_dispatch_each_slot_exactly_once(stack: Stack, beats: int) -> None:
    _, *processes = stack.up(beats=beats)
    pks = [every_second(stack, "every second A"), every_second(stack, "every second B")]

    wait_for(lambda: all(len(stack.runs(pk)) >= 8 for pk in pks), 25, "eight runs of each task")
    assert all(proc.alive() for proc in processes)
    pids = {row["pid"] for row in stack.query("SELECT pid FROM sisy_celery_beatprocess")}
    assert pids == {proc.pid for proc in processes}, "every beat is ticking"
    for proc in processes:
        stack.stop(proc)
    for pk in pks:
        wait_for(lambda: settled(stack, pk), 10, "runs in flight to finish")

    for pk in pks:
        runs = stack.runs(pk)
        slots = [run.slot for run in runs]
        assert not duplicate_slots(runs)
        assert not gaps(slots, SECOND)
        sent = sent_slots(stack, pk)
        assert len(sent) == len(set(sent)), "a slot was published twice"
        assert len(sent) == len(runs), "every published slot ran once"


def test_beat_killed_and_restarted_catches_up_once_then_back_on_grid(stack: Stack) -> None:
    _, beat = stack.up()
    step = 2 * SECOND
    pk = create(stack, "task = task_with_callable(jobs.record, label='every 2 s', schedule='* * * * * */2')\n"
                       "task.save()")
    wait_for(lambda: len(stack.runs(pk)) >= 2, 15, "two runs")
    last = stack.runs(pk)[-1].slot
    time.sleep(max(0.0, (last + 0.5 * step - now()).total_seconds()))  # between two slots

    stack.kill(beat)
    killed = now()
    time.sleep(4)  # two slots come and go with no beat
    # beat publishes a slot once it is due, so a run of a later slot would have come from no beat
    assert [r for r in stack.runs(pk) if r.slot > killed] == [], "runs while beat was down"
    launched = now()
    stack.beat("b2")
    wait_for(lambda: len([r for r in stack.runs(pk) if r.slot > launched]) >= 2, 20, "two runs after restart")
    # Measured from the new beat's first claim, not from its launch or its start-up line: starting a
    # process on a loaded 2-core machine takes seconds, and every slot until that first tick is a
    # missed one too.
    restarted = min(row["claimed_at"] for row in stack.ledger(pk) if row["claimed_at"] > killed)

    runs = stack.runs(pk)
    missed = [run for run in runs if killed < run.slot <= restarted]
    assert len(missed) == 1, f"missed slots ran {len(missed)} times, not once (coalesced)"
    assert missed[0].started >= launched, "the catch-up run happened after the restart"
    after = [run.slot for run in runs if run.slot > restarted]
    assert all(slot.second % 2 == 0 and slot.microsecond == 0 for slot in after), "back on the cron grid"
    assert not gaps(after, step)
    # the first slot after the start is sent on its tick: within one step (and a tick) of the start
    assert after[0] - restarted <= step + SECOND
    before = [run.slot for run in runs if run.slot <= killed]
    assert not gaps(before, step)
    assert not duplicate_slots(runs)


def test_beat_stopped_in_the_middle_of_a_dispatch_strands_no_claim(stack: Stack) -> None:
    stack.worker(concurrency=4)
    tasks = 150
    pks = stack.run("""
        tasks = [task_with_callable(jobs.no_arguments, label=f'burst {n}', schedule='* * * * * *')
                 for n in range(params['tasks'])]
        for task in tasks:
            task.save()
        result = [task.pk for task in tasks]
    """, tasks=tasks)
    beat = stack.beat()

    # SIGTERM as soon as the first runs of a batch are claimed: they are not published yet.
    wait_for(lambda: stack.query("SELECT 1 FROM sisy_celery_run WHERE state = 'claimed' LIMIT 1"), 10,
             "a batch to be claimed", interval=0.005)
    beat.popen.send_signal(signal.SIGTERM)
    assert beat.popen.wait(timeout=20) == 0
    stopped = now()

    def stranded() -> list[int]:
        rows = stack.query("SELECT id FROM sisy_celery_task WHERE running")
        return [row["id"] for row in rows]

    wait_for(lambda: not stranded(), 15, "every claimed slot to be published and run")
    assert [r for r in stack.ledger() if r["state"] == "claimed"] == [], "a claimed run was left unpublished"
    sent = stack.sent()
    assert sent, "beat published a batch before it stopped"
    assert {pk for pk, _ in sent} <= set(pks)
    # Each claim of the last batch was published: every task ran as often as beat says it sent it.
    runs = stack.query("SELECT periodic_task_name AS tag, COUNT(*) AS n FROM django_celery_results_taskresult "
                       "GROUP BY periodic_task_name")
    ran = {int(row["tag"].split(":")[1]): row["n"] for row in runs}
    per_task = Counter(pk for pk, _ in sent)
    assert ran == dict(per_task), "a slot was claimed but never published (or published twice)"
    assert now() - stopped < 15 * SECOND


def test_queue_routes_runs_to_the_worker_listening_on_it(stack: Stack) -> None:
    default = stack.worker("default", wait=False)
    stack.wait_ready(default, stack.beat(wait=False))
    routed = every_second(stack, "routed", queue="other")
    control = every_second(stack, "control")

    wait_for(lambda: len(stack.runs(control)) >= 3, 15, "three runs of the default-queue task")
    assert stack.runs(routed) == [], "a worker not listening on 'other' ran a routed task"

    other = stack.worker("other", queues="other")
    wait_for(lambda: len(stack.runs(routed)) >= 3, 15, "routed runs once a worker listens on 'other'")

    routed_workers = {row["worker"] for row in stack.results(routed)}
    control_workers = {row["worker"] for row in stack.results(control)}
    assert routed_workers and all(name.startswith("other@") for name in routed_workers), routed_workers
    assert control_workers and all(name.startswith("default@") for name in control_workers), control_workers
    parents = {_parent(run.pid) for run in stack.runs(routed)}
    assert parents == {other.pid}, f"routed runs ran in children of {parents}, not of worker {other.pid}"
    assert not duplicate_slots(stack.runs(routed))


def test_expired_message_is_dropped_and_counters_settle(stack: Stack) -> None:
    default = stack.worker("default", wait=False)  # does not listen on 'expiring'
    beat = stack.beat(wait=False)
    stack.wait_ready(default, beat)
    pk = create(stack, "task = Task.run_once(jobs.record, label='expiring', queue='expiring', expires=2)")

    (run,) = wait_for(lambda: [r for r in stack.ledger(pk) if r["state"] == "published"], 10, "the run to be sent")
    assert stack.task(pk)["running"] is True
    stack.stop(beat)
    expiry = run["slot"] + 2 * SECOND
    time.sleep(max(0.0, (expiry - now()).total_seconds() + 0.5))

    late = stack.worker("late", queues="expiring")
    row = wait_for(lambda: settled(stack, pk), 10, "the expired message to be dropped and the task released")
    assert stack.runs(pk) == [], "an expired message ran"
    assert row["iterations"] == 1, "a dropped message does not use up an iteration"
    assert [r["status"] for r in stack.results(pk)] == ["REVOKED"]
    wait_for(lambda: "expired before it started" in late.text(), 5, "the worker to log the expired run")
    assert [(r["state"], r["error"]) for r in stack.ledger(pk)] == [("revoked", "expired before it started")]

    stack.beat("again")
    wait_for(lambda: stack.task(pk) is None, 15, "the one-off task to run once beat is back")
    assert len(stack.runs(pk)) == 1


def test_refused_message_revokes_its_run(stack: Stack) -> None:
    default = stack.worker("default", wait=False)  # does not listen on 'held'
    beat = stack.beat(wait=False)
    stack.wait_ready(default, beat)
    pk = create(stack, "task = task_with_callable(jobs.record, label='held', schedule='* * * * * *', "
                       "queue='held', allow_overlap=False)\ntask.save()")
    wait_for(lambda: [r for r in stack.ledger(pk) if r["state"] == "published"], 10, "a run to be sent")
    stack.stop(beat)
    # The row's callable changes while its message waits (as an edit in the admin would do it).
    stack.query("UPDATE sisy_celery_task SET _func_info = %s::jsonb WHERE id = %s",
                (NO_ARGUMENTS, pk))

    held = stack.worker("held", queues="held")
    wait_for(lambda: settled(stack, pk), 10, "the refused message to revoke its run")
    assert {r["state"] for r in stack.ledger(pk)} == {"revoked"}
    assert all("function info differs" in r["error"] for r in stack.ledger(pk))
    assert stack.runs(pk) == []
    assert f"refused a message for task id={pk}" in held.text()


def test_bad_rows_are_flagged_and_do_not_stop_other_tasks(stack: Stack) -> None:
    _, beat = stack.up()
    ids = stack.run("""
        gone = Account.objects.create(name='closed')
        tasks = [task_with_callable(jobs.record, label=label, schedule='* * * * * *')
                 for label in ('good', 'missing callable', 'broken schedule')]
        tasks.append(task_with_callable(gone.accrue_interest, label='deleted instance', schedule='* * * * * *'))
        for task in tasks:
            task.save()
        gone.delete()
        result = [task.pk for task in tasks]
    """)
    good, missing, broken, deleted = ids
    # Rows broken behind the API's back, as a bad data migration or a manual edit would leave them.
    stack.query("UPDATE sisy_celery_task SET _func_info = %s::jsonb WHERE id = %s",
                ('{"func_type": "function", "module_name": "jobs.jobs", "func_name": "missing", '
                 '"func_path": "jobs.jobs.missing"}', missing))
    stack.query("UPDATE sisy_celery_task SET schedule = 'every full moon' WHERE id = %s", (broken,))

    def flagged() -> bool:
        return all((stack.task(pk) or {}).get("problem") for pk in (missing, broken, deleted))

    wait_for(flagged, 15, "the three bad rows to be flagged")
    wait_for(lambda: len(stack.runs(good)) >= 5, 15, "five runs of the good task")

    assert beat.alive()
    runs = stack.runs(good)
    assert not gaps([run.slot for run in runs], SECOND) and not duplicate_slots(runs)
    assert stack.runs(missing) == [] and stack.runs(deleted) == []
    assert "every full moon" in stack.task(broken)["problem"] or "schedule" in stack.task(broken)["problem"]
    for pk, label in ((missing, "missing callable"), (broken, "broken schedule"), (deleted, "deleted instance")):
        logs = "\n".join(proc.text() for proc in stack.processes)
        assert f"id={pk} label={label!r}" in logs, f"the problem of {label!r} is logged with its id and label"


def _parent(pid: int) -> int:
    """Parent pid of a (still running) process, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


# -- the basic scenario on other databases and brokers -------------------------------------


@pytest.mark.parametrize("db, broker", [
    pytest.param("postgres", "amqp", id="postgres-rabbitmq"),
    pytest.param("sqlite", "filesystem", id="sqlite-filesystem"),
    pytest.param("mariadb", "redis", id="mariadb-redis"),
])
def test_basic_scenario(make_stack, db: str, broker: str) -> None:
    stack = make_stack(db, broker)
    stack.up(beats=2)  # two beats: each slot is still claimed once on every database
    pks = stack.run("""
        account = Account.objects.create(name='ACME')
        forever = task_with_callable(jobs.record, label='every second', schedule='* * * * * *')
        forever.save()
        three = Task.run_iterations(jobs.record, iterations=3, label='three times')
        interest = Task.run_iterations(account.accrue_interest, iterations=2, userdata={'amount': 10})
        once = Task.run_once(jobs.no_arguments)
        result = [forever.pk, three.pk, interest.pk, once.pk, account.pk]
    """)
    forever, three, interest, once, account = pks

    wait_for(lambda: all(stack.task(pk) is None for pk in (three, interest, once)), 20, "the finite tasks to finish")
    wait_for(lambda: len(stack.runs(forever)) >= 5, 15, "five runs of the every-second task")

    runs = stack.runs(forever)
    assert not duplicate_slots(runs)
    assert not gaps([run.slot for run in runs], SECOND)
    assert len(stack.runs(three)) == 3
    assert len(stack.runs(interest)) == 2
    assert stack.query("SELECT balance FROM jobs_account WHERE id = %s", (account,))[0]["balance"] == 20
    assert [r["status"] for r in stack.results(once)] == ["SUCCESS"]
    for pk in (three, interest):
        sent = sent_slots(stack, pk)
        assert len(sent) == len(set(sent)) == len(stack.runs(pk)), f"task {pk}: slots sent {sent}"
    assert len(sent_slots(stack, once)) == 1


def test_run_now_on_a_real_broker_with_beat_running_and_with_the_broker_down(stack: Stack) -> None:
    """"Run now" from the project (as the admin and sisy_run do) with a real worker and beat: the run is
    a ledger row, runs once, and beat sends nothing for it; with the broker unreachable (a Celery app
    pointed at a closed port) nothing is sent, the run is revoked and the task is free again."""
    stack.up()
    pk = create(stack, "task = task_with_callable(jobs.record, label='on demand', schedule='0 0 1 1 *', "
                       "allow_overlap=False)\ntask.save()")
    celery_id = stack.run("from sisy_celery.tasks import run_now\nresult = run_now(Task.objects.get(pk=params['pk']))",
                          pk=pk)
    (run,) = wait_for(lambda: [r for r in stack.ledger(pk) if r["state"] == "succeeded"], 15, "the run to end")
    assert len(stack.runs(pk)) == 1 and stack.runs(pk)[0].slot == run["slot"]
    assert [r["task_id"] for r in stack.results(pk)] == [celery_id]
    assert stack.task(pk)["running"] is False

    failure = stack.run("""
        import os
        from celery import Celery
        from sisy_celery.dispatch import BrokerUnavailable
        from sisy_celery.tasks import run_now
        real = os.environ["CELERY_BROKER_URL"]  # Celery reads the broker from here before its settings
        os.environ["CELERY_BROKER_URL"] = "redis://127.0.0.1:9/0"
        try:
            down = Celery("down", set_as_current=False)
            down.conf.broker_connection_max_retries = 1
            run_now(Task.objects.get(pk=params['pk']), app=down)
            result = "sent"
        except BrokerUnavailable as exc:
            result = str(exc)
        finally:
            os.environ["CELERY_BROKER_URL"] = real
    """, pk=pk)
    assert failure != "sent"
    ledger = stack.ledger(pk)
    assert [r["state"] for r in ledger] == ["succeeded", "revoked"]
    assert "broker was unreachable" in ledger[1]["error"]
    assert stack.task(pk)["running"] is False
    time.sleep(2)  # a worker that got a message would have run it by now
    assert len(stack.runs(pk)) == 1
