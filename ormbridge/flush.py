"""Flushing pending invalidations: the body of the ``flush_invalidations`` task.

A flush takes the model's pending set over atomically (see ``store.DRAIN``),
walks it in batches of ``FLUSH_BATCH_SIZE``, deletes the dependent cache
tokens and entries of each batch in pipelined round trips, emits one event per
batch and action, and only then deletes the taken-over set. A flush that dies
half-way leaves its set in the in-flight index, from where
:func:`restore_abandoned` puts it back.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.db import models

from ormbridge import broadcast, registry, store
from ormbridge import cache as ormbridge_cache
from ormbridge.conf import settings


@dataclass
class FlushResult:
    rows: int = 0
    batches: int = 0
    entries: int = 0
    events: int = 0
    emit_failures: int = 0

    def add(self, other: FlushResult) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def flush(label: str) -> FlushResult:
    """Invalidate everything pending for the registered model ``label``."""
    model = registry.get_model(label)
    client = store.get_redis()
    inflight = store.inflight_key(label, uuid.uuid4().hex)
    took = store.script(store.DRAIN)(
        keys=[
            store.pending_key(label),
            store.fields_key(label),
            store.scheduled_key(label),
            inflight,
            _fields_of(inflight),
            store.inflight_index_key(),
        ],
        args=[time.time()],
    )
    result = FlushResult()
    if took:
        fields = client.smembers(_fields_of(inflight))
        changed = None if not fields or store.ALL in fields else sorted(fields)
        batch_size = int(settings.FLUSH_BATCH_SIZE)
        batch: list[str] = []
        cursor = 0
        while True:
            cursor, members = client.sscan(inflight, cursor, count=batch_size)
            batch.extend(members)
            while len(batch) >= batch_size or (cursor == 0 and batch):
                result.add(apply(model, batch[:batch_size], changed))
                del batch[:batch_size]
            if cursor == 0:
                break
    if took:
        pipe = client.pipeline(transaction=False)
        pipe.delete(inflight, _fields_of(inflight))
        pipe.zrem(store.inflight_index_key(), inflight)
        pipe.execute()
    record_stats(label, result, flushes=1)
    return result


def apply(
    model: type[models.Model], members: Iterable[str], fields: list[str] | None
) -> FlushResult:
    """Invalidate one batch of pending members of ``model`` and emit its events."""
    label = model._meta.label_lower
    by_action: dict[str, set[str]] = defaultdict(set)
    everything = False
    for value in members:
        action, pk = store.parse_member(value)
        if pk == store.ALL:
            everything = True
        else:
            by_action[action].add(pk)
    pks = set().union(*by_action.values())
    entries = invalidate(model, sorted(pks), everything=everything)
    events = []
    for action, action_pks in sorted(by_action.items()):
        values = sorted((event_pk(model, pk) for pk in action_pks), key=str)
        events += broadcast.events_for(model, store.ACTIONS[action], values, fields)
    if everything:
        events.append(broadcast.make_event("invalidate", label, None))
    failures = broadcast.emit(events)
    if failures:  # the change log keeps the batch: the sweep delivers it again
        from ormbridge import outbox

        outbox.write(
            "default",
            [
                outbox.NewBatch(label, store.ACTIONS[action], sorted(action_pks), fields)
                for action, action_pks in sorted(by_action.items())
            ],
            error=RuntimeError(f"{failures} emitter(s) failed"),
        )
    return FlushResult(
        rows=len(pks), batches=1, entries=entries, events=len(events), emit_failures=failures
    )


def invalidate(model: type[models.Model], pks: list[str], everything: bool = False) -> int:
    """Delete the cache tokens and entries of ``pks`` (as text), or of every row.

    Two round trips whatever the number of rows: one Redis pipeline, one
    ``delete_many`` on the Django cache. Returns the number of entries deleted.
    """
    pipe = store.get_redis().pipeline(transaction=False)
    entries = ormbridge_cache.forget(model, pks, pipe)
    if everything:
        ormbridge_cache.forget_all(model, pipe)
    pipe.execute()
    return entries


def record_stats(label: str, result: FlushResult, flushes: int = 0) -> None:
    """Add ``result`` to the model's counters (shown by the demo and status)."""
    stats = store.stats_key(label)
    pipe = store.get_redis().pipeline(transaction=False)
    if flushes:
        pipe.hincrby(stats, "flushes", flushes)
    for name in result.__dataclass_fields__:
        pipe.hincrby(stats, name, getattr(result, name))
    pipe.hset(stats, "last_flush", time.time())
    pipe.execute()


def event_pk(model: type[models.Model], pk: str) -> Any:
    """A pk from its text form, as a JSON-friendly value (int or str)."""
    value = model._meta.pk.to_python(pk)
    return value if isinstance(value, int | str) else str(value)


def ensure_scheduled(label: str) -> bool:
    """Schedule a flush of ``label`` unless one is on its way; True if one was sent."""
    from ormbridge.buffer import GUARD_GRACE, schedule_flush

    client = store.get_redis()
    guard = store.scheduled_key(label)
    if not client.set(guard, "1", nx=True, ex=int(settings.FLUSH_DELAY) + GUARD_GRACE):
        return False
    try:
        schedule_flush(label)
    except Exception:
        client.delete(guard)
        raise
    return True


def restore_abandoned(older_than: float) -> int:
    """Put in-flight sets older than ``older_than`` seconds back into their pending sets.

    Their flush died (a killed worker) or is very slow; either way the rows are
    flushed again (at least once). Returns how many sets were restored.
    """
    client = store.get_redis()
    index = store.inflight_index_key()
    stale = client.zrangebyscore(index, "-inf", time.time() - older_than)
    for inflight in stale:
        label = inflight[len(store.key("")) :].rsplit(":inflight:", 1)[0]
        store.script(store.RESTORE)(
            keys=[
                store.pending_key(label),
                store.fields_key(label),
                inflight,
                _fields_of(inflight),
                index,
            ]
        )
        ensure_scheduled(label)
    return len(stale)


def schedule_orphans() -> int:
    """Schedule flushes for registered models with pending changes but no flush on its way.

    Happens when a flush task was lost (a broker restart) after its guard was set.
    """
    return sum(ensure_scheduled(label) for label in waiting_labels())


def flush_waiting() -> int:
    """Flush, here and now, every registered model whose pending set is not empty."""
    waiting = waiting_labels()
    for label in waiting:
        flush(label)
    return len(waiting)


def waiting_labels() -> list[str]:
    """Labels of the registered models whose pending set is not empty (one round trip)."""
    labels = [model._meta.label_lower for model in registry.registered_models()]
    pipe = store.get_redis().pipeline(transaction=False)
    for label in labels:
        pipe.exists(store.pending_key(label))
    return [label for label, exists in zip(labels, pipe.execute(), strict=True) if exists]


def is_idle(label: str) -> bool:
    """True when nothing of ``label`` is pending or being flushed."""
    client = store.get_redis()
    if client.exists(store.pending_key(label)):
        return False
    prefix = store.inflight_key(label, "")
    inflight = client.zrange(store.inflight_index_key(), 0, -1)
    return not any(key.startswith(prefix) for key in inflight)


def _fields_of(inflight: str) -> str:
    return f"{inflight}:fields"
