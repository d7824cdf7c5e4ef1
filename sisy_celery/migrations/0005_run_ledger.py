"""The run ledger: a Run row per dispatched slot replaces the claim kept in the Task row.

Claims in flight are carried over: a claim whose message was never published (its lease
holds the 1970 mark) becomes a ``claimed`` run that beat publishes at once; any other
becomes a ``published`` run that the next worker to get its message starts. Rows that
an unknown SISY_TIMEZONE once parked (a global cause, not theirs) are scheduled again.
"""
from datetime import datetime, timedelta, timezone as dt_timezone

import django.db.models.deletion
from django.db import migrations, models
from django.utils import timezone

import sisy_celery.models
from sisy_celery import conf, schedules

UNPUBLISHED_BEFORE = datetime(1971, 1, 1, tzinfo=dt_timezone.utc)
FAR_FUTURE = datetime(2217, 12, 31, 23, 59, tzinfo=dt_timezone.utc)


def carry_over_claims(apps, schema_editor):
    Task = apps.get_model("sisy_celery", "Task")
    Run = apps.get_model("sisy_celery", "Run")
    now = timezone.now()
    lease = now + timedelta(seconds=conf.running_timeout())
    runs = []
    for task in Task.objects.filter(in_flight__gt=0, claimed_slot__isnull=False).iterator():
        if task.lease_expires is not None and task.lease_expires < UNPUBLISHED_BEFORE:
            runs.append(Run(task=task, slot=task.claimed_slot, state="claimed", beat="migration",
                            claimed_at=now - timedelta(days=1)))
        else:
            runs.append(Run(task=task, slot=task.claimed_slot, state="published", beat="migration", claimed_at=now,
                            published_at=now, lease_until=max(task.lease_expires or lease, lease)))
    Run.objects.bulk_create(runs, batch_size=500)
    Task.objects.update(running=False)
    Task.objects.filter(pk__in=[run.task_id for run in runs]).update(running=True)


def reschedule_zone_parked(apps, schema_editor):
    Task = apps.get_model("sisy_celery", "Task")
    try:
        zone = conf.get_zone()
    except ValueError:
        return  # still unknown: beat refuses to start until it is fixed, and touches no row
    now = timezone.now()
    parked = Task.objects.filter(timezone="", next_run__gte=FAR_FUTURE, problem__startswith="Unknown time zone")
    for task in parked.iterator():
        try:
            next_run = schedules.next_run(task.schedule, max(now, task.start_running), zone)
        except ValueError:
            continue
        Task.objects.filter(pk=task.pk).update(next_run=next_run, problem="")


class Migration(migrations.Migration):

    dependencies = [
        ('sisy_celery', '0004_lease_index'),
    ]

    operations = [
        migrations.CreateModel(
            name='Run',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('slot', models.DateTimeField(help_text='The instant this run was due.')),
                ('state', models.CharField(choices=[('claimed', 'claimed'), ('published', 'published'), ('started', 'started'), ('succeeded', 'succeeded'), ('failed', 'failed'), ('revoked', 'revoked'), ('lost', 'lost')], default='claimed', max_length=10)),
                ('attempt', models.PositiveSmallIntegerField(default=0, help_text='Starts so far (a redelivered run starts again).')),
                ('beat', models.CharField(blank=True, help_text='The beat (host:pid) that claimed or last published it.', max_length=255)),
                ('worker', models.CharField(blank=True, help_text='The worker that started it.', max_length=255)),
                ('claimed_at', models.DateTimeField()),
                ('published_at', models.DateTimeField(blank=True, null=True)),
                ('started_at', models.DateTimeField(blank=True, null=True)),
                ('finished_at', models.DateTimeField(blank=True, null=True)),
                ('lease_until', models.DateTimeField(blank=True, help_text='A published or started run is alive until then; a worker renews it while the callable runs.', null=True)),
                ('error', models.CharField(blank=True, max_length=300)),
            ],
        ),
        migrations.AddField(
            model_name='run',
            name='task',
            field=models.ForeignKey(db_constraint=False, on_delete=django.db.models.deletion.DO_NOTHING, related_name='runs', to='sisy_celery.task'),
        ),
        migrations.RunPython(carry_over_claims, migrations.RunPython.noop),
        migrations.RunPython(reschedule_zone_parked, migrations.RunPython.noop),
        migrations.RemoveIndex(
            model_name='task',
            name='sisy_task_lease_idx',
        ),
        migrations.RemoveField(
            model_name='task',
            name='claimed_slot',
        ),
        migrations.RemoveField(
            model_name='task',
            name='in_flight',
        ),
        migrations.RemoveField(
            model_name='task',
            name='lease_expires',
        ),
        migrations.AlterField(
            model_name='task',
            name='last_status',
            field=models.CharField(blank=True, editable=False, help_text='Outcome of the last settled run.', max_length=20),
        ),
        migrations.AlterField(
            model_name='task',
            name='queue',
            field=models.CharField(blank=True, help_text='Celery queue; blank = default routing.', max_length=200, validators=[sisy_celery.models.validate_queue]),
        ),
        migrations.AlterField(
            model_name='task',
            name='running',
            field=models.BooleanField(default=False, editable=False, help_text='Some run of this task is claimed, queued or running (from the run ledger).'),
        ),
        migrations.AddIndex(
            model_name='run',
            index=models.Index(fields=['task', 'state'], name='sisy_run_task_state_idx'),
        ),
        migrations.AddIndex(
            model_name='run',
            index=models.Index(fields=['state', 'claimed_at'], name='sisy_run_state_claimed_idx'),
        ),
        migrations.AddConstraint(
            model_name='run',
            constraint=models.UniqueConstraint(fields=('task', 'slot'), name='sisy_run_task_slot_uniq'),
        ),
    ]
