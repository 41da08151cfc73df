"""A dependency-tracked cache of instances and querysets, kept fresh by ormbridge.

Entries live in the Django cache ``ORMBRIDGE["CACHE_ALIAS"]``. Each entry is
stored with the tokens it depends on, read from ormbridge's Redis *before*
the database is read; an invalidation deletes those tokens (and the entries).
An entry is served only while its tokens are still current, so a reader that
loaded old data before a write committed cannot make that data live again by
storing it after the invalidation ran (the stale-set race; cf. "Scaling
Memcache at Facebook", NSDI 2013).

- an instance depends on its row token and its model's epoch token;
- a queryset depends on the generation token of every model it reads, so any
  change to one of them invalidates all its cached querysets in O(1);
- both depend on the incarnation of ormbridge's Redis (its run id), so a
  restart from an old snapshot or a failover cannot revive deleted tokens.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Iterable
from typing import Any, TypeVar

import redis
from django.apps import apps
from django.core.cache import BaseCache, caches
from django.db import models
from django.db.models.sql import Query

from ormbridge import registry, store
from ormbridge.conf import settings

logger = logging.getLogger("ormbridge")

M = TypeVar("M", bound=models.Model)

# Tokens outlive the entries stored under them by this many seconds.
TOKEN_GRACE = 60


def cached_instance(model: type[M], pk: Any = None, **unique: Any) -> M:
    """The instance of ``model`` with primary key ``pk``, from the cache when fresh.

    Or by the values of a unique field or unique set of fields instead of the
    pk: ``cached_instance(Category, name="books")``; which pk they name is
    cached too, until any row of the model changes.
    On a miss the row is loaded with ``model._default_manager`` and cached.
    A proxy's instances have entries of their own (they are of another class)
    under its concrete model's tokens, which every write to the table kills.

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
    timeout = _timeout(model)
    label = model._meta.label_lower
    rows = model._meta.concrete_model._meta.label_lower  # type: ignore[union-attr]
    pk = model._meta.pk.to_python(pk)
    entry_key = instance_key(label, pk)
    try:
        tokens = _tokens([store.epoch_key(rows), store.token_key(rows, pk)], timeout)
    except redis.RedisError as exc:
        logger.warning("ormbridge: Redis unreachable, reading %s from the database: %s", label, exc)
        return model._default_manager.get(pk=pk)
    cache = get_cache()
    hit: tuple[list[str], M] | None = cache.get(entry_key)
    if hit is not None and hit[0] == tokens:
        return hit[1]
    obj = model._default_manager.get(pk=pk)
    cache.set(entry_key, (tokens, obj), timeout)
    return obj


def _pk_of(model: type[models.Model], unique: dict[str, Any]) -> Any:
    """The pk of the row ``unique`` names, cached under the model's queryset generation."""
    names = frozenset(unique)
    if names not in _unique_sets(model):
        choices = " or ".join(", ".join(sorted(s)) for s in sorted(_unique_sets(model), key=sorted))
        raise TypeError(
            f"cached_instance({model.__name__}, {', '.join(sorted(names))}=...): that lookup "
            f"is not unique on {model._meta.label}; use the pk or: {choices}."
        )
    rows = model._meta.concrete_model._meta.label_lower  # type: ignore[union-attr]
    digest = hashlib.sha256(repr(sorted(unique.items())).encode()).hexdigest()
    entry_key = store.key(model._meta.label_lower, "by", digest)
    manager = model._default_manager
    try:
        tokens = _tokens([store.generation_key(rows)], _timeout(model))
    except redis.RedisError:
        return manager.filter(**unique).values_list("pk", flat=True).get()
    hit: tuple[list[str], Any] | None = get_cache().get(entry_key)
    if hit is not None and hit[0] == tokens:
        return hit[1]
    pk = manager.filter(**unique).values_list("pk", flat=True).get()
    get_cache().set(entry_key, (tokens, pk), _timeout(model))
    return pk


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


def cached_queryset(queryset: models.QuerySet[Any]) -> list[Any]:
    """The rows of ``queryset`` as a list, from the cache when fresh.

    Cached per database and SQL; invalidated by a change to any model the
    query reads (joins and subqueries included). Raises ``LookupError`` when
    the query reads a model that is not registered with ormbridge.
    """
    labels = sorted(_dependencies(queryset))
    timeout = _timeout(queryset.model)
    query = queryset.query.clone()
    sql, params = query.get_compiler(using=queryset.db).as_sql()
    digest = hashlib.sha256(f"{queryset.db}\0{sql}\0{params!r}".encode()).hexdigest()
    entry_key = store.key("qs", digest)
    try:
        tokens = _tokens([store.generation_key(label) for label in labels], timeout)
    except redis.RedisError as exc:
        logger.warning("ormbridge: Redis unreachable, reading the database: %s", exc)
        return list(queryset.all())
    cache = get_cache()
    hit: tuple[list[str], list[Any]] | None = cache.get(entry_key)
    if hit is not None and hit[0] == tokens:
        return hit[1]
    rows = list(queryset.all())  # a fresh clone: the queryset may hold old results
    cache.set(entry_key, (tokens, rows), timeout)
    return rows


def get_cache() -> BaseCache:
    return caches[settings.CACHE_ALIAS]


def instance_key(label: str, pk: Any) -> str:
    """The Django-cache key of a cached instance."""
    return store.key(label, "obj", pk)


def forget(model: type[models.Model], pks: Iterable[str], pipe: redis.client.Pipeline) -> int:
    """Invalidate the cached instances of ``pks`` (as text) and the model's querysets.

    The token deletions are queued on ``pipe`` (the caller executes it); the
    entries are deleted from the Django cache in one call. Returns how many
    entries were asked to be deleted.
    """
    label = model._meta.label_lower
    pks = list(pks)
    if pks:
        pipe.delete(*(store.token_key(label, pk) for pk in pks))
        get_cache().delete_many([instance_key(label, pk) for pk in pks])
    pipe.delete(store.generation_key(label))
    return len(pks)


def forget_all(model: type[models.Model], pipe: redis.client.Pipeline) -> None:
    """Invalidate every cached instance and queryset of ``model`` in O(1)."""
    label = model._meta.label_lower
    pipe.delete(store.epoch_key(label), store.generation_key(label))


def _timeout(model: type[models.Model]) -> int | None:
    own = registry.options(model).cache_timeout
    return settings.CACHE_TIMEOUT if own is None else own


def _tokens(keys: list[str], timeout: int | None) -> list[str]:
    """The tokens of ``keys`` (created if missing), led by the Redis server's run id.

    A Redis restored from a snapshot, or a replica promoted in its place, brings
    back tokens that were deleted since; its new run id still tells every entry
    stored before apart.
    """
    ttl = 0 if timeout is None else int(timeout) + TOKEN_GRACE
    tokens = store.script(store.ENSURE_TOKENS)(keys=keys, args=[os.urandom(8).hex(), ttl])
    return [store.get_redis().run_id, *tokens]


def _dependencies(queryset: models.QuerySet[Any]) -> set[str]:
    """Labels of the registered models whose tables ``queryset`` reads."""
    query = queryset.query.clone()
    query.get_compiler(using=queryset.db).as_sql()  # resolves joins into alias_map
    owners = _table_owners()
    labels: set[str] = set()
    for table in _tables(query, queryset.db):
        for label in owners.get(table, ()):
            if not registry.is_registered(apps.get_model(label)):
                raise LookupError(
                    f"cached_queryset(): the query reads {label}, which is not registered "
                    "with ormbridge, so its changes would not invalidate the cached rows."
                )
            labels.add(label)
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
