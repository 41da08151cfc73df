"""Cached querysets: ``CachedQuerySet.cache()`` and :func:`cached_queryset`.

A cached read is keyed by its database, model, SQL, parameters (encoded
exactly by :mod:`ormbridge.keys`), result shape (instances, ``values()``,
``values_list()``...), prefetches and queryset class and state, and depends
on every registered model the query reads (joins, subqueries, combined
queries, prefetched relations, follow-up queries the load runs): a committed
change to any of them makes it miss. A query ormbridge cannot key exactly (a
parameter of a type it does not know, raw SQL without declared dependencies)
goes to the database and is counted as ``uncached`` in ``ormbridge_status``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Self, TypeVar

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models.query import RawQuerySet

from ormbridge import cache, compiled
from ormbridge.loads import Uncacheable
from ormbridge.registry import label_of

__all__ = [
    "DEFAULT",
    "CachedManager",
    "CachedQuerySet",
    "Q",
    "cached_queryset",
]

M = TypeVar("M", bound=models.Model, covariant=True)
Q = TypeVar("Q", bound=models.QuerySet[Any])
T = TypeVar("T")


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()
"""The model's timeout (``register(cache_timeout=...)``, else ``CACHE_TIMEOUT``)."""


class CachedQuerySet(models.QuerySet[M]):
    """A QuerySet whose ``.cache()`` serves reads from ormbridge's cache.

    After ``.cache(timeout=...)``, iteration (and so ``get()``, ``first()``,
    ``last()``, slicing, ``len()``), ``count()``, ``exists()`` and
    ``aggregate()`` are cached; ``.nocache()`` undoes it. Without ``.cache()``
    it is a plain QuerySet. Combine it with your own QuerySet as
    ``class ProductQuerySet(CachedQuerySet, MyQuerySet)`` and use
    ``ProductQuerySet.as_manager()``, or :class:`CachedManager`.

    ``update()`` and ``delete()`` always go to the database, and so do reads through
    ``iterator()``, ``raw()``, ``select_for_update()`` or ``order_by("?")``: after
    ``.cache()`` they are counted ``uncached:<reason>`` in ``ormbridge_status``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ormbridge_timeout: Any = None
        self._ormbridge_on = False
        self._ormbridge_depends_on: tuple[str, ...] = ()

    def cache(
        self,
        timeout: int | None = DEFAULT,
        depends_on: Iterable[type[models.Model]] = (),
    ) -> Self:
        """A copy whose reads are cached for ``timeout`` seconds (None: until invalidated).

        ``depends_on``: models a raw SQL fragment of the query (``RawSQL``,
        ``extra()``) reads; without them such a query is not cached.

        Raises:
            TypeError: ``depends_on`` holds something other than a model.
            LookupError: a model of ``depends_on`` is not registered with ormbridge.
        """
        labels = _declared(depends_on)
        clone: Self = self._chain()  # type: ignore[attr-defined]  # private API
        clone._ormbridge_on, clone._ormbridge_timeout = True, timeout
        clone._ormbridge_depends_on = labels
        return clone

    def nocache(self) -> Self:
        """A copy whose reads go to the database."""
        clone: Self = self._chain()  # type: ignore[attr-defined]  # private API
        clone._ormbridge_on = False
        return clone

    def _clone(self) -> Self:
        clone = super()._clone()  # type: ignore[misc]  # django-stubs omits the private API
        clone._ormbridge_on = self._ormbridge_on
        clone._ormbridge_timeout = self._ormbridge_timeout
        clone._ormbridge_depends_on = self._ormbridge_depends_on
        return clone  # type: ignore[no-any-return]

    def _fetch_all(self) -> None:
        if self._result_cache is None and self._ormbridge_on:
            rows = _cached(
                self,
                "rows",
                lambda: list(self.nocache()),
                self._ormbridge_timeout,
                self._ormbridge_depends_on,
            )
            self._result_cache = _with_known_related(self, rows)
            self._prefetch_done = True
        super()._fetch_all()

    def get(self, *args: Any, **kwargs: Any) -> M:
        pk = self._pk_only(args, kwargs)
        if pk is None:
            return super().get(*args, **kwargs)
        timeout = self._ormbridge_timeout
        base = self.nocache()
        return cache.instance(
            base,
            pk,
            lambda: base.get(*args, **kwargs),
            cache.timeout_of(self.model) if timeout is DEFAULT else timeout,
        )

    def _pk_only(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The pk of a cached ``get(pk=...)``; None for any other read.

        Such a read shares :func:`ormbridge.cached_instance`'s entry when the
        queryset is alike the model's default manager's (an entry per row,
        which a write to another row leaves alone), and has one of its own
        otherwise (a manager that filters, joins or annotates).
        """
        if not self._ormbridge_on or args or len(kwargs) != 1:
            return None
        [(name, value)] = kwargs.items()
        meta = self.model._meta
        if name not in ("pk", meta.pk.name, meta.pk.attname) or self._ormbridge_depends_on:
            return None
        if self._known_related_objects:  # type: ignore[attr-defined]  # private API
            return None
        try:
            return meta.pk.to_python(value)
        except (ValidationError, TypeError, ValueError):
            return None

    def iterator(self, chunk_size: int | None = None) -> Iterator[M]:
        """Rows streamed from the database: never cached, counted ``uncached:iterator``
        after ``.cache()``."""
        if self._ormbridge_on:
            label = self.model._meta.label
            refused = Uncacheable(
                "iterator",
                f"iterator() on {label} streams rows from the database and is never cached: "
                "iterate the queryset itself (or use cached_queryset()) for a cached read",
            )
            cache.count_uncached(refused, [label_of(self.model)])
        return super().iterator(chunk_size)

    def raw(
        self,
        raw_query: Any,
        params: Any = (),
        translations: dict[str, str] | None = None,
        using: str | None = None,
    ) -> RawQuerySet[M]:
        """Django's ``raw()``: never cached, counted ``uncached:raw_query`` after ``.cache()``."""
        if self._ormbridge_on:
            cache.count_uncached(_raw_refusal(self.model), [label_of(self.model)])
        return super().raw(raw_query, params, translations, using)

    def count(self) -> int:
        if self._result_cache is not None or not self._ormbridge_on:
            return super().count()
        return _cached(
            self,
            "count",
            lambda: self.nocache().count(),
            self._ormbridge_timeout,
            self._ormbridge_depends_on,
        )

    def exists(self) -> bool:
        if self._result_cache is not None or not self._ormbridge_on:
            return super().exists()
        return _cached(
            self,
            "exists",
            lambda: self.nocache().exists(),
            self._ormbridge_timeout,
            self._ormbridge_depends_on,
        )

    def aggregate(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not self._ormbridge_on:
            return super().aggregate(*args, **kwargs)

        def load() -> dict[str, Any]:
            return self.nocache().aggregate(*args, **kwargs)

        try:
            # The aggregates' own SQL names them, and may join further tables.
            key, labels = compiled.aggregate_key(self, args, kwargs)
        except Uncacheable as refused:
            return cache.uncached(refused, [label_of(self.model)], load)
        return _cached(
            self,
            ("aggregate", key),
            load,
            self._ormbridge_timeout,
            self._ormbridge_depends_on,
            labels,
        )


class CachedManager(models.Manager.from_queryset(CachedQuerySet)):  # type: ignore[misc]
    """``objects = CachedManager()``: ``Model.objects.cache()`` and ``.nocache()``."""


def cached_queryset(
    queryset: Q,
    timeout: int | None = DEFAULT,
    depends_on: Iterable[type[models.Model]] = (),
) -> Q:
    """``queryset`` evaluated, its rows from the cache when fresh.

    Returns a copy whose results are loaded (``len()``, ``count()``, iteration
    and indexing run no query); filtering it again makes a new, uncached query.
    ``depends_on``: models a raw SQL fragment of the query (``RawSQL``,
    ``extra()``) reads; without them such a query is not cached.

    A ``raw()`` queryset is read from the database and counted ``uncached:raw_query``.

    Raises:
        LookupError: the query reads a model that is not registered with ormbridge.
        TypeError: ``queryset`` is not a queryset, or ``depends_on`` holds something
            other than a model.
    """
    if isinstance(queryset, RawQuerySet):
        cache.count_uncached(_raw_refusal(queryset.model), [label_of(queryset.model)])
        raw = queryset._clone()
        raw._fetch_all()
        return raw
    if not isinstance(queryset, models.QuerySet):
        raise TypeError(
            f"cached_queryset() takes a QuerySet, not {queryset!r} ({type(queryset).__name__})."
        )
    labels = _declared(depends_on)
    clone = queryset._chain()  # type: ignore[attr-defined]
    rows = _cached(queryset, "rows", lambda: list(_plain(queryset)), timeout, labels)
    clone._result_cache, clone._prefetch_done = _with_known_related(queryset, rows), True
    return clone  # type: ignore[no-any-return]


def _raw_refusal(model: type[models.Model]) -> Uncacheable:
    return Uncacheable(
        "raw_query",
        f"raw() on {model._meta.label}: ormbridge neither keys nor follows the tables of a "
        "raw query, so it always goes to the database; cache a function returning its rows "
        "with @ormbridge.cached_as(<the models it reads>), or write it as a queryset",
    )


def _plain(queryset: models.QuerySet[Any]) -> models.QuerySet[Any]:
    if isinstance(queryset, CachedQuerySet):
        return queryset.nocache()
    return queryset._chain()  # type: ignore[attr-defined,no-any-return]  # private API


def _declared(depends_on: Iterable[type[models.Model]]) -> tuple[str, ...]:
    """Labels of the models a caller says a query's raw SQL reads."""
    sources = tuple(depends_on)
    for source in sources:
        if not (isinstance(source, type) and issubclass(source, models.Model)):
            raise TypeError(f"depends_on takes models, not {source!r} ({type(source).__name__}).")
    return tuple(cache.dependencies(*sources))


def _with_known_related(queryset: models.QuerySet[Any], rows: list[Any]) -> list[Any]:
    """``rows`` with the related objects the queryset knows (a related manager's
    instance) set on them, as Django's iterable would: a cached row must not carry
    the copy of that object that was current when it was stored."""
    known = queryset._known_related_objects  # type: ignore[attr-defined]  # private API
    if not known or queryset._iterable_class is not models.query.ModelIterable:
        return rows
    for field, objects in known.items():
        for row in rows:
            related = objects.get(getattr(row, field.attname, None))
            if related is not None:
                setattr(row, field.name, related)
    return rows


def _cached(
    queryset: models.QuerySet[Any],
    kind: object,
    load: Callable[[], T],
    timeout: int | None,
    depends_on: Sequence[str] = (),
    more: Iterable[str] = (),
) -> T:
    try:
        query_key = compiled.compile_queryset(queryset, depends_on)
    except Uncacheable as refused:
        return cache.uncached(refused, [label_of(queryset.model)], load)
    if query_key is None:
        return load()
    return cache.read_through(
        (kind, query_key.digest),
        {*query_key.labels, *more},
        load,
        cache.timeout_of(queryset.model) if timeout is DEFAULT else timeout,
        shape=f"{kind if isinstance(kind, str) else 'aggregate'}\0{query_key.shape}",
        using=queryset.db,
        model=queryset.model,
        strict=True,
    )


compiled.PLAIN_QUERYSETS.add(CachedQuerySet)
