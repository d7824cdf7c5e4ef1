"""The admin's Task form: a dotted path instead of raw function info, with the API's own checks.

Users never type ``_func_info``: they name a callable (and, for a model method, the
instance's primary key) and the form builds the function info with
:func:`~sisy_celery.callables.get_func_info`, so the admin accepts exactly what
``task_with_callable`` accepts and shows its messages (a bad primary key is reported on
its own field).
"""
from __future__ import annotations

import inspect
import json
import zoneinfo
from datetime import datetime
from functools import lru_cache
from typing import Any

from django import forms
from django.contrib.admin import widgets
from django.core.exceptions import ValidationError
from django.db import models
from django.utils.html import format_html, format_html_join

from .callables import CallableError, func_from_string, get_func_info, import_attr
from .models import FAR_FUTURE, HAS_NOT_RUN, Task, check_userdata


@lru_cache(maxsize=1)
def _zone_names() -> list[str]:
    return sorted(zoneinfo.available_timezones())


class ZoneInput(forms.TextInput):
    """A text input that suggests the IANA zone names (a ``<datalist>``), still accepting typing."""

    datalist_id = "sisy-timezones"

    def __init__(self, attrs: dict[str, Any] | None = None) -> None:
        super().__init__({"list": self.datalist_id, "autocomplete": "off", **(attrs or {})})

    def render(self, name: str, value: Any, attrs: dict[str, Any] | None = None, renderer: Any = None) -> str:
        options = format_html_join("", '<option value="{}">', ((zone,) for zone in _zone_names()))
        return format_html('{}<datalist id="{}">{}</datalist>', super().render(name, value, attrs, renderer),
                           self.datalist_id, options)


def method_model(path: str) -> type[models.Model] | None:
    """The model class if ``path`` names a plain method of a Django model, else None.

    The model is the class the path goes through, not the one that defines the method: an
    inherited method (``app.models.Book.delete`` is defined on Django's ``Model``) belongs to
    the model it is reached through.
    """
    func = func_from_string(path)
    if not inspect.isfunction(func):
        return None
    owner = import_attr(path.rsplit(".", 1)[0])
    if not (inspect.isclass(owner) and issubclass(owner, models.Model) and hasattr(owner, "_meta")):
        return None
    if isinstance(inspect.getattr_static(owner, func.__name__, None), staticmethod):
        return None
    return owner


def func_info_for(path: str, pk: str) -> dict[str, Any]:
    """Function info for a dotted path typed in the admin; errors name the field to fix.

    ``func_from_string`` checks SISY_ALLOWED_MODULES before it imports anything.
    """
    model = method_model(path)
    if model is None:
        if pk:
            raise ValidationError({"pk_override": f"Leave this empty: {path!r} is not a method of a model."})
        return get_func_info(path)
    if model._meta.abstract:
        return get_func_info(path, pk_override=pk or None)  # refused, with the concrete model to use instead
    label = model._meta.label
    if not pk:
        raise ValidationError({"pk_override": (
            f"{path!r} is a method of the model {label}: enter the primary key of the instance to call it on."
        )})
    try:
        value = model._meta.pk.to_python(pk)
    except ValidationError:
        raise ValidationError({"pk_override": f"{pk!r} is not a valid primary key for {label}."}) from None
    info = get_func_info(path, pk_override=value)  # before the lookup: refuse a module that is not allowed
    if not model._default_manager.filter(pk=value).exists():
        raise ValidationError({"pk_override": f"{label} with primary key {pk!r} does not exist."})
    return info


class TaskForm(forms.ModelForm):
    """Create or edit a Task from a dotted path, a cron string and JSON user data."""

    callable = forms.CharField(
        max_length=500,
        help_text="Dotted path of a module-level function, a static or class method, or a model method, "
                  "e.g. billing.jobs.close_day. It is called with one argument, message, or none.",
    )
    pk_override = forms.CharField(
        label="Instance primary key", required=False, max_length=255,
        help_text="Only for a model method: the primary key of the instance it is called on.",
    )
    userdata = forms.CharField(
        label="User data", required=False,
        widget=forms.Textarea(attrs={"rows": 4, "class": "vLargeTextField", "spellcheck": "false"}),
        help_text="A JSON object, passed to the callable as message['userdata'].",
    )
    start_running = forms.SplitDateTimeField(
        required=False, widget=widgets.AdminSplitDateTime,
        help_text="First time the task may run; empty = right away.",
    )
    end_running = forms.SplitDateTimeField(
        required=False, widget=widgets.AdminSplitDateTime,
        help_text="The task finishes once this has passed; empty = never.",
    )

    class Meta:
        model = Task
        fields = [
            "label", "enabled", "schedule", "timezone", "start_running", "end_running", "wait_for_schedule",
            "iterations", "allow_overlap", "queue", "priority", "expires",
        ]
        widgets = {"timezone": ZoneInput, "schedule": forms.TextInput(attrs={"spellcheck": "false"})}
        help_texts = {"schedule": "Cron: minute hour day-of-month month day-of-week [second]; "
                                  "or an interval from the start time: every 90s, every 5m, every 2h."}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.func_info: dict[str, Any] = {}
        task = self.instance
        if task.pk is not None:
            info = task._func_info or {}
            self.initial.setdefault("callable", task.callable_path)
            if info.get("func_type") == "instancemethod":
                self.initial.setdefault("pk_override", info.get("model_pk"))
        self.initial.setdefault("userdata", json.dumps(task.userdata, indent=2, ensure_ascii=False))
        for name, sentinel in (("start_running", HAS_NOT_RUN), ("end_running", FAR_FUTURE)):
            if self.initial.get(name) == sentinel:
                self.initial[name] = None

    def clean_callable(self) -> str:
        return self.cleaned_data["callable"].strip()

    def clean_pk_override(self) -> str:
        return (self.cleaned_data.get("pk_override") or "").strip()

    def clean_userdata(self) -> dict[str, Any]:
        text = (self.cleaned_data.get("userdata") or "").strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValidationError(
                f"User data is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."
            ) from None
        try:
            return check_userdata(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None

    def clean_start_running(self) -> datetime:
        return self.cleaned_data.get("start_running") or HAS_NOT_RUN

    def clean_end_running(self) -> datetime:
        return self.cleaned_data.get("end_running") or FAR_FUTURE

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        path = cleaned.get("callable")
        if path and "pk_override" in cleaned:
            try:
                self.func_info = func_info_for(path, cleaned["pk_override"])
            except CallableError as exc:
                self.add_error("callable", str(exc))
            except ValidationError as exc:
                self.add_error(None, exc)
        return cleaned

    def save(self, commit: bool = True) -> Task:
        self.instance._func_info = self.func_info
        self.instance.userdata = self.cleaned_data["userdata"]
        return super().save(commit)
