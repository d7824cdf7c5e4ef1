"""Shared fixtures: which real services are reachable, and the rule for skipping."""
import os
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip outside CI when ``name`` is down; under CI=true a missing service is a failure."""
    if reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}; start it (see .ci/run) to run this test"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _clear_calls():
    from tests.testapp import models

    models.CALLS.clear()
    yield


def pytest_collection_modifyitems(config, items):
    """In the PostgreSQL pass, every database test needs the real server."""
    if os.environ.get("SISY_TEST_DB") == "postgres" and not reachable("127.0.0.1", 5432):
        message = "PostgreSQL is not reachable on 127.0.0.1:5432; start it (see .ci/run) to run this pass"
        if IN_CI:
            raise pytest.UsageError(message)
        for item in items:
            item.add_marker(pytest.mark.skip(reason=message))
