"""Bulk writes that keep every signal: ``safe_bulk_update`` and friends.

Each helper works chunk by chunk. A chunk is one short transaction (unless
``atomic=True``) that writes the rows *and* their change-log row
(:class:`~ormbridge.models.ChangeBatch`), with the capture triggers paused so
nothing is logged twice. At commit the caller invalidates the chunk's rows
(read-your-writes); the row is then delivered by the relays on the workers
(``replay="async"``) or in the caller (``"sync"``): ``post_save`` /
``post_delete`` replayed per row, cache entries deleted in batches, one event.
Pks are captured by keyset pagination on the primary key, so memory stays
bounded whatever the table size.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from django.core.exceptions import EmptyResultSet, FieldDoesNotExist
from django.db import Error as DatabaseFailure
from django.db import (
    InterfaceError,
    NotSupportedError,
    OperationalError,
    connections,
    models,
    router,
    transaction,
)
from django.db.models import sql
from django.db.models.deletion import Collector
from django.db.models.signals import post_delete
from django.utils import timezone

from ormbridge import capture, commit, registry, signals, sync_delivery
from ormbridge.conf import settings
from ormbridge.models import ChangeBatch, pieces
from ormbridge.models import snapshot as take_snapshot

__all__ = [
    "FIRST_CHUNK",
    "MAX_CHUNK",
    "MIN_CHUNK",
    "REPLAY_MODES",
    "SUPPORTED_VENDORS",
    "WAIT_POLL",
    "BulkInterrupted",
    "BulkOperationFailed",
    "BulkResult",
    "safe_bulk_create",
    "safe_bulk_delete",
    "safe_bulk_update",
    "safe_bulk_update_objects",
]

M = TypeVar("M", bound=models.Model)

REPLAY_MODES = ("async", "sync", "none")
SUPPORTED_VENDORS = ("postgresql", "sqlite")
FIRST_CHUNK = 1000
MIN_CHUNK = 100
MAX_CHUNK = 50_000
WAIT_POLL = 0.05


class BulkOperationFailed(RuntimeError):
    """A change batch of a bulk operation was given up (state ``failed``).

    Attributes:
        batch_ids: the change-log rows given up.
        errors: their receiver errors, ``{"batch", "pk", "receiver", "error"}`` each
            (empty when the delivery failed outside the receivers: see the message).
    """

    def __init__(
        self, message: str, batch_ids: list[int], errors: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.batch_ids = batch_ids
        self.errors = errors or []


class BulkInterrupted(OperationalError):
    """A ``safe_bulk_*`` call cut off by the database (its connection lost, a deadlock, a
    lock or statement timeout: an ``OperationalError`` or ``InterfaceError``), with what
    had committed.

    The committed chunks are delivered like any others; the database's error is
    the ``__cause__``. An ``OperationalError``, so handlers written for the
    database's error still catch it. Other errors (``ProtectedError``, a
    ``pre_bulk_*`` receiver raising, ``IntegrityError``…) are raised as they are,
    with a note saying what committed.

    Attributes:
        result: the :class:`BulkResult` of the committed chunks (``wait()`` on it).
        resume_after: ``safe_bulk_update`` / ``safe_bulk_delete``: the pk of the last
            row of the last committed chunk (chunks go by ascending pk); finish with
            the same call on ``queryset.filter(pk__gt=resume_after)``, so no row is
            written twice. None when no chunk committed. ``safe_bulk_create`` /
            ``safe_bulk_update_objects``: always None; the first ``result.rows``
            objects were written, so finish with ``objs[result.rows:]``.
        in_doubt: the change-log ids of a chunk whose COMMIT was cut off and that
            could not be checked afterwards: it may or may not have committed.
    """

    def __init__(
        self,
        message: str,
        result: BulkResult,
        resume_after: Any = None,
        in_doubt: list[int] | None = None,
    ) -> None:
        super().__init__(message)
        self.result = result
        self.resume_after = resume_after
        self.in_doubt = in_doubt or []


@dataclass
class BulkResult:
    """What a ``safe_bulk_*`` call did.

    Attributes:
        model: the model written.
        using: the database alias written.
        rows: rows updated, deleted or created (cascaded deletes not included).
        chunks: chunks (transactions, unless ``atomic=True``) written.
        batch_ids: ids of the change-log rows written, one or more per chunk.
        objects: the created objects (``safe_bulk_create`` only).
    """

    model: type[models.Model]
    using: str
    rows: int = 0
    chunks: int = 0
    batch_ids: list[int] = field(default_factory=list)
    objects: list[Any] | None = None

    def wait(self, timeout: float | None = None) -> None:
        """Block until every change-log row of this operation has been delivered.

        Raises as soon as a row is given up: ``MAX_ATTEMPTS`` attempts, ``RETRY_BACKOFF``
        seconds apart and doubling, about 75 s after the first failure by default.

        Raises:
            TimeoutError: rows are still undelivered after ``timeout`` seconds (the
                message gives the last error of each row still being retried).
            BulkOperationFailed: a row was given up; ``errors`` says which rows'
                receivers raised, and what.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        waiting = list(self.batch_ids)
        while waiting:
            still: list[tuple[int, str]] = []
            failed: list[tuple[int, str, list[dict[str, Any]] | None]] = []
            log = ChangeBatch.objects.using(self.using).exclude(state=ChangeBatch.State.DONE)
            for start in range(0, len(waiting), 500):
                rows = log.filter(id__in=waiting[start : start + 500]).order_by("id")
                for batch_id, state, error, errors in rows.values_list(
                    "id", "state", "last_error", "errors"
                ):
                    if state == ChangeBatch.State.FAILED:
                        failed.append((batch_id, error, errors))
                    still.append((batch_id, error))
            if failed:
                raise _failure(self.model, failed)
            waiting = [batch_id for batch_id, _ in still]
            if waiting and deadline is not None and time.monotonic() > deadline:
                errors = "".join(f"; batch {i}: {error}" for i, error in still if error)
                raise TimeoutError(
                    f"{len(waiting)} of {len(self.batch_ids)} change batches of this "
                    f"{self.model._meta.label} operation not delivered after {timeout} s"
                    f"{errors[:4000]}"
                )
            if waiting:
                time.sleep(WAIT_POLL)


def _failure(
    model: type[models.Model], failed: list[tuple[int, str, list[dict[str, Any]] | None]]
) -> BulkOperationFailed:
    """The exception for the change batches given up: each row's error in the message."""
    errors = [
        {"batch": batch_id, **e} for batch_id, _, row_errors in failed for e in row_errors or []
    ]
    lines = [f"batch {e['batch']}, pk {e['pk']}: {e['receiver']}: {e['error']}" for e in errors]
    lines += [
        f"batch {batch_id}: {error}" for batch_id, error, row_errors in failed if not row_errors
    ]
    shown = "\n  ".join(lines[:20]) + (f"\n  … {len(lines) - 20} more" if len(lines) > 20 else "")
    return BulkOperationFailed(
        f"{len(failed)} change batches of this {model._meta.label} operation failed for good "
        f"(MAX_ATTEMPTS reached):\n  {shown}",
        [batch_id for batch_id, _, _ in failed],
        errors,
    )


def safe_bulk_update(
    queryset: models.QuerySet[Any],
    *,
    chunk_size: int | None = None,
    replay: str = "async",
    atomic: bool = False,
    allow_unregistered: bool = False,
    **values: Any,
) -> BulkResult:
    """``queryset.update(**values)``, chunked, with a replayed ``post_save`` per row.

    Values may be plain values or expressions (``F()``, ``Case``, ``Value``).
    Each chunk re-applies the queryset's filter, so a row that stopped matching
    is left alone. ``chunk_size=None`` sizes chunks towards
    ``BULK_CHUNK_SECONDS``. ``replay``: ``"async"`` (workers), ``"sync"`` (this
    process, after each commit) or ``"none"`` (invalidate and broadcast only).

    Raises:
        ValueError, TypeError, LookupError: bad input, before anything is written.
        BulkInterrupted: the database cut the call off; it says what committed.
    """
    name = "safe_bulk_update"
    model = queryset.model
    using = _write_alias(queryset)
    _check_common(name, model, using, replay, chunk_size, allow_unregistered)
    _check_queryset(name, queryset)
    if not values:
        raise ValueError(f"{name}(): give at least one field=value to set.")
    fields = _check_fields(name, model, values)
    base = queryset.all()
    with contextlib.suppress(EmptyResultSet):  # values are resolved first: bad ones fail here
        _compile_update(base.filter(pk__in=[]), values, using)
    frozen = frozenset(fields)
    result = BulkResult(model, using)
    owner = sync_delivery.new_owner()  # holds the rows it writes claimed when replay="sync"

    def write(pks: list[Any]) -> tuple[list[Any], list[int]]:
        if signals.pre_bulk_update.has_listeners(model):
            signals.pre_bulk_update.send(sender=model, pks=pks, fields=frozen, using=using)
        with capture.pause(using, model):
            updated = _update_returning(base.filter(pk__gte=pks[0], pk__lte=pks[-1]), values, using)
        if not updated:  # every row of the chunk stopped matching
            return updated, []
        return updated, _write_log(model, "update", updated, sorted(fields), replay, using, owner)

    def committed(pks: list[Any]) -> None:
        signals.post_bulk_update.send(sender=model, pks=pks, fields=frozen, using=using)

    _run_chunks(result, base, chunk_size, atomic, replay, owner, write, committed, lock=False)
    return result


def safe_bulk_delete(
    queryset: models.QuerySet[Any],
    *,
    chunk_size: int | None = None,
    replay: str = "async",
    atomic: bool = False,
    allow_unregistered: bool = False,
) -> BulkResult:
    """``queryset.delete()``, chunked, with a replayed ``post_delete`` per deleted row.

    ``on_delete`` rules are applied as Django's ``delete()`` applies them
    (cascade, set null, protect, restrict); a protected row raises Django's
    ``ProtectedError`` before its chunk is deleted. Deleted rows' values are
    kept in the change log, so replayed ``post_delete`` instances carry them.

    Raises:
        ValueError, TypeError, LookupError: bad input, before anything is written.
        BulkInterrupted: the database cut the call off; it says what committed.
        django.db.models.ProtectedError, RestrictedError: as ``delete()`` would.
    """
    name = "safe_bulk_delete"
    model = queryset.model
    using = _write_alias(queryset)
    _check_common(name, model, using, replay, chunk_size, allow_unregistered)
    _check_queryset(name, queryset)
    base = queryset.all()
    result = BulkResult(model, using)
    owner = sync_delivery.new_owner()
    empty: frozenset[str] = frozenset()

    def write(pks: list[Any]) -> tuple[list[Any], list[int]]:
        if signals.pre_bulk_delete.has_listeners(model):
            signals.pre_bulk_delete.send(sender=model, pks=pks, fields=empty, using=using)
        collector = _Collector(using=using, origin=queryset)
        collector.collect(base.filter(pk__gte=pks[0], pk__lte=pks[-1]))
        touched = [*collector.data, *(target.model for target, _, _ in collector.updates)]
        with capture.pause(using, *touched):
            return _delete_collected(collector, model, replay, using, owner)

    def committed(pks: list[Any]) -> None:
        signals.post_bulk_delete.send(sender=model, pks=pks, fields=empty, using=using)

    _run_chunks(result, base, chunk_size, atomic, replay, owner, write, committed, lock=True)
    return result


def safe_bulk_create(
    model: type[M],
    objs: Iterable[M],
    *,
    batch_size: int | None = None,
    replay: str = "async",
    allow_unregistered: bool = False,
) -> BulkResult:
    """``model.objects.bulk_create(objs)`` in batches, with a replayed ``post_save(created=True)``.

    ``BulkResult.objects`` holds the created objects, with their pks where the
    database returns them (PostgreSQL, SQLite).

    Raises:
        ValueError, TypeError, LookupError: bad input, before anything is written.
        BulkInterrupted: the database cut the call off; it says what committed.
    """
    name = "safe_bulk_create"
    using = router.db_for_write(model)
    _check_common(name, model, using, replay, batch_size, allow_unregistered)
    objs = list(objs)
    _check_objects(name, model, objs, need_pk=False)
    created_objects: list[Any] = []
    result = BulkResult(model, using, objects=created_objects)
    owner = sync_delivery.new_owner()
    empty: frozenset[str] = frozenset()

    def write(batch: list[M]) -> tuple[list[Any], list[int]]:
        with capture.pause(using, model):
            created = model._base_manager.using(using).bulk_create(batch)
        created_objects.extend(created)
        pks = [obj.pk for obj in created]
        return pks, _write_log(model, "create", pks, None, replay, using, owner)

    def committed(pks: list[Any]) -> None:
        signals.post_bulk_create.send(sender=model, pks=pks, fields=empty, using=using)

    _run_batches(result, objs, batch_size, replay, owner, write, committed)
    return result


def safe_bulk_update_objects(
    objs: Iterable[models.Model],
    fields: Sequence[str],
    *,
    batch_size: int | None = None,
    replay: str = "async",
    allow_unregistered: bool = False,
) -> BulkResult:
    """``bulk_update(objs, fields)`` in batches, with a replayed ``post_save`` per object.

    Raises:
        ValueError, TypeError, LookupError: bad input, before anything is written.
        BulkInterrupted: the database cut the call off; it says what committed.
    """
    name = "safe_bulk_update_objects"
    objs = list(objs)
    if not objs:
        raise ValueError(f"{name}(): no objects given.")
    # django-stubs: Options.concrete_model is Optional; it is set on every model class.
    model: type[models.Model] = type(objs[0])._meta.concrete_model  # type: ignore[assignment]
    using = router.db_for_write(model)
    _check_common(name, model, using, replay, batch_size, allow_unregistered)
    _check_objects(name, model, objs, need_pk=True)
    if isinstance(fields, str) or not fields:
        raise ValueError(f"{name}(): fields must be a non-empty list of field names.")
    names = _check_fields(name, model, dict.fromkeys(fields))
    frozen = frozenset(names)
    result = BulkResult(model, using)
    owner = sync_delivery.new_owner()

    def write(batch: list[models.Model]) -> tuple[list[Any], list[int]]:
        pks = [obj.pk for obj in batch]
        if signals.pre_bulk_update.has_listeners(model):
            signals.pre_bulk_update.send(sender=model, pks=pks, fields=frozen, using=using)
        with capture.pause(using, model):
            model._base_manager.using(using).bulk_update(batch, names)
        return pks, _write_log(model, "update", pks, sorted(names), replay, using, owner)

    def committed(pks: list[Any]) -> None:
        signals.post_bulk_update.send(sender=model, pks=pks, fields=frozen, using=using)

    _run_batches(result, objs, batch_size, replay, owner, write, committed)
    return result


# -- chunking ---------------------------------------------------------------


class _ChunkSizer:
    """A fixed chunk size, or one adapted so each chunk takes about ``BULK_CHUNK_SECONDS``."""

    def __init__(self, fixed: int | None) -> None:
        self.fixed = fixed is not None
        self.size = fixed if fixed is not None else FIRST_CHUNK

    def record(self, rows: int, seconds: float) -> None:
        if self.fixed or rows < self.size or seconds <= 0:
            return
        ideal = self.size * float(settings.BULK_CHUNK_SECONDS) / seconds
        self.size = int(min(max(ideal, self.size / 2, MIN_CHUNK), self.size * 4, MAX_CHUNK))


def _run_chunks(
    result: BulkResult,
    base: models.QuerySet[Any],
    chunk_size: int | None,
    atomic: bool,
    replay: str,
    owner: str,
    write: Callable[[list[Any]], tuple[list[Any], list[int]]],
    committed: Callable[[list[Any]], None],
    lock: bool,
) -> None:
    """Walk ``base`` by pk in chunks; ``write`` each inside its own transaction.

    Raises:
        BulkInterrupted: a database error after chunks committed (see :func:`_interrupted`).
    """
    using = result.using
    sizer = _ChunkSizer(chunk_size)
    last = None
    run = _Run(result, commits=not atomic and not connections[using].in_atomic_block)
    outer = transaction.atomic(using=using) if atomic else contextlib.nullcontext()
    with run, outer:
        while True:
            size = sizer.size
            started = time.perf_counter()
            with transaction.atomic(using=using, savepoint=not atomic):
                page = base if last is None else base.filter(pk__gt=last)
                page = page.order_by("pk")
                if lock and connections[using].features.has_select_for_update:
                    page = page.select_for_update(of=("self",))
                pks = list(page.values_list("pk", flat=True)[:size])
                if not pks:
                    break
                written, batch_ids = write(pks)
                _after_commit(result, written, batch_ids, replay, owner, committed)
                run.committing(written, batch_ids, pks[-1])
            run.committed()
            sizer.record(len(pks), time.perf_counter() - started)
            last = pks[-1]
            if len(pks) < size:
                break


def _run_batches(
    result: BulkResult,
    objs: list[Any],
    batch_size: int | None,
    replay: str,
    owner: str,
    write: Callable[[list[Any]], tuple[list[Any], list[int]]],
    committed: Callable[[list[Any]], None],
) -> None:
    """Write ``objs`` in batches, each in its own transaction.

    Raises:
        BulkInterrupted: a database error after batches committed.
    """
    sizer = _ChunkSizer(batch_size)
    position = 0
    run = _Run(result, commits=not connections[result.using].in_atomic_block)
    with run:
        while position < len(objs):
            batch = objs[position : position + sizer.size]
            started = time.perf_counter()
            with transaction.atomic(using=result.using):
                written, batch_ids = write(batch)
                _after_commit(result, written, batch_ids, replay, owner, committed)
                run.committing(written, batch_ids, None)
            run.committed()
            sizer.record(len(batch), time.perf_counter() - started)
            position += len(batch)


class _Run:
    """What of a bulk call committed, told to the caller when a chunk fails.

    ``result`` counts only chunks whose transaction ended; the database cutting
    the call off becomes :class:`BulkInterrupted` carrying it. Any other
    exception is left as it is, with a note saying what committed. Inside the
    caller's transaction (or with ``atomic=True``) nothing commits before the
    caller's commit, so errors are left alone.
    """

    def __init__(self, result: BulkResult, commits: bool) -> None:
        self.result = result
        self.commits = commits
        self.resume_after: Any = None
        self.pending: tuple[list[Any], list[int], Any] | None = None

    def committing(self, written: list[Any], batch_ids: list[int], last_pk: Any) -> None:
        """The chunk's writes are done; its transaction is about to end."""
        self.pending = (written, batch_ids, last_pk)

    def committed(self) -> None:
        if self.pending is not None:
            self._count(*self.pending)
        self.pending = None

    def _count(self, written: list[Any], batch_ids: list[int], last_pk: Any) -> None:
        self.result.rows += len(written)
        self.result.chunks += 1
        self.result.batch_ids.extend(batch_ids)
        self.resume_after = last_pk

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        if error is None or not self.commits:  # else the caller's transaction decides
            return
        connection = connections[self.result.using]
        with contextlib.suppress(DatabaseFailure):
            if connection.connection is not None and not connection.is_usable():
                connection.close()  # a lost connection: the next query opens a new one
        in_doubt = self._settle_pending()
        label = self.result.model._meta.label
        done = (
            f"{self.result.chunks} chunk(s) of this {label} bulk call committed "
            f"({self.result.rows:,} rows, change batches {self.result.batch_ids}) and are "
            "delivered as usual"
        )
        if self.resume_after is not None:
            done += (
                f"; the last committed row is pk {self.resume_after!r}: finish with the same "
                f"call on the queryset filtered with pk__gt={self.resume_after!r}"
            )
        elif self.result.chunks:
            done += f"; finish with the objects after the first {self.result.rows}"
        if in_doubt:
            done += f"; whether change batches {in_doubt} committed could not be checked"
        if isinstance(error, OperationalError | InterfaceError):
            raise BulkInterrupted(
                f"interrupted by {type(error).__name__}: {error}. {done}.",
                self.result,
                self.resume_after,
                in_doubt,
            ) from error
        if self.result.chunks:
            error.add_note(f"ormbridge: {done}.")

    def _settle_pending(self) -> list[int]:
        """The chunk whose transaction was ending when the error came (its COMMIT, or
        a callback after it): counted if its change-log rows are there. Returns the ids
        that could not be checked."""
        if self.pending is None:
            return []
        written, batch_ids, last_pk = self.pending
        self.pending = None
        if not batch_ids:
            return []
        try:
            found = ChangeBatch.objects.using(self.result.using).filter(id__in=batch_ids).count()
        except DatabaseFailure:
            return batch_ids
        if found:
            self._count(written, batch_ids, last_pk)
        return []


def _after_commit(
    result: BulkResult,
    written: list[Any],
    batch_ids: list[int],
    replay: str,
    owner: str,
    committed: Callable[[list[Any]], None],
) -> None:
    """Arrange a written chunk's delivery once it commits.

    With ``replay="sync"`` its rows were written claimed by ``owner``: this
    process delivers those it still holds, renewing their leases meanwhile.
    """
    using = result.using

    def deliver() -> None:
        if replay == "sync":
            sync_delivery.deliver_held(batch_ids, using, owner)
        if written:
            committed(written)

    transaction.on_commit(deliver, using=using)


# -- writing ------------------------------------------------------------------


def _update_returning(
    queryset: models.QuerySet[Any], values: dict[str, Any], using: str
) -> list[Any]:
    """Run ``queryset.update(**values)`` and return the pks of the rows it changed."""
    model = queryset.model
    sql_text, params = _compile_update(queryset, values, using)
    connection = connections[using]
    quote = connection.ops.quote_name
    returning = f" RETURNING {quote(model._meta.db_table)}.{quote(model._meta.pk.column)}"
    with connection.cursor() as cursor:
        cursor.execute(sql_text + returning, params)
        return [row[0] for row in cursor.fetchall()]


def _compile_update(
    queryset: models.QuerySet[Any], values: dict[str, Any], using: str
) -> tuple[str, tuple[Any, ...]]:
    """The SQL ``queryset.update(**values)`` would run (as ``QuerySet.update`` builds it)."""
    # django-stubs: Query.chain(klass) -> Query; it returns a klass instance.
    query: sql.UpdateQuery = queryset.query.chain(sql.UpdateQuery)  # type: ignore[assignment]
    query.add_update_values(values)
    query.order_by = ()
    query.annotations = {}
    compiled: tuple[str, tuple[Any, ...]] = query.get_compiler(using).as_sql()
    return compiled


def _write_log(
    model: type[models.Model],
    action: str,
    pks: list[Any],
    fields: list[str] | None,
    replay: str,
    using: str,
    owner: str,
    snapshot: dict[str, Any] | None = None,
    wants_replay: bool = True,
) -> list[int]:
    """Write the change-log row(s) of ``pks`` in the current transaction; returns their ids.

    One row per ``RELAY_MAX_PKS`` pks (and their snapshot's rows, in the same order):
    a relay delivers such a row whole, replays and all, so it must fit what a relay
    holds at once.

    With ``replay="sync"`` the caller delivers the row itself after the commit:
    it is written claimed by ``owner`` (the call's own), so relays leave it alone
    unless its lease runs out first (the caller died; or its transaction outlasted
    the lease, and a relay took the row at the commit: then only that relay delivers).
    """
    to_python = model._meta.pk.to_python
    values = [to_python(pk) for pk in pks]
    label = model._meta.label_lower
    mine = replay == "sync"
    now = timezone.now()
    ids = []
    for piece in pieces(len(values)):
        kept = None if snapshot is None else {**snapshot, "rows": snapshot["rows"][piece]}
        batch = ChangeBatch.objects.using(using).create(
            model=label,
            action=action,
            pks=values[piece],
            rows=len(values[piece]),
            fields=fields,
            replay=wants_replay and replay != "none",
            snapshot=kept,
            state=ChangeBatch.State.CLAIMED if mine else ChangeBatch.State.PENDING,
            claimed_by=owner if mine else "",
            claimed_at=now if mine else None,
            lease_until=now + timedelta(seconds=float(settings.RELAY_LEASE)) if mine else None,
            attempts=1 if mine else 0,
        )
        ids.append(batch.pk)
    if not mine:
        capture.notify(using)
    commit.note(commit.keys_for(label, values), using)
    return ids


class _Collector(Collector):
    """Django's collector, for what it decides (cascade, set null, protect), not for deleting.

    Deleting through it would send ``pre_delete``/``post_delete`` for every row in
    the caller's thread; ormbridge deletes itself and replays ``post_delete`` later.
    """

    def __init__(self, using: str, origin: Any = None) -> None:
        super().__init__(using, origin)
        self.updates: list[tuple[models.Field[Any, Any], Any, Any]] = []

    def add_field_update(self, field: models.Field[Any, Any], value: Any, objs: Any) -> None:
        self.updates.append((field, value, objs))


def _delete_collected(
    collector: _Collector, model: type[models.Model], replay: str, using: str, owner: str
) -> tuple[list[Any], list[int]]:
    """Delete what ``collector`` gathered, in Django's order, logging every registered row."""
    batch_ids = []
    for qs in collector.fast_deletes:  # models nobody listens to: no rows to remember
        qs._raw_delete(using=using)
    for target, value, objs in collector.updates:  # SET_NULL, SET_DEFAULT, SET(...)
        related = target.model
        if isinstance(objs, models.QuerySet):
            rows = objs
        else:
            rows = related._base_manager.using(using).filter(pk__in=[obj.pk for obj in objs])
        if registry.is_registered(related):
            pks = list(rows.values_list("pk", flat=True))
            if not pks:  # nothing refers to the chunk's rows: nothing to log
                continue
            batch_ids += _write_log(
                related, "update", pks, [target.name], replay, using, owner, wants_replay=False
            )
        rows.update(**{target.name: value})
    collector.sort()
    deleted: list[Any] = []
    for victim, instances in collector.data.items():
        ordered = sorted(instances, key=lambda obj: obj.pk)
        pks = [obj.pk for obj in ordered]
        listened = post_delete.has_listeners(victim)
        if registry.is_registered(victim) or listened:
            batch_ids += _write_log(
                victim,
                "delete",
                pks,
                None,
                replay,
                using,
                owner,
                snapshot=take_snapshot(victim, ordered),
                wants_replay=listened,
            )
        sql.DeleteQuery(victim).delete_batch(pks, using)
        if victim is model:
            deleted = pks
    return deleted, batch_ids


# -- validation ----------------------------------------------------------------


def _write_alias(queryset: models.QuerySet[Any]) -> str:
    # QuerySet._db (the alias given to .using()) is not in django-stubs.
    return queryset._db or router.db_for_write(queryset.model)  # type: ignore[attr-defined]


def _check_common(
    name: str,
    model: type[models.Model],
    using: str,
    replay: str,
    size: int | None,
    allow_unregistered: bool,
) -> None:
    if not (isinstance(model, type) and issubclass(model, models.Model)):
        raise TypeError(f"{name}() works on Django models, not {model!r}.")
    if replay not in REPLAY_MODES:
        raise ValueError(
            f"{name}(): replay must be one of {', '.join(REPLAY_MODES)}, not {replay!r}."
        )
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(
            f"{name}(): the chunk/batch size must be a whole number >= 1 or None, not {size!r}."
        )
    if not allow_unregistered and not registry.is_registered(model):
        raise LookupError(
            f"{name}(): {model._meta.label} is not registered with ormbridge; register it, "
            "or pass allow_unregistered=True to replay signals without cache invalidation."
        )
    vendor = connections[using].vendor
    if vendor not in SUPPORTED_VENDORS:
        raise NotSupportedError(f"{name}() supports PostgreSQL and SQLite, not {vendor}.")


def _check_queryset(name: str, queryset: models.QuerySet[Any]) -> None:
    query = queryset.query
    problem = None
    if query.is_sliced:
        problem = "is sliced"
    elif query.combinator:
        problem = f"is combined with {query.combinator}()"
    elif query.distinct or query.distinct_fields:
        problem = "uses distinct()"
    elif query.group_by is not None or any(
        getattr(expr, "contains_aggregate", False) for expr in query.annotations.values()
    ):
        problem = "is aggregated"
    if problem:
        raise TypeError(f"{name}(): the queryset {problem}; pass a plain filtered queryset.")


def _check_fields(name: str, model: type[models.Model], values: dict[str, Any]) -> list[str]:
    """The field names of ``values``, each a concrete, local, non-pk field of ``model``."""
    names = []
    for key in values:
        try:
            field = model._meta.get_field(key)
        except FieldDoesNotExist:
            raise ValueError(f"{name}(): {model._meta.label} has no field {key!r}.") from None
        if field.auto_created and not field.concrete:
            raise ValueError(
                f"{name}(): {key!r} is a reverse relation of "
                f"{model._meta.label}, not a field of it."
            )
        if not field.concrete or field.many_to_many:
            raise ValueError(f"{name}(): {key!r} is not a concrete field of {model._meta.label}.")
        if field.primary_key:
            raise ValueError(f"{name}(): {key!r} is the primary key; it cannot be bulk-updated.")
        if field.model is not model._meta.concrete_model:
            raise ValueError(
                f"{name}(): {key!r} lives in the table of {field.model._meta.label} "
                "(multi-table inheritance); update it through that model."
            )
        names.append(field.name)
    return names


def _check_objects(name: str, model: type[models.Model], objs: list[Any], need_pk: bool) -> None:
    concrete = model._meta.concrete_model
    for position, obj in enumerate(objs):
        if not isinstance(obj, models.Model) or obj._meta.concrete_model is not concrete:
            raise TypeError(
                f"{name}(): object {position} is {obj!r}, not a "
                f"{model._meta.label}: objects of mixed models."
            )
        if need_pk and obj.pk is None:
            raise ValueError(f"{name}(): object {position} has no primary key.")
