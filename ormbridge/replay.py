"""Replaying Django's per-row signals for rows changed in bulk.

Runs where a change-log row is delivered (a Celery worker, or the caller with
``replay="sync"``). Receivers get the usual arguments plus
``ormbridge_replay=True``; delivery is at least once, so receivers must be
idempotent. A receiver that raises fails its row alone: every receiver still
gets every row, and the error is returned with the row's pk, to be retried.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from django.db import connections, models
from django.db.models.signals import ModelSignal, post_delete, post_save

__all__ = [
    "ERROR_TEXT",
    "LOAD_SIZE",
    "ReceiverError",
    "Replayed",
    "keep_rows",
    "rebuild",
    "receiver_name",
    "replay_deletes",
    "replay_saves",
]

# Rows loaded per query when replaying saves.
LOAD_SIZE = 2000
# Characters of an exception's text kept in a receiver error.
ERROR_TEXT = 500


@dataclasses.dataclass(frozen=True)
class ReceiverError:
    """A receiver that raised while a row was replayed."""

    pk: Any
    receiver: str
    error: str

    def as_dict(self) -> dict[str, Any]:
        pk = self.pk if isinstance(self.pk, int | str) else str(self.pk)
        return {"pk": pk, "receiver": self.receiver, "error": self.error}


@dataclasses.dataclass
class Replayed:
    """What a replay did: the receivers that raised."""

    errors: list[ReceiverError] = dataclasses.field(default_factory=list)

    def failed_pks(self) -> list[Any]:
        """The pks of the rows a receiver raised for, each once, in replay order."""
        return list(dict.fromkeys(error.pk for error in self.errors))


def receiver_name(receiver: Any) -> str:
    """A receiver's dotted name (``app.receivers.on_save``, ``app.Index.on_save``)."""
    target = getattr(receiver, "__func__", receiver)
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if module is None or name is None:
        module, name = type(target).__module__, type(target).__qualname__
    return f"{module}.{name}"


def _send(signal: ModelSignal, obj: models.Model, done: Replayed, **named: Any) -> None:
    for receiver, response in signal.send_robust(instance=obj, ormbridge_replay=True, **named):
        if isinstance(response, Exception):
            text = f"{type(response).__name__}: {response}"[:ERROR_TEXT]
            done.errors.append(ReceiverError(obj.pk, receiver_name(receiver), text))


def replay_saves(
    model: type[models.Model],
    pks: list[Any],
    fields: list[str] | None,
    created: bool,
    using: str,
) -> Replayed:
    """Send ``post_save`` once per row of ``pks`` that still exists, to every receiver."""
    update_fields = frozenset(fields) if fields and not created else None
    manager = model._base_manager.using(using)
    size = min(LOAD_SIZE, connections[using].ops.bulk_batch_size([model._meta.pk], pks) or 1)
    done = Replayed()
    for start in range(0, len(pks), size):
        for obj in manager.filter(pk__in=pks[start : start + size]).order_by("pk"):
            _send(
                post_save,
                obj,
                done,
                sender=model,
                created=created,
                update_fields=update_fields,
                raw=False,
                using=using,
            )
    return done


def replay_deletes(model: type[models.Model], snapshot: dict[str, Any], using: str) -> Replayed:
    """Send ``post_delete`` once per row of ``snapshot``, with instances rebuilt from it."""
    done = Replayed()
    for obj in rebuild(model, snapshot, using):
        _send(post_delete, obj, done, sender=model, using=using, origin=None)
    return done


def keep_rows(
    model: type[models.Model], snapshot: dict[str, Any], pks: list[Any]
) -> dict[str, Any]:
    """``snapshot`` with only the rows of ``pks``: what a retry of those rows needs."""
    to_python = model._meta.pk.to_python
    position = snapshot["fields"].index(model._meta.pk.attname)
    wanted = {to_python(pk) for pk in pks}
    rows = [row for row in snapshot["rows"] if to_python(row[position]) in wanted]
    return {"fields": snapshot["fields"], "rows": rows}


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
