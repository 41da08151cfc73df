"""Changes recorded during a transaction, handed to Redis when it commits.

A receiver calls :func:`record`; nothing leaves the process until the
transaction commits. Then all changes of the transaction go to the per-model
pending sets in one Redis round trip, and a flush task is scheduled for each
model that has none on its way (the debounce guard). A rolled-back
transaction or savepoint drops its changes with its ``on_commit`` callbacks.

When Redis or the broker cannot be reached, the changes are written to the
change log (:class:`ormbridge.models.ChangeBatch`) instead, for
``sweep_outbox`` to deliver later: saving never fails because of ormbridge.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections import defaultdict
from collections.abc import Iterable

import redis
from django.db import connections, models, router, transaction
from kombu.exceptions import OperationalError as BrokerError

from ormbridge import outbox, store
from ormbridge.conf import settings

logger = logging.getLogger("ormbridge")

# Extra lifetime of the debounce guard beyond FLUSH_DELAY: if the flush task is
# lost, the next change after this schedules a new one.
GUARD_GRACE = 30


class Changes:
    """Changes recorded at one savepoint level of a transaction, as pending-set members."""

    def __init__(self, using: str) -> None:
        self.using = using
        self.members: dict[str, set[str]] = defaultdict(set)
        self.fields: dict[str, set[str]] = defaultdict(set)
        self.delivered = False

    def add(
        self, label: str, pks: Iterable[object] | None, action: str, fields: Iterable[str] | None
    ) -> None:
        if pks is None:
            self.members[label].add(store.ALL)
        else:
            self.members[label].update(store.member(action, pk) for pk in pks)
        if action == "u":
            self.fields[label].update([store.ALL] if fields is None else fields)

    def merge(self, other: Changes) -> None:
        for label, members in other.members.items():
            self.members[label] |= members
        for label, fields in other.fields.items():
            self.fields[label] |= fields

    def __call__(self) -> None:
        """The ``on_commit`` callback: deliver these changes and their committed siblings.

        Every ``Changes`` of the transaction still referenced by Django survived
        its savepoints, so the first callback to run delivers them all at once.
        """
        if self.delivered:
            return
        merged = Changes(self.using)
        for changes in _open_changes(self.using):
            if not changes.delivered:
                merged.merge(changes)
                changes.delivered = True
        merged.merge(self)
        self.delivered = True
        deliver(merged)


class _Local(threading.local):
    def __init__(self) -> None:
        # alias -> {savepoint path: weak reference to the Changes registered there}
        self.open: dict[str, dict[tuple[str, ...], weakref.ref[Changes]]] = defaultdict(dict)


_local = _Local()


def _open_changes(using: str) -> list[Changes]:
    """The ``Changes`` of the current transaction on ``using`` that Django still holds."""
    slots = _local.open[using]
    alive = {path: ref for path, ref in slots.items() if ref() is not None}
    slots.clear()
    slots.update(alive)
    return [changes for ref in alive.values() if (changes := ref()) is not None]


def record(
    model: type[models.Model],
    pks: Iterable[object] | None,
    action: str,
    fields: Iterable[str] | None,
    using: str,
) -> None:
    """Note that rows of ``model`` changed in the current transaction on ``using``.

    ``action`` is a key of ``store.ACTIONS``; ``pks`` None means every row.
    ``fields`` are the changed field names of an update (None: all). Nothing
    is sent before the commit; a rolled-back transaction or savepoint drops
    what was recorded in it.
    """
    connection = connections[using]
    label = model._meta.label_lower
    if not connection.in_atomic_block:
        changes = Changes(using)
        changes.add(label, pks, action, fields)
        transaction.on_commit(changes, using=using)
        return
    # One Changes per savepoint level, registered with on_commit there: Django
    # drops it (and our weak reference dies) if that savepoint rolls back.
    path = tuple(sid for sid in connection.savepoint_ids if sid is not None)
    slots = _local.open[using]
    ref = slots.get(path)
    changes = ref() if ref is not None else None
    if changes is None or changes.delivered:
        changes = Changes(using)
        transaction.on_commit(changes, using=using)
        slots[path] = weakref.ref(changes)
    changes.add(label, pks, action, fields)


def invalidate(model: type[models.Model], pks: Iterable[object] | None = None) -> None:
    """Invalidate cached data of ``model``: the given rows, or all of it when ``pks`` is None.

    Goes through the same batched path as saves: after the current transaction
    on the model's write database commits, at once outside a transaction.

    Raises:
        LookupError: the model is not registered with ormbridge.
    """
    from ormbridge import registry

    registry.options(model)
    record(model, None if pks is None else list(pks), "i", None, router.db_for_write(model))


def deliver(changes: Changes) -> None:
    """Push committed changes to Redis and schedule flushes; fall back to the change log."""
    labels = [label for label, members in changes.members.items() if members]
    if not labels:
        return
    guard_ttl = int(settings.FLUSH_DELAY) + GUARD_GRACE
    try:
        pipe = store.get_redis().pipeline(transaction=False)
        for label in labels:
            members = sorted(changes.members[label])
            for start in range(0, len(members), 5000):
                pipe.sadd(store.pending_key(label), *members[start : start + 5000])
            if changes.fields.get(label):
                pipe.sadd(store.fields_key(label), *changes.fields[label])
            pipe.set(store.scheduled_key(label), "1", nx=True, ex=guard_ttl)
        replies = pipe.execute()
    except redis.RedisError as exc:
        logger.warning("ormbridge: Redis unreachable, changes kept in the change log: %s", exc)
        outbox.write(changes.using, _batches(changes, labels), error=exc)
        return
    # The guard reply is the last reply of each label's commands.
    guard_replies = []
    position = -1
    for label in labels:
        position += -(-len(changes.members[label]) // 5000) + bool(changes.fields.get(label)) + 1
        guard_replies.append(replies[position])
    for label, claimed in zip(labels, guard_replies, strict=True):
        if not claimed:
            continue
        try:
            schedule_flush(label)
        except (BrokerError, OSError) as exc:
            logger.warning("ormbridge: broker unreachable, changes kept in the change log: %s", exc)
            outbox.write(changes.using, _batches(changes, [label]), error=exc)
            with contextlib.suppress(redis.RedisError):  # else the guard expires on its own
                store.get_redis().delete(store.scheduled_key(label))


def schedule_flush(label: str) -> None:
    """Send the flush task for ``label``, to run after the debounce window."""
    from ormbridge import tasks

    tasks.enqueue(tasks.flush_invalidations, label, countdown=settings.FLUSH_DELAY)


def _batches(changes: Changes, labels: list[str]) -> list[outbox.NewBatch]:
    """The change-log rows equivalent to ``changes`` for ``labels``."""
    batches = []
    for label in labels:
        by_action: dict[str, list[str]] = defaultdict(list)
        for value in changes.members[label]:
            action, pk = store.parse_member(value)
            by_action[action].append(pk)
        fields = changes.fields.get(label)
        for action, pks in sorted(by_action.items()):
            batches.append(
                outbox.NewBatch(
                    label=label,
                    action=store.ACTIONS[action],
                    pks=None if store.ALL in pks else pks,
                    fields=sorted(fields)
                    if action == "u" and fields and store.ALL not in fields
                    else None,
                )
            )
    return batches
