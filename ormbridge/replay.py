"""Replaying Django's per-row signals for rows changed in bulk.

Runs where a change-log row is delivered (a Celery worker, or the caller with
``replay="sync"``). Receivers get the usual arguments plus
``ormbridge_replay=True``; delivery is at least once, so receivers must be
idempotent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django.db import connections, models
from django.db.models.signals import post_delete, post_save

# Rows loaded per query when replaying saves.
LOAD_SIZE = 2000


def replay_saves(
    model: type[models.Model],
    pks: list[Any],
    fields: list[str] | None,
    created: bool,
    using: str,
) -> int:
    """Send ``post_save`` once per row of ``pks`` that still exists; returns how many."""
    update_fields = frozenset(fields) if fields and not created else None
    manager = model._base_manager.using(using)
    size = min(LOAD_SIZE, connections[using].ops.bulk_batch_size([model._meta.pk], pks) or 1)
    sent = 0
    for start in range(0, len(pks), size):
        for obj in manager.filter(pk__in=pks[start : start + size]).order_by("pk"):
            post_save.send(
                sender=model,
                instance=obj,
                created=created,
                update_fields=update_fields,
                raw=False,
                using=using,
                ormbridge_replay=True,
            )
            sent += 1
    return sent


def replay_deletes(model: type[models.Model], snapshot: dict[str, Any], using: str) -> int:
    """Send ``post_delete`` once per row of ``snapshot``, with instances rebuilt from it."""
    sent = 0
    for obj in rebuild(model, snapshot, using):
        post_delete.send(
            sender=model, instance=obj, using=using, origin=None, ormbridge_replay=True
        )
        sent += 1
    return sent


def snapshot(model: type[models.Model], instances: list[models.Model]) -> dict[str, Any]:
    """The concrete field values of ``instances``, in a form the change log can store."""
    fields = model._meta.concrete_fields
    return {
        "fields": [field.attname for field in fields],
        "rows": [[getattr(obj, field.attname) for field in fields] for obj in instances],
    }


def rebuild(
    model: type[models.Model], snapshot: dict[str, Any], using: str
) -> Iterator[models.Model]:
    """Instances of ``model`` as they were when ``snapshot`` was taken."""
    by_attname = {field.attname: field for field in model._meta.concrete_fields}
    fields = [by_attname[attname] for attname in snapshot["fields"]]
    for row in snapshot["rows"]:
        obj = model(**{f.attname: f.to_python(value) for f, value in zip(fields, row, strict=True)})
        obj._state.adding = False
        obj._state.db = using
        yield obj
