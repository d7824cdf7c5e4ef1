"""Django admin for sisy tasks: readable schedules, safe editing, run now, run history, beat health.

The changelist reads only the task rows themselves (no per-row queries; a large
unfiltered list is counted from PostgreSQL's estimate), so it stays fast with many tasks. Every view that can start a run requires
the change permission and refuses callables outside ``SISY_ALLOWED_MODULES``.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone as dt_timezone, tzinfo
from functools import lru_cache
from typing import Any

from cron_descriptor import ExpressionDescriptor, Options
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import ImproperlyConfigured, PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from django.utils.timesince import timesince, timeuntil

from . import conf, engine, schedules
from .callables import CallableError, check_allowed
from .dispatch import BrokerUnavailable
from .forms import TaskForm
from .models import FAR_FUTURE, HAS_NOT_RUN, BeatProcess, Run, Task
from .tasks import NotSent, TaskBusy, run_now

logger = logging.getLogger("sisy_celery.admin")

PREVIEW_COUNT = 5
RUNS_PER_PAGE = 20
#: The last page of run history whose row offset fits the 64-bit integer databases take for OFFSET.
LAST_RUNS_PAGE = (2**63 - 1) // RUNS_PER_PAGE - 1
#: Seconds after which a published run that no worker started is worth a warning.
WAITING_AFTER = 60.0
_DESCRIBE_OPTIONS = Options()
_DESCRIBE_OPTIONS.use_24hour_time_format = True


@lru_cache(maxsize=2048)
def describe_schedule(schedule: str) -> str:
    """A plain-English description of a schedule as the scheduler reads it ("" if it is not valid).

    Intervals describe themselves ("every 90 seconds"). For cron, the fields come from the
    scheduler's own parse (``5-5`` is already ``5``), and when both day fields are restricted
    the description says whether a day must match both or either (cron-descriptor guesses).
    cron-descriptor reads a 6-field string as *seconds first*, while our 6th field is seconds,
    so the fields are rotated; if it still cannot describe the string, the fields that are not
    ``*`` are listed by name.
    """
    try:
        if schedules.is_interval(schedule):
            return schedules.describe_interval(schedule)
        fields = schedules.describe_fields(schedule)
        rule = schedules.day_rule(schedule)
    except ValueError:
        return ""
    values = list(fields.values())
    if len(values) == 6:
        values = values[5:] + values[:5]
    try:
        if rule is None:
            return ExpressionDescriptor(" ".join(values), _DESCRIBE_OPTIONS).get_description()
        return _describe_with_day_rule(values, rule)
    except Exception:  # cron-descriptor rejects some forms croniter accepts
        logger.debug("cron-descriptor cannot describe %r", schedule, exc_info=True)
        return ", ".join(f"{name} {value}" for name, value in fields.items() if value != "*")


def _describe_with_day_rule(values: list[str], rule: str) -> str:
    """Describe time, day of month, day of week and month, joined by the day rule in words."""
    whole = ExpressionDescriptor(" ".join(values), _DESCRIBE_OPTIONS)
    week_only = ExpressionDescriptor(" ".join(values[:-3] + ["*"] + values[-2:]), _DESCRIBE_OPTIONS)
    week = week_only.get_day_of_week_description().removeprefix(", ")
    if rule == "and":
        days, note = f", and {week}", "the day must match both fields"
    else:
        days, note = f", or {week.removeprefix('only ')}", "a day matching either field is enough"
    text = (f"{whole.get_time_of_day_description()}{whole.get_day_of_month_description()}{days}"
            f"{whole.get_month_description()}{whole.get_year_description()} ({note})")
    text = whole.transform_verbosity(text, use_verbose_format=_DESCRIBE_OPTIONS.verbose)
    return ExpressionDescriptor.transform_case(text, _DESCRIBE_OPTIONS.casing_type)


def upcoming(schedule: str, zone: tzinfo, after: datetime, count: int = PREVIEW_COUNT,
             until: datetime = FAR_FUTURE, anchor: datetime | None = None) -> list[datetime]:
    """The next ``count`` slots of ``schedule`` after ``after`` and not later than ``until``
    (an interval's slots count from ``anchor``, the task's start)."""
    runs: list[datetime] = []
    while len(runs) < count:
        after = schedules.next_run(schedule, after, zone, anchor=anchor)
        if after > until:
            break
        runs.append(after)
    return runs


def relative(moment: datetime, now: datetime) -> str:
    """'in 3 minutes' / '12 seconds ago', with seconds for sub-minute schedules."""
    seconds = (moment - now).total_seconds()
    if abs(seconds) < 60:
        amount = f"{abs(int(seconds))} second{'' if abs(int(seconds)) == 1 else 's'}"
    else:
        amount = timeuntil(moment, now, depth=1) if seconds > 0 else timesince(moment, now, depth=1)
    return f"in {amount}" if seconds >= 0 else f"{amount} ago"


def local_time(moment: datetime, zone: tzinfo) -> str:
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z")


def when(moment: datetime, zone: tzinfo, now: datetime) -> str:
    """The one date format of the sisy admin: how far off (what a reader wants first), the absolute
    time in ``zone`` on hover (what they check), so one short line serves list and form alike."""
    return format_html('<time datetime="{}" title="{}">{}</time>',
                       moment.isoformat(), local_time(moment, zone), relative(moment, now))


def is_one_off(task: Task) -> bool:
    """True for a task made by ``Task.run_once`` (or alike): one iteration left, not waiting for the
    schedule and never run, so its only run is its first slot, right away or at ``start_running``,
    and its schedule string ("* * * * * *" by default) never comes into play."""
    return task.iterations == 1 and not task.wait_for_schedule and task.last_run <= HAS_NOT_RUN


def describe_one_off(task: Task, now: datetime) -> str:
    """'Once, in 3 minutes' for a one-off task: when it runs, or that it is running or finished."""
    zone = zone_or_none(task) or dt_timezone.utc
    if task.finished_at is not None:
        return format_html("Once, finished {}", when(task.finished_at, zone, now))
    if task.running:
        return "Once, running"
    return format_html("Once, {}", when(task.next_run, zone, now))


def warning_list(warnings: list[str]) -> str:
    """Warnings about a valid schedule, in the admin's message style."""
    if not warnings:
        return ""
    return format_html('<ul class="messagelist"><li class="warning">{}</li></ul>',
                       format_html_join("", "{}<br>", ((text,) for text in warnings)))


def zone_or_none(task: Task) -> tzinfo | None:
    try:
        return task.zone
    except ValueError:
        return None


class EstimatedCountPaginator(Paginator):
    """On PostgreSQL, an unfiltered list of many tasks is counted from the planner's estimate.

    An exact ``COUNT(*)`` reads the whole table on every changelist view; the estimate
    (``pg_class.reltuples``, kept by autovacuum) costs one catalogue lookup. Filtered
    lists, small tables and other databases are counted exactly.
    """

    exact_below = 100_000

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        database = connections[queryset.db] if isinstance(queryset, QuerySet) else None
        if database is not None and database.vendor == "postgresql" and not queryset.query.where:
            with database.cursor() as cursor:
                cursor.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                               [database.ops.quote_name(queryset.model._meta.db_table)])
                row = cursor.fetchone()
            if row and row[0] >= self.exact_below:
                return int(row[0])
        return super().count


class StateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("finished", "Finished (kept)"), ("problem", "Has a problem")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Task]) -> QuerySet[Task]:
        if self.value() == "finished":
            return queryset.filter(enabled=False, finished_at__isnull=False)
        if self.value() == "problem":
            return queryset.exclude(problem="")
        return queryset


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    form = TaskForm
    # Six columns fit beside the admin's navigation at 1280 px: the time zone and the runs left are
    # part of the schedule cell, the last result of the last run's, running and finished of the state.
    list_display = (
        "label", "callable_display", "schedule_display", "next_run_display", "last_run_summary", "state_display",
    )
    list_filter = ("enabled", "running", "allow_overlap", StateFilter)
    search_fields = ("label", "_func_info__func_path")
    ordering = ("-enabled", "next_run")
    paginator = EstimatedCountPaginator
    show_full_result_count = False
    actions = ("enable_tasks", "disable_tasks", "run_tasks_now", "clear_running")
    state_fields = (
        "next_run_display", "last_run_display", "last_result", "running", "problem", "finished_display",
        "created_display", "modified_display",
    )
    readonly_fields = ("next_runs", "callable_display", *state_fields)

    class Media:
        css = {"all": ("sisy_celery/admin.css",)}
        js = ("sisy_celery/schedule_preview.js",)

    # -- form layout --------------------------------------------------------------------

    def get_fieldsets(self, request: HttpRequest, obj: Task | None = None) -> list[tuple[str | None, dict]]:
        editable = self.has_change_permission(request, obj) if obj else self.has_add_permission(request)
        callable_fields = ("callable", "pk_override") if editable else ("callable_display",)
        fieldsets: list[tuple[str | None, dict]] = [
            (None, {"fields": ("label", *callable_fields, "enabled")}),
            ("Schedule", {"fields": ("schedule", "timezone", "next_runs", "start_running", "end_running",
                                     "wait_for_schedule")}),
            ("Runs", {"fields": ("iterations", "allow_overlap", "userdata")}),
            ("Celery message", {"fields": ("queue", "priority", "expires")}),
        ]
        if obj is not None:
            fieldsets.append(("State", {"fields": self.state_fields}))
        return fieldsets

    # -- columns ------------------------------------------------------------------------

    @admin.display(description="Callable")
    def callable_display(self, task: Task) -> str:
        """The dotted path, with line breaks allowed after its dots: a path deep in a project is
        wider than the column."""
        path = format_html_join(mark_safe(".<wbr>"), "{}", ((part,) for part in task.callable_path.split(".")))
        info = task._func_info or {}
        if info.get("func_type") == "instancemethod":
            return format_html('<code class="sisy-callable">{}</code> (pk {})', path, info.get("model_pk"))
        return format_html('<code class="sisy-callable">{}</code>', path)

    @admin.display(description="Schedule", ordering="schedule")
    def schedule_display(self, task: Task) -> str:
        """The cron string or interval on one line, then what it means, the zone it is read in and
        how many runs are left (if not forever)."""
        zone = task.timezone or format_html('{} <span class="quiet">(default)</span>', conf.timezone_name())
        if is_one_off(task):
            return format_html('{}<div class="sisy-zone">{}</div>', describe_one_off(task, timezone.now()), zone)
        left = format_html('<div class="sisy-left">{} run{} left</div>', task.iterations,
                           "" if task.iterations == 1 else "s") if task.iterations else ""
        return format_html('<code class="sisy-schedule">{}</code><div class="quiet">{}</div>'
                           '<div class="sisy-zone">{}</div>{}', task.schedule, describe_schedule(task.schedule),
                           zone, left)

    @admin.display(description="Next run", ordering="next_run")
    def next_run_display(self, task: Task) -> str:
        if task.problem:
            return format_html('<span class="errornote" title="{}">problem</span>', task.problem)
        zone = zone_or_none(task)
        if not task.enabled or task.next_run >= FAR_FUTURE or zone is None:
            return "—"
        return when(task.next_run, zone, timezone.now())

    @admin.display(description="Last run", ordering="last_run")
    def last_run_display(self, task: Task) -> str:
        zone = zone_or_none(task)
        if task.last_run <= HAS_NOT_RUN or zone is None:
            return "never"
        return when(task.last_run, zone, timezone.now())

    @admin.display(description="Last run", ordering="last_run")
    def last_run_summary(self, task: Task) -> str:
        """When the last run was and how it ended, in one cell."""
        if not task.last_status:
            return self.last_run_display(task)
        return format_html('{}<div class="sisy-status sisy-status-{}">{}</div>', self.last_run_display(task),
                           task.last_status.lower(), task.last_status)

    @admin.display(description="Last result", ordering="last_status")
    def last_result(self, task: Task) -> str:
        return task.last_status or "—"

    @admin.display(description="State", ordering="-enabled")
    def state_display(self, task: Task) -> str:
        """Enabled, disabled or finished, and whether a run is going: one column for the flags."""
        state = "finished" if task.finished_at is not None else "enabled" if task.enabled else "disabled"
        if task.running:
            return format_html('{}<div class="sisy-running">running</div>', state)
        return state

    @admin.display(description="Finished at")
    def finished_display(self, task: Task) -> str:
        return self.task_when(task, task.finished_at)

    @admin.display(description="Created at")
    def created_display(self, task: Task) -> str:
        return self.task_when(task, task.created_at)

    @admin.display(description="Modified at")
    def modified_display(self, task: Task) -> str:
        return self.task_when(task, task.modified_at)

    @staticmethod
    def task_when(task: Task, moment: datetime | None) -> str:
        """``when`` in the task's zone (UTC if the zone is not known); "—" for no moment."""
        if moment is None:
            return "—"
        return when(moment, zone_or_none(task) or dt_timezone.utc, timezone.now())

    @admin.display(description="Next runs")
    def next_runs(self, task: Task) -> str:
        """Server-rendered preview; schedule_preview.js refreshes it as the fields are edited."""
        if is_one_off(task):
            return format_html('<div class="sisy-preview" data-once="1"><p>{}</p><p class="quiet">{}</p></div>',
                               describe_one_off(task, timezone.now()),
                               "One iteration left and no wait for the schedule: the task runs once, "
                               "and its schedule is not used.")
        url = reverse(f"{self.admin_site.name}:sisy_celery_task_preview")
        try:
            zone = task.zone
            now = timezone.now()
            start = max(now, task.start_running)
            runs = upcoming(task.schedule, zone, start - timedelta(microseconds=1), until=task.end_running,
                            anchor=task.start_running)
            warnings = schedules.schedule_warnings(task.schedule)
        except ValueError as exc:
            body = format_html('<p class="errornote">{}</p>', exc)
        else:
            items = format_html_join("", "<li>{} <span class=\"quiet\">({})</span></li>",
                                     ((local_time(run, zone), relative(run, now)) for run in runs))
            body = format_html('{}<p class="quiet">{}</p><ol>{}</ol>', warning_list(warnings),
                               describe_schedule(task.schedule),
                               items or format_html("<li>{}</li>", "none before the end of the window"))
        return format_html('<div class="sisy-preview" data-url="{}" data-anchor="{}">{}</div>',
                           url, task.start_running.isoformat(), body)

    # -- actions ------------------------------------------------------------------------

    @admin.action(description="Enable selected tasks", permissions=["change"])
    def enable_tasks(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        enabled = 0
        for task in queryset.filter(enabled=False).iterator(chunk_size=500):
            task.enabled = True
            try:
                task.save()  # save() computes the next run from now, so no stale slot fires
            except ValueError as exc:
                self.message_user(request, f"{task} (id {task.pk}) not enabled: {exc}", messages.ERROR)
            else:
                enabled += 1
        self.message_user(request, f"{enabled} task(s) enabled.", messages.SUCCESS)

    @admin.action(description="Disable selected tasks", permissions=["change"])
    def disable_tasks(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        count = queryset.filter(enabled=True).update(enabled=False, modified_at=timezone.now())
        self.message_user(request, f"{count} task(s) disabled.", messages.SUCCESS)

    @admin.action(description="Run selected tasks now", permissions=["change"])
    def run_tasks_now(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        for task in queryset:
            self.send_now(request, task)

    @admin.action(description="Clear a stuck running flag", permissions=["change"])
    def clear_running(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        """Give up the unsettled runs of the selected tasks as lost (a worker that is really running
        one of them can no longer count it)."""
        stuck = list(queryset.filter(running=True).values_list("pk", flat=True))
        count = engine.abandon(stuck, timezone.now(), f"cleared by {request.user} in the admin")
        if stuck:
            logger.warning("sisy running flag of task ids %s cleared by %s in the admin (%d run(s) given up)",
                           stuck, request.user, count)
        self.message_user(request, f"Running flag cleared on {len(stuck)} task(s).", messages.SUCCESS)

    def send_now(self, request: HttpRequest, task: Task) -> None:
        """Send one run of ``task`` now and say so; refuse callables that are not allowed."""
        try:
            check_allowed(task._func_info or {})
            celery_id = run_now(task, by=f"admin:{request.user}")
        except (CallableError, NotSent, ImproperlyConfigured) as exc:
            self.message_user(request, f"{task} (id {task.pk}) not sent: {exc}", messages.ERROR)
        except TaskBusy as exc:
            self.message_user(request, str(exc), messages.WARNING)
        except BrokerUnavailable as exc:  # run_now has revoked the run it claimed
            logger.warning("sisy task id=%s label=%r could not be sent now: %s", task.pk, task.label, exc)
            self.message_user(request, f"{task} (id {task.pk}) not sent: the broker is unreachable ({exc}).",
                              messages.ERROR)
        else:
            logger.info("sisy task id=%s label=%r sent now by %s (id %s)",
                        task.pk, task.label, request.user, celery_id)
            self.message_user(request, f"{task} (id {task.pk}) sent: Celery task id {celery_id}.",
                              messages.SUCCESS)

    def save_model(self, request: HttpRequest, obj: Task, form: Any, change: bool) -> None:
        """Save, then repeat the preview's warnings about the schedule (it is valid, maybe not meant)."""
        super().save_model(request, obj, form, change)
        for warning in schedules.schedule_warnings(obj.schedule):
            self.message_user(request, warning, messages.WARNING)

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        action = request.POST.get("action") if request.method == "POST" else None
        if action and action not in self.get_actions(request):
            raise PermissionDenied  # e.g. a view-only user posting "run now"
        if action and not all(map(self._is_task_id, request.POST.getlist(helpers.ACTION_CHECKBOX_NAME))):
            # Django's own actions would fail on the query (a 500): say so and do nothing.
            self.message_user(request, "The selection is not a list of task ids; nothing was done.", messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())
        if request.method == "GET":
            waiting = engine.waiting(timezone.now(), WAITING_AFTER)
            if waiting:
                self.message_user(request, f"{waiting} run(s) were published more than {WAITING_AFTER:g} s ago and no "
                                           f"worker has started them: is a worker running and listening on their "
                                           f"queues?", messages.WARNING)
        return super().changelist_view(request, extra_context)

    def get_object(self, request: HttpRequest, object_id: str, from_field: str | None = None) -> Task | None:
        """None for an id that is not a task id the column can hold (Django before 5.0 lets a number
        too large for SQLite raise instead of finding nothing)."""
        if from_field is None and not self._is_task_id(object_id):
            return None
        return super().get_object(request, object_id, from_field)

    def _is_task_id(self, value: str) -> bool:
        """True if ``value`` can be looked up as a Task primary key (a number the column can hold)."""
        try:
            pk = self.model._meta.pk.to_python(value)
        except ValidationError:
            return False
        return not isinstance(pk, int) or -(2 ** 63) <= pk < 2 ** 63

    # -- extra views --------------------------------------------------------------------

    def get_urls(self) -> list[Any]:
        name = f"{self.opts.app_label}_{self.opts.model_name}"
        return [
            path("preview/", self.admin_site.admin_view(self.preview_view), name=f"{name}_preview"),
            path("<path:object_id>/run/", self.admin_site.admin_view(self.run_now_view), name=f"{name}_run"),
            *super().get_urls(),
        ]

    def preview_view(self, request: HttpRequest) -> JsonResponse:
        """JSON: the next runs of ``?schedule=&timezone=``, or the error naming the bad field."""
        if not (self.has_add_permission(request) or self.has_change_permission(request)):
            raise PermissionDenied
        schedule = request.GET.get("schedule", "")
        zone_name = request.GET.get("timezone", "").strip()
        try:
            schedules.validate(schedule)
        except ValueError as exc:
            return JsonResponse({"field": "schedule", "error": str(exc)}, status=400)
        try:
            zone = conf.get_zone(zone_name or None)
        except ValueError as exc:
            return JsonResponse({"field": "timezone", "error": str(exc)}, status=400)
        try:
            anchor = datetime.fromisoformat(request.GET["anchor"]) if request.GET.get("anchor") else None
        except ValueError:
            anchor = None
        if anchor is not None and timezone.is_naive(anchor):
            anchor = None
        now = timezone.now()
        runs = upcoming(schedule, zone, now, anchor=anchor)
        return JsonResponse({
            "description": describe_schedule(schedule),
            "warnings": schedules.schedule_warnings(schedule),
            "timezone": str(zone),
            "runs": [{"at": run.isoformat(), "local": local_time(run, zone), "relative": relative(run, now)}
                     for run in runs],
        })

    def run_now_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """GET asks for confirmation, POST sends one run now (change permission required)."""
        task = self.get_object(request, unquote(object_id))
        if task is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if not self.has_change_permission(request, task):
            raise PermissionDenied
        change_url = reverse(f"{self.admin_site.name}:sisy_celery_task_change", args=[quote(task.pk)])
        if request.method == "POST":
            self.send_now(request, task)
            return HttpResponseRedirect(change_url)
        context = {
            **self.admin_site.each_context(request),
            "title": "Run this task now?",
            "subtitle": str(task),
            "opts": self.opts,
            "object": task,
            "change_url": change_url,
        }
        return TemplateResponse(request, "admin/sisy_celery/task/run_now_confirmation.html", context)

    # -- run history --------------------------------------------------------------------

    def render_change_form(self, request: HttpRequest, context: dict[str, Any], add: bool = False,
                           change: bool = False, form_url: str = "", obj: Task | None = None) -> HttpResponse:
        if obj is not None and obj.pk is not None:
            context.update(self.run_history(request, obj))
        return super().render_change_form(request, context, add, change, form_url, obj)

    def run_history(self, request: HttpRequest, task: Task) -> dict[str, Any]:
        """One page of the task's runs from the ledger, newest slot first, with their results from
        django-celery-results where it keeps them: two queries, no COUNT."""
        # Imported here: without django_celery_results installed, importing this module at admin
        # autodiscovery would fail with a traceback before check E010 could say what is missing.
        from django_celery_results.models import TaskResult

        try:
            page = min(max(1, int(request.GET.get("runs_page", "1"))), LAST_RUNS_PAGE)
        except ValueError:
            page = 1
        start = (page - 1) * RUNS_PER_PAGE
        rows = list(Run.objects.filter(task=task).order_by("-slot")[start:start + RUNS_PER_PAGE + 1])
        shown = rows[:RUNS_PER_PAGE]
        results = {result.task_id: result for result in TaskResult.objects.filter(
            task_id__in=[run.celery_id for run in shown]).only("id", "task_id", "status")} if shown else {}
        linked = self.admin_site.is_registered(TaskResult) and request.user.has_perm(
            "django_celery_results.view_taskresult")
        zone = zone_or_none(task) or timezone.get_current_timezone()
        now = timezone.now()
        runs = []
        for run in shown:
            result = results.get(run.celery_id)
            duration = run.finished_at - run.started_at if run.finished_at and run.started_at else None
            runs.append({
                "run": run,
                "slot": when(run.slot, zone, now),
                "lateness": f"{run.lateness.total_seconds():.3f} s" if run.lateness is not None else "",
                "duration": f"{duration.total_seconds():.3f} s" if duration is not None else "",
                "url": reverse(f"{self.admin_site.name}:django_celery_results_taskresult_change",
                               args=[quote(result.pk)]) if linked and result is not None else "",
            })
        return {
            "runs": runs,
            "runs_page": page,
            "runs_previous": page - 1 if page > 1 else None,
            "runs_next": page + 1 if len(rows) > RUNS_PER_PAGE else None,
        }


@admin.register(BeatProcess)
class BeatProcessAdmin(admin.ModelAdmin):
    """Beat processes as they last reported; read-only (stale rows may be deleted)."""

    list_display = ("ident", "hostname", "pid", "started", "last_tick_display")
    fields = ("ident", "hostname", "pid", "started", "last_tick_display", "stopped")
    readonly_fields = ("started", "last_tick_display", "stopped")
    ordering = ("-last_tick",)
    search_fields = ("ident", "hostname")

    class Media:
        css = {"all": ("sisy_celery/admin.css",)}

    @admin.display(description="Started", ordering="started_at")
    def started(self, beat: BeatProcess) -> str:
        return when(beat.started_at, dt_timezone.utc, timezone.now())

    @admin.display(description="Last tick", ordering="last_tick")
    def last_tick_display(self, beat: BeatProcess) -> str:
        return when(beat.last_tick, dt_timezone.utc, timezone.now())

    @admin.display(description="Stopped")
    def stopped(self, beat: BeatProcess) -> str:
        return when(beat.stopped_at, dt_timezone.utc, timezone.now()) if beat.stopped_at else "—"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: BeatProcess | None = None) -> bool:
        return False
