"""The relay: claims undelivered change-log rows and delivers them.

It runs inside every Celery worker process of the project (see
:func:`start_in_worker`), so a project runs no new daemon, and any number of
relays share the work: each claims up to ``RELAY_BATCH`` rows at a time with
``SELECT … FOR UPDATE SKIP LOCKED`` and a lease of ``RELAY_LEASE`` seconds,
which it renews while it works. A killed relay's rows are taken over when
their lease runs out; every write of a row's state is conditional on still
holding it, so a relay that lost its lease (paused past it) records nothing.
Callers delivering their own rows (``replay="sync"``, ``ormbridge_resync
--sync``) hold and renew them the same way (:func:`deliver_held`). On
PostgreSQL the capture triggers' ``NOTIFY`` wakes it within milliseconds;
elsewhere it looks every ``RELAY_POLL`` seconds.

Delivering a claim: rows of the same model and action are merged and delivered
together (tokens and cache entries deleted, one event per batch and
namespace); a row asking for replays is delivered first, then replays
``post_save`` / ``post_delete`` per row, so a failing receiver can neither
leave its chunk stale nor hold back its event. A receiver that raises fails
its row alone (pk, receiver and exception are recorded); the other rows go
on. A delivery that fails puts its row back with the work left (the delivery,
the rows to replay again), to be tried again after a backoff
(``RETRY_BACKOFF``, doubling) until ``MAX_ATTEMPTS``; its last attempt marks
it failed at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.apps import apps
from django.conf import settings as django_settings
from django.db import (
    DatabaseError,
    InterfaceError,
    OperationalError,
    connections,
    models,
    router,
    transaction,
)
from django.db.models import BooleanField, Case, DateTimeField, ExpressionWrapper, F, Q, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from ormbridge import delivery, registry, replay
from ormbridge.conf import settings
from ormbridge.models import CHANNEL, ChangeBatch, ResyncJob
from ormbridge.models import log_databases as log_databases  # for the layers above

__all__ = [
    "BIG_ROWS",
    "ERRORS_KEPT",
    "PRUNE_CHUNK",
    "DrainResult",
    "Heartbeat",
    "Relay",
    "backoff",
    "claim",
    "deliver",
    "deliver_held",
    "drain",
    "log_databases",
    "model_databases",
    "new_owner",
    "prune",
    "receiver_errors",
    "renew",
    "start_in_process",
    "start_in_worker",
    "stop_in_worker",
    "unlogged_databases",
]

logger = logging.getLogger(__name__)

PRUNE_CHUNK = 10_000
BIG_ROWS = 4
"""Change-log rows holding many pks that a merged delivery reads in step (see ``_steps``)."""
ERRORS_KEPT = 100
"""Receiver errors kept per change-log row (every failed row is retried all the same)."""


@dataclass
class DrainResult:
    """What a relay delivered."""

    batches: int = 0
    rows: int = 0
    failed: int = 0
    delivered: delivery.DeliveryResult = field(default_factory=delivery.DeliveryResult)

    def add(self, other: DrainResult) -> None:
        self.batches += other.batches
        self.rows += other.rows
        self.failed += other.failed
        self.delivered.add(other.delivered)


def model_databases() -> dict[str, list[str]]:
    """Per database alias, the registered models whose rows it holds: the router lets
    their tables into it, or writes them there. Each needs a change log there: the
    capture triggers of a database write to its own."""
    held: dict[str, list[str]] = {}
    for model in registry.registered_models():
        writes_to = router.db_for_write(model)
        for using in django_settings.DATABASES:
            if using == writes_to or router.allow_migrate_model(using, model):
                held.setdefault(using, []).append(model._meta.label_lower)
    return held


def unlogged_databases() -> dict[str, list[str]]:
    """Databases holding registered models that the router keeps ormbridge's tables, the
    change log, out of (``ormbridge.W006``): writes to those models there are never
    captured. Per alias, those models."""
    logs = set(log_databases())
    return {using: labels for using, labels in model_databases().items() if using not in logs}


def _due(now: Any) -> Q:
    backed_off = Q(retry_at__isnull=True) | Q(retry_at__lte=now)
    return (Q(state=ChangeBatch.State.PENDING) & backed_off) | Q(
        state=ChangeBatch.State.CLAIMED, lease_until__lt=now
    )


def claim(using: str, owner: str, limit: int | None = None) -> list[ChangeBatch]:
    """Claim up to ``limit`` due rows for ``owner``, oldest first.

    At most one of them asks for replays: replaying a chunk's rows is the long
    part of delivering, so the other chunks are left to other relays (the
    other processes and machines of the pool) to replay at the same time.
    Rows tried ``MAX_ATTEMPTS`` times are marked failed instead.
    """
    limit = int(settings.RELAY_BATCH) if limit is None else limit
    log = ChangeBatch.objects.using(using)
    now = timezone.now()
    if not log.filter(_due(now)).exists():  # a read: no write lock taken when idle (SQLite)
        return []
    with transaction.atomic(using=using):
        due = log.select_for_update(skip_locked=True).filter(_due(now)).order_by("id")
        rows = []
        replays = 0
        for pk, attempts, replay in due.values_list("id", "attempts", "replay")[:limit]:
            if replay and attempts < settings.MAX_ATTEMPTS:
                replays += 1
                if replays > 1:
                    continue
            rows.append((pk, attempts))
        spent = [pk for pk, attempts in rows if attempts >= settings.MAX_ATTEMPTS]
        ids = [pk for pk, attempts in rows if attempts < settings.MAX_ATTEMPTS]
        if spent:
            log.filter(id__in=spent).update(state=ChangeBatch.State.FAILED, finished_at=now)
        log.filter(id__in=ids).update(
            state=ChangeBatch.State.CLAIMED,
            claimed_by=owner,
            claimed_at=now,
            lease_until=now + timedelta(seconds=float(settings.RELAY_LEASE)),
            attempts=F("attempts") + 1,
        )
    return list(_light(log.filter(id__in=ids, claimed_by=owner)).order_by("id"))


def _light(rows: models.QuerySet[ChangeBatch]) -> models.QuerySet[ChangeBatch]:
    """``rows`` without their pk lists and snapshots, which may be huge (a statement's every
    row): a delivery reads them slice by slice (:func:`_slices`), or one row's at a time.
    Annotated with whether each row holds pks at all, and a snapshot."""
    return rows.defer("pks", "snapshot").annotate(
        every_row=ExpressionWrapper(Q(pks__isnull=True), output_field=BooleanField()),
        has_snapshot=ExpressionWrapper(Q(snapshot__isnull=False), output_field=BooleanField()),
    )


def _kind(batch: ChangeBatch) -> tuple[bool, bool]:
    """Whether ``batch`` stands for every row (no pks), and whether it keeps a snapshot,
    without loading either when :func:`_light` left them out."""
    annotated: Any = batch  # the annotations are not fields: unknown to the model's type
    if hasattr(annotated, "every_row"):
        return bool(annotated.every_row), bool(annotated.has_snapshot)
    return batch.pks is None, bool(batch.snapshot)


def _contents(using: str, batch: ChangeBatch) -> tuple[Any, Any]:
    """``batch``'s pks and snapshot, read for this delivery only (never kept on the instance,
    which the claim's list holds until its last row is delivered)."""
    if "pks" not in batch.get_deferred_fields():
        return batch.pks, batch.snapshot
    found = ChangeBatch.objects.using(using).filter(pk=batch.pk).values_list("pks", "snapshot")
    return found.get()


def renew(using: str, owner: str, ids: Iterable[int]) -> int:
    """Extend the lease of the rows ``ids`` that ``owner`` still holds; returns how many."""
    lease = timezone.now() + timedelta(seconds=float(settings.RELAY_LEASE))
    return (
        ChangeBatch.objects.using(using)
        .filter(id__in=list(ids), state=ChangeBatch.State.CLAIMED, claimed_by=owner)
        .update(lease_until=lease)
    )


class Heartbeat:
    """A thread renewing the leases of the rows ``owner`` is delivering, every third of
    ``RELAY_LEASE``, so that a delivery however long is never taken over while its
    process lives. ``holding`` (per database alias) says which rows; a row taken over
    meanwhile is not renewed (see :func:`renew`)."""

    def __init__(self, owner: str, holding: dict[str, set[int]] | None = None) -> None:
        self.owner = owner
        self.holding: dict[str, set[int]] = {} if holding is None else holding
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="ormbridge-lease", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()

    def __enter__(self) -> Heartbeat:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            while not self.stopping.wait(float(settings.RELAY_LEASE) / 3):
                try:
                    for using, ids in list(self.holding.items()):
                        if ids:
                            renew(using, self.owner, ids)
                except Exception as exc:
                    logger.warning("ormbridge: the relay could not renew its leases: %s", exc)
        finally:
            connections.close_all()  # this thread's own connections


def deliver_held(ids: Iterable[int], using: str, owner: str) -> DrainResult:
    """Deliver the rows ``ids`` that ``owner`` holds, renewing their leases while it works.

    For the callers that deliver their own rows (``replay="sync"``, ``ormbridge_resync
    --sync``): the rows were written, or taken, claimed by ``owner``. Their leases are
    renewed first, so one that ran out before they could be delivered (a long
    transaction) is kept only if no relay has taken it meanwhile; a row a relay took
    is left to it.
    """
    wanted = list(ids)
    renew(using, owner, wanted)
    held = ChangeBatch.objects.using(using).filter(
        id__in=wanted, state=ChangeBatch.State.CLAIMED, claimed_by=owner
    )
    batches = list(_light(held).order_by("id"))
    if not batches:
        return DrainResult()
    if connections[using].in_atomic_block:
        # Not committed yet (a test's transaction running its on_commit callbacks): no
        # other process sees the rows, and a heartbeat's connection would wait on them.
        return deliver(batches, using)
    with Heartbeat(owner, {using: {batch.pk for batch in batches}}):
        return deliver(batches, using)


def deliver(batches: list[ChangeBatch], using: str) -> DrainResult:
    """Deliver claimed rows: one merged delivery per model and action; replays after theirs.

    A merged delivery reads its rows' pks in slices of at most ``RELAY_MAX_PKS``
    (:func:`_deliver_merged`), so memory stays flat however many pks the rows hold.
    """
    result = DrainResult()
    merged: dict[tuple[str, str, tuple[str, ...] | None], list[ChangeBatch]] = defaultdict(list)
    for batch in batches:
        every_row, has_snapshot = _kind(batch)
        if batch.replay or has_snapshot or every_row or batch.delivered_at is not None:
            _deliver_alone(batch, using, result)
        else:
            fields = None if batch.fields is None else tuple(sorted(batch.fields))
            merged[(batch.model, batch.action, fields)].append(batch)
    for (label, action, fields), group in merged.items():
        _deliver_merged(label, action, _list(fields), group, using, result)
    return result


def _deliver_merged(
    label: str,
    action: str,
    fields: list[str] | None,
    group: list[ChangeBatch],
    using: str,
    result: DrainResult,
) -> None:
    """Flush the pks of ``group`` (rows of one model, action and fields), a step at a time.

    Each step reads a slice of every row's pks, in step (the rows of several
    statements over the same rows, in the same order, then share their
    invalidations), at most ``RELAY_MAX_PKS`` in all, and records how far each
    row got (``pks_delivered``): a relay killed, or failing, half-way is followed
    by one that goes on from there.
    """
    try:
        model = apps.get_model(label)
        for pks, reached in _steps(using, group):
            if registry.is_registered(model):
                result.delivered.add(delivery.deliver(model, action, _unique(model, pks), fields))
            progress = Case(*(When(id=pk, then=Value(n)) for pk, n in reached.items()))
            touched = [batch for batch in group if batch.pk in reached]
            if _held(using, touched).update(pks_delivered=progress) < len(touched):
                _lost(touched)  # the rest is left to the rows' new holders
                return
    except Exception as exc:
        _retry_later(group, using, result, _describe(exc), exc)
    else:
        _done(group, using, result)


def _steps(using: str, group: list[ChangeBatch]) -> Iterator[tuple[list[Any], dict[int, int]]]:
    """``(pks, {row id: pks delivered once these are})`` per step over ``group``'s pk lists.

    Each step takes an equal share of ``RELAY_MAX_PKS`` (at least one pk each)
    from the rows not yet through, from where each row's last delivery stopped:
    every small row, and the oldest ``BIG_ROWS`` of the rows holding more than a
    ``BIG_ROWS``-th of the cap. Each step reads each of its rows' lists again (the
    database cuts the slices), so taking every big row at once would cost reads
    growing with the square of their number.
    """
    cap = max(1, int(settings.RELAY_MAX_PKS))
    lengths = _lengths(using, [batch.pk for batch in group])
    done = {batch.pk: min(batch.pks_delivered or 0, lengths.get(batch.pk, 0)) for batch in group}
    while True:
        left = {pk: lengths.get(pk, 0) - done[pk] for pk in sorted(done)}
        big = [pk for pk, n in left.items() if n > cap // BIG_ROWS][:BIG_ROWS]
        small = [pk for pk, n in left.items() if 0 < n <= cap // BIG_ROWS]
        open_rows = sorted(big + small)[:cap]
        if not open_rows:
            return
        share = max(1, cap // len(open_rows))
        segments = [(pk, done[pk], min(lengths[pk], done[pk] + share)) for pk in open_rows]
        pks = _slices(using, segments)
        reached = {pk: stop for pk, _, stop in segments}
        yield pks, reached
        done.update(reached)


def _lengths(using: str, ids: list[int]) -> dict[int, int]:
    """The length of each row's pk list, as the database counts it."""
    function = (
        "jsonb_array_length" if connections[using].vendor == "postgresql" else ("json_array_length")
    )
    table = ChangeBatch._meta.db_table
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"SELECT id, {function}(pks) FROM {table} WHERE pks IS NOT NULL AND id IN "
            f"({', '.join(['%s'] * len(ids))})",
            ids,
        )
        return {pk: length or 0 for pk, length in cursor.fetchall()}


def _slices(using: str, segments: list[tuple[int, int, int]]) -> list[Any]:
    """The pks at positions ``[start, stop)`` of each row ``(id, start, stop)``: one query,
    cut by the database (PostgreSQL: a JSON path slice, SQLite: ``json_each``), so no
    row's whole list is ever read here."""
    connection = connections[using]
    table = ChangeBatch._meta.db_table
    values = ", ".join(["(%s, %s, %s)"] * len(segments))
    if connection.vendor == "postgresql":
        part = (
            "jsonb_path_query_array(b.pks, ('$[' || s.start || ' to ' || (s.stop - 1) || ']')"
            "::jsonpath)"
        )
    else:
        part = (
            "(SELECT json_group_array(e.value) FROM json_each(b.pks) AS e "
            "WHERE e.key >= s.start AND e.key < s.stop)"
        )
    sql = (
        f"WITH s (id, start, stop) AS (VALUES {values}) "
        f"SELECT {part} FROM {table} AS b JOIN s ON b.id = s.id"
    )
    params = [int(n) for segment in segments for n in segment]
    pks: list[Any] = []
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        for (part_pks,) in cursor.fetchall():
            pks.extend(json.loads(part_pks) if isinstance(part_pks, str | bytes) else part_pks)
    return pks


def _deliver_alone(batch: ChangeBatch, using: str, result: DrainResult) -> None:
    """Flush ``batch`` (unless an earlier attempt did), then replay its rows (or the failed ones).

    Neither step undoes or blocks the other: a failed delivery is tried again
    without replaying the rows again, and a row whose receiver raised is
    replayed again without delivering the chunk again.
    """
    try:
        model = apps.get_model(batch.model)
        raw_pks, snapshot = _contents(using, batch)
        pks = None if raw_pks is None else _unique(model, raw_pks)
    except Exception as exc:
        _retry_later([batch], using, result, _describe(exc), exc)
        return
    problem: Exception | None = None
    if batch.delivered_at is None:
        try:
            if registry.is_registered(model):
                rows = list(replay.rebuild(model, snapshot, using)) if snapshot else None
                result.delivered.add(delivery.deliver(model, batch.action, pks, batch.fields, rows))
            batch.delivered_at = timezone.now()
            # So that a relay dying in the replays does not deliver again; and a relay
            # that lost its lease (paused past it) stops here: the new holder replays.
            if batch.replay and not _held(using, [batch]).update(delivered_at=batch.delivered_at):
                _lost([batch])
                return
        except Exception as exc:
            problem = exc
    retry_pks = batch.retry_pks
    errors: list[replay.ReceiverError] = []
    if batch.replay:
        try:
            replayed = _replay(batch, model, pks, snapshot, using)
        except Exception as exc:  # not a receiver: the rows are replayed again
            problem = problem or exc
        else:
            errors, retry_pks = replayed.errors, replayed.failed_pks()
    if problem is None and not errors:
        _done([batch], using, result)
        return
    if snapshot and batch.delivered_at is not None and retry_pks is not None:
        snapshot = replay.keep_rows(model, snapshot, retry_pks)  # only what a retry needs
    error = _describe(problem) if problem is not None else _summary(errors)
    _retry_later(
        [batch],
        using,
        result,
        error,
        problem,
        delivered_at=batch.delivered_at,
        retry_pks=retry_pks,
        errors=[e.as_dict() for e in errors[:ERRORS_KEPT]] or None,
        snapshot=snapshot,
    )


def _replay(
    batch: ChangeBatch,
    model: type[models.Model],
    pks: list[Any] | None,
    snapshot: dict[str, Any] | None,
    using: str,
) -> replay.Replayed:
    """Replay the rows of ``batch`` still to replay: all of them, or those that failed last."""
    if batch.action == ChangeBatch.Action.DELETE:
        snapshot = snapshot or {"fields": [], "rows": []}
        if batch.retry_pks is not None:
            snapshot = replay.keep_rows(model, snapshot, batch.retry_pks)
        return replay.replay_deletes(model, snapshot, using)
    todo = pks if batch.retry_pks is None else _unique(model, batch.retry_pks)
    if not todo:
        return replay.Replayed()
    created = batch.action == ChangeBatch.Action.CREATE
    return replay.replay_saves(model, todo, batch.fields, created, using)


def _unique(model: type[models.Model], pks: Any) -> list[Any]:
    """``pks`` as the model's pk values, each once, sorted (by type first if they are mixed)."""
    to_python = model._meta.pk.to_python
    values = {to_python(pk) for pk in pks}
    try:
        return sorted(values)  # one type, as a pk column's values are: no key to compute
    except TypeError:
        return sorted(values, key=lambda pk: (str(type(pk)), pk))


def _list(fields: tuple[str, ...] | None) -> list[str] | None:
    return None if fields is None else list(fields)


def _held(using: str, batches: list[ChangeBatch]) -> models.QuerySet[ChangeBatch]:
    """The rows of ``batches`` still held by the relay (or caller) that claimed them.

    Every write of a row's state goes through this: a delivery whose lease was taken
    over (its process paused past ``RELAY_LEASE``, its heartbeat stalled) writes
    nothing, and the row's new holder alone decides its outcome.
    """
    by_owner: dict[str, list[int]] = defaultdict(list)
    for batch in batches:
        by_owner[batch.claimed_by].append(batch.pk)
    held = Q(pk__in=[])
    for owner, ids in by_owner.items():
        held |= Q(id__in=ids, claimed_by=owner)
    return ChangeBatch.objects.using(using).filter(held, state=ChangeBatch.State.CLAIMED)


def _lost(batches: list[ChangeBatch]) -> None:
    """Say that ``batches``' delivery here lost its lease: its outcome is not written."""
    logger.warning(
        "ormbridge: %s lost its lease on change-log rows %s (taken over after it ran out: "
        "the process paused, or its heartbeat stalled, for longer than RELAY_LEASE); "
        "their new holder delivers them, nothing of this delivery is recorded",
        batches[0].claimed_by,
        [batch.pk for batch in batches],
    )


def _record(using: str, batches: list[ChangeBatch], **values: Any) -> int:
    """Write the outcome of delivering ``batches``, for the rows still held; on a fresh
    connection if theirs died. Returns how many rows it was written for.

    The connection may die under a delivery (a killed backend, a failover, a
    receiver's query cut off): the outcome is written all the same, so a
    failure is recorded and retried after its backoff, and a finished delivery
    is not redone, rather than the rows waiting for their lease to run out.
    A row whose lease was taken over meanwhile is left to its new holder.
    """
    try:
        written = _held(using, batches).update(**values)
    except (OperationalError, InterfaceError) as exc:
        connection = connections[using]
        if connection.in_atomic_block or (
            connection.connection is not None and connection.is_usable()
        ):
            raise  # not a lost connection, or one that cannot be replaced here
        logger.warning(
            "ormbridge: the relay's database connection was lost (%s); "
            "writing the outcome of rows %s on a new one",
            exc,
            [batch.pk for batch in batches],
        )
        connection.close()
        written = _held(using, batches).update(**values)
    if written < len(batches):
        _lost(batches)
    return written


def _done(batches: list[ChangeBatch], using: str, result: DrainResult) -> None:
    now = timezone.now()
    # A snapshot is only needed until its rows' post_delete replays ran: deleted
    # rows' values are not kept once delivered.
    written = _record(
        using,
        batches,
        state=ChangeBatch.State.DONE,
        finished_at=now,
        delivered_at=Coalesce("delivered_at", Value(now, output_field=DateTimeField())),
        lease_until=None,
        retry_at=None,
        retry_pks=None,
        errors=None,
        last_error="",
        snapshot=None,
    )
    if not written:
        return
    result.batches += written
    result.rows += sum(batch.rows for batch in batches)
    for job_id in {batch.job_id for batch in batches if batch.job_id is not None}:
        ResyncJob.finish_if_complete(job_id)


def backoff(attempts: int) -> float:
    """Seconds to wait before the next attempt after ``attempts`` failed ones."""
    doubling = min(max(attempts, 1) - 1, 30)
    return min(float(settings.RETRY_BACKOFF) * 2.0**doubling, float(settings.RETRY_BACKOFF_MAX))


def _retry_later(
    batches: list[ChangeBatch],
    using: str,
    result: DrainResult,
    error: str,
    exc: Exception | None,
    **progress: Any,
) -> None:
    """Put ``batches`` back with what is left to do, due after their backoff.

    A row whose last attempt this was is marked failed at once, so
    ``BulkResult.wait()`` raises now rather than after another claim.
    """
    now = timezone.now()
    by_attempts: dict[int, list[ChangeBatch]] = defaultdict(list)
    for batch in batches:
        by_attempts[batch.attempts].append(batch)
    for attempts, group in by_attempts.items():
        spent = attempts >= settings.MAX_ATTEMPTS
        delay = backoff(attempts)
        written = _record(
            using,
            group,
            state=ChangeBatch.State.FAILED if spent else ChangeBatch.State.PENDING,
            finished_at=now if spent else None,
            retry_at=None if spent else now + timedelta(seconds=delay),
            lease_until=None,
            last_error=error[:2000],
            **progress,
        )
        if not written:
            continue  # taken over: the new holder's delivery decides (and logs)
        logger.log(
            logging.ERROR if spent else logging.WARNING,
            "ormbridge: delivering change-log rows %s failed (attempt %d of %d); %s: %s",
            [batch.pk for batch in group],
            attempts,
            settings.MAX_ATTEMPTS,
            "given up" if spent else f"tried again in {delay:g} s",
            error,
            exc_info=exc is not None and not isinstance(exc, delivery.EmitFailed),
        )
        result.failed += written


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _summary(errors: list[replay.ReceiverError]) -> str:
    """One line for ``last_error``: how many rows failed, and the first error in full."""
    rows = len({str(error.pk) for error in errors})
    first = errors[0]
    return (
        f"{rows} row(s) failed in receivers; first: pk {first.pk}: {first.receiver}: {first.error}"
    )


def drain(
    using: str | None = None,
    owner: str | None = None,
    passes: int = 50,
    holding: dict[str, set[int]] | None = None,
) -> DrainResult:
    """Claim and deliver until nothing is due (at most ``passes`` claims per database).

    ``holding`` (per database alias) is kept up to date with the ids of the rows
    being delivered, for a heartbeat to renew their leases.
    """
    owner = owner or new_owner()
    holding = {} if holding is None else holding
    result = DrainResult()
    for alias in [using] if using else list(log_databases()):
        for _ in range(passes):
            batches = claim(alias, owner)
            if not batches:
                break
            holding[alias] = {batch.pk for batch in batches}
            try:
                result.add(deliver(batches, alias))
            finally:
                holding[alias] = set()
    return result


def receiver_errors(
    limit: int = 10, scanned: int = 1000, databases: Iterable[str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Per model label, the receiver errors of undelivered rows (retrying or failed).

    Newest rows first, at most ``limit`` errors per model, from the newest
    ``scanned`` undelivered rows with errors of each database holding a log (or of
    ``databases``). Each error: ``{"batch", "state", "attempts", "pk", "receiver", "error"}``.
    """
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    undelivered = [ChangeBatch.State.PENDING, ChangeBatch.State.CLAIMED, ChangeBatch.State.FAILED]
    for using in log_databases() if databases is None else databases:
        rows = (
            ChangeBatch.objects.using(using)
            .filter(state__in=undelivered, errors__isnull=False)
            .order_by("-id")
            .values_list("id", "model", "state", "attempts", "errors")[:scanned]
        )
        for batch_id, label, state, attempts, errors in rows:
            shown = found[label]
            for error in (errors or [])[: max(0, limit - len(shown))]:
                shown.append({"batch": batch_id, "state": state, "attempts": attempts, **error})
    return dict(found)


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def prune(using: str, older_than: float | None = None) -> int:
    """Delete done rows finished more than ``older_than`` seconds ago (``LOG_RETENTION``)."""
    age = float(settings.LOG_RETENTION) if older_than is None else older_than
    cutoff = timezone.now() - timedelta(seconds=age)
    log = ChangeBatch.objects.using(using)
    deleted = 0
    while True:
        ids = list(
            log.filter(state=ChangeBatch.State.DONE, finished_at__lt=cutoff, job__isnull=True)
            .order_by("finished_at")
            .values_list("id", flat=True)[:PRUNE_CHUNK]
        )
        if not ids:
            return deleted
        deleted += log.filter(id__in=ids).delete()[0]


class Relay:
    """A relay loop in a thread: drain, wait for a wake-up or ``RELAY_POLL``, repeat."""

    def __init__(self) -> None:
        self.owner = new_owner()
        self.holding: dict[str, set[int]] = {}
        """Per database, the rows being delivered: only their leases are renewed."""
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self._listener: Any = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="ormbridge-relay", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def run(self) -> None:
        heartbeat = Heartbeat(self.owner, self.holding)
        heartbeat.start()
        try:
            while not self.stopping.is_set():
                try:
                    drained = drain(owner=self.owner, holding=self.holding)
                except DatabaseError as exc:
                    logger.warning("ormbridge: the relay could not reach the database: %s", exc)
                    drained = DrainResult()
                    connections.close_all()
                    self.stopping.wait(float(settings.RELAY_POLL))
                except Exception:
                    logger.exception("ormbridge: the relay failed; it goes on")
                    drained = DrainResult()
                idle = not drained.batches and not drained.failed
                if idle and self._wait(float(settings.RELAY_POLL)):
                    time.sleep(float(settings.DELIVERY_DELAY))
        finally:
            heartbeat.stop()
            self._close_listener()
            connections.close_all()

    def _wait(self, timeout: float) -> bool:
        """Wait for a NOTIFY (PostgreSQL) or ``timeout``; True if woken by a change."""
        listener = self._listen()
        if listener is None:
            self.stopping.wait(timeout)
            return False
        try:
            woken = False
            for _ in listener.notifies(timeout=timeout, stop_after=1):
                woken = True
            return woken
        except Exception as exc:
            logger.warning("ormbridge: the relay's LISTEN connection failed: %s", exc)
            self._close_listener()
            return False

    def _listen(self) -> Any:
        if self._listener is not None:
            return self._listener
        using = next((u for u in log_databases() if connections[u].vendor == "postgresql"), None)
        if using is None:
            return None
        connection = connections[using]
        try:
            raw = connection.get_new_connection(connection.get_connection_params())
            raw.autocommit = True
            raw.execute(f"LISTEN {CHANNEL}")
        except Exception as exc:
            logger.warning("ormbridge: the relay cannot LISTEN, it polls instead: %s", exc)
            return None
        self._listener = raw
        return raw

    def _close_listener(self) -> None:
        if self._listener is not None:
            try:
                self._listener.close()
            except Exception:
                logger.debug("ormbridge: closing the LISTEN connection failed", exc_info=True)
            self._listener = None


_worker_relay: Relay | None = None


def start_in_process(**kwargs: Any) -> None:
    """``worker_process_init`` receiver: run a relay in this pool process.

    Prefork workers get one relay per child process, so replays run with the
    pool's concurrency; the solo pool sends it from the worker's own process.
    """
    global _worker_relay
    if not settings.RELAY or _worker_relay is not None:
        return
    _worker_relay = Relay()
    _worker_relay.start()
    logger.info("ormbridge: relay %s started", _worker_relay.owner)


def start_in_worker(sender: Any = None, **kwargs: Any) -> None:
    """``worker_ready`` receiver: a relay in the worker's process for pools of threads."""
    from celery.concurrency.prefork import TaskPool

    if not isinstance(getattr(sender, "pool", None), TaskPool):
        start_in_process()


def stop_in_worker(**kwargs: Any) -> None:
    """``worker_process_shutdown`` / ``worker_shutdown`` receiver: stop this process's relay."""
    global _worker_relay
    if _worker_relay is not None:
        _worker_relay.stop()
        _worker_relay = None
