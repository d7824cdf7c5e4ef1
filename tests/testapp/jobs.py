"""Callables of every kind the API accepts, and some it must refuse."""
import functools

from . import models


def job(message):
    models.CALLS.append(("job", message))
    return "ok"


def no_params():
    models.CALLS.append(("no_params",))


def two_params(message, other):
    pass


def failing(message):
    raise RuntimeError("boom")


class Holder:
    @staticmethod
    def static_job(message):
        models.CALLS.append(("static", message))

    @classmethod
    def class_job(cls, message):
        models.CALLS.append(("class", cls, message))

    def plain_method(self, message):
        pass

    @staticmethod
    def static_two_params(message, other):
        pass

    @classmethod
    def class_two_params(cls, message, other):
        pass

    class Inner:
        @staticmethod
        def nested(message):
            pass


def make_closure():
    def inner(message):
        pass
    return inner


lam = lambda message: None  # noqa: E731


async def async_job(message):
    pass


def generator_job(message):
    yield message


def _shout(func):
    def wrapper(message):
        return func(message)
    return wrapper


@_shout
def decorated_without_wraps(message):
    pass


def _logged(func):
    @functools.wraps(func)
    def wrapper(message):
        return func(message)
    return wrapper


@_logged
def decorated_with_wraps(message):
    models.CALLS.append(("decorated", message))


def shadowed(message):
    pass


old_shadowed = shadowed


def shadowed(message):  # noqa: F811 - the name now leads to another function than old_shadowed
    pass


def with_defaults(message=None, *args, **kwargs):
    pass


def keyword_only(*, message):
    pass


class CallableObject:
    def __call__(self, message):
        pass


callable_object = CallableObject()
partial_job = functools.partial(two_params, other=1)
some_widget = models.Widget(pk=1, name="module-level")


# Reached through this module, defined in tests.testapp.vendor (allow-list indirection tests).
from .vendor import VendorBase, disguised_job, logged, vendored_job  # noqa: E402,F401


class VendorChild(VendorBase):
    """Inherits a class and a static method whose code lives in tests.testapp.vendor."""


@logged
def vendor_decorated(message):
    models.CALLS.append(("vendor_decorated", message))


# Celery task objects: refused, with what to schedule instead.
from celery import shared_task  # noqa: E402

from tests.celery_app import app  # noqa: E402


@shared_task
def celery_shared_job(message):
    pass


@app.task
def celery_app_job(message):
    pass


def job_with_extra_default(message, retries=3):
    pass


def job_with_keyword_only_extra(message, *, retries=3):
    models.CALLS.append(("keyword_only_extra", retries))
