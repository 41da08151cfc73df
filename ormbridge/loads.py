"""What a cached load read, and whether what it loaded may be stored for others.

Every statement a load runs is recorded (an ``execute_wrapper`` on every
connection of its thread while it runs), with the models its nested cached
reads depend on. A loaded value is stored only if every table read is
covered by the entry's tokens, read on the database the models are written
to (not a replica), outside a snapshot that may predate the last
invalidation and outside a transaction whose writes may roll back.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

from django.apps import apps
from django.db import DEFAULT_DB_ALIAS, connections, router
from django.db.backends.base.base import BaseDatabaseWrapper

from ormbridge import tables

__all__ = ["Recorder", "Uncacheable", "in_manual_transaction", "learnt", "note_nested", "recording"]


class Uncacheable(Exception):
    """A read ormbridge cannot cache exactly; it goes to the database instead.

    ``reason`` is a short code counted in the model's statistics
    (``ormbridge_status``), ``message`` says why and what to do.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def in_manual_transaction(using: str | None) -> bool:
    """Whether ``using`` (None: any open connection of this thread) is in a transaction
    begun with ``set_autocommit(False)``: ormbridge cannot see whether it wrote, nor its
    commit or rollback, so reads there go to the database."""
    if using is None:
        return any(_manual(c) for c in connections.all(initialized_only=True))
    return _manual(connections[using])


def _manual(connection: BaseDatabaseWrapper) -> bool:
    return (
        connection.connection is not None
        and not connection.in_atomic_block
        and not connection.get_autocommit()
    )


# shape -> models loads of that shape were found to read beyond their declared dependencies
_learnt: dict[str, frozenset[str]] = {}


_learnt_lock = threading.Lock()


def learnt(shape: str) -> frozenset[str]:
    """The models earlier loads of ``shape`` were found to read beyond their dependencies."""
    return _learnt.get(shape, frozenset())


def _learn(shape: str, labels: Iterable[str]) -> None:
    with _learnt_lock:
        if len(_learnt) > 4096:
            _learnt.clear()
        _learnt[shape] = _learnt.get(shape, frozenset()) | frozenset(labels)


class Recorder:
    """The statements one cached load ran and on which database (seen by :func:`record_statement`
    while it runs), and the models its nested cached reads depend on."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, str]] = []
        self.nested: set[str] = set()
        self.refused: str | None = None

    def verdict(self, covered: set[str], strict: bool, shape: str) -> Uncacheable | None:
        """Why the loaded value must not be stored under tokens covering ``covered``, or None.

        Models read but not covered are learnt for ``shape``: the next load of
        that shape reads their generations first.
        """
        if self.refused is not None:
            return Uncacheable(
                self.refused, f"a read inside this one was not cached ({self.refused})"
            )
        read = set(self.nested)
        unwatched: set[str] = set()
        aliases: dict[str, set[str]] = {}
        owners, names = tables.owners()
        for alias, sql in self.statements:
            for table in tables.tables_in(sql):
                labels = owners[table]
                if not labels:
                    unwatched.add(names[table])
                aliases.setdefault(alias, set()).update(labels)
                read.update(labels)
        if strict and unwatched:
            return Uncacheable(
                "unregistered",
                f"the load read {', '.join(sorted(unwatched))}, which ormbridge does not "
                "watch (register it), so its changes would not invalidate the entry",
            )
        for alias, read_there in aliases.items():
            refusal = _unstorable(alias, read_there)
            if refusal is not None:
                return refusal
        missing = read - covered
        if missing:
            _learn(shape, missing)
            return Uncacheable(
                "learning",
                f"the load read {', '.join(sorted(missing))} beyond what it was keyed on; "
                "the next read depends on it too",
            )
        return None


class _Stack(threading.local):
    def __init__(self) -> None:
        self.recorders: list[Recorder] = []


_stack = _Stack()


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """Record what runs in this thread until the block ends (loads nest: each records)."""
    recorder = Recorder()
    _stack.recorders.append(recorder)
    try:
        yield recorder
    finally:
        _stack.recorders.pop()


def record_statement(
    execute: Callable[..., Any],
    sql: str,
    params: Any,
    many: bool,
    context: Mapping[str, Any],
) -> Any:
    """``execute_wrapper`` of every connection: the statement, recorded for the loads
    running in this thread (connections are per thread)."""
    recorders = _stack.recorders
    if recorders and isinstance(sql, str):
        statement = (context["connection"].alias, sql)
        for recorder in recorders:
            recorder.statements.append(statement)
    return execute(sql, params, many, context)


def watch(connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    """``connection_created`` receiver: record the statements of cached loads on it."""
    if record_statement not in connection.execute_wrappers:
        connection.execute_wrappers.append(record_statement)


def note_nested(labels: Iterable[str], refused: str | None) -> None:
    """Tell the loads this read runs inside what it depends on, or that it was not stored."""
    for recorder in _stack.recorders:
        recorder.nested.update(labels)
        if refused is not None and recorder.refused is None:
            recorder.refused = refused


def _unstorable(alias: str, labels: Iterable[str]) -> Uncacheable | None:
    """Why what a load read on ``alias`` (of ``labels``) may be invisible or wrong to others."""
    connection = connections[alias]
    if _manual(connection):
        return Uncacheable("manual_transaction", f"{alias} is in a manual transaction")
    for label in labels:
        written = router.db_for_write(apps.get_model(label)) or DEFAULT_DB_ALIAS
        if written != alias:
            return Uncacheable(
                "replica",
                f"{label} was read from {alias!r}, and is written to {written!r}: a replica "
                "may lag behind the invalidation",
            )
    level = _snapshot_isolation(connection)
    if level:
        return Uncacheable(
            "snapshot",
            f"{alias} reads from a snapshot ({level}) that may predate the last invalidation",
        )
    return None


def _snapshot_isolation(connection: BaseDatabaseWrapper) -> str:
    """The open transaction's isolation level on ``connection`` if its reads may come from a
    snapshot older than the last invalidation; '' otherwise.

    Asked of the server on a raw cursor (outside ``assertNumQueries``), so a level set
    by ``OPTIONS``, libpq options, ``ALTER DATABASE/ROLE ... SET`` or ``SET TRANSACTION``
    is seen alike. In autocommit every statement is its own transaction: no snapshot
    outlives it.
    """
    if not connection.in_atomic_block or connection.connection is None:
        return ""
    vendor = connection.vendor
    if vendor == "sqlite":
        return "WAL" if _sqlite_journal(connection) == "wal" else ""
    query = _ISOLATION_QUERIES.get(vendor)
    if query is None:
        return f"{vendor}: isolation unknown"
    try:
        cursor = connection.connection.cursor()
        try:
            cursor.execute(query)
            row = cursor.fetchone()
        finally:
            cursor.close()
    except Exception as exc:  # the driver's own error, on a broken transaction
        return f"unknown ({exc.__class__.__name__})"
    level = str(row[0] if row else "").lower().replace("-", " ").replace("_", " ")
    return level if level in ("repeatable read", "serializable") else ""


_ISOLATION_QUERIES = {
    "postgresql": "SHOW transaction_isolation",
    "mysql": "SELECT @@transaction_isolation",
}


def _sqlite_journal(connection: BaseDatabaseWrapper) -> str:
    """The journal mode of the SQLite database behind ``connection``, asked once per
    connection (WAL lets a reader keep a snapshot while a writer commits)."""
    raw = connection.connection
    known = getattr(connection, "_ormbridge_journal", None)
    if known is not None and known[0] is raw:
        return cast(str, known[1])
    cursor = raw.cursor()
    try:
        cursor.execute("PRAGMA journal_mode")
        row = cursor.fetchone()
    finally:
        cursor.close()
    mode = str(row[0] if row else "").lower()
    connection._ormbridge_journal = (raw, mode)  # type: ignore[attr-defined]
    return mode
