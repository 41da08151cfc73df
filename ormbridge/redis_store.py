"""ormbridge's Redis: the clients, the key layout and the server-side scripts.

Redis is a cache of the change log (the database is the truth): it may be
emptied, restored or failed over at any time. Every key is built here, under
``ORMBRIDGE["KEY_PREFIX"]`` in braces: ``{prefix}`` is a Redis Cluster hash
tag, so every key of a prefix lives in one hash slot and the scripts, MGETs,
multi-key deletes and multi-stream reads that span models work on a cluster.
Per model (``label`` is ``app_label.modelname``):

``{prefix}:{label}:obj:<pk>``         cached instance: its tokens' stamp, then a pickle
``{prefix}:entry:<sha256>``           cached queryset, value or fragment, the same way
``{prefix}:{label}:tok:<pk>``         token of a cached instance (deleted on change)
``{prefix}:{label}:epoch``            token of all cached instances of the model
``{prefix}:{label}:gen``              token of all cached querysets reading the model
``{prefix}:{label}:stats``            counters for status and the demo
``{prefix}:{label}:namespaces``       each row's last event namespaces
``{prefix}:events:<namespace>``       stream of a namespace's events
``{prefix}:tasks:refused``            tasks the workers refused: task name -> count
``{prefix}:tasks:refusals``           the recent refusals (sorted set, scored by time)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterator
from importlib import resources
from typing import Any, TypeAlias

import redis
from redis.cluster import ClusterPipeline, RedisCluster
from redis.connection import AbstractConnection
from redis.exceptions import RedisClusterException

from ormbridge.conf import settings

__all__ = [
    "READ_ENTRY",
    "STORE_ENTRY",
    "Breaker",
    "Client",
    "ClusterClient",
    "ClusterError",
    "Pipeline",
    "ServerClient",
    "as_text",
    "blocking_redis",
    "breaker",
    "commit_redis",
    "entries_redis",
    "epoch_key",
    "generation_key",
    "get_redis",
    "incarnation",
    "key",
    "read_breaker",
    "refusals_key",
    "refused_key",
    "script",
    "stats_key",
    "tag",
    "token_key",
]

logger = logging.getLogger(__name__)


class ServerClient(redis.Redis):
    """A redis-py client that knows which incarnation of the server it talks to.

    ``run_id`` is read from ``INFO server`` on every new connection: a restart
    (with or without a restored snapshot) or a failover to another server
    changes it, and every connection to the old server is gone by then.
    """

    run_id: str = ""


class ClusterError(redis.RedisError):
    """A failure of redis-py's cluster client (``RedisClusterException``, which is
    not a ``RedisError``: every node down, slots uncovered) as a ``RedisError``,
    so that the handlers of Redis failures see it as one."""


@contextlib.contextmanager
def _as_redis_error() -> Iterator[None]:
    try:
        yield
    except RedisClusterException as exc:
        raise ClusterError(str(exc)) from exc


class ClusterClient(RedisCluster):
    """A Redis Cluster client (``ORMBRIDGE["REDIS_CLUSTER"]``) that knows which
    incarnation of the node serving ormbridge's slot it talks to.

    Every key of ``KEY_PREFIX`` is in one hash slot, so one node (a master)
    serves them all: ``run_id`` is that node's, read from ``INFO server`` on
    every new connection to each node. A failover moves the slot to a replica,
    whose run id differs. Its failures are ``RedisError`` (see :class:`ClusterError`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.run_ids: dict[str, str] = {}  # "host:port" of a node -> its run id
        with _as_redis_error():
            super().__init__(*args, **kwargs)
        # KEYS looks at every master, as SCAN does (redis-py asks one node only).
        self.command_flags["KEYS"] = self.PRIMARIES

    @property
    def run_id(self) -> str:
        try:
            node = self.get_node_from_key(key())  # type: ignore[no-untyped-call]  # unannotated
        except RedisClusterException:  # no slot map at the moment: no known incarnation
            return ""
        return self.run_ids.get(node.name, "") if node is not None else ""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with _as_redis_error():
            return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        pipe: ClusterPipeline = super().pipeline(transaction, shard_hint)  # type: ignore[no-untyped-call]
        # redis-py builds the pipeline; this class only adds to its methods.
        pipe.__class__ = _ClusterPipeline
        return pipe


class _ClusterPipeline(ClusterPipeline):
    """A cluster pipeline whose failures are ``RedisError`` and that deletes many keys of
    one slot with one ``DEL`` (redis-py's takes one key per call)."""

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        with _as_redis_error():
            return super().execute(raise_on_error)

    def delete(self, *names: Any) -> Any:
        return self.execute_command("DEL", *names)  # type: ignore[no-untyped-call]  # unannotated

    def unlink(self, *names: Any) -> Any:
        return self.execute_command("UNLINK", *names)  # type: ignore[no-untyped-call]  # same


Client: TypeAlias = ServerClient | ClusterClient
Pipeline: TypeAlias = redis.client.Pipeline | ClusterPipeline


def get_redis() -> Client:
    """The client for ``ORMBRIDGE["REDIS_URL"]``, shared per URL.

    Raises:
        redis.RedisError: a cluster client could not reach any node of the cluster
            (a client of one server connects only when it is first used).
    """
    return _client(settings.REDIS_URL, bool(settings.REDIS_CLUSTER), 2.0, 5.0)


def entries_redis() -> Client:
    """The client of cached reads: it answers bytes (entries hold pickles), and gives up
    after ``READ_TIMEOUT`` seconds, when the read goes to the database."""
    timeout = float(settings.READ_TIMEOUT)
    return _client(settings.REDIS_URL, bool(settings.REDIS_CLUSTER), timeout, timeout, decode=False)


def commit_redis() -> Client:
    """The client of the commit path: timeouts of ``COMMIT_TIMEOUT`` seconds."""
    timeout = float(settings.COMMIT_TIMEOUT)
    return _client(settings.REDIS_URL, bool(settings.REDIS_CLUSTER), timeout, timeout)


def blocking_redis(timeout: float) -> redis.Redis | RedisCluster:
    """A new blocking client (answers as ``str``) of ormbridge's Redis, for one event stream
    under WSGI: its XREADs block, so it shares no connection pool with the rest."""
    if settings.REDIS_CLUSTER:
        return RedisCluster.from_url(
            settings.REDIS_URL, decode_responses=True, socket_timeout=timeout
        )
    return redis.Redis.from_url(settings.REDIS_URL, decode_responses=True, socket_timeout=timeout)


def _run_id(connection: AbstractConnection) -> tuple[str, str]:
    """The run id and mode (standalone, cluster, …) of the server behind ``connection``."""
    connection.send_command("INFO", "server")  # type: ignore[no-untyped-call]  # unannotated
    info = connection.read_response()
    text = info.decode() if isinstance(info, bytes) else str(info)  # INFO is text
    fields = dict(line.partition(":")[::2] for line in text.splitlines() if ":" in line)
    return fields.get("run_id", "").strip(), fields.get("redis_mode", "").strip()


@functools.lru_cache(maxsize=8)
def _client(
    url: str, cluster: bool, connect_timeout: float, timeout: float, decode: bool = True
) -> Client:
    options: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": timeout,
        "decode_responses": decode,
    }
    if cluster:
        run_ids: dict[str, str] = {}

        def on_node_connect(connection: AbstractConnection) -> None:
            # The cluster client has done the handshake (connection.on_connect) already.
            host, port = getattr(connection, "host", ""), getattr(connection, "port", "")
            run_ids[f"{host}:{port}"] = _run_id(connection)[0]

        with _as_redis_error():
            # from_url is annotated -> "RedisCluster" but returns cls(...), a ClusterClient.
            client: ClusterClient = ClusterClient.from_url(  # type: ignore[assignment]
                url, redis_connect_func=on_node_connect, **options
            )
        client.run_ids = run_ids  # including the nodes it connected to while starting
        return client
    servers: list[ServerClient] = []

    def on_connect(connection: AbstractConnection) -> None:
        connection.on_connect()  # type: ignore[no-untyped-call]  # unannotated in redis-py
        run_id, mode = _run_id(connection)
        if mode == "cluster":
            raise redis.ConnectionError(
                f"{url} is a node of a Redis Cluster: set ORMBRIDGE['REDIS_CLUSTER'] = True"
            )
        servers[0].run_id = run_id

    # redis-py annotates from_url as -> "Redis" but returns cls(...), here a ServerClient.
    server: ServerClient = ServerClient.from_url(  # type: ignore[assignment]
        url, redis_connect_func=on_connect, **options
    )
    servers.append(server)
    return server


def incarnation(client: Client | None = None) -> str:
    """The run id of the server ``client`` (``get_redis()``) talks to, on a cluster the
    node serving ormbridge's slot; connects if needed."""
    client = client or get_redis()
    if not client.run_id:
        if isinstance(client, ClusterClient):
            node = client.get_node_from_key(key())  # type: ignore[no-untyped-call]  # unannotated
            client.ping(target_nodes=node)
        else:
            client.ping()
    return client.run_id


class Breaker:
    """Skips Redis for ``BREAKER_COOLDOWN`` seconds after a failure on one path.

    A hung or dead Redis then costs one commit ``COMMIT_TIMEOUT`` (one cached
    read ``READ_TIMEOUT``) at most and later ones nothing, until one after the
    cool-down tries again. ``fallback`` says what happens meanwhile.
    """

    def __init__(self, who: str, fallback: str) -> None:
        self.who = who
        self.fallback = fallback
        self._lock = threading.Lock()
        self._open_until = 0.0

    @property
    def open(self) -> bool:
        return time.monotonic() < self._open_until

    def trip(self, error: BaseException, quiet: bool = False) -> None:
        """Open for ``BREAKER_COOLDOWN`` seconds; say so once (unless ``quiet``)."""
        with self._lock:
            if not self.open and not quiet:
                logger.warning(
                    "ormbridge: Redis failed (%s); %s skip it for %s s: %s",
                    error,
                    self.who,
                    settings.BREAKER_COOLDOWN,
                    self.fallback,
                )
            self._open_until = time.monotonic() + float(settings.BREAKER_COOLDOWN)

    def reset(self) -> None:
        with self._lock:
            self._open_until = 0.0


breaker = Breaker("commits", "the relay delivers their changes from the change log")
read_breaker = Breaker("cached reads", "they read the database")


def tag(prefix: str | None = None) -> str:
    """``{prefix}`` (``KEY_PREFIX`` by default), the start of every key: a Redis Cluster
    hash tag, so that all of a prefix's keys share one hash slot."""
    return "{" + (settings.KEY_PREFIX if prefix is None else prefix) + "}"


def key(*parts: object) -> str:
    return ":".join([tag(), *map(str, parts)])


def refused_key() -> str:
    """Hash of the tasks this project's workers refused (sent under another ``KEY_PREFIX``)."""
    return key("tasks", "refused")


def refusals_key() -> str:
    """Sorted set of the recent refusals of task messages, scored by their Unix time."""
    return key("tasks", "refusals")


def token_key(label: str, pk: object) -> str:
    return key(label, "tok", pk)


def epoch_key(label: str) -> str:
    return key(label, "epoch")


def generation_key(label: str) -> str:
    return key(label, "gen")


def stats_key(label: str) -> str:
    return key(label, "stats")


def _lua(name: str) -> str:
    """The source of the server-side script ``ormbridge/lua/<name>.lua`` (package data)."""
    return resources.files("ormbridge").joinpath("lua", f"{name}.lua").read_text("utf-8")


READ_ENTRY = _lua("read_entry")
"""See ``ormbridge/lua/read_entry.lua``."""

STORE_ENTRY = _lua("store_entry")
"""See ``ormbridge/lua/store_entry.lua``."""


def as_text(value: bytes | str | None) -> str:
    """A reply of a (``decode_responses``) client as ``str``; None is ``""``."""
    if isinstance(value, bytes):
        return value.decode()
    return value or ""


def script(source: str, client: Client | None = None) -> Any:
    """A registered script on ``client`` (``get_redis()``), cached per client and source."""
    return _script(client or get_redis(), source)


@functools.lru_cache(maxsize=32)
def _script(client: Client, source: str) -> Any:
    return client.register_script(source)
