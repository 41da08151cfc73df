"""A queryset's key and dependencies: what names its result, and which models it reads.

The key holds the database, the model (a proxy's rows are of its own class),
the compiled SQL and its parameters, the result shape (iterable class and
fields), the prefetches (a ``Prefetch`` queryset by its own key) and the
queryset's class and any state a subclass keeps on it, all encoded exactly by
:mod:`ormbridge.keys`. Its dependencies are the registered models whose
tables its SQL names, and what its prefetches read as far as the models'
relations tell (the rest is learnt from the load's statements).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from typing import Any

from django.core.exceptions import EmptyResultSet, FieldDoesNotExist
from django.db import models
from django.db.models.constants import LOOKUP_SEP
from django.db.models.expressions import Func, RawSQL
from django.db.models.sql import Query
from django.db.models.sql.where import ExtraWhere

from ormbridge import keys, registry, tables
from ormbridge.loads import Uncacheable
from ormbridge.registry import label_of

__all__ = [
    "PLAIN_QUERYSETS",
    "Compiled",
    "aggregate_key",
    "compile_queryset",
    "queryset_dependencies",
    "state_of",
]


# Querysets whose results are a plain QuerySet's: CachedQuerySet adds itself.
PLAIN_QUERYSETS: set[type[models.QuerySet[Any]]] = {models.QuerySet}


# Attributes of a queryset that are caching options, not what the read returns.
OWN_ATTRIBUTES = frozenset({"_ormbridge_on", "_ormbridge_timeout", "_ormbridge_depends_on"})


@functools.cache
def _django_attributes() -> frozenset[str]:
    """The attributes Django's own QuerySet sets: what they hold is in the query, the
    database, the iterable class, the fields and the prefetches a key holds anyway."""
    return frozenset(vars(models.QuerySet())) | OWN_ATTRIBUTES


def state_of(queryset: models.QuerySet[Any]) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """The queryset's class and the state a subclass keeps on it (django-polymorphic's
    ``polymorphic_disabled``), which decide what a read returns as much as its SQL."""
    kind = type(queryset)
    if kind in PLAIN_QUERYSETS:
        kind = models.QuerySet
    known = _django_attributes()
    extra = tuple(sorted((k, v) for k, v in vars(queryset).items() if k not in known))
    return f"{kind.__module__}.{kind.__qualname__}", extra


class Compiled:
    """A queryset's key and what it depends on, computed once per read.

    Raises:
        Uncacheable: a parameter or the queryset's state cannot be keyed, the query
            holds raw SQL (``RawSQL``, ``extra()``) and no declared dependencies, or a
            function whose value changes with each read (``Now()``, ``Random()``).
        EmptyResultSet: it matches nothing by construction.
    """

    def __init__(self, queryset: models.QuerySet[Any], depends_on: Sequence[str] = ()) -> None:
        query = queryset.query
        # Compiled in place, as evaluating the queryset (or str(queryset.query)) does.
        self.sql, self.params = query.get_compiler(using=queryset.db).as_sql()
        raw, volatile = _fragments([query])
        if volatile is not None:
            raise _volatile_refusal(f"a query on {queryset.model._meta.label}", volatile)
        if raw is not None and not depends_on:
            raise Uncacheable(
                "raw_sql",
                f"a query on {queryset.model._meta.label} holds {raw}, whose tables ormbridge "
                "cannot know: pass the models it reads, .cache(depends_on=[...]) or "
                "cached_queryset(..., depends_on=[...])",
            )
        lookups = queryset._prefetch_related_lookups  # type: ignore[attr-defined]
        prefetched = [_prefetch_key(lookup, depends_on) for lookup in lookups]
        iterable = queryset._iterable_class
        self.key: tuple[object, ...] = (
            queryset.db,
            queryset.model._meta.label_lower,  # a proxy's rows are of its own class
            self.sql,
            self.params,
            f"{iterable.__module__}.{iterable.__qualname__}",
            queryset._fields,  # type: ignore[attr-defined]
            prefetched,
            state_of(queryset),
        )
        try:
            self.digest = keys.digest(*self.key)
        except keys.Unkeyable as exc:
            raise Uncacheable(
                "unkeyable", f"a query on {queryset.model._meta.label}: {exc}"
            ) from None
        self.shape = "\0".join([queryset.db, self.sql, repr(sorted(depends_on))])
        labels = set(_labels_of(queryset, self.sql, self.shape)) | set(depends_on)
        self.labels = tuple(sorted(labels))


def compile_queryset(
    queryset: models.QuerySet[Any], depends_on: Sequence[str] = ()
) -> Compiled | None:
    """The queryset's key and dependencies; None when it matches nothing by construction
    (``filter(pk__in=[])``, ``none()``: Django runs no query for it).

    Raises:
        Uncacheable: see :class:`Compiled`; or the query locks rows
            (``select_for_update()``) or is in random order (``order_by("?")``). Such
            reads always go to the database.
    """
    refusal = _never_cached(queryset)
    if refusal is not None:
        raise refusal
    try:
        return Compiled(queryset, depends_on)
    except EmptyResultSet:
        return None


def _never_cached(queryset: models.QuerySet[Any]) -> Uncacheable | None:
    """Why ``queryset`` is never cached, whatever it reads; None if it may be."""
    model = queryset.model._meta.label
    if queryset.query.select_for_update:
        return Uncacheable(
            "select_for_update",
            f"select_for_update() on {model} locks rows, which a cached read would not: "
            "it always goes to the database (drop .cache() there)",
        )
    if "?" in queryset.query.order_by:
        return Uncacheable(
            "random_order",
            f'order_by("?") on {model} asks for another order each time: it always goes '
            "to the database (cache the rows and shuffle them in Python instead)",
        )
    return None


def _volatile_refusal(what: str, volatile: str) -> Uncacheable:
    return Uncacheable(
        "volatile",
        f"{what} holds {volatile}, whose value changes with each read, not with the data: "
        "it always goes to the database (pass the value it stands for instead, such as "
        "timezone.now() rounded to the minute)",
    )


def queryset_dependencies(queryset: models.QuerySet[Any]) -> set[str]:
    """Labels of the registered models ``queryset`` reads, prefetches included.

    Raises:
        LookupError: it reads a model that is not registered with ormbridge.
    """
    try:
        compiled = compile_queryset(queryset)
    except Uncacheable:
        compiled = None
    if compiled is not None:
        return set(compiled.labels)
    query = queryset.query
    try:
        sql = query.get_compiler(using=queryset.db).as_sql()[0]
    except EmptyResultSet:
        sql = ""
    read = tables.tables_in(sql) | {alias.table_name for alias in query.alias_map.values()}
    return (
        {label_of(queryset.model)}
        | tables.covering(read, "cached querysets")
        | _prefetch_labels(queryset)
    )


def aggregate_key(
    queryset: models.QuerySet[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[object, ...], set[str]]:
    """What names ``queryset.aggregate(*args, **kwargs)``'s result, and the models the
    aggregates read: each aggregate resolved against a copy of the query as
    ``aggregate()`` resolves it, and compiled to its SQL and parameters.

    Raises:
        Uncacheable: an aggregate cannot be resolved or keyed here (the read goes
            to the database, which raises Django's own error if it is wrong).
    """
    named = dict(kwargs)
    _, volatile = _fragments([*args, *kwargs.values()])
    if volatile is not None:
        raise _volatile_refusal(f"aggregate() on {queryset.model._meta.label}", volatile)
    try:
        for arg in args:
            named[arg.default_alias] = arg
        query = queryset.query.chain()
        compiler = query.get_compiler(using=queryset.db)
        parts: list[object] = []
        read: set[str] = set()
        for alias, expression in named.items():
            resolved = expression.resolve_expression(
                query, allow_joins=True, reuse=None, summarize=True
            )
            query.append_annotation_mask([alias])
            query.annotations[alias] = resolved
            sql, params = compiler.compile(resolved)
            parts.append((alias, sql, tuple(params)))
            read |= tables.tables_in(sql)
        read |= {join.table_name for join in query.alias_map.values()}
    except Exception as exc:  # Django raises its own error when the database reads it
        raise Uncacheable(
            "aggregate", f"aggregate() on {queryset.model._meta.label} could not be keyed: {exc!r}"
        ) from None
    return tuple(parts), tables.covering(read, "cached aggregates")


# SQL functions whose value changes from one read to the next whatever the data:
# Django's Now(), Random(), and PostgreSQL's RandomUUID(), TransactionNow() among them.
_VOLATILE = re.compile(
    r"\b(CURRENT_TIMESTAMP|CURRENT_DATE|CURRENT_TIME|LOCALTIMESTAMP|LOCALTIME|NOW|"
    r"CLOCK_TIMESTAMP|STATEMENT_TIMESTAMP|TRANSACTION_TIMESTAMP|TIMEOFDAY|RANDOM|RAND|"
    r"RANDOMBLOB|GEN_RANDOM_UUID|UUID_GENERATE_V[0-9A-Z]*)\b",
    re.IGNORECASE,
)


def _fragments(roots: list[Any]) -> tuple[str | None, str | None]:
    """What raw SQL ``roots`` (queries, expressions) hold, with their subqueries and
    combined queries, and a function among them whose value changes with each read, not
    with the data (``Now()``, ``Random()``...); None for either they lack. One walk."""
    raw: str | None = None
    volatile: str | None = None
    for node in _walk(roots):
        texts: list[str] = []
        if isinstance(node, Func):
            extra = getattr(node, "extra", {})
            texts = [str(extra.get("function", node.function) or "")]
            texts.append(str(extra.get("template", node.template) or ""))
        elif isinstance(node, RawSQL):
            raw = raw or "RawSQL"
            texts = [node.sql]
        elif isinstance(node, ExtraWhere):
            raw = raw or "extra(where=...)"
            texts = list(node.sqls)
        elif isinstance(node, Query):
            if node.extra or node.extra_tables or node.extra_order_by:
                raw = raw or "extra()"
            texts = [sql for sql, _ in node.extra.values()] + list(node.extra_order_by)
        if volatile is None:
            found = next(filter(None, map(_VOLATILE.search, texts)), None)
            if found is not None:
                volatile = f"{type(node).__name__} ({found.group(0)})"
        if volatile is not None and raw is not None:
            break
    return raw, volatile


def _walk(roots: list[Any]) -> Iterator[Any]:
    """Every query, expression, lookup and value reachable from ``roots``: their
    subqueries, combined queries and filtered relations' conditions included."""
    queries: list[Query] = []
    nodes: list[Any] = list(roots)
    seen: set[int] = set()
    while nodes or queries:
        if not nodes:
            current = queries.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            yield current
            queries.extend(current.combined_queries)
            nodes = [current.where, *current.annotations.values()]
            filtered = current._filtered_relations.values()  # type: ignore[attr-defined]
            nodes += [relation.condition for relation in filtered]
            nodes += [o for o in current.order_by if not isinstance(o, str)]
            if isinstance(current.group_by, tuple):
                nodes += current.group_by
            nodes += current.select
            continue
        node = nodes.pop()
        if node is None or isinstance(node, str | int | float | bool | models.Model):
            continue  # a model instance (a lookup's value) holds no SQL
        inner = node if isinstance(node, Query) else getattr(node, "query", None)
        if isinstance(inner, Query):
            queries.append(inner)
            if inner is node:
                continue
        yield node
        if isinstance(node, list | tuple | set | frozenset):
            nodes.extend(node)
            continue
        nodes.extend(getattr(node, "children", ()))
        for side in ("lhs", "rhs"):
            value = getattr(node, side, None)
            if value is not None:
                nodes.append(value)
        if hasattr(node, "get_source_expressions"):
            nodes.extend(node.get_source_expressions())


_labels_by_sql: dict[tuple[str, str], tuple[str, ...]] = {}


registry.on_change(_labels_by_sql.clear)


def _labels_of(queryset: models.QuerySet[Any], sql: str, shape: str) -> tuple[str, ...]:
    """Dependencies of a compiled query: every table its SQL names, and what its prefetches
    read; remembered per SQL text."""
    lookups = queryset._prefetch_related_lookups  # type: ignore[attr-defined]
    memo = (shape, "\0".join(_prefetch_key_text(lookup) for lookup in lookups))
    labels = _labels_by_sql.get(memo)
    if labels is None:
        read = tables.tables_in(sql) | {
            join.table_name for join in queryset.query.alias_map.values()
        }
        found = tables.covering(read, "cached querysets")
        labels = tuple(sorted(found | {label_of(queryset.model)} | _prefetch_labels(queryset)))
        if len(_labels_by_sql) > 4096:
            _labels_by_sql.clear()
        _labels_by_sql[memo] = labels
    return labels


def _prefetch_key(lookup: Any, depends_on: Sequence[str]) -> tuple[object, ...]:
    """A prefetch lookup as key parts: its path, and the key of a ``Prefetch`` queryset
    (whose raw SQL may read the models of ``depends_on``, the read's declared ones)."""
    if not isinstance(lookup, models.Prefetch):
        return ("path", str(lookup))
    inner = lookup.queryset
    if inner is None:
        return ("prefetch", lookup.prefetch_through, lookup.prefetch_to, None)
    try:
        compiled = compile_queryset(inner, depends_on)
    except Uncacheable as refused:
        raise Uncacheable(
            refused.reason, f"Prefetch({lookup.prefetch_through!r}): {refused.message}"
        ) from None
    key = compiled.digest if compiled is not None else ("empty", inner.model._meta.label_lower)
    return ("prefetch", lookup.prefetch_through, lookup.prefetch_to, key)


def _prefetch_key_text(lookup: Any) -> str:
    if isinstance(lookup, models.Prefetch):
        return f"{lookup.prefetch_through}>{lookup.prefetch_to}"
    return str(lookup)


def _prefetch_labels(queryset: models.QuerySet[Any]) -> set[str]:
    """Models read by ``queryset``'s ``prefetch_related`` lookups, as far as the models'
    relations tell; what they cannot (a generic foreign key's rows, an attribute set by
    an earlier lookup) is learnt from the first load's statements.

    Raises:
        LookupError: a relation it follows leads to a model ormbridge does not watch.
    """
    labels: set[str] = set()
    for lookup in queryset._prefetch_related_lookups:  # type: ignore[attr-defined]
        path = lookup.prefetch_through if isinstance(lookup, models.Prefetch) else lookup
        if isinstance(lookup, models.Prefetch) and lookup.queryset is not None:
            labels |= queryset_dependencies(lookup.queryset)
        model: Any = queryset.model
        for part in path.split(LOOKUP_SEP):
            field = _relation(model, part)
            related: Any = getattr(field, "related_model", None)
            if field is None or related is None:
                break  # learnt from the load
            read = [related._meta.db_table]
            if field.many_to_many:
                through: Any = getattr(field, "through", None) or field.remote_field.through
                read.append(through._meta.db_table)
            labels |= tables.covering(read, f"prefetch_related({path!r})")
            model = related
    return labels


def _relation(model: type[models.Model], name: str) -> Any:
    """The relation ``name`` (a field, or a reverse relation's accessor such as
    ``entry_set``) on ``model``, or None."""
    field: Any
    try:
        field = model._meta.get_field(name)
    except FieldDoesNotExist:
        field = next(
            (rel for rel in model._meta.related_objects if rel.get_accessor_name() == name),
            None,
        )
    if field is None or not field.is_relation:
        return None
    return field
