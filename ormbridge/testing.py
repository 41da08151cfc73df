"""Testing helpers: deliver changes at commit, one key prefix per test, assertions.

A project's tests see ormbridge as production does, with no worker running:

- **Delivered at commit, in the test's process.** An ``execute_wrapper`` on
  the test's database connections notes every write statement and runs
  :func:`ormbridge.relay.drain` (invalidation, events, signal replays) when the
  write commits: after its statement in autocommit, through ``on_commit`` in a
  transaction. A ``django.test.TestCase`` never commits, so there the end of
  the outermost atomic block the test itself opened (its ``RELEASE
  SAVEPOINT``) counts as the commit, and a write outside any such block counts
  as committed after its statement; the buffer's read-your-writes callbacks
  run then too. The change log's rows are visible to the connection that wrote
  them, inside the test's transaction as well, so none of this needs
  ``captureOnCommitCallbacks``, and it works inside one.
- **A key prefix of its own.** Every test runs with ``ORMBRIDGE["KEY_PREFIX"]
  = "<prefix>:testing:<uuid>"``: one test's cache entries, tokens, event
  streams and counters are invisible to every other test and run, and deleted
  when it ends.
- **Assertions** on what a test did: :func:`assert_invalidated`,
  :func:`assert_not_invalidated`, :func:`events`, :func:`assert_events`.

Use the ``ormbridge_testing`` pytest fixture (``pytest_plugins =
["ormbridge.testing"]`` in the root ``conftest.py``) or
:class:`OrmbridgeTestMixin` in Django test cases; see ``docs/testing.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import redis
from django.conf import settings as django_settings
from django.db import connections, models, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.test.utils import override_settings

from ormbridge import broadcast, cache, redis_store, stats
from ormbridge.conf import settings

__all__ = [
    "STREAM_EMITTER",
    "DeliveryError",
    "Harness",
    "OrmbridgeTestMixin",
    "assert_events",
    "assert_invalidated",
    "assert_not_invalidated",
    "events",
    "wipe",
]

try:
    import pytest
except ImportError:  # pytest is optional: OrmbridgeTestMixin needs only Django
    HAS_PYTEST = False
else:
    HAS_PYTEST = True

if TYPE_CHECKING:
    from django.test import SimpleTestCase

    from ormbridge.relay import DrainResult

    _TestCaseBase = SimpleTestCase
else:
    _TestCaseBase = object

logger = logging.getLogger(__name__)

STREAM_EMITTER = "ormbridge.broadcast.RedisStreamEmitter"


class DeliveryError(RuntimeError):
    """Delivering a test's changes raised; reported when the test ends."""


class Harness:
    """ormbridge's test set-up for one test: its key prefix and delivery at commit.

    A context manager (``start()`` / ``stop()``) for the thread running the
    test; the fixture and the mixin make one per test. ``databases``: the
    aliases the test uses (``"__all__"`` for every one; default ``default``).
    """

    def __init__(self, databases: Iterable[str] | str | None = None) -> None:
        self.databases = databases
        self.prefix = ""
        """This test's ``KEY_PREFIX``."""
        self.errors: list[Exception] = []
        """Exceptions raised by deliveries at commit; :meth:`stop` raises the first."""
        self._stack = contextlib.ExitStack()
        self._pending: set[str] = set()
        """Aliases with writes to deliver once they count as committed."""
        self._unfinished: set[str] = set()
        """Aliases whose last write is still in progress (SQLite, ``RETURNING``)."""
        self._at_commit: dict[str, weakref.ref[_AtCommit]] = {}
        self._delivering = False
        self._thread = threading.get_ident()

    @property
    def aliases(self) -> list[str]:
        """The test's databases that hold a change log."""
        from ormbridge.relay import log_databases

        wanted = self.databases if self.databases is not None else ["default"]
        logs = list(log_databases())
        return logs if wanted == "__all__" else [alias for alias in logs if alias in wanted]

    def start(self) -> None:
        """Switch to a new key prefix, watch the databases, deliver what was logged before."""
        self._thread = threading.get_ident()
        stats.counts.send()  # hits counted so far belong to the prefix before this test's
        self.prefix = f"{settings.KEY_PREFIX}:testing:{uuid.uuid4().hex}"
        emitters = list(settings.EMITTERS)
        if STREAM_EMITTER not in emitters:  # events() reads the streams
            emitters.append(STREAM_EMITTER)
        user = getattr(django_settings, "ORMBRIDGE", {})
        own = {**user, "KEY_PREFIX": self.prefix, "EMITTERS": emitters}
        self._stack.enter_context(override_settings(ORMBRIDGE=own))
        redis_store.breaker.reset()
        redis_store.read_breaker.reset()
        try:
            for alias in self.aliases:
                # Outermost: it acts after the buffer's wrapper noted the statement.
                wrappers = connections[alias].execute_wrappers
                wrappers.insert(0, self._deliver_writes)
                self._stack.callback(wrappers.remove, self._deliver_writes)
            # First of the cache's bypass predicates: it runs before every cached read.
            self._stack.callback(cache.add_bypass(self._before_read, first=True))
            _running.append(self)
            self._stack.callback(_running.remove, self)
            # Rows logged before the test (setUpTestData, fixtures, the last test's
            # flush) are delivered now, and what that wrote is wiped: a clean start.
            self.deliver()
        except BaseException:
            self._stack.close()
            raise
        wipe(self.prefix)

    def stop(self) -> None:
        """Stop watching, restore the settings, delete every key of the test's prefix.

        Raises:
            DeliveryError: a delivery at commit raised during the test.
        """
        stats.counts.send()  # under the test's prefix, about to be wiped
        try:
            self._stack.close()
        finally:
            wipe(self.prefix)
        if self.errors:
            raise DeliveryError(
                f"ormbridge.testing: delivering changes at commit raised {self.errors[0]!r}"
            ) from self.errors[0]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def deliver(self) -> DrainResult:
        """Deliver every change in the test's databases' change logs now.

        For what the harness cannot see: writes in a manual transaction
        (``set_autocommit(False)``) or from another thread.
        """
        from ormbridge.relay import DrainResult, drain

        result = DrainResult()
        with self._as_relay(self.aliases):
            for alias in self.aliases:
                result.add(drain(using=alias))
                _commit_buffer(connections[alias])
        self._pending.clear()
        self._unfinished.clear()
        return result

    @contextlib.contextmanager
    def _as_relay(self, aliases: Iterable[str]) -> Iterator[None]:
        """Run the relay's queries unobserved, and out of ``assertNumQueries``' count:
        in production a worker makes them."""
        logged = {alias: connections[alias].force_debug_cursor for alias in aliases}
        self._delivering = True
        try:
            for alias in logged:
                connections[alias].force_debug_cursor = False
            yield
        finally:
            for alias, value in logged.items():
                connections[alias].force_debug_cursor = value
            self._delivering = False

    def _deliver_writes(
        self,
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: Mapping[str, Any],
    ) -> Any:
        """``execute_wrapper``: after a write, deliver now or when it commits."""
        if self._delivering:  # the relay's own statements
            return execute(sql, params, many, context)
        connection: BaseDatabaseWrapper = context["connection"]
        text = sql if isinstance(sql, str) else str(sql)
        statement = text.lstrip()[:12].upper()
        if statement.startswith("ROLLBACK"):
            # Django drops a rolled-back savepoint's on_commit callbacks after
            # this statement; the RELEASE that follows settles.
            return execute(sql, params, many, context)
        if connection.alias in self._unfinished:
            self._settle(connection)  # the write before is done now
        result = execute(sql, params, many, context)
        from ormbridge.commit import may_write  # imports models: not at plugin load

        if may_write(text):
            self._wrote(connection)
            # SQLite runs a RETURNING statement's changes at once but keeps it
            # in progress until its rows are read, and refuses a savepoint or a
            # commit (the relay's) until then: deliver before the next
            # statement, cached read or assertion instead.
            if connection.vendor == "sqlite" and "RETURNING" in text.upper():
                self._unfinished.add(connection.alias)
                return result
        self._settle(connection)
        return result

    def _wrote(self, connection: BaseDatabaseWrapper) -> None:
        if _in_test_case(connection) or not connection.in_atomic_block:
            # Committed now (autocommit), or when the test's outermost own atomic
            # block ends (TestCase). A manual transaction's commit is invisible.
            if connection.in_atomic_block or connection.get_autocommit():
                self._pending.add(connection.alias)
            return
        # A real transaction: once per transaction, dropped with a rolled-back savepoint.
        ref = self._at_commit.get(connection.alias)
        callback = ref() if ref is not None else None
        if callback is None or callback.ran:
            callback = _AtCommit(self, connection.alias)
            transaction.on_commit(callback, using=connection.alias)
            self._at_commit[connection.alias] = weakref.ref(callback)

    def _before_read(self, using: str | None) -> bool:
        """A bypass predicate (:func:`ormbridge.cache.add_bypass`) that never bypasses:
        a cached read is about to begin, so the writes waiting for their statement are
        delivered first. Only in the test's thread: the connections are per thread, the
        predicates are not."""
        if not self._delivering and threading.get_ident() == self._thread:
            self.settle()
        return False

    def settle(self) -> None:
        """Deliver the writes that count as committed but wait for their statement."""
        for alias in list(self._unfinished):
            self._settle(connections[alias])

    def _settle(self, connection: BaseDatabaseWrapper) -> None:
        """Deliver ``connection``'s pending writes if they count as committed now."""
        self._unfinished.discard(connection.alias)
        if connection.alias in self._pending and _committed(connection):
            self._pending.discard(connection.alias)
            self._deliver(connection.alias)

    def _deliver(self, alias: str) -> None:
        """Deliver ``alias``'s log from inside a statement or a commit: never raises."""
        from ormbridge.relay import drain

        if self._delivering:
            return
        try:
            with self._as_relay([alias]):
                drain(using=alias)
                _commit_buffer(connections[alias])
        except Exception as exc:
            logger.exception("ormbridge.testing: delivering changes at commit failed")
            self.errors.append(exc)


_running: list[Harness] = []
"""The harnesses of the running test: the assertions settle their deliveries first."""


class _AtCommit:
    """The ``on_commit`` callback of a real transaction's writes."""

    def __init__(self, harness: Harness, alias: str) -> None:
        self.harness = harness
        self.alias = alias
        self.ran = False

    def __call__(self) -> None:
        self.ran = True
        self.harness._deliver(self.alias)


def _commit_buffer(connection: BaseDatabaseWrapper) -> None:
    """In a ``TestCase``, run the read-your-writes its commit would have run.

    The buffer's ``on_commit`` callbacks: until they run, the cache reads
    around a transaction that has written (:func:`ormbridge.commit.dirty`).
    """
    from ormbridge import commit

    if _in_test_case(connection):
        commit.commit_open(connection.alias)


def _in_test_case(connection: BaseDatabaseWrapper) -> bool:
    """Whether a ``TestCase`` (which never commits) holds the connection's transaction."""
    return any(getattr(block, "_from_testcase", False) for block in connection.atomic_blocks)


def _committed(connection: BaseDatabaseWrapper) -> bool:
    """Whether the connection's writes so far count as committed now.

    In a ``TestCase``: when no atomic block of the test's own with a savepoint
    is open (a block without one cannot roll back on its own: a failure in it
    breaks the test's transaction). Elsewhere: in autocommit.
    """
    if not _in_test_case(connection):
        return not connection.in_atomic_block and connection.get_autocommit()
    if connection.needs_rollback:
        return False
    # The innermost blocks have one savepoint id each; the outermost may have none.
    blocks = reversed(connection.atomic_blocks)
    sids = reversed(connection.savepoint_ids)
    return not any(
        sid is not None and not getattr(block, "_from_testcase", False)
        for block, sid in zip(blocks, sids, strict=False)
    )


def wipe(prefix: str) -> int:
    """Delete every key under ``prefix`` from ormbridge's Redis; returns how many.

    Never raises: a test that stopped Redis leaves its keys to Redis.
    """
    pattern = "".join(f"\\{c}" if c in "*?[]\\" else c for c in redis_store.tag(prefix)) + ":*"
    deleted = 0
    try:
        client = redis_store.get_redis()
        batch: list[str] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) == 1000:
                deleted += client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += client.unlink(*batch)
    except (redis.RedisError, OSError) as exc:
        logger.warning("ormbridge.testing: could not delete the keys of %s: %s", prefix, exc)
    return deleted


# -- assertions --------------------------------------------------------------


def assert_invalidated(*targets: models.Model | models.QuerySet[Any]) -> None:
    """Assert that the next cached read of each instance or queryset would miss.

    An instance is invalidated when a token of its row or of its model (along
    its parent chain) is gone; a queryset when the generation of a model it
    reads is. True, too, of what was never cached.
    """
    _settle_running()
    for target in targets:
        if _current(target):
            raise AssertionError(
                f"{_describe(target)} is not invalidated: its cache tokens are all current"
            )


def assert_not_invalidated(*targets: models.Model | models.QuerySet[Any]) -> None:
    """Assert that every cache token of each instance or queryset is current.

    Their entries, if cached since, would be served; the tokens exist once a
    cached read has ensured them.
    """
    _settle_running()
    for target in targets:
        if not _current(target):
            raise AssertionError(
                f"{_describe(target)} is invalidated (or was never read through the cache)"
            )


def events(namespace: str) -> list[broadcast.Event]:
    """The events emitted for ``namespace`` during this test, oldest first."""
    _settle_running()
    stream = broadcast.stream_key(namespace)
    # redis-py types replies for any client; this one decodes them (decode_responses).
    entries: list[tuple[str, dict[str, str]]] = redis_store.get_redis().xrange(stream)  # type: ignore[assignment]
    return [json.loads(fields["event"]) for _, fields in entries]


def assert_events(
    namespace: str,
    count: int | None = None,
    *,
    type: str | None = None,
    pk: Any = None,
) -> list[broadcast.Event]:
    """Assert that events were emitted for ``namespace``; returns them.

    Only events of the given ``type`` (``create``, ``update``, ``delete``, ``removed``,
    ``invalidate``) and concerning row ``pk`` (or every row) count, when
    given; ``count``: exactly that many (0: none), else at least one.
    """
    row = pk if pk is None or isinstance(pk, int | str) else str(pk)  # as events carry it
    found = [
        event
        for event in events(namespace)
        if (type is None or event["type"] == type)
        and (row is None or event["pks"] is None or row in event["pks"])
    ]
    if (count is None and not found) or (count is not None and len(found) != count):
        what = " ".join(filter(None, [type, "events", f"of pk {pk!r}" if pk is not None else ""]))
        raise AssertionError(
            f"expected {'some' if count is None else count} {what} for {namespace!r}, "
            f"found {len(found)}: {json.dumps(events(namespace), default=str)}"
        )
    return found


def _settle_running() -> None:
    for harness in _running:
        harness.settle()


def _current(target: models.Model | models.QuerySet[Any]) -> bool:
    keys = _token_keys(target)
    return bool(redis_store.get_redis().exists(*keys) == len(keys))


def _token_keys(target: models.Model | models.QuerySet[Any]) -> list[str]:
    """The tokens a cached read of ``target`` depends on (as :mod:`ormbridge.cache` keys them)."""
    if isinstance(target, models.QuerySet):
        return [redis_store.generation_key(label) for label in cache.dependencies(target)]
    if not isinstance(target, models.Model) or target.pk is None:
        raise TypeError(f"expected a saved model instance or a queryset, not {target!r}")
    return cache.instance_tokens(type(target), target.pk)


def _describe(target: models.Model | models.QuerySet[Any]) -> str:
    if isinstance(target, models.QuerySet):
        return f"the queryset {target.query}"
    return f"{target._meta.label} {target.pk!r}"


# -- Django test cases and pytest --------------------------------------------


class OrmbridgeTestMixin(_TestCaseBase):
    """Mix into a ``TestCase`` or ``TransactionTestCase``, before it in the bases.

    Each test gets a :class:`Harness` (``self.ormbridge``, for the class's
    ``databases``) in ``setUp`` (call ``super().setUp()`` if you override it),
    stopped by a cleanup; ``assertInvalidated``, ``assertNotInvalidated`` and
    ``assertEvents`` are the module's assertions.
    """

    ormbridge: Harness

    def setUp(self) -> None:
        super().setUp()
        self.ormbridge = Harness(getattr(self, "databases", None))
        self.ormbridge.start()
        self.addCleanup(self.ormbridge.stop)

    def assertInvalidated(self, *targets: models.Model | models.QuerySet[Any]) -> None:
        assert_invalidated(*targets)

    def assertNotInvalidated(self, *targets: models.Model | models.QuerySet[Any]) -> None:
        assert_not_invalidated(*targets)

    def assertEvents(
        self, namespace: str, count: int | None = None, *, type: str | None = None, pk: Any = None
    ) -> list[broadcast.Event]:
        return assert_events(namespace, count, type=type, pk=pk)


if HAS_PYTEST:

    @pytest.fixture
    def ormbridge_testing(request: pytest.FixtureRequest) -> Iterator[Harness]:
        """The test's :class:`Harness` (pytest-django). The test's ``django_db`` mark
        or ``transactional_db`` fixture decides about commits; without either it
        gets ``db`` (a transaction that never commits)."""
        request.getfixturevalue("db")
        marker = request.node.get_closest_marker("django_db")
        databases = marker.kwargs.get("databases") if marker is not None else None
        with Harness(databases) as harness:
            yield harness
