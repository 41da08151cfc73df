"""Delivering changes to the cache and to listeners: what the relay does per batch.

For each batch of ``DELIVERY_BATCH_SIZE`` rows: one Redis pipeline deleting the
rows' tokens and cached instances (and the model's queryset generation), then
one event per namespace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from django.db import models

from ormbridge import broadcast, cache, redis_store
from ormbridge.conf import settings

__all__ = [
    "DeliveryResult",
    "EmitFailed",
    "deliver",
    "drop_cached",
    "event_pk",
    "record_stats",
]


@dataclass
class DeliveryResult:
    rows: int = 0
    batches: int = 0
    entries: int = 0
    events: int = 0
    emit_failures: int = 0

    def add(self, other: DeliveryResult) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class EmitFailed(RuntimeError):
    """An emitter failed: the change-log rows are delivered again later."""


def deliver(
    model: type[models.Model],
    action: str,
    pks: list[Any] | None,
    fields: list[str] | None = None,
    rows: list[models.Model] | None = None,
) -> DeliveryResult:
    """Invalidate ``pks`` of ``model`` (None: every row) and emit their events, in batches.

    ``rows`` are deleted rows' last values, when known (bulk deletes).

    Raises:
        EmitFailed: an emitter failed (after every batch was invalidated).
    """
    result = DeliveryResult()
    if pks is None:
        result.entries = drop_cached(model, [], everything=True)
        result.events, result.emit_failures = _emit(model, action, None, fields, rows)
    else:
        size = int(settings.DELIVERY_BATCH_SIZE)
        for start in range(0, len(pks), size):
            chunk = pks[start : start + size]
            result.entries += drop_cached(model, [str(pk) for pk in chunk])
            events, failures = _emit(model, action, [event_pk(pk) for pk in chunk], fields, rows)
            result.events += events
            result.emit_failures += failures
            result.batches += 1
        result.rows = len(pks)
    record_stats(model._meta.label_lower, result)
    if result.emit_failures:
        raise EmitFailed(f"{result.emit_failures} emitter call(s) failed; delivered again later")
    return result


def _emit(
    model: type[models.Model],
    action: str,
    pks: list[Any] | None,
    fields: list[str] | None,
    rows: list[models.Model] | None,
) -> tuple[int, int]:
    events = broadcast.events_for(model, action, pks, fields, rows)
    return len(events), broadcast.emit(events)


def drop_cached(model: type[models.Model], pks: list[str], everything: bool = False) -> int:
    """Delete the cache tokens and entries of ``pks`` (as text), or of every row.

    One Redis pipeline whatever the number of rows. Returns the number of
    instance entries deleted.
    """
    pipe = redis_store.get_redis().pipeline(transaction=False)
    entries = cache.drop_instances(model, pks, pipe)
    if everything:
        cache.drop_model(model, pipe)
    pipe.execute()
    return entries


def record_stats(label: str, result: DeliveryResult) -> None:
    """Add ``result`` to the model's counters (shown by the demo and status)."""
    stats = redis_store.stats_key(label)
    pipe = redis_store.get_redis().pipeline(transaction=False)
    for name in result.__dataclass_fields__:
        pipe.hincrby(stats, name, getattr(result, name))
    pipe.hset(stats, "last_delivery", time.time())
    pipe.execute()


def event_pk(pk: Any) -> Any:
    """A pk as a JSON-friendly value (int or str)."""
    return pk if isinstance(pk, int | str) else str(pk)
