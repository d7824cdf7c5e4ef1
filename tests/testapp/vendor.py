"""Code outside the allow-list of the indirection tests, reached through tests.testapp.jobs."""
import functools

from . import models


class VendorBase:
    @classmethod
    def inherited_class_job(cls, message):
        models.CALLS.append(("inherited_class_job", message))

    @staticmethod
    def inherited_static_job(message):
        models.CALLS.append(("inherited_static_job", message))


def vendored_job(message):
    models.CALLS.append(("vendored_job", message))


def disguised_job(message):
    models.CALLS.append(("disguised_job", message))


# Labelled as if it were defined in jobs, where it is re-exported: only its code tells the truth.
disguised_job.__module__ = "tests.testapp.jobs"


def logged(func):
    """A decorator library's wrapper: the decorated function, not this module, is judged."""
    @functools.wraps(func)
    def wrapper(message):
        return func(message)
    return wrapper
