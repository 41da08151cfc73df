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
from django.conf import settings as django_settings
from django.db import DatabaseError, router, transaction
from django.db.models import F, Q
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from ormbridge import flush, registry, store
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
        ids = list(due.order_by("id").values_list("id", flat=True)[:limit])
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


def process(batch_id: int, using: str = "default") -> flush.FlushResult:
    """Deliver one change-log row: invalidate its rows, emit its events, mark it done."""
    from ormbridge.models import ChangeBatch

    result = flush.FlushResult()
    batch = ChangeBatch.objects.using(using).filter(id=batch_id).first()
    if batch is None or batch.state == ChangeBatch.State.DONE:
        return result
    try:
        model = registry.get_model(batch.model)
        action = {name: code for code, name in store.ACTIONS.items()}[batch.action]
        if batch.pks is None:
            result.add(flush.apply(model, [store.ALL], None))
        size = int(settings.FLUSH_BATCH_SIZE)
        pks = batch.pks or []
        for start in range(0, len(pks), size):
            members = [store.member(action, pk) for pk in pks[start : start + size]]
            result.add(flush.apply(model, members, batch.fields))
    except Exception as exc:
        ChangeBatch.objects.using(using).filter(id=batch_id).update(
            last_error=f"{type(exc).__name__}: {exc}"
        )
        raise
    ChangeBatch.objects.using(using).filter(id=batch_id).update(
        state=ChangeBatch.State.DONE, finished_at=timezone.now(), last_error=""
    )
    return result
