"""Callables of every kind the API accepts, and some it must refuse."""
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

    class Inner:
        @staticmethod
        def nested(message):
            pass


def make_closure():
    def inner(message):
        pass
    return inner


lam = lambda message: None  # noqa: E731
