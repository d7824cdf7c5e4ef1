"""Function info: how a callable is stored in a Task row and found again in a worker.

A callable is kept as a small JSON dict (``func_type``, ``module_name``,
``func_path`` …) instead of a pickle, so a row can be read, audited and edited
safely; a worker imports it again by dotted path. Only module-level functions,
static and class methods of module-level classes, and methods of saved Django
model instances can be found that way, so everything else is refused up front.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from django.conf import settings
from django.core.exceptions import ValidationError

from . import conf

FUNC_TYPES = ("function", "staticmethod", "classmethod", "instancemethod")


class CallableError(ValueError):
    """A callable that cannot be stored, found or allowed; the message says how to fix it."""


def is_allowed(module_name: str, allowed: list[str] | None = None) -> bool:
    """True if ``module_name`` is under one of the allowed prefixes (None: those of SISY_ALLOWED_MODULES)."""
    prefixes = conf.allowed_modules() if allowed is None else allowed
    if prefixes is None:
        return True
    return any(module_name == p or module_name.startswith(p + ".") for p in prefixes)


def check_allowed(info: dict[str, Any]) -> None:
    """Refuse function info whose paths, or the module that really defines its code, are not allowed.

    The stored paths say where a callable is *reached*; its code may be defined elsewhere (a
    method inherited from a base class, a function re-exported or given another ``__module__``),
    so the code is found and its own module judged as well. Only paths already admitted are
    imported for that.
    """
    if conf.allowed_modules() is None:
        return
    module = info.get("module_name", "")
    path = info.get("func_path", "")
    if not isinstance(module, str) or not is_allowed(module):
        _refuse(path, f"module {module!r}")
    for key in ("func_path", "class_path"):
        value = info.get(key, "")
        if (key == "func_path" or key in info) and (not isinstance(value, str) or not is_allowed(value)):
            _refuse(path, "its path" if key == "func_path" else f"class {value!r}")
    defined_in = defining_module(_code_of(info))
    if not isinstance(defined_in, str) or not is_allowed(defined_in):
        _refuse(path, f"its code, defined in module {defined_in!r},")


def _code_of(info: dict[str, Any]) -> Any:
    """The function object whose code runs for ``info`` (a model method is looked up on its class)."""
    if info.get("func_type") == "instancemethod":
        owner = import_attr(info.get("class_path"))
        return inspect.getattr_static(owner, info.get("func_name") or "", None)
    return func_from_string(info.get("func_path"))


def defining_module(func: Any) -> str | None:
    """The module whose code ``func`` runs: the module of its globals, not its ``__module__`` label.

    A wrapper made with ``functools.wraps`` is judged by the function it decorates (the code
    written in the scheduled module); a decorator library need not be allowed for it.
    """
    func = getattr(func, "__func__", func)
    try:
        inner = inspect.unwrap(func)
    except ValueError:  # a __wrapped__ cycle
        inner = func
    code = inner if inspect.isfunction(inner) else func
    if not inspect.isfunction(code):
        return None
    name = code.__globals__.get("__name__")
    return name if isinstance(name, str) else None


def _refuse(path: Any, what: str) -> None:
    allowed = conf.allowed_modules()
    if not allowed and getattr(settings, "SISY_ALLOWED_MODULES", None) is None:
        fix = "SISY_ALLOWED_MODULES is not set and DEBUG is off, so no module is allowed. List your job modules in it."
    else:
        fix = "Add its module prefix to that setting."
    raise CallableError(f"Callable {path!r} is not allowed: {what} is not under SISY_ALLOWED_MODULES {allowed!r}. {fix}")


def call_arity(func: Callable[..., Any], path: str) -> int:
    """1 if ``func`` is called with ``message``, 0 if with nothing; CallableError otherwise."""
    if inspect.iscoroutinefunction(func) or inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        # Calling one only creates a coroutine or generator: the body would silently never run.
        raise CallableError(
            f"{path!r} is an async or generator function; a worker calls it and would never run its "
            f"body. Schedule a plain function (wrap async code with asgiref's async_to_sync)."
        )
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        raise CallableError(f"{path!r} is not a callable object whose signature can be read.") from None
    positional = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for args in ((object(),), ()):
        # Exactly (message) or (): a further positional parameter, even with a default, means the
        # callable is something else (Task.run_once(the_callable, userdata=None) binds one argument too).
        if len(positional) > len(args):
            continue
        try:
            signature.bind(*args)
        except TypeError:
            continue
        return len(args)
    raise CallableError(
        f"{path!r} has the signature {signature}; a scheduled callable must take one argument "
        f"(message) or none, e.g. 'def job(message): ...'. Other parameters, even with defaults, are "
        f"never filled in: make them keyword-only (after *) or read them from message['userdata']."
    )


def _is_celery_task(obj: Any) -> bool:
    """A Celery task object (``@shared_task``, ``@app.task``), also behind shared_task's lazy proxy."""
    from celery.app.task import Task as CeleryTask

    try:
        return isinstance(obj, CeleryTask)
    except Exception:  # a lazy proxy that cannot be evaluated is no task that could be scheduled
        return False


def _refuse_celery_task(obj: Any, path: str) -> None:
    if _is_celery_task(obj):
        raise CallableError(
            f"{path!r} is a Celery task (@shared_task or @app.task), not a plain function; sisy runs "
            f"callables inside its own Celery task and does not schedule task objects. Schedule a plain "
            f"module-level function holding the body instead (def job(message): ...) and call it from the "
            f"Celery task if you still need that; or put the Celery task itself in Celery's beat_schedule, "
            f"which runs beside sisy's tasks."
        )


def get_func_info(the_callable: Any, pk_override: Any = None) -> dict[str, Any]:
    """Encode a callable or dotted path as function info, refusing what a worker could not run."""
    if isinstance(the_callable, str):
        func = func_from_string(the_callable)
        if pk_override is not None:
            return _instance_info_from_path(the_callable, func, pk_override)
        return get_func_info(func)
    info = _encode(the_callable, pk_override)
    check_allowed(info)
    return info


def _instance_info_from_path(path: str, func: Any, pk: Any) -> dict[str, Any]:
    """A dotted ``module.Model.method`` plus a primary key (used in data migrations)."""
    owner = import_attr(path.rsplit(".", 1)[0])
    if not _is_model_class(owner):
        _refuse_pk_override(path)
    # The model's own dotted path, as a worker will rebuild it (``path`` may go through a re-export).
    name = path.rsplit(".", 1)[1]
    info = _model_method_info(owner, name, pk, f"{owner.__module__}.{owner.__qualname__}.{name}")
    check_allowed(info)
    return info


def _refuse_pk_override(path: str) -> None:
    raise CallableError(
        f"pk_override needs a Django model instance method, e.g. 'app.models.Model.method' or "
        f"Model.method; {path!r} is not one. Leave pk_override out for functions, static and class methods."
    )


def _model_method_info(cls: type, name: str, pk: Any, path: str) -> dict[str, Any]:
    """Function info for ``cls.name`` called on the row ``pk``, after checking all three."""
    _check_module_level(cls, path)
    if cls._meta.abstract:
        raise CallableError(
            f"{path!r} is a method of the abstract model {cls.__qualname__}, which has no rows; "
            f"name it through the concrete model, e.g. 'app.models.Concrete.{name}'."
        )
    if not inspect.isfunction(inspect.getattr_static(cls, name, None)):
        # A static or class method reached with a pk would be looked up on an instance and fail later.
        raise CallableError(
            f"{path!r} is not an instance method of {cls._meta.label}: a model row's method must be "
            f"defined as 'def {name or 'name'}(self, message)' (or '(self)'). Static and class methods "
            f"need no pk_override."
        )
    try:
        pk = cls._meta.pk.to_python(pk)
    except ValidationError as exc:
        raise CallableError(
            f"{pk!r} is not a valid primary key for {cls._meta.label} ({'; '.join(exc.messages)})."
        ) from None
    if pk is None:
        raise CallableError(
            f"{cls.__qualname__} instance is not saved: save it before scheduling its "
            f"method {name!r}, or pass pk_override."
        )
    info = _base("instancemethod", cls.__module__, name, path)
    info.update(
        class_name=cls.__qualname__,
        class_path=f"{cls.__module__}.{cls.__qualname__}",
        model=cls._meta.label,
        model_pk=_json_pk(pk),
    )
    _check_method_signature(getattr(cls, name), path)
    return info


def _encode(obj: Any, pk_override: Any) -> dict[str, Any]:
    if inspect.ismethod(obj):
        owner = obj.__self__
        func = obj.__func__
        if inspect.isclass(owner):
            _check_module_level(owner, _path_of(func))
            if pk_override is not None:
                _refuse_pk_override(_path_of(func))
            path = f"{owner.__module__}.{owner.__qualname__}.{func.__name__}"
            info = _base("classmethod", owner.__module__, func.__name__, path)
            info.update(class_name=owner.__qualname__, class_path=f"{owner.__module__}.{owner.__qualname__}")
            call_arity(obj, path)
            _check_round_trip(info, obj)
            return info
        cls = type(owner)
        if not _is_model_class(cls):
            raise CallableError(
                f"{_path_of(func)!r} is a method of a {cls.__qualname__} object; only methods of saved "
                f"Django model instances can be scheduled (a worker loads the row by primary key)."
            )
        cls = _real_model(cls)
        pk = owner.pk if pk_override is None else pk_override
        path = f"{cls.__module__}.{cls.__qualname__}.{func.__name__}"
        return _model_method_info(cls, func.__name__, pk, path)
    if inspect.isfunction(obj):
        path = _path_of(obj)
        qualname = obj.__qualname__
        if "<lambda>" in qualname or "<locals>" in qualname:
            raise CallableError(
                f"{path!r} is a lambda or a function defined inside another function; a worker can "
                f"only import module-level callables. Define it at module level and schedule that."
            )
        parts = qualname.split(".")
        if len(parts) > 2:
            raise CallableError(
                f"{path!r} belongs to a nested class; a worker can only find methods of module-level "
                f"classes. Move the class to module level."
            )
        if len(parts) == 2:
            owner = import_attr(f"{obj.__module__}.{parts[0]}")
            if pk_override is not None:
                if not _is_model_class(owner):
                    _refuse_pk_override(path)
                return _model_method_info(owner, obj.__name__, pk_override, path)
            if not isinstance(inspect.getattr_static(owner, obj.__name__, None), staticmethod):
                raise CallableError(
                    f"{path!r} is an instance method reached through its class; schedule the bound "
                    f"method of a saved model instance (instance.{obj.__name__}) or pass pk_override."
                )
            info = _base("staticmethod", obj.__module__, obj.__name__, path)
            info.update(class_name=parts[0], class_path=f"{obj.__module__}.{parts[0]}")
        else:
            if pk_override is not None:
                _refuse_pk_override(path)
            info = _base("function", obj.__module__, obj.__name__, path)
        call_arity(obj, path)
        _check_round_trip(info, obj)
        return info
    _refuse_celery_task(obj, getattr(obj, "name", None) or repr(obj))
    raise CallableError(
        f"{obj!r} is not a function or method. Schedule a module-level function, a static or class "
        f"method, a saved model instance's method, or a dotted path to one of those."
    )


def _base(func_type: str, module: str, name: str, path: str) -> dict[str, Any]:
    return {"func_type": func_type, "module_name": module, "func_name": name, "func_path": path}


def _json_pk(pk: Any) -> Any:
    if isinstance(pk, (int, str)) and not isinstance(pk, bool):
        return pk
    return str(pk)


def _path_of(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _is_model_class(obj: Any) -> bool:
    from django.db import models

    # Django's Model itself has no _meta: its methods are reached through a real model.
    return inspect.isclass(obj) and issubclass(obj, models.Model) and hasattr(obj, "_meta")


def _real_model(cls: type) -> type:
    """Map a migration's historical model to the project's real model class."""
    if cls.__module__ == "__fake__":
        from django.apps import apps

        return apps.get_model(cls._meta.label)
    return cls


def _check_module_level(cls: type, path: str) -> None:
    if "." in cls.__qualname__ or "<locals>" in cls.__qualname__:
        raise CallableError(
            f"{path!r} belongs to a nested or local class; a worker can only find methods of "
            f"module-level classes. Move the class to module level."
        )


def _check_method_signature(unbound: Any, path: str) -> None:
    """An instance method is called as ``instance.method(message)`` or ``instance.method()``."""
    if not inspect.isfunction(unbound):
        raise CallableError(f"{path!r} is not a plain method of the model.")
    call_arity(unbound.__get__(object()), path)


def _check_round_trip(info: dict[str, Any], obj: Any) -> None:
    """Refuse callables whose dotted path leads somewhere else (e.g. decorated without wraps)."""
    found = func_from_string(info["func_path"])
    if getattr(found, "__func__", found) is not getattr(obj, "__func__", obj):
        raise CallableError(
            f"{info['func_path']!r} does not lead back to the callable given (is it wrapped by a "
            f"decorator without functools.wraps, or shadowed?). Schedule the module-level name."
        )


def import_attr(path: str) -> Any:
    """Import the longest importable module prefix of ``path`` and walk the rest as attributes."""
    if not isinstance(path, str) or not path or len(path) > 500:
        raise CallableError(f"{path!r} is not a dotted path such as 'billing.jobs.close_day'.")
    parts = path.split(".")
    if any(not p.isidentifier() for p in parts):
        raise CallableError(
            f"{path!r} is not a dotted path of Python names such as 'billing.jobs.close_day' "
            f"(relative paths and other characters are not accepted)."
        )
    for name in parts:
        if name.startswith("__"):
            raise CallableError(f"{path!r} names a private attribute {name!r}; that is not allowed.")
    obj: Any = None
    cut = 0
    # Shortest prefix first, so an error names the module that really failed to import.
    for index in range(1, len(parts) + 1):
        module_name = ".".join(parts[:index])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                break  # no such module: the rest of the path names attributes
            raise CallableError(f"Importing {module_name!r} failed: {exc}. Fix the module.") from exc
        except Exception as exc:  # the module exists but fails to import
            raise CallableError(
                f"Importing {module_name!r} raised {type(exc).__name__}: {exc}. Fix the module."
            ) from exc
        obj, cut = module, index
    if obj is None:
        raise CallableError(f"Module {parts[0]!r} not found (from {path!r}). Check the dotted path and PYTHONPATH.")
    for index, name in enumerate(parts[cut:], start=cut):
        obj = _member(obj, name, f"{'.'.join(parts[:index])!r} (from {path!r})")
    return obj


def _member(obj: Any, name: str, where: str) -> Any:
    """``getattr(obj, name)`` that never evaluates a property or other descriptor of an instance."""
    try:
        static = inspect.getattr_static(obj, name)
    except AttributeError:
        raise CallableError(f"{name!r} is not a member of {where}. Check the spelling of the dotted path.") from None
    if inspect.ismodule(obj) or inspect.isclass(obj):
        return getattr(obj, name)
    if inspect.isfunction(static):
        return static.__get__(obj)
    if hasattr(type(static), "__get__"):
        raise CallableError(f"{name!r} of {where} is a {type(static).__name__}, not a method; it is not evaluated.")
    return static


def func_from_string(path: str) -> Callable[..., Any]:
    """Resolve a dotted path to a schedulable callable, with a clear error for everything else."""
    if not isinstance(path, str) or path.count(".") < 1:
        raise CallableError(
            f"{path!r} is not a full dotted path: name the module and the callable, "
            f"e.g. 'billing.jobs.close_day'."
        )
    if not is_allowed(path):
        # Checked before importing anything: importing a module runs its code.
        _refuse(path, "its path")
    obj = import_attr(path)
    if inspect.ismodule(obj):
        raise CallableError(f"{path!r} is a module; name a function inside it.")
    if inspect.isclass(obj):
        raise CallableError(f"{path!r} is a class; name a function or method, not the class.")
    if not (inspect.isfunction(obj) or inspect.ismethod(obj)):
        _refuse_celery_task(obj, path)
        raise CallableError(
            f"{path!r} ({type(obj).__name__}) is not a function or method that can be scheduled."
        )
    return obj


def resolve(info: dict[str, Any]) -> Callable[..., Any]:
    """Find the callable function info stands for (in a worker); CallableError if it is gone."""
    if not isinstance(info, dict) or info.get("func_type") not in FUNC_TYPES:
        raise CallableError(f"Function info {info!r} is not valid: recreate the task with task_with_callable.")
    check_allowed(info)
    if info["func_type"] != "instancemethod":
        func = func_from_string(info.get("func_path"))
        _check_same(info, get_func_info(func))
        return func
    cls = import_attr(info.get("class_path"))
    if not _is_model_class(cls):
        raise CallableError(f"{info['class_path']!r} is no longer a Django model.")
    name = info.get("func_name", "")
    path = f"{cls.__module__}.{cls.__qualname__}.{name}"
    _check_same(info, _model_method_info(cls, name, info.get("model_pk"), path))
    try:
        instance = cls._default_manager.get(pk=info["model_pk"])
    except cls.DoesNotExist:
        raise CallableError(
            f"{cls._meta.label} with pk {info['model_pk']!r} no longer exists, so "
            f"{info['func_path']!r} cannot run. Delete this task or point it at an existing row."
        ) from None
    return getattr(instance, info["func_name"])


def _check_same(stored: dict[str, Any], found: dict[str, Any]) -> None:
    """The callable found must be the one the row names (a hand-edited row cannot point elsewhere)."""
    keys = ("func_type", "module_name", "func_name", "func_path", "class_path")
    if any(stored.get(key) != found.get(key) for key in keys) or str(stored.get("model_pk")) != str(found.get("model_pk")):
        raise CallableError(
            f"Function info {stored!r} does not describe the callable it leads to ({found!r}); "
            f"recreate the task with task_with_callable."
        )
