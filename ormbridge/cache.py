"""A dependency-tracked cache of instances, querysets and values, kept fresh by ormbridge.

Entries live in ormbridge's Redis, next to the tokens they depend on. An
entry starts with the *stamp* of its tokens (the server's run id and each
token's value); a hit is one MGET of the tokens and the entry whose stamp is
still theirs. A miss creates missing tokens and stores the loaded value under
their stamp, unless an invalidation deleted one in the meantime. An invalidation deletes tokens,
so a reader that loaded old data before a write committed cannot make it live
again by storing it after the invalidation ran: it stores under the old stamp,
which no later read produces (the stale-set race; cf. "Scaling Memcache at
Facebook", NSDI 2013).

- an instance depends on its row's token and its model's epoch token, for
  every table of its parent chain (multi-table inheritance);
- anything else depends on the generation token of every model it reads, so
  any change to one of them invalidates all of them in O(1);
- every stamp leads with the Redis server's run id, so a restart from an old
  snapshot or a failover cannot revive deleted tokens.

A read inside a transaction whose snapshot may predate a flush, or on a
replica, is served from the cache but never stored: what it loaded may be
older than the last invalidation (see :func:`storable`). A read inside a
transaction that has written goes to the database: its own uncommitted rows
are neither hidden from it nor stored for others.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import pickle
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import redis
from django.apps import apps
from django.core.exceptions import EmptyResultSet, FieldDoesNotExist
from django.db import DEFAULT_DB_ALIAS, connections, models, router
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models.constants import LOOKUP_SEP
from django.db.models.sql import Query

from ormbridge import registry, store
from ormbridge.conf import settings

logger = logging.getLogger("ormbridge")

M = TypeVar("M", bound=models.Model)
T = TypeVar("T")

# Tokens outlive the entries stored under them by this many seconds.
TOKEN_GRACE = 60
# What an entry's unpickling may raise when the code changed since it was stored.
STALE_PICKLE = (pickle.UnpicklingError, AttributeError, ImportError, EOFError, TypeError)


def cached_instance(model: type[M], pk: Any = None, **unique: Any) -> M:
    """The instance of ``model`` with primary key ``pk``, from the cache when fresh.

    Or by the values of a unique field or unique set of fields instead of the
    pk: ``cached_instance(Category, name="books")``; which pk they name is
    cached too, until any row of the model changes.
    On a miss the row is loaded with ``model._default_manager`` and cached.
    A proxy's instances have entries of their own (they are of another class)
    under its concrete model's tokens, which every write to the table kills.
    A multi-table child's entry also depends on its parents' rows.

    Raises:
        model.DoesNotExist: like ``get()``.
        LookupError: the model is not registered with ormbridge (nothing would
            invalidate it).
        TypeError: neither or both of ``pk`` and a unique lookup given, or the
            lookup is not unique.
    """
    if (pk is None) == (not unique):
        raise TypeError(
            f"cached_instance({model.__name__}, ...) takes a pk or a unique lookup "
            "such as name='books', one of the two."
        )
    if unique:
        pk = _pk_of(model, unique)
    manager = model._default_manager
    pk = model._meta.pk.to_python(pk)
    return instance(model, pk, lambda: manager.get(pk=pk), manager.db, timeout_of(model))


def instance(model: type[M], pk: Any, load: Callable[[], M], using: str, timeout: int | None) -> M:
    """The cached instance of ``model`` with ``pk`` (a Python value), ``load()`` on a miss.

    The one entry per row that :func:`cached_instance` and ``.cache().get(pk=...)``
    share: it depends on the row (and its parent rows), not on the whole table.
    """
    return _read(
        instance_key(model._meta.label_lower, pk),
        _instance_tokens(model, pk),
        [label_of(model)],
        timeout,
        load,
        using,
        model,
    )


def read_through(
    name: str,
    labels: Sequence[str],
    load: Callable[[], T],
    timeout: int | None,
    using: str | None = None,
    model: type[models.Model] | None = None,
) -> T:
    """``load()``'s result, cached under ``name`` until a row of any of ``labels`` changes.

    ``name`` is any text (it is hashed); ``labels`` come from :func:`dependencies`;
    the result must be picklable. ``using`` and ``model``: the database ``load``
    reads and for which model, if known (see :func:`storable`). Hits, misses and
    stores are counted for ``model``, or for each of ``labels`` without one.
    """
    digest = hashlib.sha256(name.encode()).hexdigest()
    return _read(
        store.key("entry", digest),
        [store.generation_key(label) for label in labels],
        [label_of(model)] if model is not None else list(labels),
        timeout,
        load,
        using,
        model,
    )


def dependencies(*sources: type[models.Model] | models.QuerySet[Any]) -> list[str]:
    """Sorted labels of the registered models that ``sources`` (models or querysets) read.

    A queryset reads its joins, subqueries and prefetched relations; a proxy or a
    multi-table child reads its concrete tables.

    Raises:
        LookupError: a source reads a model that is not registered with ormbridge.
        TypeError: a source is neither a model nor a queryset, or prefetches
            something ormbridge cannot follow.
    """
    labels: set[str] = set()
    for source in sources:
        if isinstance(source, models.QuerySet):
            labels.update(queryset_dependencies(source))
        elif isinstance(source, type) and issubclass(source, models.Model):
            if not registry.is_registered(source):
                raise LookupError(
                    f"{source._meta.label} is not registered with ormbridge, so its changes "
                    "would not invalidate what is cached against it."
                )
            labels.update(label_of(m) for m in [source, *source._meta.get_parent_list()])
        else:
            raise TypeError(
                f"ormbridge caches against models and querysets, not {source!r} "
                f"({type(source).__name__})."
            )
    return sorted(labels)


def default_timeout(labels: Iterable[str]) -> int | None:
    """The shortest timeout of the models in ``labels`` (``CACHE_TIMEOUT`` without any)."""
    timeouts = [timeout_of(apps.get_model(label)) for label in labels]
    finite = [t for t in timeouts if t is not None]
    if finite:
        return min(finite)
    return None if timeouts else settings.CACHE_TIMEOUT


# Predicates of a database alias (None: any this thread uses) under which reads
# go to the database, neither served nor stored. The buffer adds one: "the open
# transaction has written", whose rows the cache must neither hide nor keep.
bypass: list[Callable[[str | None], bool]] = []


def storable(using: str | None, model: type[models.Model] | None = None) -> bool:
    """Whether what a read on ``using`` loads may be stored.

    Not inside a transaction whose snapshot may be older than the last
    invalidation (REPEATABLE READ or SERIALIZABLE; SQLite in WAL mode), and not
    from a database the router sends ``model``'s reads to but not its writes (a
    replica may lag behind the flush). ``using=None``: any open connection of
    this thread.
    """
    if using is None:
        return not any(_in_snapshot(c) for c in connections.all(initialized_only=True))
    if _in_snapshot(connections[using]):
        return False
    return model is None or (router.db_for_write(model) or DEFAULT_DB_ALIAS) == using


def _in_snapshot(connection: BaseDatabaseWrapper) -> bool:
    if not connection.in_atomic_block:
        return False
    if connection.vendor == "sqlite":
        options = connection.settings_dict.get("OPTIONS", {})
        return "wal" in str(options.get("init_command", "")).lower()
    level = getattr(connection, "isolation_level", None)
    name = str(getattr(level, "name", level) or "").lower().replace("_", " ")
    return name in ("repeatable read", "serializable")


def _read(
    entry_key: str,
    token_keys: list[str],
    labels: list[str],
    timeout: int | None,
    load: Callable[[], T],
    using: str | None,
    model: type[models.Model] | None,
) -> T:
    """A hit is one MGET of the tokens and the entry; a miss runs the load and two scripts."""
    if (timeout is not None and timeout <= 0) or any(check(using) for check in bypass):
        return load()  # a timeout of 0 caches nothing, as in Django
    try:
        client = store.entries_redis()  # a cluster client connects when it is created
        run_id = store.incarnation(client)
        # Bytes: this client does not decode responses.
        *tokens, entry = cast(list[bytes | None], client.mget([*token_keys, entry_key]))
        if client.run_id != run_id:  # it reconnected, to a restarted or another server
            run_id = client.run_id
            *tokens, entry = cast(list[bytes | None], client.mget([*token_keys, entry_key]))
    except redis.RedisError as exc:
        logger.warning("ormbridge: Redis unreachable, reading the database: %s", exc)
        return load()
    if entry is not None and all(token is not None for token in tokens):
        stamp = b" ".join([run_id.encode(), *cast(list[bytes], tokens)]) + b"\n"
        if entry.startswith(stamp) and (value := _unpickle(entry, len(stamp))) is not _STALE:
            hits.add(labels)
            return cast(T, value)
    return _miss(client, run_id, entry_key, token_keys, labels, timeout, load, using, model)


def _miss(
    client: store.Client,
    run_id: str,
    entry_key: str,
    token_keys: list[str],
    labels: list[str],
    timeout: int | None,
    load: Callable[[], T],
    using: str | None,
    model: type[models.Model] | None,
) -> T:
    """Create missing tokens, load, and store under their stamp if they still hold it."""
    stats = [store.stats_key(label) for label in labels]
    ttl = 0 if timeout is None else int(timeout) + TOKEN_GRACE
    try:
        found, data = store.script(store.READ_ENTRY, client)(
            keys=[entry_key, *stats, *token_keys],
            args=[os.urandom(8).hex(), ttl, run_id, len(stats)],
        )
    except redis.RedisError as exc:
        logger.warning("ormbridge: Redis unreachable, reading the database: %s", exc)
        return load()
    if found:  # stored by another reader since the MGET
        value = _unpickle(data, 0)
        return cast(T, value) if value is not _STALE else load()
    value = load()
    # A reconnection during the read may have reached another incarnation.
    if client.run_id == run_id and storable(using, model):
        try:
            store.script(store.STORE_ENTRY, client)(
                keys=[entry_key, *token_keys, *stats],
                args=[
                    data,
                    data + pickle.dumps(value, pickle.HIGHEST_PROTOCOL),
                    timeout or 0,
                    ttl,
                    run_id,
                    len(token_keys),
                ],
            )
        except redis.RedisError as exc:
            logger.warning("ormbridge: Redis unreachable, %s not cached: %s", entry_key, exc)
    return value


_STALE = object()


def _unpickle(entry: bytes, start: int) -> Any:
    """The value pickled in ``entry`` from ``start``; ``_STALE`` if the code changed since."""
    try:
        return pickle.loads(memoryview(entry)[start:])
    except STALE_PICKLE:
        return _STALE


class Hits:
    """Cache hits, counted in memory and added to Redis at most every ``every`` seconds.

    A hit is one MGET: counting it there would cost a second command. Misses
    and stores are counted by the scripts they run anyway.
    """

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._sent = time.monotonic()

    def add(self, labels: Iterable[str]) -> None:
        with self._lock:
            self._counts.update(labels)
            due = time.monotonic() - self._sent >= self.every
        if due:
            self.send()

    def send(self) -> None:
        """Add the hits counted so far to Redis now (the status command reads them there)."""
        with self._lock:
            counts, self._counts, self._sent = self._counts, Counter(), time.monotonic()
        if not counts:
            return
        try:
            pipe = store.get_redis().pipeline(transaction=False)
            for label, n in counts.items():
                pipe.hincrby(store.stats_key(label), "hits", n)
            pipe.execute()
        except redis.RedisError as exc:
            logger.debug("ormbridge: hit counts not sent: %s", exc)


hits = Hits()
atexit.register(hits.send)


def _instance_tokens(model: type[models.Model], pk: Any) -> list[str]:
    """Row and epoch tokens of every table along the pk's parent links; the
    generation of any other parent (multiple inheritance)."""
    keys: list[str] = []
    chain: list[type[models.Model]] = []
    current: type[models.Model] | None = model._meta.concrete_model
    while current is not None:
        chain.append(current)
        label = current._meta.label_lower
        keys += [store.epoch_key(label), store.token_key(label, pk)]
        link = current._meta.pk
        parent_link = link is not None and link.remote_field and link.remote_field.parent_link
        current = link.related_model if parent_link else None
    for parent in model._meta.get_parent_list():
        if parent not in chain:
            keys.append(store.generation_key(parent._meta.label_lower))
    return keys


def _pk_of(model: type[models.Model], unique: dict[str, Any]) -> Any:
    """The pk of the row ``unique`` names, cached under the model's queryset generation."""
    names = frozenset(unique)
    if names not in _unique_sets(model):
        choices = " or ".join(", ".join(sorted(s)) for s in sorted(_unique_sets(model), key=sorted))
        raise TypeError(
            f"cached_instance({model.__name__}, {', '.join(sorted(names))}=...): that lookup "
            f"is not unique on {model._meta.label}; use the pk or: {choices}."
        )
    manager = model._default_manager
    digest = hashlib.sha256(repr(sorted(unique.items())).encode()).hexdigest()
    return _read(
        store.key(model._meta.label_lower, "by", digest),
        [store.generation_key(label) for label in dependencies(model)],
        [label_of(model)],
        timeout_of(model),
        lambda: manager.filter(**unique).values_list("pk", flat=True).get(),
        manager.db,
        model,
    )


def _unique_sets(model: type[models.Model]) -> set[frozenset[str]]:
    """The field-name sets whose values name at most one row of ``model``."""
    meta = model._meta
    sets = {frozenset([f.name]) for f in meta.concrete_fields if f.unique}
    sets |= {frozenset(together) for together in meta.unique_together}
    for constraint in meta.constraints:
        if (
            isinstance(constraint, models.UniqueConstraint)
            and constraint.condition is None
            and constraint.fields
        ):
            sets.add(frozenset(constraint.fields))
    return sets


def instance_key(label: str, pk: Any) -> str:
    """The Redis key of a cached instance."""
    return store.key(label, "obj", pk)


def forget(model: type[models.Model], pks: Iterable[str], pipe: store.Pipeline) -> int:
    """Invalidate the cached instances of ``pks`` (as text) and the model's querysets.

    Queued on ``pipe`` (the caller executes it). Returns how many instance
    entries were asked to be deleted.
    """
    label = model._meta.label_lower
    pks = list(pks)
    if pks:
        pipe.delete(*(store.token_key(label, pk) for pk in pks))
        pipe.delete(*(instance_key(label, pk) for pk in pks))
    pipe.delete(store.generation_key(label))
    return len(pks)


def forget_all(model: type[models.Model], pipe: store.Pipeline) -> None:
    """Invalidate every cached instance and queryset of ``model`` in O(1)."""
    label = model._meta.label_lower
    pipe.delete(store.epoch_key(label), store.generation_key(label))


def label_of(model: type[models.Model]) -> str:
    """The label whose tokens a model's rows use: its concrete model's."""
    return model._meta.concrete_model._meta.label_lower  # type: ignore[union-attr]  # always set


def timeout_of(model: type[models.Model]) -> int | None:
    """Seconds the model's entries live: its ``cache_timeout``, else ``CACHE_TIMEOUT``."""
    own = registry.options(model).cache_timeout
    return settings.CACHE_TIMEOUT if own is None else own


# -- querysets: what a query reads, and what names its result


class Compiled:
    """A queryset's SQL and what it depends on, computed once per read."""

    def __init__(self, queryset: models.QuerySet[Any]) -> None:
        # Compiled in place, as evaluating the queryset (or str(queryset.query)) does.
        query = queryset.query
        self.sql, self.params = query.get_compiler(using=queryset.db).as_sql()
        prefetched = [_prefetch_key(lookup) for lookup in queryset._prefetch_related_lookups]  # type: ignore[attr-defined]
        self.labels = _labels_of(queryset, query, self.sql, prefetched)
        self.key = "\0".join(
            [
                queryset.db,
                queryset.model._meta.label_lower,  # a proxy's rows are of its own class
                self.sql,
                repr(self.params),
                queryset._iterable_class.__qualname__,
                repr(queryset._fields),  # type: ignore[attr-defined]
                *prefetched,
            ]
        )


def compile_queryset(queryset: models.QuerySet[Any]) -> Compiled | None:
    """The queryset's SQL, key and dependencies; None when it matches nothing by
    construction (``filter(pk__in=[])``), locks rows or is in random order: such
    reads are not cached."""
    if queryset.query.select_for_update or "?" in queryset.query.order_by:
        return None
    try:
        return Compiled(queryset)
    except EmptyResultSet:
        return None


def queryset_dependencies(queryset: models.QuerySet[Any]) -> set[str]:
    """Labels of the registered models ``queryset`` reads, prefetches included."""
    compiled = compile_queryset(queryset)
    if compiled is not None:
        return set(compiled.labels)
    return {label_of(queryset.model)} | _prefetch_labels(queryset)


_labels_by_sql: dict[tuple[str, str], tuple[str, ...]] = {}
registry.on_change(_labels_by_sql.clear)


def _labels_of(
    queryset: models.QuerySet[Any], compiled: Query, sql: str, prefetched: list[str]
) -> tuple[str, ...]:
    """Dependencies of a compiled query: remembered per SQL text (it names every table)."""
    memo = (queryset.db, "\0".join([sql, *prefetched]))
    labels = _labels_by_sql.get(memo)
    if labels is None:
        found = _table_labels(_tables(compiled, queryset.db), "cached querysets")
        labels = tuple(sorted(found | _prefetch_labels(queryset)))
        if len(_labels_by_sql) > 4096:
            _labels_by_sql.clear()
        _labels_by_sql[memo] = labels
    return labels


def _table_labels(tables: Iterable[str], what: str) -> set[str]:
    owners = _table_owners()
    labels: set[str] = set()
    for table in tables:
        for label in owners.get(table, ()):
            if not registry.is_registered(apps.get_model(label)):
                raise LookupError(
                    f"{what}: the query reads {label}, which is not registered with "
                    "ormbridge, so its changes would not invalidate the cached result."
                )
            labels.add(label)
    return labels


def _prefetch_key(lookup: Any) -> str:
    """A prefetch lookup as text: its path, and the SQL of a ``Prefetch`` queryset."""
    if not isinstance(lookup, models.Prefetch):
        return str(lookup)
    inner = lookup.queryset
    compiled = compile_queryset(inner) if inner is not None else None
    return f"{lookup.prefetch_to}={compiled.key if compiled else inner!r}"


def _prefetch_labels(queryset: models.QuerySet[Any]) -> set[str]:
    """Models read by ``queryset``'s ``prefetch_related`` lookups (TypeError if unknowable)."""
    labels: set[str] = set()
    for lookup in queryset._prefetch_related_lookups:  # type: ignore[attr-defined]
        path = lookup.prefetch_through if isinstance(lookup, models.Prefetch) else lookup
        if isinstance(lookup, models.Prefetch) and lookup.queryset is not None:
            labels |= queryset_dependencies(lookup.queryset)
        model = queryset.model
        for part in path.split(LOOKUP_SEP):
            try:
                field = model._meta.get_field(part)
            except FieldDoesNotExist:
                field = None
            related: Any = getattr(field, "related_model", None)
            if field is None or not field.is_relation or related is None:
                raise TypeError(
                    f"prefetch_related({path!r}) on {queryset.model._meta.label}: {part!r} is "
                    f"not a relation ormbridge can follow on {model._meta.label} (a generic "
                    "foreign key or an attribute), so it cannot tell which rows the cached "
                    "result holds; prefetch after reading from the cache instead."
                )
            tables = [related._meta.db_table]
            if field.many_to_many:
                through: Any = getattr(field, "through", None) or field.remote_field.through
                tables.append(through._meta.db_table)
            labels |= _table_labels(tables, f"prefetch_related({path!r})")
            model = related
    return labels


@functools.cache
def _table_owners() -> dict[str, tuple[str, ...]]:
    """Which models' changes a table's rows follow: itself, or an m2m table's two ends."""
    owners: dict[str, tuple[str, ...]] = {}
    for model in apps.get_models(include_auto_created=True):
        meta = model._meta
        if meta.auto_created:
            # django-stubs: related_model is Optional; it is set on relation fields.
            ends = {f.related_model._meta.label_lower for f in meta.fields if f.is_relation}  # type: ignore[union-attr]
            owners[meta.db_table] = tuple(sorted(ends))
        elif not meta.proxy:
            owners[meta.db_table] = (meta.label_lower,)
    return owners


def _tables(query: Query, using: str) -> set[str]:
    """Every table ``query`` reads, in joins, subqueries and ``extra(tables=...)``."""
    tables = {alias.table_name for alias in query.alias_map.values()}
    tables.update(query.extra_tables)
    nodes: list[Any] = [query.where, *query.annotations.values()]
    while nodes:
        node = nodes.pop()
        if node is None:
            continue
        inner = node if isinstance(node, Query) else getattr(node, "query", None)
        if isinstance(inner, Query) and inner is not query:
            inner = inner.clone()
            inner.get_compiler(using=using).as_sql()
            tables |= _tables(inner, using)
            continue
        nodes.extend(getattr(node, "children", ()))
        for side in ("lhs", "rhs"):
            if hasattr(node, side):
                nodes.append(getattr(node, side))
        if hasattr(node, "get_source_expressions"):
            nodes.extend(node.get_source_expressions())
    return tables
