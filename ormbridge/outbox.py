"""The change log's life cycle: write, hand out (sweep), deliver.

The database is the source of truth: Redis keeps nothing across a restart and
a broker can be down. Rows of :class:`ormbridge.models.ChangeBatch` are
delivered by ``process_change_batch`` tasks; ``sweep_outbox`` hands out rows
still pending and rows handed out ``REDELIVER_AFTER`` seconds ago that never
finished, and recovers abandoned Redis flushes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis
from django.apps import apps
from django.conf import settings as django_settings
from django.db import DatabaseError, models, router, transaction
from django.db.models import F, Q
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from ormbridge import broadcast, flush, registry, replay
from ormbridge.conf import settings

logger = logging.getLogger("ormbridge")

SWEEP_LIMIT = 1000


@dataclass(frozen=True)
class NewBatch:
    """A change-log row to write: ``pks`` None means every row of the model."""

    label: str
    action: str
    pks: list[Any] | None
    fields: list[str] | None = None


def write(using: str, batches: list[NewBatch], error: BaseException | None = None) -> None:
    """Write change-log rows, last resort when Redis or the broker refused a change.

    Runs after the data's commit, so it must not raise: a failure here is logged.
    """
    from ormbridge.models import ChangeBatch

    try:
        ChangeBatch.objects.using(using).bulk_create(
            [
                ChangeBatch(
                    model=batch.label,
                    action=batch.action,
                    pks=batch.pks,
                    rows=len(batch.pks or ()),
                    fields=batch.fields,
                    last_error="" if error is None else f"{type(error).__name__}: {error}",
                )
                for batch in batches
            ]
        )
    except DatabaseError:
        logger.exception(
            "ormbridge: could not write the change log; these changes are lost: %s", batches
        )


@dataclass
class SweepResult:
    enqueued: int = 0
    failed: int = 0
    restored: int = 0
    scheduled: int = 0
    errors: list[str] = field(default_factory=list)


def sweep(limit: int = SWEEP_LIMIT) -> SweepResult:
    """Hand out due change-log rows and recover abandoned flushes."""
    result = SweepResult()
    try:
        result.restored = flush.restore_abandoned(float(settings.REDELIVER_AFTER))
        result.scheduled = flush.schedule_orphans()
    except (redis.RedisError, BrokerError, OSError) as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
        logger.warning("ormbridge: sweep could not recover Redis flushes: %s", exc)
    for using in _log_databases():
        result.enqueued += _hand_out(using, limit, result)
    return result


def _log_databases() -> Iterator[str]:
    from ormbridge.models import ChangeBatch

    for using in django_settings.DATABASES:
        if router.allow_migrate_model(using, ChangeBatch):
            yield using


def _hand_out(using: str, limit: int, result: SweepResult) -> int:
    from ormbridge import tasks
    from ormbridge.models import ChangeBatch

    now = timezone.now()
    stale = now - timedelta(seconds=float(settings.REDELIVER_AFTER))
    with transaction.atomic(using=using):
        due = (
            ChangeBatch.objects.using(using)
            .select_for_update(skip_locked=True)
            .filter(
                Q(state=ChangeBatch.State.PENDING)
                | Q(state=ChangeBatch.State.ENQUEUED, enqueued_at__lt=stale)
            )
        )
        rows = list(due.order_by("id").values_list("id", "attempts")[:limit])
        spent = [batch_id for batch_id, attempts in rows if attempts >= settings.MAX_ATTEMPTS]
        ids = [batch_id for batch_id, attempts in rows if attempts < settings.MAX_ATTEMPTS]
        if spent:
            ChangeBatch.objects.using(using).filter(id__in=spent).update(
                state=ChangeBatch.State.FAILED, finished_at=now
            )
            result.failed += len(spent)
        ChangeBatch.objects.using(using).filter(id__in=ids).update(
            state=ChangeBatch.State.ENQUEUED, enqueued_at=now, attempts=F("attempts") + 1
        )
    sent = 0
    for batch_id in ids:
        try:
            tasks.enqueue(tasks.process_change_batch, batch_id, using)
        except (BrokerError, OSError) as exc:
            result.errors.append(f"{type(exc).__name__}: {exc}")
            ChangeBatch.objects.using(using).filter(id__in=ids[sent:]).update(
                state=ChangeBatch.State.PENDING, last_error=f"{type(exc).__name__}: {exc}"
            )
            break
        sent += 1
    return sent


def dispatch(batch_ids: list[int], using: str) -> None:
    """Send ``process_change_batch`` for rows written in state enqueued.

    Called after their transaction committed. If the broker is unreachable the
    rows go back to pending, for the sweep: nothing is lost.
    """
    from ormbridge import tasks
    from ormbridge.models import ChangeBatch

    for position, batch_id in enumerate(batch_ids):
        try:
            tasks.enqueue(tasks.process_change_batch, batch_id, using)
        except (BrokerError, OSError) as exc:
            logger.warning(
                "ormbridge: broker unreachable, change batches left to the sweep: %s", exc
            )
            ChangeBatch.objects.using(using).filter(id__in=batch_ids[position:]).update(
                state=ChangeBatch.State.PENDING, last_error=f"{type(exc).__name__}: {exc}"
            )
            return


def process(batch_id: int, using: str = "default") -> flush.FlushResult:
    """Deliver one change-log row: replay its signals if asked, invalidate, emit one event.

    Idempotent enough for at-least-once delivery: a row already done is skipped;
    a row whose delivery fails keeps its error and is handed out again later.
    """
    from ormbridge.models import ChangeBatch

    result = flush.FlushResult()
    batch = ChangeBatch.objects.using(using).filter(id=batch_id).first()
    if batch is None or batch.state == ChangeBatch.State.DONE:
        return result
    try:
        model = apps.get_model(batch.model)
        pk_field = model._meta.pk
        pks = None if batch.pks is None else [pk_field.to_python(pk) for pk in batch.pks]
        if batch.replay and batch.action == ChangeBatch.Action.DELETE:
            replay.replay_deletes(model, batch.snapshot or {"fields": [], "rows": []}, using)
        elif batch.replay and pks:
            created = batch.action == ChangeBatch.Action.CREATE
            replay.replay_saves(model, pks, batch.fields, created, using)
        if registry.is_registered(model):
            rows = None
            if batch.snapshot:
                rows = list(replay.rebuild(model, batch.snapshot, using))
            result = _invalidate(model, batch.action, pks, batch.fields, rows)
    except Exception as exc:
        ChangeBatch.objects.using(using).filter(id=batch_id).update(
            last_error=f"{type(exc).__name__}: {exc}"[:2000]
        )
        raise
    ChangeBatch.objects.using(using).filter(id=batch_id).update(
        state=ChangeBatch.State.DONE, finished_at=timezone.now(), last_error=""
    )
    if batch.job_id is not None:
        from ormbridge import resync

        resync.finish_if_complete(batch.job_id)
    return result


def _invalidate(
    model: type[models.Model],
    action: str,
    pks: list[Any] | None,
    fields: list[str] | None,
    rows: list[models.Model] | None = None,
) -> flush.FlushResult:
    """Invalidate a change-log row's rows in batches; one event per namespace.

    Raises ``RuntimeError`` when an emitter failed, so the row is delivered again.
    """
    label = model._meta.label_lower
    result = flush.FlushResult()
    if pks is None:
        result.entries = flush.invalidate(model, [], everything=True)
    else:
        texts = [str(pk) for pk in pks]
        size = int(settings.FLUSH_BATCH_SIZE)
        for start in range(0, len(texts), size):
            result.entries += flush.invalidate(model, texts[start : start + size])
            result.batches += 1
        result.rows = len(texts)
    event_pks = None if pks is None else [flush.event_pk(model, str(pk)) for pk in pks]
    events = broadcast.events_for(model, action, event_pks, fields, rows)
    result.events = len(events)
    result.emit_failures = broadcast.emit(events)
    flush.record_stats(label, result)
    if result.emit_failures:
        raise RuntimeError(f"{result.emit_failures} emitter(s) failed; delivered again later")
    return result
