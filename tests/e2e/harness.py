"""End-to-end harness: the example project with real ``celery worker`` and ``celery beat`` processes.

A :class:`Stack` is one fresh database (PostgreSQL, MariaDB or an SQLite file) and
one broker (a Redis database of its own, RabbitMQ or kombu's filesystem
transport). It migrates the database, runs code inside the project through
``driver.py`` (tasks are made with the public API), starts, stops and kills
worker and beat processes (each in its own process group, logging to a file),
and reads the ``jobs_run`` and ``sisy_celery_task`` tables with the raw driver,
so the test process itself needs no Django.

    stack = Stack("postgres", "redis", workdir)
    stack.setup()
    try:
        stack.worker("w1"); stack.beat("b1")
        task = stack.run("result = Task.run_once(jobs.record).pk")
        wait_for(lambda: stack.runs(task), 10, "the run")
    finally:
        stack.teardown()

A stack made with ``proxied=("database", "broker")`` puts a :class:`~tests.e2e.proxy.Proxy` in
front of each, and ``with stack.outage("broker"):`` cuts it: the stack's processes lose the server
while the server itself, shared with others, stays as it is.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from tests.e2e.proxy import Proxy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "example"
DRIVER = Path(__file__).resolve().with_name("driver.py")

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root"}
REDIS = {"host": "127.0.0.1", "port": 6379}
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"

#: (name, host, port) of the server each database / broker kind needs, for require_service().
SERVICES = {
    "postgres": ("PostgreSQL", PG["host"], PG["port"]),
    "mariadb": ("MariaDB", MYSQL["host"], MYSQL["port"]),
    "redis": ("Redis", REDIS["host"], REDIS["port"]),
    "amqp": ("RabbitMQ", "127.0.0.1", 5672),
}

UTC = timezone.utc
#: the line beat logs for each message it publishes
T = TypeVar("T")

RUN_TIMES = ("slot", "started", "finished")
TASK_TIMES = ("next_run", "last_run", "start_running", "end_running")
LEDGER_TIMES = ("slot", "claimed_at", "published_at", "started_at", "finished_at", "lease_until")
TASK_FLAGS = ("running", "enabled", "allow_overlap", "wait_for_schedule")


class Timeout(AssertionError):
    """A condition polled by :func:`wait_for` did not come true in time."""


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``condition`` until it returns something truthy (returned); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout:g}s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


def now() -> datetime:
    return datetime.now(UTC)


def aware(value: Any) -> Any:
    """A datetime column as an aware UTC datetime, whichever driver read it."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


@dataclass(frozen=True)
class Run:
    """One row of ``jobs_run``: a callable ran for ``slot``, from ``started`` to ``finished``."""

    id: int
    task_id: int
    label: str
    slot: datetime
    started: datetime
    finished: datetime | None
    worker: str
    pid: int


@dataclass
class Proc:
    """A worker or beat process started by a :class:`Stack`."""

    kind: str
    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] = field(repr=False)
    #: the log text that says the process is ready
    ready: str = ""
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])


def _die_with_parent() -> None:
    """In a child before exec: on Linux, be killed when the test process dies, even by ``kill -9``
    (teardown kills the processes otherwise; this covers a test session that is itself killed)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# -- databases -----------------------------------------------------------------------------


class Database:
    """A fresh database of one kind, created for a stack and dropped at teardown."""

    kind = ""
    placeholder = "%s"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.name = f"sisy_e2e_{secrets.token_hex(4)}"
        self._conn: Any = None

    @property
    def url(self) -> str:
        raise NotImplementedError

    def create(self) -> None:
        raise NotImplementedError

    def drop(self) -> None:
        raise NotImplementedError

    def connect(self) -> Any:
        raise NotImplementedError

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        if self._conn is None:
            self._conn = self.connect()
        cursor = self._conn.cursor()
        try:
            cursor.execute(sql.replace("%s", self.placeholder), params)
            if cursor.description is None:
                return []
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]
        finally:
            cursor.close()

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


class Postgres(Database):
    kind = "postgres"

    @property
    def url(self) -> str:
        return f"postgres://{PG['user']}@{PG['host']}:{PG['port']}/{self.name}"

    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(dbname="postgres", autocommit=True, connect_timeout=5, **PG)

    def create(self) -> None:
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        self.close()
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(dbname=self.name, autocommit=True, connect_timeout=5, **PG)


class MariaDB(Database):
    kind = "mariadb"

    @property
    def url(self) -> str:
        return f"mysql://{MYSQL['user']}@{MYSQL['host']}:{MYSQL['port']}/{self.name}"

    def _admin(self, **extra: Any) -> Any:
        import pymysql

        return pymysql.connect(autocommit=True, connect_timeout=5, **MYSQL, **extra)

    def _admin_execute(self, sql: str) -> None:
        conn = self._admin()
        try:
            conn.cursor().execute(sql)
        finally:
            conn.close()

    def create(self) -> None:
        self._admin_execute(f"CREATE DATABASE `{self.name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")

    def drop(self) -> None:
        self.close()
        self._admin_execute(f"DROP DATABASE IF EXISTS `{self.name}`")

    def connect(self) -> Any:
        return self._admin(database=self.name)


class SQLite(Database):
    kind = "sqlite"
    placeholder = "?"

    @property
    def path(self) -> Path:
        return self.workdir / f"{self.name}.sqlite3"

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def drop(self) -> None:
        self.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def connect(self) -> Any:
        return sqlite3.connect(self.path, isolation_level=None, timeout=30)


DATABASES: dict[str, type[Database]] = {"postgres": Postgres, "mariadb": MariaDB, "sqlite": SQLite}


# -- brokers -------------------------------------------------------------------------------


class Broker:
    """The stack's own broker: a URL nobody else publishes to, emptied by :meth:`reset`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.url = kind  # a full URL given as the kind is used as it is

    def acquire(self) -> str:
        return self.url

    def reset(self) -> None:
        """Drop every message and binding left by a previous test."""

    def release(self) -> None:
        self.reset()


class RedisBroker(Broker):
    """A database of the local Redis server claimed for this stack (a key in db 0, so that test
    sessions running at the same time never share one) and flushed before and after it."""

    #: databases the stacks may use (the benchmark uses 11)
    candidates = (15, 14, 13, 12, 10, 9, 8)
    claim_seconds = 4 * 3600

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.number: int | None = None
        self.token = secrets.token_hex(8)

    @staticmethod
    def _client(number: int) -> Any:
        import redis

        return redis.Redis(db=number, socket_timeout=5, **REDIS)

    @staticmethod
    def _claim_key(number: int) -> str:
        return f"sisy-e2e:redis-db:{number}"

    def acquire(self) -> str:
        admin = self._client(0)
        try:
            for number in self.candidates:
                if admin.set(self._claim_key(number), self.token, nx=True, ex=self.claim_seconds):
                    self.number = number
                    break
        finally:
            admin.close()
        if self.number is None:
            raise RuntimeError(f"every Redis database of {self.candidates} is claimed by another e2e session")
        self.url = f"redis://{REDIS['host']}:{REDIS['port']}/{self.number}"
        self.reset()
        return self.url

    def reset(self) -> None:
        if self.number is not None:
            client = self._client(self.number)
            try:
                client.flushdb()
            finally:
                client.close()

    def release(self) -> None:
        if self.number is None:
            return
        self.reset()
        admin = self._client(0)
        try:
            if admin.get(self._claim_key(self.number)) == self.token.encode():
                admin.delete(self._claim_key(self.number))
        finally:
            admin.close()
        self.number = None


class AmqpBroker(Broker):
    """A virtual host of the local RabbitMQ made for this stack with ``rabbitmqctl`` and deleted
    after it: the shared default vhost is never used (tests check ``rabbitmqctl`` beforehand)."""

    def __init__(self, kind: str, queues: tuple[str, ...]) -> None:
        super().__init__(kind)
        self.queues = queues
        self.vhost: str | None = None

    @staticmethod
    def _ctl(*args: str) -> None:
        done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stdout}{done.stderr}")

    def acquire(self) -> str:
        vhost = f"sisy_e2e_{secrets.token_hex(4)}"
        self._ctl("add_vhost", vhost)
        self.vhost = vhost
        self._ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        self.url = f"{AMQP_URL.rstrip('/')}/{vhost}"
        self.reset()
        return self.url

    def reset(self) -> None:
        from kombu import Connection

        with Connection(self.url, connect_timeout=5) as conn:
            for queue in self.queues:
                channel = conn.channel()
                try:
                    channel.queue_purge(queue)
                except Exception:  # the queue does not exist yet: nothing to purge
                    pass
                finally:
                    try:
                        channel.close()
                    except Exception:  # a channel closed by the server after a 404
                        pass

    def release(self) -> None:
        if self.vhost is not None:
            self._ctl("delete_vhost", self.vhost)
            self.vhost = None


def make_broker(kind: str, queues: tuple[str, ...]) -> Broker:
    """``redis`` (a Redis database of its own), ``amqp`` (a vhost of its own), ``filesystem``
    (kombu's transport in the stack's var directory) or a full broker URL."""
    if kind == "redis":
        return RedisBroker(kind)
    if kind == "amqp":
        return AmqpBroker(kind, queues)
    if kind == "filesystem":
        return Broker("filesystem://")
    return Broker(kind)


# -- the stack -----------------------------------------------------------------------------


class Stack:
    """One migrated example project on a fresh database and broker, plus its processes."""

    #: queues the tests publish to; purged on AMQP at setup and teardown
    queues = ("celery", "other", "expiring")

    #: the parts of a stack that can sit behind a proxy (see :meth:`outage`)
    components = ("database", "broker")

    def __init__(self, db: str, broker: str, workdir: Path, env: dict[str, str] | None = None,
                 proxied: Iterable[str] = ()) -> None:
        if db not in DATABASES:
            raise ValueError(f"database kind {db!r} is not one of {sorted(DATABASES)}")
        self.proxied = tuple(proxied)
        if set(self.proxied) - set(self.components):
            raise ValueError(f"proxied {self.proxied!r}: only {self.components} can be")
        self.proxies: dict[str, Proxy] = {}
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.db = DATABASES[db](self.workdir)
        self.broker_kind = broker
        self._broker = make_broker(broker, self.queues)
        #: the broker URL the processes use (set by setup())
        self.broker = ""
        self.extra_env = dict(env or {})
        self.processes: list[Proc] = []
        self._driver: subprocess.Popen[str] | None = None
        self._created = False

    def __repr__(self) -> str:
        return f"<Stack {self.db.kind} {self.broker or self.broker_kind} in {self.workdir}>"

    # -- lifecycle

    def env(self, **extra: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("SISY_", "CELERY_", "DJANGO_"))}
        env.update({
            "DJANGO_SETTINGS_MODULE": "proj.settings",
            "PYTHONPATH": str(EXAMPLE),
            "PYTHONUNBUFFERED": "1",
            "SISY_DATABASE_URL": self._through_proxy("database", self.db.url),
            "CELERY_BROKER_URL": self._through_proxy("broker", self.broker),
            "SISY_VAR_DIR": str(self.workdir / "var"),
            "SISY_HEARTBEAT_FREQUENCY": "1",
        })
        env.update(self.extra_env)
        env.update(extra)
        return env

    def _through_proxy(self, component: str, url: str) -> str:
        proxy = self.proxies.get(component)
        return proxy.url(url) if proxy else url

    def setup(self) -> "Stack":
        self.broker = self._broker.acquire()
        self.db.create()
        self._created = True
        for component, url in (("database", self.db.url), ("broker", self.broker)):
            if component in self.proxied:
                target = urlsplit(url)
                if not target.hostname or not target.port:
                    raise ValueError(f"{url} names no server that a proxy could stand in front of")
                self.proxies[component] = Proxy(target.hostname, target.port).start()
        migrate = subprocess.run(
            [sys.executable, str(EXAMPLE / "manage.py"), "migrate", "-v0", "--no-input"],
            cwd=self.workdir, env=self.env(), capture_output=True, text=True, timeout=180,
        )
        if migrate.returncode:
            raise RuntimeError(f"migrate failed on {self.db.url}:\n{migrate.stdout}\n{migrate.stderr}")
        return self

    def teardown(self) -> None:
        for proc in self.processes:
            self.kill(proc)  # the database and the broker's messages are thrown away anyway
        self._stop_driver()
        for proxy in self.proxies.values():
            proxy.stop()
        self.proxies.clear()
        if self._created:
            self.db.drop()
        self._broker.release()  # also a vhost made before a failed setup

    def reset(self) -> None:
        """Forget the previous test: stop its processes and delete tasks, runs, accounts, results."""
        for proc in self.processes:
            if proc.alive():
                self.kill(proc)
        self.processes.clear()
        for table in ("sisy_celery_task", "sisy_celery_run", "jobs_run", "jobs_account", "django_celery_results_taskresult",
                      "sisy_celery_beatprocess"):
            self.db.query(f"DELETE FROM {table}")
        self._broker.reset()

    @contextmanager
    def outage(self, component: str) -> Iterator[None]:
        """The stack's processes lose ``component`` ('database' or 'broker', which must be proxied)
        until the block ends: open connections are reset, new ones refused. The harness's own
        queries go straight to the server and keep working."""
        proxy = self.proxies.get(component)
        if proxy is None:
            raise ValueError(f"{component} is not behind a proxy: make the stack with proxied=({component!r},)")
        with proxy.outage():
            yield
        self._stop_driver()  # its connections were reset: the next run() starts a fresh one

    # -- code inside the project

    def run(self, code: str, **params: Any) -> Any:
        """Run ``code`` in the project (see driver.py) and return what it assigned to ``result``."""
        import textwrap

        if self._driver is None or self._driver.poll() is not None:
            log = open(self.workdir / "driver.log", "a")
            self._driver = subprocess.Popen(
                [sys.executable, str(DRIVER)], cwd=self.workdir, env=self.env(), text=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            log.close()
        assert self._driver.stdin is not None and self._driver.stdout is not None
        self._driver.stdin.write(json.dumps({"code": textwrap.dedent(code), "params": params}) + "\n")
        self._driver.stdin.flush()
        line = self._driver.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver died; its log:\n{(self.workdir / 'driver.log').read_text()[-3000:]}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise RuntimeError(f"code failed in the project:\n{answer['error']}")
        return answer["result"]

    def _stop_driver(self) -> None:
        if self._driver is not None:
            if self._driver.stdin:
                self._driver.stdin.close()
            try:
                self._driver.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._driver.kill()
                self._driver.wait()
            if self._driver.stdout:
                self._driver.stdout.close()
            self._driver = None

    # -- processes

    def _start(self, kind: str, name: str, args: list[str], wait: bool, env: dict[str, str] | None,
               ready: str) -> Proc:
        log = self.workdir / f"{kind}-{name}-{len(self.processes)}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "proj", *args], cwd=self.workdir,
                env=self.env(**(env or {})), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        proc = Proc(kind, name, args, log, popen, ready)
        self.processes.append(proc)
        if wait:
            self.wait_ready(proc)
        return proc

    def wait_ready(self, *procs: Proc, timeout: float = 60) -> None:
        """Wait until each process has logged that it is ready (fail at once if one exits)."""
        def all_ready() -> bool:
            for proc in procs:
                if not proc.alive():
                    raise AssertionError(f"{proc.kind} {proc.name} exited with {proc.popen.returncode}:\n"
                                         f"{proc.tail()}")
            return all(proc.ready in proc.text() for proc in procs)

        wait_for(all_ready, timeout, f"{', '.join(f'{p.kind} {p.name}' for p in procs)} to be ready")

    def worker(self, name: str = "w1", concurrency: int = 4, queues: str | None = None, wait: bool = True,
               env: dict[str, str] | None = None) -> Proc:
        """Start ``celery worker -n name@%h -c concurrency [-Q queues]``; wait until it is ready."""
        args = ["worker", "-l", "info", "-c", str(concurrency), "-n", f"{name}@%h",
                "--without-gossip", "--without-mingle", "--without-heartbeat"]
        if queues:
            args += ["-Q", queues]
        return self._start("worker", name, args, wait, env, ready=" ready.")

    def beat(self, name: str = "b1", wait: bool = True, env: dict[str, str] | None = None,
             scheduler: str = "sisy_celery.Scheduler") -> Proc:
        """Start ``celery beat -S scheduler``; wait until the scheduler has started."""
        args = ["beat", "-S", scheduler, "-l", "info", "-s", str(self.workdir / f"beat-{name}")]
        return self._start("beat", name, args, wait, env, ready="sisy beat ")

    def up(self, workers: int = 1, beats: int = 1, env: dict[str, str] | None = None) -> list[Proc]:
        """Start workers ``w1``… and beats ``b1``… side by side; return them once all are ready."""
        procs = [self.worker(f"w{n}", wait=False, env=env) for n in range(1, workers + 1)]
        procs += [self.beat(f"b{n}", wait=False, env=env) for n in range(1, beats + 1)]
        self.wait_ready(*procs)
        return procs

    def stop(self, proc: Proc, timeout: float = 20) -> int:
        """SIGTERM the process (warm shutdown) and wait; SIGKILL its group if it does not exit."""
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group(proc)
        return proc.popen.wait()

    def kill(self, proc: Proc) -> int:
        """``kill -9`` the process and everything in its process group (pool children too)."""
        self._kill_group(proc)
        return proc.popen.wait()

    @staticmethod
    def _kill_group(proc: Proc) -> None:
        try:
            os.killpg(proc.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def logs(self, lines: int = 40) -> str:
        """The last lines of every process log of this stack (for failure reports)."""
        parts = []
        for proc in self.processes:
            state = "running" if proc.alive() else f"exited {proc.popen.returncode}"
            parts.append(f"----- {proc.kind} {proc.name} (pid {proc.pid}, {state}) {proc.log.name}\n{proc.tail(lines)}")
        driver = self.workdir / "driver.log"
        if driver.exists() and driver.stat().st_size:
            parts.append(f"----- driver\n" + "\n".join(driver.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)

    def sent(self) -> list[tuple[int, str]]:
        """(task id, ISO slot) of every run the ledger says was published (one per slot), by slot."""
        return [(row["task_id"], row["slot"].isoformat()) for row in self.ledger() if row["state"] != "claimed"]

    def ledger(self, task_id: int | None = None) -> list[dict[str, Any]]:
        """Rows of the run ledger ``sisy_celery_run`` (of one task), by slot (datetimes aware)."""
        sql = "SELECT * FROM sisy_celery_run"
        params: tuple[Any, ...] = ()
        if task_id is not None:
            sql += " WHERE task_id = %s"
            params = (task_id,)
        rows = self.query(sql + " ORDER BY slot, task_id", params)
        for row in rows:
            for key in LEDGER_TIMES:
                row[key] = aware(row[key])
        return rows

    # -- reading the database

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return self.db.query(sql, params)

    def runs(self, task_id: int | None = None) -> list[Run]:
        """Rows of ``jobs_run`` (of one task), ordered by slot then start."""
        sql = "SELECT id, task_id, label, slot, started, finished, worker, pid FROM jobs_run"
        params: tuple[Any, ...] = ()
        if task_id is not None:
            sql += " WHERE task_id = %s"
            params = (task_id,)
        rows = self.query(sql + " ORDER BY slot, started, id", params)
        return [Run(**{k: aware(v) if k in RUN_TIMES else v for k, v in row.items()}) for row in rows]

    def task(self, pk: int) -> dict[str, Any] | None:
        """The ``sisy_celery_task`` row ``pk`` (datetimes aware, flags bool), or None if it is gone."""
        rows = self.query("SELECT * FROM sisy_celery_task WHERE id = %s", (pk,))
        if not rows:
            return None
        row = rows[0]
        for key in TASK_TIMES:
            row[key] = aware(row[key])
        for key in TASK_FLAGS:
            row[key] = bool(row[key])
        return row

    def results(self, task_id: int) -> list[dict[str, Any]]:
        """django-celery-results rows of one task (tagged ``periodic_task_name = 'sisy:<id>'``)."""
        return self.query(
            "SELECT task_id, status, worker, date_done FROM django_celery_results_taskresult"
            " WHERE periodic_task_name = %s ORDER BY date_done", (f"sisy:{task_id}",))


# -- checks shared by the tests ------------------------------------------------------------


def line_time(line: str) -> datetime | None:
    """The aware time a log line starts with (``[2026-01-01 12:00:00,123 ...``), if it has one."""
    match = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", line)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(
        microsecond=int(match.group(2)) * 1000).astimezone(UTC)


def logged_at(proc: Proc, needle: str, after: datetime | None = None) -> datetime | None:
    """When ``proc`` first logged a line containing ``needle`` (after ``after``), as an aware time."""
    for line in proc.text().splitlines():
        moment = line_time(line)
        if moment is not None and needle in line and (after is None or moment > after):
            return moment
    return None


def duplicate_slots(runs: list[Run]) -> list[tuple[int, datetime]]:
    seen: set[tuple[int, datetime]] = set()
    duplicates = []
    for run in runs:
        key = (run.task_id, run.slot)
        if key in seen:
            duplicates.append(key)
        seen.add(key)
    return duplicates


def gaps(slots: list[datetime], step: timedelta) -> list[tuple[datetime, datetime]]:
    """Pairs of neighbouring slots further apart than ``step`` (slots that never ran)."""
    ordered = sorted(set(slots))
    return [(a, b) for a, b in zip(ordered, ordered[1:]) if b - a != step]


def overlaps(runs: list[Run]) -> list[tuple[Run, Run]]:
    """Runs that started before the previous one had finished."""
    ordered = sorted(runs, key=lambda run: run.started)
    return [(a, b) for a, b in zip(ordered, ordered[1:]) if a.finished is None or b.started < a.finished]
