"""Read-your-writes: the committing process invalidates what it wrote, at commit.

The capture triggers put every change in the change log, and the relay
delivers it; that takes a moment. So that the writer's own next read (and
any other process's) is fresh at once, an ``execute_wrapper`` on every
database connection notes the registered tables each write statement
touches, and when the transaction commits one Redis round trip deletes the
changed rows' tokens and the models' queryset generations.

What a statement writes is read from its SQL text (once per distinct text),
by its first keyword after leading whitespace, comments and parentheses:

- read-only statements note nothing: ``SELECT`` (``FOR UPDATE`` included),
  ``VALUES``, ``TABLE``, ``SHOW``, ``PRAGMA``, ``EXPLAIN``/``DESCRIBE``
  without ``ANALYZE``, ``SET``, transaction and savepoint control, ``LOCK``,
  cursors, and a ``WITH`` holding no ``INSERT``/``UPDATE``/``DELETE``/``MERGE``;
- ``INSERT``, ``REPLACE``, ``UPDATE``, ``DELETE`` and ``MERGE`` of one table
  write that table only (the others they name are read). Rows are exact only
  for the shapes of ``save()`` and ``delete()``: ``UPDATE "t" SET … WHERE
  "t"."pk" = %s`` and ``DELETE FROM "t" WHERE "t"."pk" IN (%s, …)`` (either
  of ``=`` and ``IN``), whose last parameters are the pks. An ``INSERT`` that
  cannot change existing rows (plain, ``ON CONFLICT DO NOTHING``, ``INSERT OR
  IGNORE``, ``INSERT IGNORE``) only adds rows: the model's queryset generation
  goes. Any other write to the table kills the model wholesale: its instance
  epoch and queryset generation;
- anything else (``TRUNCATE``, data-modifying CTEs, several statements in one
  string, MySQL's multi-table forms, DDL, ``DO`` blocks…) kills wholesale
  every captured table its text names, quoted or bare, in any case,
  schema-qualified or not; ``TRUNCATE … CASCADE`` every captured table.
  ``EXPLAIN ANALYZE`` counts as the statement it runs.

A write to an m2m table kills both ends' queryset generations. When in doubt,
more is invalidated, never less. What no statement text names is left to the
relay: writes made by functions and procedures (``SELECT f()``, ``CALL``), by
the database's own triggers, rules and foreign-key actions, or through a view
or a prepared statement (``EXECUTE``).

This path is best effort and never raises into the host: a rolled-back
savepoint or transaction drops its notes with its ``on_commit`` callback, a
manual transaction (``set_autocommit(False)``) is left to the relay, and
Redis gets ``COMMIT_TIMEOUT`` per commit behind a circuit breaker.
"""

from __future__ import annotations

import functools
import logging
import re
import string
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from django.core.exceptions import ValidationError
from django.db import connections, models, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from ormbridge import cache, capture, redis_store, registry
from ormbridge.models import ChangeBatch

__all__ = [
    "Changes",
    "commit_open",
    "delete_keys",
    "dirty",
    "invalidate",
    "keys_for",
    "may_write",
    "note",
    "note_writes",
    "tables_changed",
    "watch",
]

logger = logging.getLogger(__name__)


class Changes:
    """Keys to delete at the commit of one savepoint level of a transaction."""

    def __init__(self, using: str) -> None:
        self.using = using
        self.keys: set[str] = set()
        self.delivered = False

    def __call__(self) -> None:
        """The ``on_commit`` callback: delete these keys and those of committed siblings.

        Every ``Changes`` of the transaction still referenced by Django survived
        its savepoints, so the first callback to run delivers them all at once.
        """
        if self.delivered:
            return
        keys = set(self.keys)
        for changes in _open_changes(self.using):
            if not changes.delivered:
                keys |= changes.keys
                changes.delivered = True
        self.delivered = True
        delete_keys(keys)


class _Local(threading.local):
    def __init__(self) -> None:
        # alias -> {savepoint path: weak reference to the Changes registered there}
        self.open: dict[str, dict[tuple[str, ...], weakref.ref[Changes]]] = defaultdict(dict)


_local = _Local()


def _open_changes(using: str) -> list[Changes]:
    """The ``Changes`` of the current transaction on ``using`` that Django still holds."""
    slots = _local.open[using]
    alive = {path: ref for path, ref in slots.items() if ref() is not None}
    slots.clear()
    slots.update(alive)
    return [changes for ref in alive.values() if (changes := ref()) is not None]


def dirty(using: str | None) -> bool:
    """Whether the open transaction on ``using`` (None: any alias) has noted writes."""
    aliases = [using] if using is not None else list(_local.open)
    return any(
        connections[alias].in_atomic_block
        and any(not changes.delivered for changes in _open_changes(alias))
        for alias in aliases
    )


cache.add_bypass(dirty)  # reads inside a transaction that wrote skip the cache


def commit_open(using: str) -> None:
    """Run the open transaction's read-your-writes now, as its commit would.

    For test harnesses: a ``TestCase``'s transaction never commits.
    """
    for changes in _open_changes(using):
        changes()


def note(keys: Iterable[str], using: str) -> None:
    """Delete ``keys`` from ormbridge's Redis when the current transaction commits.

    At once in autocommit; nothing in a manual transaction (the relay covers it).
    """
    connection = connections[using]
    if not connection.in_atomic_block:
        if connection.get_autocommit():
            delete_keys(set(keys))
        return
    # One Changes per savepoint level, registered with on_commit there: Django
    # drops it (and our weak reference dies) if that savepoint rolls back.
    path = tuple(sid for sid in connection.savepoint_ids if sid is not None)
    slots = _local.open[using]
    ref = slots.get(path)
    changes = ref() if ref is not None else None
    if changes is None or changes.delivered:
        changes = Changes(using)
        transaction.on_commit(changes, using=using, robust=True)
        slots[path] = weakref.ref(changes)
    changes.keys.update(keys)


def delete_keys(keys: set[str]) -> None:
    """Delete ``keys`` in one round trip, unless the breaker is open. Never raises."""
    if not keys or redis_store.breaker.open:
        return
    try:
        redis_store.commit_redis().delete(*keys)
    except (redis.RedisError, OSError) as exc:
        redis_store.breaker.trip(exc)
    except Exception:
        logger.exception("ormbridge: invalidating at commit failed; the relay will")


def keys_for(label: str, pks: Sequence[object] | None) -> list[str]:
    """The tokens a change to ``pks`` of ``label`` kills (None: the rows are unknown)."""
    keys = [redis_store.generation_key(label)]
    if pks is None:
        keys.append(redis_store.epoch_key(label))
    else:
        keys += [redis_store.token_key(label, pk) for pk in pks]
    return keys


# -- the execute wrapper ----------------------------------------------------


def note_writes(
    execute: Callable[..., Any],
    sql: Any,
    params: Any,
    many: bool,
    context: Mapping[str, Any],
) -> Any:
    """``execute_wrapper``: run the statement, then note what it wrote to captured tables."""
    result = execute(sql, params, many, context)
    try:
        writes = _parse(sql) if isinstance(sql, str) else _parse_other(sql, context)
        if writes:
            keys = [
                key
                for write in writes
                if not any(capture.paused(label) for label in write.labels)
                for key in write.keys(params, many)
            ]
            if keys:
                note(keys, context["connection"].alias)
    except Exception:
        logger.exception("ormbridge: could not note a write for read-your-writes")
    return result


def _parse_other(sql: Any, context: Mapping[str, Any]) -> tuple[_Write, ...]:
    """The writes of a statement given as bytes or a psycopg ``sql.Composable``.

    Parsed as its text; if it has none we can read, a write to every captured table.
    """
    try:
        if isinstance(sql, bytes):
            return _parse(sql.decode())
        return _parse(str(sql.as_string(context["connection"].connection)))
    except Exception:
        return _catalog().every


@dataclass(frozen=True)
class _Write:
    """What a statement's SQL says it writes to one captured table, whatever its parameters."""

    table: capture.Table
    labels: tuple[str, ...]
    """Registered models whose rows it writes (both ends of an m2m table)."""
    instances: bool
    """Whether it can change rows that cached instances hold (not when it adds rows only)."""
    pk_params: int | None = None
    """How many of its last parameters are the pks of its rows (None: its rows are unknown)."""
    to_python: Callable[[Any], Any] | None = None
    """The pk field's ``to_python``, when ``pk_params`` is set."""

    def keys(self, params: Any, many: bool) -> list[str]:
        if not self.instances:  # new rows, m2m links: only querysets may hold them
            return [redis_store.generation_key(label) for label in self.labels]
        pks = None
        count = self.pk_params
        if (
            not many
            and count
            and self.to_python is not None
            and isinstance(params, list | tuple)
            and len(params) >= count
        ):
            try:
                pks = [self.to_python(pk) for pk in params[-count:]]
            except (TypeError, ValueError, ValidationError):  # not pks after all: every row
                pks = None
        return keys_for(self.labels[0], pks)


def _write(table: capture.Table, instances: bool = True, pk_params: int | None = None) -> _Write:
    """A write to ``table``: of the rows whose pks are its last ``pk_params`` parameters, if set."""
    to_python = None
    if pk_params is not None:
        to_python = registry.get_model(table.targets[0].label)._meta.pk.to_python
    labels = tuple(target.label for target in table.targets)
    return _Write(table, labels, instances and not table.through, pk_params, to_python)


# -- classifying statements (see the module docstring) -----------------------

# Statements that never change a table's rows (SELECT and VALUES cannot hold a
# data-modifying statement in PostgreSQL, SQLite or MySQL; WITH can).
_READS = frozenset(
    {
        *("SELECT", "VALUES", "TABLE", "SHOW", "PRAGMA", "DECLARE", "FETCH", "MOVE", "CLOSE"),
        *("SET", "RESET", "SAVEPOINT", "RELEASE", "ROLLBACK", "ABORT", "BEGIN", "START"),
        *("COMMIT", "END", "LOCK", "LISTEN", "UNLISTEN", "NOTIFY", "ANALYZE", "ANALYSE"),
        "VACUUM",
    }
)
_EXPLAINS = frozenset({"EXPLAIN", "DESCRIBE", "DESC"})  # they run the statement with ANALYZE
_WORD = re.compile(r"[A-Za-z_]+")
_ANALYZE = re.compile(r"\bANALY[SZ]E\b", re.I)
_EXPLAIN = re.compile(
    r"\w+(?:\s*\([^)]*\)|\s+(?:ANALY[SZ]E|VERBOSE|QUERY\s+PLAN|EXTENDED|FORMAT\s*=\s*\w+)\b)*",
    re.I,
)
_LOCKING = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+)?UPDATE\b", re.I)
_MODIFIES = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE|REPLACE\s+INTO)\b", re.I)
_CASCADE = re.compile(r"\bCASCADE\b", re.I)
# An INSERT that says UPDATE (ON CONFLICT DO UPDATE, ON DUPLICATE KEY UPDATE) can
# change existing rows, as INSERT OR REPLACE and REPLACE INTO can.
_UPSERT = re.compile(r"\bUPDATE\b", re.I)

# An identifier ("quoted", `quoted`, [quoted] or bare) and a name (identifiers and dots).
_PART = r'(?:"(?:[^"]|"")*"|`[^`]*`|\[[^\]]*\]|[^\W\d][\w$]*(?![\w$]))'
_NAME = rf"{_PART}(?:\s*\.\s*{_PART})*"
_PARTS = re.compile(_PART)
_TARGET = rf"(?P<name>{_NAME})(?:\s*\*)?"
_ALIAS = rf"(?:\s+(?:AS\s+)?(?P<alias>{_PART}))?"
# The statements of one target table, up to its name (and alias).
_SHAPES = {
    "INSERT": re.compile(
        r"INSERT(?:\s+OR\s+(?P<conflict>\w+))?(?:\s+(?:LOW_PRIORITY|DELAYED|HIGH_PRIORITY|IGNORE))*"
        rf"(?:\s+INTO)?\s+{_TARGET}(?=[\s(]|$)",
        re.I,
    ),
    "REPLACE": re.compile(
        rf"REPLACE(?:\s+(?:LOW_PRIORITY|DELAYED))*(?:\s+INTO)?\s+{_TARGET}(?=[\s(]|$)", re.I
    ),
    "UPDATE": re.compile(
        rf"UPDATE(?:\s+(?:OR\s+\w+|LOW_PRIORITY|IGNORE|ONLY))*\s+{_TARGET}{_ALIAS}\s+SET\b",
        re.I,
    ),
    "DELETE": re.compile(
        rf"DELETE(?:\s+(?:LOW_PRIORITY|QUICK|IGNORE))*\s+FROM(?:\s+ONLY)?\s+{_TARGET}{_ALIAS}"
        r"\s*(?:(?:WHERE|USING|RETURNING|ORDER|LIMIT)\b|$)",
        re.I,
    ),
    "MERGE": re.compile(rf"MERGE\s+INTO(?:\s+ONLY)?\s+{_TARGET}(?=\s|$)", re.I),
}
# How the statements of save() (WHERE pk = %s) and delete() (WHERE pk IN (%s, ...)) end.
_BY_PK = re.compile(
    rf"\sWHERE\s+(?P<qualifier>{_NAME})\s*\.\s*(?P<column>{_PART})\s*"
    r"(?:=\s*%s|IN\s*\((?:\s*%s\s*,)*\s*%s\s*\))$",
    re.I,
)


@functools.lru_cache(maxsize=1024)
def may_write(sql: str) -> bool:
    """Whether ``sql`` may change rows of any table (captured or not): it is not one of
    the statements that never do (``SELECT``, ``SET``, ``SAVEPOINT``, a ``WITH`` holding
    no data-modifying statement, ``EXPLAIN`` without ``ANALYZE``...)."""
    text = _trimmed(sql)
    word = _WORD.match(text)
    keyword = word.group().upper() if word is not None else ""
    if ";" in text:
        return True
    if keyword in _READS:
        return False
    if keyword in _EXPLAINS:
        head = _EXPLAIN.match(text)
        return head is not None and bool(_ANALYZE.search(text)) and may_write(text[head.end() :])
    if keyword == "WITH":
        return bool(_MODIFIES.search(_LOCKING.sub(" ", text)))
    return True


@functools.lru_cache(maxsize=1024)
def _parse(sql: str) -> tuple[_Write, ...]:
    """The writes of ``sql`` to captured tables (cached: Django repeats its SQL)."""
    return _classify(sql, _catalog())


def _classify(sql: str, catalog: _Catalog) -> tuple[_Write, ...]:
    text = _trimmed(sql)
    if ";" in text:  # several statements (or a ';' in a literal): whatever they name
        return catalog.mentioned(text)
    word = _WORD.match(text)
    keyword = word.group().upper() if word is not None else ""
    if keyword in _READS:
        return ()
    if keyword in _EXPLAINS:
        head = _EXPLAIN.match(text)
        if head is None or not _ANALYZE.search(text):
            return ()
        return _classify(text[head.end() :], catalog)
    if keyword == "WITH":
        return catalog.mentioned(text) if _MODIFIES.search(_LOCKING.sub(" ", text)) else ()
    if keyword == "TRUNCATE" and _CASCADE.search(text):  # and every table referencing them
        return catalog.every
    shape = _SHAPES.get(keyword)
    target = shape.match(text) if shape is not None else None
    if target is None:
        return catalog.mentioned(text)
    tables = catalog.named(target.group("name"))
    if keyword == "INSERT":
        upsert = (target.group("conflict") or "").upper() == "REPLACE" or _UPSERT.search(text)
        return tuple(_write(table, instances=bool(upsert)) for table in tables)
    if keyword in ("UPDATE", "DELETE") and len(tables) == 1:
        pk_params = _pk_params(text, target, tables[0])
        if pk_params is not None:
            return (_write(tables[0], pk_params=pk_params),)
    return tuple(_write(table) for table in tables)


def _pk_params(text: str, target: re.Match[str], table: capture.Table) -> int | None:
    """How many pks end ``text``, if it is Django's ``UPDATE "t" SET … WHERE "t"."pk" = %s``
    or ``DELETE FROM "t" WHERE "t"."pk" IN (%s, …)`` (either of = and IN)."""
    head = text[: target.start("name")].split()
    if [word.upper() for word in head] not in (["UPDATE"], ["DELETE", "FROM"]):
        return None  # OR REPLACE, ONLY...
    if "--" in text or "#" in text:  # a line comment could hide the real end (MySQL: #)
        return None
    where = _BY_PK.search(text)
    if (
        where is None
        or target.group("alias")
        or _parts(where.group("qualifier")) != _parts(target.group("name"))
        or _parts(where.group("column")) != (table.targets[0].column.lower(),)
    ):
        return None
    return where.group().count("%s")


_TRAILING = string.whitespace + ";"


def _trimmed(sql: str) -> str:
    """``sql`` without leading whitespace, comments and '(', or trailing ';' and comments."""
    start, end = 0, len(sql)
    while start < end:
        if sql[start].isspace() or sql[start] == "(":
            start += 1
        elif sql.startswith("--", start):
            newline = sql.find("\n", start)
            start = end if newline < 0 else newline + 1
        elif sql.startswith("/*", start):
            close = sql.find("*/", start + 2)
            start = end if close < 0 else close + 2
        else:
            break
    text = sql[start:]
    while True:
        text = text.rstrip(_TRAILING)
        opening = text.rfind("/*") if text.endswith("*/") else -1
        if opening < 0:
            return text
        text = text[:opening]


def _parts(name: str) -> tuple[str, ...]:
    """The identifiers of a name in SQL (``"public"."t"``: public, t), unquoted, lower case."""
    parts = []
    for found in _PARTS.finditer(name):
        part = found.group()
        if part[0] in '"`[':
            part = part[1:-1].replace('""', '"')
        parts.append(part.lower())
    return tuple(parts)


class _Catalog:
    """The captured tables, to find in SQL text by their names."""

    def __init__(self, tables: Sequence[capture.Table]) -> None:
        self.by_name: dict[str, list[capture.Table]] = defaultdict(list)
        for table in tables:
            # Django's way to a schema is db_table = 'schema"."table'.
            self.by_name[table.name.strip('"').split('"."')[-1].lower()].append(table)
        self.every = tuple(_write(table) for table in tables)  # rows unknown
        names = sorted(self.by_name, key=len, reverse=True)
        bare = [name for name in names if re.fullmatch(r"[^\W\d][\w$]*", name)]
        alternatives = [rf'["`\[](?P<quoted>{"|".join(map(re.escape, names))})["`\]]']
        if bare:
            alternatives.append(rf"(?<![\w$])(?P<bare>{'|'.join(map(re.escape, bare))})(?![\w$])")
        self.mentions = re.compile("|".join(alternatives), re.I) if names else None

    def named(self, name: str) -> tuple[capture.Table, ...]:
        """The captured tables a table name in SQL (quoted or not, with a schema or not) can be."""
        parts = _parts(name)
        return tuple(self.by_name.get(parts[-1], ())) if parts else ()

    def mentioned(self, text: str) -> tuple[_Write, ...]:
        """A write of each captured table ``text`` names, rows unknown."""
        if self.mentions is None:
            return ()
        names = {
            found.group(found.lastgroup or 0).lower() for found in self.mentions.finditer(text)
        }
        return tuple(_write(table) for name in sorted(names) for table in self.by_name[name])


@functools.cache
def _catalog() -> _Catalog:
    return _Catalog(capture.tables())


def tables_changed() -> None:
    """Forget the captured tables and parsed statements (a model was registered)."""
    _catalog.cache_clear()
    _parse.cache_clear()


def watch(connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    """``connection_created`` receiver: observe every statement of a capturing database."""
    if capture.supports(connection) and note_writes not in connection.execute_wrappers:
        connection.execute_wrappers.append(note_writes)


# -- invalidate() -----------------------------------------------------------


def invalidate(model: type[models.Model], pks: Iterable[object] | None = None) -> None:
    """Invalidate cached data of ``model``: the given rows, or all of it when ``pks`` is None.

    For changes ormbridge cannot see (another database, a file the rows are
    built from). Logged in the current transaction on the model's write
    database, so it happens if and only if that transaction commits: at
    commit in this process, and by the relay (events included).

    Raises:
        LookupError: the model is not registered with ormbridge.
    """
    registry.options(model)
    label = registry.label_of(model)
    using = router.db_for_write(model)
    values = None if pks is None else [model._meta.pk.get_prep_value(pk) for pk in pks]
    ChangeBatch.objects.using(using).create(
        model=label,
        action=ChangeBatch.Action.INVALIDATE,
        pks=values,
        rows=len(values or ()),
    )
    note(keys_for(label, values), using)
