"""Read-your-writes: the committing process invalidates what it wrote, at commit.

The capture triggers put every change in the change log, and the relay
delivers it; that takes a moment. So that the writer's own next read (and
any other process's) is fresh at once, an ``execute_wrapper`` on every
database connection notes the registered tables each write statement
touches, and when the transaction commits one Redis round trip deletes the
changed rows' tokens and the models' queryset generations.

Rows are known exactly for the statements Django makes for ``save()``
(``UPDATE … WHERE pk = %s``) and ``delete()`` (``DELETE … WHERE pk IN
(…)``); for any other update or delete the model's instance epoch goes too.
This path is best effort and never raises into the host: a rolled-back
savepoint or transaction drops its notes with its ``on_commit`` callback, a
manual transaction (``set_autocommit(False)``) is left to the relay, and
Redis gets ``COMMIT_TIMEOUT`` per commit behind a circuit breaker.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from django.db import connections, models, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from ormbridge import cache, capture, registry, store
from ormbridge.models import ChangeBatch

logger = logging.getLogger("ormbridge")

# SQLite spells an insert that ignores conflicts (``bulk_create(ignore_conflicts=True)``,
# every m2m ``add()``) ``INSERT OR IGNORE INTO``; ``OR REPLACE`` and the others may follow
# INSERT or UPDATE too.
_WRITE = re.compile(
    r"\s*(INSERT(?:\s+OR\s+(?:IGNORE|REPLACE|ABORT|FAIL|ROLLBACK))?\s+INTO"
    r"|UPDATE(?:\s+OR\s+(?:IGNORE|REPLACE|ABORT|FAIL|ROLLBACK))?"
    r'|DELETE\s+FROM)\s+"?([^\s"(]+)"?',
    re.IGNORECASE,
)
_BY_PK = re.compile(r'WHERE\s+"?[^\s"]+"?\."?([^\s"]+)"?\s*=\s*%s\s*$', re.IGNORECASE)
_IN_PKS = re.compile(r'WHERE\s+"?[^\s"]+"?\."?([^\s"]+)"?\s+IN\s+\((?:%s(?:,\s*)?)+\)\s*$', re.I)


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
        forget(keys)


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


cache.bypass.append(dirty)


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
            forget(set(keys))
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


def forget(keys: set[str]) -> None:
    """Delete ``keys`` in one round trip, unless the breaker is open. Never raises."""
    if not keys or store.breaker.open:
        return
    try:
        store.commit_redis().delete(*keys)
    except (redis.RedisError, OSError) as exc:
        store.breaker.trip(exc)
    except Exception:
        logger.exception("ormbridge: invalidating at commit failed; the relay will")


def keys_for(label: str, pks: Sequence[object] | None) -> list[str]:
    """The tokens a change to ``pks`` of ``label`` kills (None: the rows are unknown)."""
    keys = [store.generation_key(label)]
    if pks is None:
        keys.append(store.epoch_key(label))
    else:
        keys += [store.token_key(label, pk) for pk in pks]
    return keys


# -- the execute wrapper ----------------------------------------------------


def observe(
    execute: Callable[..., Any],
    sql: str,
    params: Any,
    many: bool,
    context: Mapping[str, Any],
) -> Any:
    """``execute_wrapper``: run the statement, then note what it wrote to registered tables."""
    result = execute(sql, params, many, context)
    write = _parse(sql) if isinstance(sql, str) else None
    if write is not None and not any(capture.paused(label) for label in write.labels):
        try:
            note(write.keys(params, many), context["connection"].alias)
        except Exception:
            logger.exception("ormbridge: could not note a write for read-your-writes")
    return result


@dataclass(frozen=True)
class _Write:
    """What a write statement's SQL says about the rows it changes, whatever its parameters."""

    labels: tuple[str, ...]
    """Registered models whose rows it writes (both ends of an m2m table)."""
    instances: bool
    """Whether it can change rows that cached instances hold (updates and deletes)."""
    pk_params: int | None
    """How many of its last parameters are the pks of its rows (None: its rows are unknown)."""
    to_python: Callable[[Any], Any]

    def keys(self, params: Any, many: bool) -> list[str]:
        if not self.instances:  # new rows, m2m links: only querysets may hold them
            return [store.generation_key(label) for label in self.labels]
        pks = None
        count = self.pk_params
        if not many and count and isinstance(params, list | tuple) and len(params) >= count:
            pks = [self.to_python(pk) for pk in params[-count:]]
        return keys_for(self.labels[0], pks)


@functools.lru_cache(maxsize=1024)
def _parse(sql: str) -> _Write | None:
    """The write of ``sql`` to a captured table, or None (cached: Django repeats its SQL)."""
    match = _WRITE.match(sql)
    table = _tables().get(match.group(2)) if match is not None else None
    if match is None or table is None:
        return None
    verb = match.group(1)[0].upper()
    labels = tuple(target.label for target in table.targets)
    pk = registry.get_model(labels[0])._meta.pk
    replaces = "ON CONFLICT" in sql.upper() or "REPLACE" in match.group(1).upper()
    instances = not table.through and (verb != "I" or replaces)
    # WHERE pk = %s or WHERE pk IN (%s, …) ending the statement: its last parameters
    exact = None if verb == "I" else _BY_PK.search(sql) or _IN_PKS.search(sql)
    pk_params = None
    if exact is not None and exact.group(1) == table.targets[0].column:
        pk_params = exact.group(0).count("%s")
    return _Write(labels, instances, pk_params, pk.to_python)


@functools.cache
def _tables() -> dict[str, capture.Table]:
    return {table.name: table for table in capture.tables()}


def tables_changed() -> None:
    """Forget the table map and parsed statements (a model was registered)."""
    _tables.cache_clear()
    _parse.cache_clear()


def watch(connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    """``connection_created`` receiver: observe every statement of a capturing database."""
    if capture.supports(connection) and observe not in connection.execute_wrappers:
        connection.execute_wrappers.append(observe)


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
    # django-stubs: concrete_model is Optional; it is set on every model class.
    label = model._meta.concrete_model._meta.label_lower  # type: ignore[union-attr]
    using = router.db_for_write(model)
    values = None if pks is None else [model._meta.pk.get_prep_value(pk) for pk in pks]
    ChangeBatch.objects.using(using).create(
        model=label,
        action=ChangeBatch.Action.INVALIDATE,
        pks=values,
        rows=len(values or ()),
    )
    note(keys_for(label, values), using)
