"""Shared fixtures: which real services are reachable, and the rule for skipping."""
import os
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
#: the unit tests run on PostgreSQL (SISY_TEST_DB=postgres) rather than in-memory SQLite
POSTGRES_PASS = os.environ.get("SISY_TEST_DB") == "postgres"


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def skip_unless(condition: object, reason: str) -> None:
    """The one way a test may be skipped: when ``condition`` is false, skip outside CI and fail
    under CI=true, so that CI never reports green over a test it did not run."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a test that cannot run fails)", pytrace=False)
    pytest.skip(reason)


def require_service(name: str, host: str, port: int) -> None:
    """Skip outside CI when ``name`` is down; under CI=true a missing service is a failure."""
    skip_unless(reachable(host, port),
                f"{name} is not reachable on {host}:{port}; start it (see .ci/run) to run this test")


@pytest.fixture(autouse=True)
def _clear_calls():
    from tests.testapp import models

    models.CALLS.clear()
    yield


@pytest.fixture(scope="session", autouse=True)
def _postgres_pass() -> None:
    """In the PostgreSQL pass every test needs the real server (checked before pytest-django's
    session fixtures create the test database)."""
    if POSTGRES_PASS:
        require_service("PostgreSQL", "127.0.0.1", 5432)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``postgresql`` are about PostgreSQL itself: they belong to the PostgreSQL pass
    (which CI runs) and are deselected, not skipped, from the SQLite pass."""
    if POSTGRES_PASS:
        return
    other = [item for item in items if item.get_closest_marker("postgresql")]
    if other:
        config.hook.pytest_deselected(items=other)
        items[:] = [item for item in items if not item.get_closest_marker("postgresql")]
