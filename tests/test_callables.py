"""Function info: encoding callables for a Task row and finding them again in a worker."""
from __future__ import annotations

import re
import sys
import uuid

import pytest
from django.test import override_settings

from sisy_celery.callables import (
    CallableError, call_arity, check_allowed, func_from_string, get_func_info, is_allowed, resolve,
)
from tests.testapp import jobs
from tests.testapp.models import CALLS, SlugWidget, UuidWidget, Widget

JOBS = "tests.testapp.jobs"
MODELS = "tests.testapp.models"


def refused(thing, message: str, **kwargs) -> str:
    """Assert get_func_info refuses ``thing`` with a message containing ``message``; return it."""
    with pytest.raises(CallableError) as info:
        get_func_info(thing, **kwargs)
    assert message in str(info.value)
    return str(info.value)


def instance_info(model: type, pk, name: str = "touch") -> dict:
    return {
        "func_type": "instancemethod", "module_name": MODELS, "func_name": name,
        "func_path": f"{MODELS}.{model.__name__}.{name}", "class_name": model.__name__,
        "class_path": f"{MODELS}.{model.__name__}", "model": f"testapp.{model.__name__}", "model_pk": pk,
    }


# -- what is accepted ----------------------------------------------------------------------


FUNCTION_INFO = {"func_type": "function", "module_name": JOBS, "func_name": "job", "func_path": f"{JOBS}.job"}
STATIC_INFO = {
    "func_type": "staticmethod", "module_name": JOBS, "func_name": "static_job",
    "func_path": f"{JOBS}.Holder.static_job", "class_name": "Holder", "class_path": f"{JOBS}.Holder",
}
CLASS_INFO = {
    "func_type": "classmethod", "module_name": JOBS, "func_name": "class_job",
    "func_path": f"{JOBS}.Holder.class_job", "class_name": "Holder", "class_path": f"{JOBS}.Holder",
}


@pytest.mark.parametrize("thing, expected", [
    (jobs.job, FUNCTION_INFO),
    (f"{JOBS}.job", FUNCTION_INFO),
    (jobs.Holder.static_job, STATIC_INFO),
    (f"{JOBS}.Holder.static_job", STATIC_INFO),
    (jobs.Holder.class_job, CLASS_INFO),
    (f"{JOBS}.Holder.class_job", CLASS_INFO),
])
def test_module_level_callables_and_their_dotted_paths(thing, expected):
    assert get_func_info(thing) == expected


def test_zero_argument_function():
    info = get_func_info(jobs.no_params)
    assert info == {"func_type": "function", "module_name": JOBS, "func_name": "no_params",
                    "func_path": f"{JOBS}.no_params"}
    assert call_arity(resolve(info), info["func_path"]) == 0


def test_function_with_defaults_is_called_with_message():
    assert call_arity(jobs.with_defaults, "x") == 1
    assert get_func_info(jobs.with_defaults)["func_name"] == "with_defaults"


def test_decorated_with_functools_wraps_is_accepted():
    info = get_func_info(jobs.decorated_with_wraps)
    assert info["func_path"] == f"{JOBS}.decorated_with_wraps"
    resolve(info)({"task": None})
    assert CALLS == [("decorated", {"task": None})]


def test_static_and_class_methods_of_a_model():
    assert get_func_info(Widget.static_job)["func_type"] == "staticmethod"
    assert get_func_info(f"{MODELS}.Widget.class_job") == {
        "func_type": "classmethod", "module_name": MODELS, "func_name": "class_job",
        "func_path": f"{MODELS}.Widget.class_job", "class_name": "Widget", "class_path": f"{MODELS}.Widget",
    }


@pytest.mark.django_db
@pytest.mark.parametrize("make, stored_pk", [
    (lambda: Widget.objects.create(name="w"), lambda obj: obj.pk),
    (lambda: UuidWidget.objects.create(id=uuid.UUID(int=7)), lambda obj: "00000000-0000-0000-0000-000000000007"),
    (lambda: SlugWidget.objects.create(slug="s-1"), lambda obj: "s-1"),
])
def test_bound_methods_of_saved_instances(make, stored_pk):
    obj = make()
    info = get_func_info(obj.touch)
    assert info == instance_info(type(obj), stored_pk(obj))
    found = resolve(info)
    assert found.__self__ == obj and found.__func__ is type(obj).touch
    found({"k": 1})
    assert len(CALLS) == 1


@pytest.mark.django_db
def test_bound_method_without_parameters_and_inherited_from_an_abstract_model():
    widget = Widget.objects.create(name="w")
    info = get_func_info(widget.no_args)
    assert call_arity(resolve(info), info["func_path"]) == 0
    inherited = get_func_info(widget.base_touch)
    assert inherited["func_path"] == f"{MODELS}.Widget.base_touch"
    resolve(inherited)({})
    assert CALLS == [("base_touch", widget.pk)]


def test_method_of_a_module_level_instance_through_a_dotted_path():
    assert get_func_info(f"{JOBS}.some_widget.touch") == instance_info(Widget, 1)


def test_bound_method_does_not_evaluate_properties():
    # Widget.exploding raises if evaluated; encoding and resolving never touch it.
    widget = Widget(pk=3, name="w")
    assert get_func_info(widget.touch)["model_pk"] == 3


# -- pk_override -----------------------------------------------------------------------------


@pytest.mark.parametrize("thing, pk, model, stored", [
    (f"{MODELS}.Widget.touch", 5, Widget, 5),
    (f"{MODELS}.Widget.touch", "5", Widget, 5),
    (f"{MODELS}.Widget.no_args", 6, Widget, 6),
    (f"{MODELS}.UuidWidget.touch", uuid.UUID(int=5), UuidWidget, "00000000-0000-0000-0000-000000000005"),
    (f"{MODELS}.UuidWidget.touch", "00000000000000000000000000000005", UuidWidget,
     "00000000-0000-0000-0000-000000000005"),
    (f"{MODELS}.SlugWidget.touch", "abc", SlugWidget, "abc"),
    (Widget.touch, 7, Widget, 7),
    (UuidWidget.touch, uuid.UUID(int=9), UuidWidget, "00000000-0000-0000-0000-000000000009"),
    (Widget(name="unsaved").touch, 9, Widget, 9),
])
def test_pk_override_for_strings_and_callables(thing, pk, model, stored):
    info = get_func_info(thing, pk_override=pk)
    name = "no_args" if "no_args" in str(thing) else "touch"
    assert info == instance_info(model, stored, name)


def test_pk_override_through_a_reexported_path_stores_the_models_own_path():
    info = get_func_info(f"{JOBS}.models.Widget.touch", pk_override=1)
    assert info["func_path"] == f"{MODELS}.Widget.touch"
    assert info["class_path"] == f"{MODELS}.Widget"


@pytest.mark.parametrize("thing", [
    jobs.job, f"{JOBS}.job", jobs.Holder.static_job, jobs.Holder.class_job, f"{JOBS}.Holder.class_job",
    jobs.Holder.plain_method, f"{JOBS}.Holder.plain_method",
])
def test_pk_override_is_refused_where_it_means_nothing(thing):
    # The original silently ignored it for anything but a string.
    refused(thing, "pk_override needs a Django model instance method, e.g. 'app.models.Model.method'",
            pk_override=1)


@pytest.mark.parametrize("thing", [Widget.static_job, f"{MODELS}.Widget.static_job", f"{MODELS}.Widget.class_job"])
def test_pk_override_with_a_static_or_class_method_of_a_model_is_refused(thing):
    message = refused(thing, "is not an instance method of testapp.Widget", pk_override=1)
    assert "Static and class methods need no pk_override" in message


@pytest.mark.parametrize("thing, pk, message", [
    (f"{MODELS}.Widget.touch", "abc", "'abc' is not a valid primary key for testapp.Widget"),
    (f"{MODELS}.UuidWidget.touch", "not-a-uuid", "'not-a-uuid' is not a valid primary key for testapp.UuidWidget"),
    (Widget.touch, [1], "[1] is not a valid primary key for testapp.Widget"),
])
def test_pk_override_must_fit_the_primary_key(thing, pk, message):
    refused(thing, message, pk_override=pk)


def test_pk_override_with_an_abstract_models_method_is_refused():
    from tests.testapp.models import Touchable

    refused(Touchable.base_touch, "is a method of the abstract model Touchable, which has no rows", pk_override=1)


def test_pk_override_checks_the_signature():
    refused(f"{MODELS}.Widget.two_args", "has the signature (message, extra); a scheduled callable must take "
            "one argument (message) or none", pk_override=1)


# -- what is refused -------------------------------------------------------------------------


LOCAL_FUNCTION = "is a lambda or a function defined inside another function; a worker can only import module-level"
NESTED_CLASS = "belongs to a nested class; a worker can only find methods of module-level classes"
NOT_A_FUNCTION = "is not a function or method. Schedule a module-level function, a static or class method"


@pytest.mark.parametrize("thing, message", [
    (jobs.lam, f"'{JOBS}.<lambda>' {LOCAL_FUNCTION}"),
    (jobs.some_widget, NOT_A_FUNCTION),
    (lambda message: None, LOCAL_FUNCTION),
    (jobs.make_closure(), f"'{JOBS}.make_closure.<locals>.inner' {LOCAL_FUNCTION}"),
    (jobs.decorated_without_wraps, f"'{JOBS}._shout.<locals>.wrapper' {LOCAL_FUNCTION}"),
    (jobs.Holder.Inner.nested, f"'{JOBS}.Holder.Inner.nested' {NESTED_CLASS}"),
    (f"{JOBS}.Holder.Inner.nested", f"'{JOBS}.Holder.Inner.nested' {NESTED_CLASS}"),
    (jobs.Holder().plain_method, f"'{JOBS}.Holder.plain_method' is a method of a Holder object; only methods of "
                                 "saved Django model instances can be scheduled"),
    (jobs.Holder.plain_method, f"'{JOBS}.Holder.plain_method' is an instance method reached through its class; "
                               "schedule the bound method of a saved model instance (instance.plain_method)"),
    (f"{MODELS}.Widget.touch", f"'{MODELS}.Widget.touch' is an instance method reached through its class"),
    (Widget(name="unsaved").touch, "Widget instance is not saved: save it before scheduling its method 'touch', "
                                   "or pass pk_override."),
    (jobs.two_params, f"'{JOBS}.two_params' has the signature (message, other); a scheduled callable must take "
                      "one argument (message) or none, e.g. 'def job(message): ...'."),
    (f"{JOBS}.two_params", f"'{JOBS}.two_params' has the signature (message, other)"),
    (jobs.keyword_only, f"'{JOBS}.keyword_only' has the signature (*, message)"),
    (Widget(pk=1).two_args, f"'{MODELS}.Widget.two_args' has the signature (message, extra)"),
    (jobs.async_job, f"'{JOBS}.async_job' is an async or generator function; a worker calls it and would never "
                     "run its body"),
    (jobs.generator_job, f"'{JOBS}.generator_job' is an async or generator function"),
    (jobs.old_shadowed, f"'{JOBS}.shadowed' does not lead back to the callable given"),
    (jobs, f"<module '{JOBS}'"),
    (jobs, NOT_A_FUNCTION),
    (jobs.Holder, NOT_A_FUNCTION),
    (jobs.callable_object, NOT_A_FUNCTION),
    (jobs.partial_job, NOT_A_FUNCTION),
    (print, NOT_A_FUNCTION),
    (42, NOT_A_FUNCTION),
    (None, NOT_A_FUNCTION),
])
def test_refused_callables(thing, message):
    refused(thing, message)


@pytest.mark.parametrize("path, message", [
    (JOBS, f"'{JOBS}' is a module; name a function inside it."),
    ("os.path", "'os.path' is a module; name a function inside it."),
    (f"{JOBS}.Holder", f"'{JOBS}.Holder' is a class; name a function or method, not the class."),
    (f"{MODELS}.Widget", f"'{MODELS}.Widget' is a class"),
    ("os", "'os' is not a full dotted path: name the module and the callable, e.g. 'billing.jobs.close_day'."),
    ("__import__", "'__import__' is not a full dotted path"),
    ("", "'' is not a full dotted path"),
    ("..x", "'..x' is not a dotted path of Python names such as 'billing.jobs.close_day' (relative paths and "
            "other characters are not accepted)."),
    (".tests.testapp.jobs.job", "is not a dotted path of Python names"),
    (f"{JOBS}..job", "is not a dotted path of Python names"),
    (f" {JOBS}.job", "is not a dotted path of Python names"),
    (f"{JOBS}.job()", "is not a dotted path of Python names"),
    ("os.system; rm", "is not a dotted path of Python names"),
    ("a." * 300 + "b", "is not a dotted path such as 'billing.jobs.close_day'."),
    ("sisy_no_such_module.job", "Module 'sisy_no_such_module' not found (from 'sisy_no_such_module.job'). "
                                "Check the dotted path and PYTHONPATH."),
    ("tests.testapp.nope.job", "'nope' is not a member of 'tests.testapp' (from 'tests.testapp.nope.job'). "
                               "Check the spelling of the dotted path."),
    (f"{JOBS}.nope", f"'nope' is not a member of '{JOBS}' (from '{JOBS}.nope')."),
    (f"{JOBS}.Holder.nope", f"'nope' is not a member of '{JOBS}.Holder'"),
    ("tests.testapp.broken.job", "Importing 'tests.testapp.broken' raised RuntimeError: broken on purpose. "
                                 "Fix the module."),
    ("tests.testapp.bad_import.job", "Importing 'tests.testapp.bad_import' failed: No module named "
                                     "'sisy_no_such_dependency'. Fix the module."),
    ("builtins.eval", "'builtins.eval' (builtin_function_or_method) is not a function or method that can be "
                      "scheduled."),
    ("builtins.exec", "'builtins.exec' (builtin_function_or_method) is not a function or method"),
    ("os.system", "'os.system' (builtin_function_or_method) is not a function or method"),
    ("builtins.__import__", "'builtins.__import__' names a private attribute '__import__'; that is not allowed."),
    (f"{JOBS}.job.__globals__", "names a private attribute '__globals__'"),
    (f"{JOBS}.__builtins__", "names a private attribute '__builtins__'"),
    (f"{JOBS}.models.CALLS", f"'{JOBS}.models.CALLS' (list) is not a function or method"),
    (f"{MODELS}.Widget.objects", "(Manager) is not a function or method"),
    (f"{MODELS}.Widget.exploding", f"'{MODELS}.Widget.exploding' (property) is not a function or method"),
    (f"{JOBS}.some_widget.exploding", f"'exploding' of '{JOBS}.some_widget' (from '{JOBS}.some_widget.exploding') "
                                      "is a property, not a method; it is not evaluated."),
    (f"{JOBS}.some_widget.nope", f"'nope' is not a member of '{JOBS}.some_widget'"),
])
def test_refused_dotted_paths(path, message):
    with pytest.raises(CallableError) as info:
        func_from_string(path)
    assert message in str(info.value)
    refused(path, message)


@pytest.mark.parametrize("path", [None, 42, b"tests.testapp.jobs.job"])
def test_refused_non_string_paths(path):
    with pytest.raises(CallableError, match="is not a full dotted path"):
        func_from_string(path)


def test_callable_error_is_a_value_error():
    # The original raised ValueError; callers catching that keep working.
    with pytest.raises(ValueError, match="is a lambda"):
        get_func_info(jobs.lam)


def test_allowing_every_module_accepts_any_importable_python_function():
    with override_settings(SISY_ALLOWED_MODULES="__all__"):
        assert get_func_info("os.path.join")["func_path"] == "posixpath.join"
    with override_settings(SISY_ALLOWED_MODULES=None, DEBUG=True):
        assert get_func_info("os.path.join")["func_path"] == "posixpath.join"


@pytest.mark.parametrize("thing", [jobs.job, f"{JOBS}.job", "os.path.join"])
def test_without_an_allow_list_and_debug_off_nothing_is_accepted(thing):
    # A web server that never runs the system checks (E008) still refuses every callable.
    with override_settings(SISY_ALLOWED_MODULES=None, DEBUG=False):
        message = refused(thing, "is not under SISY_ALLOWED_MODULES []. SISY_ALLOWED_MODULES is not set and DEBUG "
                                 "is off, so no module is allowed.")
        with pytest.raises(CallableError, match="is not set and DEBUG is off"):
            check_allowed(FUNCTION_INFO)
    assert message.startswith("Callable ")


# -- the allow-list --------------------------------------------------------------------------------


@pytest.mark.parametrize("module, prefixes, allowed", [
    ("tests.testapp.jobs", ["tests.testapp"], True),
    ("tests.testapp.jobs", ["tests.testapp.jobs"], True),
    ("tests.testapp", ["tests.testapp"], True),
    ("tests.testapp.jobs", ["tests"], True),
    ("tests.testapp.jobs", ["tests.test"], False),
    ("tests.testapp.jobs", ["tests.testapp.jobs.job"], False),
    ("tests.testapp.jobs", ["tests.testapp."], False),
    ("tests.testapp.jobs", [], False),
    ("tests.testapp.jobs", ["billing", "tests.testapp"], True),
    ("posixpath", ["os"], False),
])
def test_is_allowed_matches_on_module_boundaries(module, prefixes, allowed):
    assert is_allowed(module, prefixes) is allowed


def test_is_allowed_follows_the_setting():
    assert is_allowed("anything.at.all")  # the test settings allow every module ('__all__')
    with override_settings(SISY_ALLOWED_MODULES=None, DEBUG=False):
        assert not is_allowed("tests.testapp.jobs")
    with override_settings(SISY_ALLOWED_MODULES=None, DEBUG=True):
        assert is_allowed("anything.at.all")
    with override_settings(SISY_ALLOWED_MODULES=["tests.testapp"]):
        assert is_allowed("tests.testapp.jobs")
        assert not is_allowed("tests.testapps.jobs")
        assert not is_allowed("os")


@pytest.mark.parametrize("thing", [jobs.job, f"{JOBS}.job", jobs.Holder.class_job, f"{JOBS}.Holder.static_job"])
@pytest.mark.parametrize("prefixes", [["tests.testapp"], ("tests.testapp.jobs",), ["billing", "tests"]])
def test_allow_list_admits(thing, prefixes):
    with override_settings(SISY_ALLOWED_MODULES=prefixes):
        assert get_func_info(thing)["module_name"] == JOBS


@pytest.mark.parametrize("thing", [jobs.job, f"{JOBS}.job", jobs.Holder.class_job, f"{JOBS}.Holder.static_job"])
def test_allow_list_refuses_a_prefix_that_is_not_a_module_boundary(thing):
    with override_settings(SISY_ALLOWED_MODULES=["tests.test"]):
        message = refused(thing, "is not under SISY_ALLOWED_MODULES ['tests.test']. Add its module prefix to "
                                 "that setting.")
        assert message.startswith("Callable 'tests.testapp.jobs.")


@pytest.mark.parametrize("path", ["os.system", "builtins.eval", "os.path.join", "subprocess.run"])
def test_allow_list_refuses_other_modules(path):
    with override_settings(SISY_ALLOWED_MODULES=["tests.testapp"]):
        refused(path, f"Callable {path!r} is not allowed: its path is not under SISY_ALLOWED_MODULES ['tests.testapp']")


def test_allow_list_checks_the_module_a_function_really_lives_in():
    # 'os' is allowed, but os.path.join lives in posixpath, which is not.
    with override_settings(SISY_ALLOWED_MODULES=["os"]):
        refused("os.path.join", "Callable 'posixpath.join' is not allowed: its path is not under "
                                "SISY_ALLOWED_MODULES ['os']")


def test_allow_list_is_checked_before_importing():
    assert "tests.testapp.import_probe" not in sys.modules
    with override_settings(SISY_ALLOWED_MODULES=["tests.testapp.jobs"]):
        refused("tests.testapp.import_probe.job", "Callable 'tests.testapp.import_probe.job' is not allowed")
    assert "tests.testapp.import_probe" not in sys.modules


@pytest.mark.django_db
def test_allow_list_applies_to_model_methods():
    widget = Widget.objects.create(name="w")
    with override_settings(SISY_ALLOWED_MODULES=["tests.testapp.jobs"]):
        refused(widget.touch, f"Callable '{MODELS}.Widget.touch' is not allowed: module '{MODELS}'")
        refused(f"{MODELS}.Widget.touch", "is not allowed", pk_override=widget.pk)
    with override_settings(SISY_ALLOWED_MODULES=["tests.testapp.models"]):
        assert get_func_info(widget.touch)["model_pk"] == widget.pk


def test_check_allowed_refuses_a_stored_module_or_path_outside_the_list():
    with override_settings(SISY_ALLOWED_MODULES=["tests.testapp"]):
        check_allowed(FUNCTION_INFO)
        with pytest.raises(CallableError, match="Callable 'os.system' is not allowed: its path is not under"):
            check_allowed(dict(FUNCTION_INFO, func_path="os.system"))
        with pytest.raises(CallableError, match="Callable 'tests.testapp.jobs.job' is not allowed: module 'os' is "
                                                r"not under SISY_ALLOWED_MODULES \['tests.testapp'\]"):
            check_allowed(dict(FUNCTION_INFO, module_name="os"))
        with pytest.raises(CallableError, match="Callable 'tests.testapp.jobs.job' is not allowed: class 'os.X' is not "
                                                "under"):
            check_allowed(dict(STATIC_INFO, func_path="tests.testapp.jobs.job", class_path="os.X"))
        with pytest.raises(CallableError, match="module None is not under"):
            check_allowed({"func_path": "tests.testapp.jobs.job", "module_name": None})


# -- resolving in the worker -----------------------------------------------------------------------


@pytest.mark.parametrize("thing", [jobs.job, jobs.no_params, jobs.Holder.static_job, jobs.Holder.class_job,
                                   Widget.static_job, Widget.class_job])
def test_resolve_round_trip(thing):
    found = resolve(get_func_info(thing))
    assert getattr(found, "__func__", found) is getattr(thing, "__func__", thing)


def test_resolve_calls_the_function():
    resolve(FUNCTION_INFO)({"task": "t"})
    resolve(CLASS_INFO)({"task": "c"})
    assert CALLS == [("job", {"task": "t"}), ("class", jobs.Holder, {"task": "c"})]


@pytest.mark.django_db
def test_resolve_after_the_row_was_deleted():
    widget = Widget.objects.create(name="w")
    info = get_func_info(widget.touch)
    pk = widget.pk
    widget.delete()
    with pytest.raises(CallableError) as error:
        resolve(info)
    assert str(error.value) == (
        f"testapp.Widget with pk {pk!r} no longer exists, so '{MODELS}.Widget.touch' cannot run. "
        f"Delete this task or point it at an existing row."
    )


@pytest.mark.django_db
def test_resolve_with_a_uuid_row_deleted():
    info = get_func_info(f"{MODELS}.UuidWidget.touch", pk_override=uuid.UUID(int=1))
    with pytest.raises(CallableError, match="testapp.UuidWidget with pk '00000000-0000-0000-0000-000000000001' "
                                            "no longer exists"):
        resolve(info)


@pytest.mark.django_db
def test_resolve_does_not_evaluate_properties():
    widget = Widget.objects.create(name="w")
    info = dict(instance_info(Widget, widget.pk, "exploding"))
    with pytest.raises(CallableError, match=f"'{MODELS}.Widget.exploding' is not an instance method of testapp.Widget"):
        resolve(info)


@pytest.mark.parametrize("info, message", [
    ({"func_type": "lambda", "func_path": "x.y"}, "is not valid: recreate the task with task_with_callable."),
    ({}, "Function info {} is not valid"),
    ({"func_type": "function"}, "None is not a full dotted path"),
    (None, "Function info None is not valid"),
    ("tests.testapp.jobs.job", "Function info 'tests.testapp.jobs.job' is not valid"),
    (dict(FUNCTION_INFO, func_path=f"{JOBS}.no_params"), "does not describe the callable it leads to"),
    (dict(FUNCTION_INFO, module_name="elsewhere"), "does not describe the callable it leads to"),
    (dict(STATIC_INFO, func_type="function"), "does not describe the callable it leads to"),
    (dict(FUNCTION_INFO, func_path=f"{JOBS}.lam"), f"'{JOBS}.<lambda>' is a lambda"),
    (dict(FUNCTION_INFO, func_path=f"{JOBS}.nothing_here"), f"'nothing_here' is not a member of '{JOBS}'"),
    (dict(instance_info(Widget, 1), class_path=f"{JOBS}.Holder"), f"'{JOBS}.Holder' is no longer a Django model."),
    (dict(instance_info(Widget, 1), func_name="vanished"), "'tests.testapp.models.Widget.vanished' is not an "
                                                           "instance method of testapp.Widget"),
    (dict(instance_info(Widget, 1), func_name="no_args"), "does not describe the callable it leads to"),
    (dict(instance_info(Widget, 1), model_pk="abc"), "'abc' is not a valid primary key for testapp.Widget"),
    (dict(instance_info(Widget, 1), model_pk=None), "Widget instance is not saved"),
])
def test_resolve_refuses_bad_or_tampered_info(info, message):
    with pytest.raises(CallableError) as error:
        resolve(info)
    assert message in str(error.value)


def test_resolve_checks_the_allow_list_again():
    info = get_func_info(jobs.job)
    with override_settings(SISY_ALLOWED_MODULES=["billing"]):
        with pytest.raises(CallableError, match=r"Callable 'tests.testapp.jobs.job' is not allowed: module "
                                                r"'tests.testapp.jobs' is not under SISY_ALLOWED_MODULES \['billing'\]"):
            resolve(info)


def test_call_arity_on_unreadable_signature():
    class NoSignature:
        __signature__ = "broken"

        def __call__(self):
            pass

    with pytest.raises(CallableError, match="'x' is not a callable object whose signature can be read."):
        call_arity(NoSignature(), "x")


# -- the allow-list judges the module that defines the code ---------------------------------------

VENDOR_REFUSED = "its code, defined in module 'tests.testapp.vendor', is not under SISY_ALLOWED_MODULES"
DJANGO_REFUSED = "its code, defined in module 'django.db.models.base', is not under SISY_ALLOWED_MODULES"


@pytest.mark.parametrize("thing, path, message", [
    # a class method inherited from a base class defined elsewhere, reached through an allowed subclass
    (jobs.VendorChild.inherited_class_job, f"{JOBS}.VendorChild.inherited_class_job", VENDOR_REFUSED),
    (f"{JOBS}.VendorChild.inherited_class_job", f"{JOBS}.VendorChild.inherited_class_job", VENDOR_REFUSED),
    # a static method inherited the same way: it is stored under the class that defines it
    (jobs.VendorChild.inherited_static_job, "tests.testapp.vendor.VendorBase.inherited_static_job", "its path"),
    (f"{JOBS}.VendorChild.inherited_static_job", "tests.testapp.vendor.VendorBase.inherited_static_job", "its path"),
    # a function re-exported under the allowed module's name
    (jobs.vendored_job, "tests.testapp.vendor.vendored_job", "its path"),
    (f"{JOBS}.vendored_job", "tests.testapp.vendor.vendored_job", "its path"),
    # a re-exported function whose __module__ claims the allowed module: its code says otherwise
    (jobs.disguised_job, f"{JOBS}.disguised_job", VENDOR_REFUSED),
    (f"{JOBS}.disguised_job", f"{JOBS}.disguised_job", VENDOR_REFUSED),
])
def test_allow_list_judges_the_module_that_defines_the_code(thing, path, message):
    with override_settings(SISY_ALLOWED_MODULES=[JOBS]):
        error = refused(thing, message)
    assert error.startswith(f"Callable {path!r} is not allowed: ")
    assert get_func_info(thing)["func_path"] == path  # allowed once every module is


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["clean", "clean_fields", "get_deferred_fields"])  # (message) or () signatures
def test_allow_list_refuses_a_model_method_inherited_from_django(name):
    widget = Widget.objects.create(name="w")
    with override_settings(SISY_ALLOWED_MODULES=["tests.testapp"]):
        refused(getattr(widget, name), DJANGO_REFUSED)
        refused(f"{MODELS}.Widget.{name}", DJANGO_REFUSED, pk_override=widget.pk)
        with pytest.raises(CallableError, match=DJANGO_REFUSED):
            check_allowed(instance_info(Widget, widget.pk, name))


def test_allow_list_judges_a_wrapped_function_by_the_function_it_decorates():
    with override_settings(SISY_ALLOWED_MODULES=[JOBS]):
        info = get_func_info(jobs.vendor_decorated)
        assert info["func_path"] == f"{JOBS}.vendor_decorated"
        resolve(info)({"k": 1})
    assert CALLS == [("vendor_decorated", {"k": 1})]


@pytest.mark.parametrize("info", [
    dict(CLASS_INFO, func_path=f"{JOBS}.VendorChild.inherited_class_job", func_name="inherited_class_job",
         class_name="VendorChild", class_path=f"{JOBS}.VendorChild"),
    # hand-written info that reaches inherited or re-exported code through the allowed module's names
    dict(STATIC_INFO, func_path=f"{JOBS}.VendorChild.inherited_static_job", func_name="inherited_static_job",
         class_name="VendorChild", class_path=f"{JOBS}.VendorChild"),
    dict(FUNCTION_INFO, func_path=f"{JOBS}.vendored_job", func_name="vendored_job"),
    dict(FUNCTION_INFO, func_path=f"{JOBS}.disguised_job", func_name="disguised_job"),
])
def test_worker_check_judges_the_defining_module_of_stored_function_info(info):
    # The worker calls check_allowed on the message's function info before anything runs.
    with override_settings(SISY_ALLOWED_MODULES=[JOBS]):
        with pytest.raises(CallableError, match=VENDOR_REFUSED):
            check_allowed(info)
        with pytest.raises(CallableError, match=VENDOR_REFUSED):
            resolve(info)


INDIRECTIONS = [
    # (what is scheduled, pk_override, the refusal): each form of indirection, as task_with_callable stores it
    (f"{JOBS}.VendorChild.inherited_class_job", None, VENDOR_REFUSED),  # an inherited class method
    # an inherited static method and a re-exported function are stored under the path that defines them
    (f"{JOBS}.VendorChild.inherited_static_job", None, "Callable 'tests.testapp.vendor.VendorBase.inherited_static_job'"),
    (f"{JOBS}.vendored_job", None, "Callable 'tests.testapp.vendor.vendored_job'"),
    (f"{JOBS}.disguised_job", None, VENDOR_REFUSED),  # ... with its __module__ rewritten
    (f"{MODELS}.Widget.clean_fields", "widget", DJANGO_REFUSED),  # a model method inherited from Django
]


@pytest.mark.django_db
@pytest.mark.parametrize("path, pk, message", INDIRECTIONS)
def test_the_worker_refuses_a_row_of_each_indirection_and_runs_nothing(path, pk, message):
    """A row saved while every module was allowed, whose slot was claimed: once the allow-list
    names only the modules it is reached through, the worker task itself refuses it."""
    from django.utils import timezone

    from sisy_celery import engine
    from sisy_celery.models import Run, task_with_callable
    from sisy_celery.tasks import RefusedMessage, run_callable

    widget = Widget.objects.create(name="w")
    task = task_with_callable(path, pk_override=widget.pk if pk else None, label="indirect")
    task.save()
    run = engine.claim_now(task, timezone.now(), "test")
    args = [task.pk, task._func_info, task._extra_data, run.slot.isoformat()]
    with override_settings(SISY_ALLOWED_MODULES=[JOBS, MODELS]):
        with pytest.raises(RefusedMessage, match=re.escape(message)):
            run_callable.apply(args=args).get()
    assert CALLS == []
    task.refresh_from_db()
    assert message in task.problem and "is not allowed" in task.problem
    run.refresh_from_db()
    assert run.state == Run.REVOKED


@pytest.mark.django_db
@pytest.mark.parametrize("path, pk, message", INDIRECTIONS)
def test_admin_form_refuses_code_defined_outside_the_allow_list(path, pk, message):
    from sisy_celery.forms import TaskForm

    widget = Widget.objects.create(name="w")
    data = {"callable": path, "pk_override": str(widget.pk) if pk else "", "label": "x", "enabled": "on",
            "schedule": "* * * * *", "timezone": "", "iterations": "0", "priority": "", "queue": "", "expires": "",
            "userdata": "{}"}
    with override_settings(SISY_ALLOWED_MODULES=[JOBS, MODELS]):
        form = TaskForm(data=data)
        assert not form.is_valid()
    assert "is not allowed" in form.errors["callable"][0] and message in form.errors["callable"][0]
    assert TaskForm(data=data).is_valid(), form.errors  # every module allowed: the same form is accepted


# -- the signature: (message) or (), in every form -------------------------------------------------

SIGNATURE = "a scheduled callable must take one argument (message) or none"


@pytest.mark.django_db
@pytest.mark.parametrize("thing, kwargs", [
    ("sisy_celery.models.Task.run_once", {}),  # a class method: (the_callable, userdata=None, ...)
    ("sisy_celery.models.Task.run_iterations", {}),
    (f"{JOBS}.job_with_extra_default", {}),  # a function
    (jobs.job_with_extra_default, {}),
    (f"{MODELS}.Widget.delete", {"pk_override": 1}),  # a model method by path: (using=None, keep_parents=False)
])
def test_signature_with_further_positional_parameters_is_refused(thing, kwargs):
    refused(thing, SIGNATURE, **kwargs)


@pytest.mark.django_db
@pytest.mark.parametrize("form, thing, pk", [
    ("function", jobs.two_params, False),
    ("function path", f"{JOBS}.two_params", False),
    ("static method", jobs.Holder.static_two_params, False),
    ("static method path", f"{JOBS}.Holder.static_two_params", False),
    ("class method", jobs.Holder.class_two_params, False),
    ("class method path", f"{JOBS}.Holder.class_two_params", False),
    ("bound model method", "two_args", False),
    ("model method path with pk_override", f"{MODELS}.Widget.two_args", True),
    ("model method with pk_override", Widget.two_args, True),
])
def test_every_callable_form_is_refused_unless_it_takes_message_or_nothing(form, thing, pk):
    widget = Widget.objects.create(name="w")
    if form == "bound model method":
        thing = getattr(widget, thing)
    shown = "(message, extra)" if "model" in form else "(message, other)"
    refused(thing, f"has the signature {shown}; {SIGNATURE}", **({"pk_override": widget.pk} if pk else {}))


@pytest.mark.django_db
def test_signature_of_a_bound_model_method_is_checked():
    widget = Widget.objects.create(name="w")
    refused(widget.delete, "has the signature (using=None, keep_parents=False); " + SIGNATURE)
    # (Django 5.1 added from_queryset: the signature shown is the installed Django's)
    refused(widget.refresh_from_db, "has the signature (using=None, fields=None")


def test_task_with_callable_refuses_run_once():
    from sisy_celery.models import task_with_callable

    with pytest.raises(CallableError) as error:
        task_with_callable("sisy_celery.models.Task.run_once")
    assert str(error.value).startswith("'sisy_celery.models.Task.run_once' has the signature (the_callable: ")
    assert SIGNATURE in str(error.value)


def test_an_inherited_method_of_djangos_model_through_the_class_is_refused():
    # Widget.delete is Model.delete: without an instance nothing says which model it is for.
    refused(Widget.delete, "pk_override needs a Django model instance method", pk_override=1)


def test_keyword_only_parameters_with_defaults_are_accepted():
    info = get_func_info(jobs.job_with_keyword_only_extra)
    assert call_arity(resolve(info), info["func_path"]) == 1
    resolve(info)({})
    assert CALLS == [("keyword_only_extra", 3)]


CELERY_TASK = ("is a Celery task (@shared_task or @app.task), not a plain function; sisy runs callables inside "
               "its own Celery task and does not schedule task objects. Schedule a plain module-level function "
               "holding the body instead")


@pytest.mark.parametrize("thing, name", [
    (jobs.celery_shared_job, f"{JOBS}.celery_shared_job"),
    (f"{JOBS}.celery_shared_job", f"{JOBS}.celery_shared_job"),
    (jobs.celery_app_job, f"{JOBS}.celery_app_job"),
    (f"{JOBS}.celery_app_job", f"{JOBS}.celery_app_job"),
    ("sisy_celery.tasks.run_callable", "sisy.run_callable"),
])
def test_celery_task_objects_are_refused_with_what_to_pass_instead(thing, name):
    message = refused(thing, CELERY_TASK)
    assert message.startswith(repr(thing if isinstance(thing, str) else name))
    assert "beat_schedule" in message
