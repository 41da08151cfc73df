"""Cached querysets: ``CachedQuerySet.cache()`` and :func:`cached_queryset`.

A cached read is keyed by its database, SQL, parameters, result shape
(instances, ``values()``, ``values_list()``...) and prefetches, and depends on
every registered model the query reads (joins, subqueries, prefetched
relations): a committed change to any of them makes it miss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self, TypeVar

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models.query import ModelIterable

from ormbridge import cache

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

    ``iterator()``, ``update()``, ``delete()`` and ``select_for_update()``
    reads always go to the database.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ormbridge_timeout: Any = None
        self._ormbridge_on = False

    def cache(self, timeout: int | None = DEFAULT) -> Self:
        """A copy whose reads are cached for ``timeout`` seconds (None: until invalidated)."""
        clone: Self = self._chain()  # type: ignore[attr-defined]  # private API
        clone._ormbridge_on, clone._ormbridge_timeout = True, timeout
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
        return clone  # type: ignore[no-any-return]

    def _fetch_all(self) -> None:
        if self._result_cache is None and self._ormbridge_on:
            rows = _cached(self, "rows", lambda: list(self.nocache()), self._ormbridge_timeout)
            self._result_cache = rows
            self._prefetch_done = True
        super()._fetch_all()

    def get(self, *args: Any, **kwargs: Any) -> M:
        pk = self._pk_only(args, kwargs)
        if pk is None:
            return super().get(*args, **kwargs)
        timeout = self._ormbridge_timeout
        return cache.instance(
            self.model,
            pk,
            lambda: self.nocache().get(*args, **kwargs),
            self.db,
            cache.timeout_of(self.model) if timeout is DEFAULT else timeout,
        )

    def _pk_only(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The pk of a cached ``get(pk=...)`` among all rows; None for any other read.

        Such a read shares :func:`ormbridge.cached_instance`'s entry, which a
        write to another row leaves alone.
        """
        if not self._ormbridge_on or args or len(kwargs) != 1:
            return None
        [(name, value)] = kwargs.items()
        meta, query = self.model._meta, self.query
        plain = (
            self._iterable_class is ModelIterable
            and not self._prefetch_related_lookups  # type: ignore[attr-defined]
            and not query.where
            and not query.select_related
            and not query.annotations
            and not query.extra
            and not query.extra_tables
            and not query.is_sliced
            and not query.distinct
            and not query.combinator
            and not query.select_for_update
            and query.deferred_loading == (frozenset(), True)
            and self.db == self.model._default_manager.db
        )
        if not plain or name not in ("pk", meta.pk.name, meta.pk.attname):
            return None
        try:
            return meta.pk.to_python(value)
        except (ValidationError, TypeError, ValueError):
            return None

    def count(self) -> int:
        if self._result_cache is not None or not self._ormbridge_on:
            return super().count()
        return _cached(self, "count", lambda: self.nocache().count(), self._ormbridge_timeout)

    def exists(self) -> bool:
        if self._result_cache is not None or not self._ormbridge_on:
            return super().exists()
        return _cached(self, "exists", lambda: self.nocache().exists(), self._ormbridge_timeout)

    def aggregate(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not self._ormbridge_on:
            return super().aggregate(*args, **kwargs)
        # The aggregates may join further tables: their annotation tells which.
        probe = self.nocache()
        probe.query.clear_limits()
        probe = probe.annotate(**{f"ormbridge_{i}": a for i, a in enumerate(args)}, **kwargs)
        return _cached(
            self,
            f"aggregate {args!r} {sorted(kwargs.items())!r}",
            lambda: self.nocache().aggregate(*args, **kwargs),
            self._ormbridge_timeout,
            probe,
        )


class CachedManager(models.Manager.from_queryset(CachedQuerySet)):  # type: ignore[misc]
    """``objects = CachedManager()``: ``Model.objects.cache()`` and ``.nocache()``."""


def cached_queryset(queryset: Q, timeout: int | None = DEFAULT) -> Q:
    """``queryset`` evaluated, its rows from the cache when fresh.

    Returns a copy whose results are loaded (``len()``, ``count()``, iteration
    and indexing run no query); filtering it again makes a new, uncached query.
    Raises ``LookupError`` when the query reads a model that is not registered
    with ormbridge, ``TypeError`` when it prefetches what ormbridge cannot follow.
    """
    clone = queryset._chain()  # type: ignore[attr-defined]
    rows = _cached(queryset, "rows", lambda: list(_uncached(queryset)), timeout)
    clone._result_cache, clone._prefetch_done = rows, True
    return clone  # type: ignore[no-any-return]


def _uncached(queryset: models.QuerySet[Any]) -> models.QuerySet[Any]:
    if isinstance(queryset, CachedQuerySet):
        return queryset.nocache()
    return queryset._chain()  # type: ignore[attr-defined,no-any-return]  # private API


def _cached(
    queryset: models.QuerySet[Any],
    kind: str,
    load: Callable[[], T],
    timeout: int | None,
    probe: models.QuerySet[Any] | None = None,
) -> T:
    compiled = cache.compile_queryset(queryset)
    if compiled is None:
        return load()
    labels = compiled.labels
    if probe is not None:
        labels = tuple(sorted({*labels, *cache.queryset_dependencies(probe)}))
    return cache.read_through(
        f"{kind}\0{compiled.key}",
        labels,
        load,
        cache.timeout_of(queryset.model) if timeout is DEFAULT else timeout,
        using=queryset.db,
        model=queryset.model,
    )
