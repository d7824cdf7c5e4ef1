"""Code outside the allow-list of the indirection tests, reached through tests.testapp.jobs."""
import functools


class VendorBase:
    @classmethod
    def inherited_class_job(cls, message):
        pass

    @staticmethod
    def inherited_static_job(message):
        pass


def vendored_job(message):
    pass


def disguised_job(message):
    pass


# Labelled as if it were defined in jobs, where it is re-exported: only its code tells the truth.
disguised_job.__module__ = "tests.testapp.jobs"


def logged(func):
    """A decorator library's wrapper: the decorated function, not this module, is judged."""
    @functools.wraps(func)
    def wrapper(message):
        return func(message)
    return wrapper
