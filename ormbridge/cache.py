"""A dependency-tracked cache of instances, querysets and values, kept fresh by ormbridge.

Entries live in ormbridge's Redis, next to the tokens they depend on. An
entry starts with the *stamp* of its tokens (the server's run id and each
token's value); a hit is one MGET of the tokens and the entry whose stamp is
still theirs. A miss creates missing tokens and stores the loaded value under
their stamp, unless an invalidation deleted one in the meantime. An
invalidation deletes tokens, so a reader that loaded old data before a write
committed cannot make it live again by storing it after the invalidation ran:
it stores under the old stamp, which no later read produces (the stale-set
race; cf. "Scaling Memcache at Facebook", NSDI 2013).

Two rules make an entry right, whatever the read (docs/design.md, "What makes
two reads share an entry"):

- **Its key is everything that decides the result**, encoded exactly by
  :mod:`ormbridge.keys`: a queryset's database, model, SQL, parameters,
  result shape, prefetches and queryset state; a function's name and
  arguments. A read ormbridge cannot key exactly is not cached.
- **It is stored only if every table its load read is covered by a token read
  before the load.** Every statement a load runs (follow-up queries,
  prefetches, deferred loads inside it, nested cached reads) is recorded;
  tables the entry's tokens do not cover are learnt for the next read, and
  this load's value is returned but not stored.

- an instance depends on its row's token and its model's epoch token, for
  every table of its parent chain (multi-table inheritance), plus the
  generation token of every other model its manager's query reads;
- anything else depends on the generation token of every model it reads, so
  any change to one of them invalidates all of them in O(1);
- every stamp leads with the Redis server's run id, so a restart from an old
  snapshot or a failover cannot revive deleted tokens.

What a load reads is stored only if no other process could be shown data it
must not see: not from a snapshot older than the last invalidation
(REPEATABLE READ or SERIALIZABLE, asked of the server; SQLite in WAL mode), not
from a database the router sends reads to but not writes (a replica), not
inside a transaction that wrote or a manual one (``set_autocommit(False)``),
whose uncommitted rows may roll back: those reads go to the database.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import redis
from django.apps import apps
from django.db import models

from ormbridge import compiled, keys, loads, redis_store, registry, stats
from ormbridge.conf import settings
from ormbridge.registry import label_of

__all__ = [
    "STALE_PICKLE",
    "TOKEN_GRACE",
    "add_bypass",
    "cached_instance",
    "count_uncached",
    "default_timeout",
    "dependencies",
    "drop_instances",
    "drop_model",
    "instance",
    "instance_key",
    "instance_tokens",
    "read_through",
    "timeout_of",
    "uncached",
]

logger = logging.getLogger(__name__)

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
    On a miss the row is loaded with ``model._default_manager`` and cached:
    the entry follows that manager's query (a manager that filters, joins or
    annotates gets entries of its own, depending on every table it reads).
    A proxy's instances have entries of their own (they are of another class)
    under its concrete model's tokens, which every write to the table kills.
    A multi-table child's entry also depends on its parents' rows.

    Raises:
        model.DoesNotExist: like ``get()``.
        LookupError: the model is not registered with ormbridge (nothing would
            invalidate it).
        TypeError: neither or both of ``pk`` and a unique lookup given, the
            lookup is not unique, or one of its values cannot be keyed.
    """
    if (pk is None) == (not unique):
        raise TypeError(
            f"cached_instance({model.__name__}, ...) takes a pk or a unique lookup "
            "such as name='books', one of the two."
        )
    registry.options(model)
    if unique:
        pk = _pk_of(model, unique)
    pk = model._meta.pk.to_python(pk)
    base = model._default_manager.get_queryset()
    return instance(base, pk, lambda: base.get(pk=pk), timeout_of(model))


def instance(base: models.QuerySet[M], pk: Any, load: Callable[[], M], timeout: int | None) -> M:
    """The cached instance with ``pk`` (a Python value) that ``base`` finds; ``load()`` on a miss.

    ``base`` is the queryset the row is read from, without the pk filter:
    :func:`cached_instance` and ``.cache().get(pk=...)`` share one entry per
    row when their querysets are alike. Such an entry depends on the row (and
    its parent rows), not on the whole table, unless the queryset joins,
    filters or annotates: then also on every model its SQL reads.
    """
    model: type[M] = base.model
    try:
        variant, extra = _variant(base)
    except loads.Uncacheable as refused:
        return uncached(refused, [label_of(model)], load)
    tokens = instance_tokens(model, pk)
    chain: list[type[models.Model]] = [model, *model._meta.get_parent_list()]
    covered = {label_of(m) for m in chain}
    if variant:
        digest = keys.digest("instance", model._meta.label_lower, pk, variant)
        entry_key = redis_store.key("entry", digest)
    else:
        entry_key = instance_key(model._meta.label_lower, pk)
    return _read(
        entry_key,
        _Dependencies(tokens, covered, extra),
        [label_of(model)],
        timeout,
        load,
        shape=f"instance\0{model._meta.label_lower}\0{variant}",
        using=base.db,
        strict=True,
    )


def read_through(
    key: Sequence[object],
    labels: Iterable[str],
    load: Callable[[], T],
    timeout: int | None,
    *,
    shape: str,
    using: str | None = None,
    model: type[models.Model] | None = None,
    strict: bool = False,
) -> T:
    """``load()``'s result, cached under ``key`` until a row of any of ``labels`` changes.

    ``key``: the values that decide the result, encoded by :func:`ormbridge.keys.encode`
    (raises :class:`~ormbridge.keys.Unkeyable` for a value it cannot encode);
    ``labels`` come from :func:`dependencies`; the result must be picklable.
    ``shape``: what stays the same across keys of one kind of read (a
    function's name, a query's SQL): models the load turns out to read beyond
    ``labels`` are remembered for it. ``using``: the database ``load`` reads,
    if known (None: any). ``strict``: a load that reads a model ormbridge does
    not watch is not stored (a queryset); otherwise such reads are the
    caller's declared business (a function cached against its sources).
    Hits, misses and stores are counted for ``model``, or for each of
    ``labels`` without one.
    """
    labels = sorted(set(labels))
    entry_key = redis_store.key("entry", keys.digest(*key))
    return _read(
        entry_key,
        _Dependencies([], set(labels), set(labels)),
        [label_of(model)] if model is not None else labels,
        timeout,
        load,
        shape=shape,
        using=using,
        strict=strict,
    )


def dependencies(*sources: type[models.Model] | models.QuerySet[Any]) -> list[str]:
    """Sorted labels of the registered models that ``sources`` (models or querysets) read.

    A queryset reads its joins, subqueries and prefetched relations; a proxy or a
    multi-table child reads its concrete tables.

    Raises:
        LookupError: a source reads a model that is not registered with ormbridge.
        TypeError: a source is neither a model nor a queryset.
    """
    labels: set[str] = set()
    for source in sources:
        if isinstance(source, models.QuerySet):
            labels.update(compiled.queryset_dependencies(source))
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


_bypass: list[Callable[[str | None], bool]] = []


def add_bypass(
    predicate: Callable[[str | None], bool], *, first: bool = False
) -> Callable[[], None]:
    """Register ``predicate``: while it returns True, cached reads go to the database.

    The hook by which the write side and the test harness reach into every cached
    read without the cache importing them. Before each cached read (``cached_instance``,
    cached querysets, ``@cached_as``, ``@cached_view_as``, the template tag), each
    predicate is called with the read's database alias (None: any alias this thread
    uses), in order; the first that returns True makes the read bypass the cache:
    neither served nor stored, counted as ``bypassed`` in the status.

    - :mod:`ormbridge.commit` registers "the open transaction has written", whose rows
      the cache must neither hide nor keep (read-your-writes);
    - :mod:`ormbridge.testing` registers, ``first``, a predicate that never bypasses
      but delivers the writes waiting for their statement before the read begins.

    A predicate runs on every cached read: it must be cheap and must not raise.
    Returns a function that unregisters it.
    """
    if first:
        _bypass.insert(0, predicate)
    else:
        _bypass.append(predicate)
    return lambda: _bypass.remove(predicate)


class _Dependencies:
    """The tokens an entry is read and stored under, and the models they cover.

    ``tokens``: keys read as they are (an instance's row and epoch tokens);
    ``covered``: every model whose changes those tokens and the generations
    of ``generations`` follow; ``generations``: models whose generation token
    the entry also depends on.
    """

    def __init__(self, tokens: list[str], covered: set[str], generations: set[str]) -> None:
        self.covered = covered | generations
        self.keys = tokens + [redis_store.generation_key(label) for label in sorted(generations)]

    def learnt(self, shape: str) -> _Dependencies:
        """These plus the models earlier loads of ``shape`` were found to read."""
        extra = loads.learnt(shape)
        if not extra or extra <= self.covered:
            return self
        more = sorted(extra - self.covered)
        grown = _Dependencies([], set(), set())
        grown.covered = self.covered | extra
        grown.keys = self.keys + [redis_store.generation_key(label) for label in more]
        return grown


def _read(
    entry_key: str,
    dependencies: _Dependencies,
    labels: list[str],
    timeout: int | None,
    load: Callable[[], T],
    *,
    shape: str,
    using: str | None,
    strict: bool,
) -> T:
    """A hit is one MGET of the tokens and the entry; a miss runs the load and two scripts."""
    if timeout is not None and timeout <= 0:
        return load()  # a timeout of 0 caches nothing, as in Django
    if loads.in_manual_transaction(using):
        refused = loads.Uncacheable(
            "manual_transaction", "a manual transaction (set_autocommit(False)) is open"
        )
        return uncached(refused, labels, load)
    if any(check(using) for check in _bypass):
        refused = loads.Uncacheable("bypassed", "the open transaction has written")
        return uncached(refused, labels, load)
    dependencies = dependencies.learnt(shape)
    loads.note_nested(dependencies.covered, None)
    if redis_store.read_breaker.open:
        return uncached(
            loads.Uncacheable("redis", "ormbridge's Redis failed a moment ago"), labels, load
        )
    token_keys = dependencies.keys
    try:
        client = redis_store.entries_redis()  # a cluster client connects when it is created
        run_id = redis_store.incarnation(client)
        # Bytes: this client does not decode responses.
        *tokens, entry = cast(list[bytes | None], client.mget([*token_keys, entry_key]))
        if client.run_id != run_id:  # it reconnected, to a restarted or another server
            run_id = client.run_id
            *tokens, entry = cast(list[bytes | None], client.mget([*token_keys, entry_key]))
    except (redis.RedisError, OSError) as exc:
        redis_store.read_breaker.trip(exc)
        return load()
    if entry is not None and all(token is not None for token in tokens):
        stamp = b" ".join([run_id.encode(), *cast(list[bytes], tokens)]) + b"\n"
        if entry.startswith(stamp) and (value := _unpickle(entry, len(stamp))) is not _STALE:
            stats.counts.add(labels, "hits")
            return cast(T, value)
    return _miss(client, run_id, entry_key, dependencies, labels, timeout, load, shape, strict)


def _miss(
    client: redis_store.Client,
    run_id: str,
    entry_key: str,
    dependencies: _Dependencies,
    labels: list[str],
    timeout: int | None,
    load: Callable[[], T],
    shape: str,
    strict: bool,
) -> T:
    """Create missing tokens, load, and store under their stamp if they still hold it and
    the load read nothing they do not cover."""
    stats = [redis_store.stats_key(label) for label in labels]
    token_keys = dependencies.keys
    ttl = 0 if timeout is None else int(timeout) + TOKEN_GRACE
    try:
        found, data = redis_store.script(redis_store.READ_ENTRY, client)(
            keys=[entry_key, *stats, *token_keys],
            args=[os.urandom(8).hex(), ttl, run_id, len(stats)],
        )
    except (redis.RedisError, OSError) as exc:
        redis_store.read_breaker.trip(exc)
        return load()
    if found:  # stored by another reader since the MGET
        value = _unpickle(data, 0)
        return cast(T, value) if value is not _STALE else load()
    with loads.recording() as recorder:
        value = load()
    refusal = recorder.verdict(dependencies.covered, strict, shape)
    # A reconnection during the read may have reached another incarnation.
    if refusal is not None:
        loads.note_nested(set(), refusal.reason)
        _count_uncached(refusal, labels)
        return value
    if client.run_id != run_id:
        return value
    try:
        redis_store.script(redis_store.STORE_ENTRY, client)(
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
    except (redis.RedisError, OSError) as exc:
        redis_store.read_breaker.trip(exc)
    return value


_STALE = object()


def _unpickle(entry: bytes, start: int) -> Any:
    """The value pickled in ``entry`` from ``start``; ``_STALE`` if the code changed since."""
    try:
        return pickle.loads(memoryview(entry)[start:])
    except STALE_PICKLE:
        return _STALE


def uncached(refused: loads.Uncacheable, labels: Iterable[str], load: Callable[[], T]) -> T:
    """``load()``, neither served from nor stored in the cache, the refusal counted."""
    loads.note_nested(set(), refused.reason)
    _count_uncached(refused, labels)
    return load()


def count_uncached(refused: loads.Uncacheable, labels: Iterable[str]) -> None:
    """Count (and log once per process) a read that goes to the database for ``refused``'s
    reason, in the statistics of ``labels``."""
    _count_uncached(refused, labels)


# Refusals that are a setup's normal business (a transaction, a replica): counted, not logged.
_QUIET = frozenset({"bypassed", "snapshot", "replica", "manual_transaction", "redis", "learning"})
_warned: set[tuple[str, str]] = set()


def _count_uncached(refused: loads.Uncacheable, labels: Iterable[str]) -> None:
    labels = list(labels)
    stats.counts.add(labels, "uncached")
    stats.counts.add(labels, f"uncached:{refused.reason}")
    if refused.reason in _QUIET:
        logger.debug("ormbridge: read not cached: %s", refused.message)
        return
    seen = (refused.reason, refused.message)
    if seen not in _warned and len(_warned) < 1024:
        _warned.add(seen)
        logger.warning("ormbridge: read not cached (said once per process): %s", refused.message)


# -- what a load read


# -- counters


# -- instances


def instance_tokens(model: type[models.Model], pk: Any) -> list[str]:
    """The tokens a cached read of row ``pk`` of ``model`` depends on: row and epoch
    tokens of every table along the pk's parent links; the generation of any other
    parent (multiple inheritance)."""
    keys_: list[str] = []
    chain: list[type[models.Model]] = []
    current: type[models.Model] | None = model._meta.concrete_model
    while current is not None:
        chain.append(current)
        label = current._meta.label_lower
        keys_ += [redis_store.epoch_key(label), redis_store.token_key(label, pk)]
        link = current._meta.pk
        parent_link = link is not None and link.remote_field and link.remote_field.parent_link
        current = link.related_model if parent_link else None
    for parent in model._meta.get_parent_list():
        if parent not in chain:
            keys_.append(redis_store.generation_key(parent._meta.label_lower))
    return keys_


def _variant(base: models.QuerySet[Any]) -> tuple[str, set[str]]:
    """How ``base`` differs from reading a row by its pk alone: ``''`` for a plain
    queryset, else a digest of its class, state and SQL; and the models its SQL reads.

    Raises:
        loads.Uncacheable: its state or parameters cannot be keyed, or it has raw SQL.
    """
    query = base.query
    kind, extra = compiled.state_of(base)
    plain = (
        base._iterable_class is models.query.ModelIterable
        and not base._prefetch_related_lookups  # type: ignore[attr-defined]
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
    )
    if plain:
        if not extra and type(base) in compiled.PLAIN_QUERYSETS:
            return "", set()
        return _key_digest(("plain", kind, extra)), set()
    query_key = compiled.compile_queryset(base)
    if query_key is None:
        return _key_digest(("empty", kind, extra)), set()
    return _key_digest(("query", query_key.digest)), set(query_key.labels)


def _key_digest(parts: Sequence[object]) -> str:
    try:
        return keys.digest(*parts)
    except keys.Unkeyable as exc:
        raise loads.Uncacheable("unkeyable", str(exc)) from None


def _pk_of(model: type[models.Model], unique: dict[str, Any]) -> Any:
    """The pk of the row ``unique`` names, cached under the model's queryset generation."""
    names = frozenset(unique)
    if names not in _unique_sets(model):
        choices = " or ".join(", ".join(sorted(s)) for s in sorted(_unique_sets(model), key=sorted))
        raise TypeError(
            f"cached_instance({model.__name__}, {', '.join(sorted(names))}=...): that lookup "
            f"is not unique on {model._meta.label}; use the pk or: {choices}."
        )
    queryset = model._default_manager.filter(**unique).values_list("pk", flat=True)
    try:
        key = ("pk of", model._meta.label_lower, sorted(unique.items()))
        keys.encode(key)
    except keys.Unkeyable as exc:
        raise TypeError(f"cached_instance({model.__name__}, ...): {exc}") from None
    return read_through(
        key,
        dependencies(model),
        queryset.get,
        timeout_of(model),
        shape=f"pk of\0{model._meta.label_lower}\0{','.join(sorted(names))}",
        using=queryset.db,
        model=model,
        strict=True,
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
    """The Redis key of a cached instance read through a plain queryset."""
    return redis_store.key(label, "obj", pk)


def drop_instances(
    model: type[models.Model], pks: Iterable[str], pipe: redis_store.Pipeline
) -> int:
    """Invalidate the cached instances of ``pks`` (as text) and the model's querysets.

    Queued on ``pipe`` (the caller executes it). Returns how many instance
    entries were asked to be deleted.
    """
    label = model._meta.label_lower
    pks = list(pks)
    if pks:
        # The keys' common beginnings built once: a relay deletes millions of them.
        tokens, entries = redis_store.token_key(label, ""), instance_key(label, "")
        pipe.delete(*[tokens + pk for pk in pks])
        pipe.delete(*[entries + pk for pk in pks])
    pipe.delete(redis_store.generation_key(label))
    return len(pks)


def drop_model(model: type[models.Model], pipe: redis_store.Pipeline) -> None:
    """Invalidate every cached instance and queryset of ``model`` in O(1)."""
    label = model._meta.label_lower
    pipe.delete(redis_store.epoch_key(label), redis_store.generation_key(label))


def timeout_of(model: type[models.Model]) -> int | None:
    """Seconds the model's entries live: its ``cache_timeout``, else ``CACHE_TIMEOUT``."""
    own = registry.options(model).cache_timeout
    return settings.CACHE_TIMEOUT if own is None else own


# -- querysets: what a query reads, and what names its result
