"""Fixtures of the end-to-end tests: migrated stacks, cleaned between tests, logs on failure."""
from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.conftest import require_service, skip_unless
from tests.e2e.harness import SERVICES, Stack


def require_stack(db: str, broker: str) -> None:
    """Skip (or fail under CI) unless the servers of this database and broker are up, and, for
    RabbitMQ, ``rabbitmqctl`` is there to give the stack a vhost of its own."""
    for kind in (db, broker):
        if kind in SERVICES:
            require_service(*SERVICES[kind])
    if broker == "amqp":
        skip_unless(shutil.which("rabbitmqctl"), "rabbitmqctl is not installed: no vhost of the stack's own")


@pytest.fixture(scope="module")
def pg_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The main stack, migrated once per module: PostgreSQL + Redis."""
    require_stack("postgres", "redis")
    stack = Stack("postgres", "redis", tmp_path_factory.mktemp("pg-redis"))
    try:
        stack.setup()
        yield stack
    finally:
        stack.teardown()


@pytest.fixture
def stack(pg_redis: Stack) -> Iterator[Stack]:
    """The main stack for one test; its processes, tasks, runs and messages are gone afterwards."""
    pg_redis.reset()
    yield pg_redis
    pg_redis.reset()


class StackFactory:
    """``make_stack(db, broker, proxied=(), **env)``: a fresh, migrated stack, torn down after the test."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.stacks: list[Stack] = []

    def __call__(self, db: str, broker: str, proxied: tuple[str, ...] = (), **env: str) -> Stack:
        require_stack(db, broker)
        stack = Stack(db, broker, self.tmp_path_factory.mktemp(f"{db}-{broker}"), env=env, proxied=proxied)
        self.stacks.append(stack)
        return stack.setup()

    def teardown(self) -> None:
        for stack in self.stacks:
            stack.teardown()


@pytest.fixture
def make_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackFactory]:
    factory = StackFactory(tmp_path_factory)
    yield factory
    factory.teardown()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failed e2e test shows the tail of every worker and beat log of its stacks."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    stacks: list[Stack] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Stack) and value not in stacks:
            stacks.append(value)
        elif isinstance(value, StackFactory):
            stacks += value.stacks
    for stack in stacks:
        report.sections.append((f"e2e logs {stack!r}", stack.logs()))
