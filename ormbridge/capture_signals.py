"""Capture by Django signals, where a database has no capture triggers.

On a backend ormbridge has no triggers for (MySQL, Oracle, …), or with
``ORMBRIDGE["CAPTURE"] = "signals"`` (a database that refuses triggers),
``post_save``, ``post_delete`` and ``m2m_changed`` receivers write the change
log instead, in the writer's transaction, and note the changed rows for
read-your-writes at commit. What that costs, and what it misses:

- only writes that send signals are seen: not ``QuerySet.update()``,
  ``bulk_create()``, ``bulk_update()``, raw SQL or other programs (use the
  ``safe_bulk_*`` helpers or :func:`ormbridge.invalidate`);
- a ``post_delete`` or ``m2m_changed`` receiver turns off Django's fast delete
  and fast many-to-many add for the model: ``qs.delete()`` loads every row and
  deletes in batches (17 s instead of 0.02 s for 200,000 rows, measured here);
- one change-log ``INSERT`` per saved or deleted row.
"""

from __future__ import annotations

import functools
from typing import Any

from django.apps import apps
from django.db import connections, models
from django.db.models.signals import m2m_changed, post_delete, post_save

from ormbridge import capture, commit, registry
from ormbridge.conf import settings
from ormbridge.models import ChangeBatch

__all__ = [
    "connect",
    "disconnect",
    "needed",
    "tables_changed",
]


def needed(using: str) -> bool:
    """Whether changes on ``using`` are captured by signals rather than triggers."""
    return settings.CAPTURE == "signals" or not capture.supports(connections[using])


def connect() -> None:
    """Connect the receivers of every registered model, its proxies and MTI children.

    Per model, with ``sender=`` and a ``dispatch_uid``: a receiver for every
    model would send every model's deletes down Django's slow path.
    """
    for model in apps.get_models():
        if _targets(model):
            uid = model._meta.label_lower
            post_save.connect(_on_save, sender=model, dispatch_uid=f"ormbridge:save:{uid}")
            post_delete.connect(_on_delete, sender=model, dispatch_uid=f"ormbridge:delete:{uid}")
    for table in capture.tables():
        if table.through:
            through = _through_model(table.name)
            if through is not None:
                m2m_changed.connect(
                    _on_m2m, sender=through, dispatch_uid=f"ormbridge:m2m:{table.name}"
                )


def disconnect() -> None:
    """Disconnect every receiver :func:`connect` connected."""
    for model in apps.get_models(include_auto_created=True):
        uid = model._meta.label_lower
        post_save.disconnect(sender=model, dispatch_uid=f"ormbridge:save:{uid}")
        post_delete.disconnect(sender=model, dispatch_uid=f"ormbridge:delete:{uid}")
        m2m_changed.disconnect(sender=model, dispatch_uid=f"ormbridge:m2m:{model._meta.db_table}")


@functools.cache
def _through_tables() -> dict[str, capture.Table]:
    return {table.name: table for table in capture.tables() if table.through}


def tables_changed() -> None:
    """Forget the m2m table map (a model was registered)."""
    _through_tables.cache_clear()


def _through_model(table: str) -> type[models.Model] | None:
    for model in apps.get_models(include_auto_created=True):
        if model._meta.db_table == table:
            return model
    return None


def _targets(model: type[models.Model]) -> list[type[models.Model]]:
    """Registered models whose rows a write through ``model`` changes (proxies, MTI parents)."""
    concrete = model._meta.concrete_model
    if concrete is None:
        return []
    chain = [concrete, *concrete._meta.get_parent_list()]
    return [m for m in chain if registry.is_registered(m)]


def _write_log(
    model: type[models.Model], action: str, pks: list[Any], fields: Any, using: str
) -> None:
    label = model._meta.label_lower
    to_python = model._meta.pk.to_python
    values = [to_python(pk) for pk in pks]
    ChangeBatch.objects.using(using).create(
        model=label,
        action=action,
        pks=values,
        rows=len(values),
        fields=None if fields is None else sorted(fields),
    )
    commit.note(commit.keys_for(label, values), using)


def _on_save(
    sender: type[models.Model],
    instance: models.Model,
    created: bool,
    update_fields: frozenset[str] | None,
    using: str,
    **kwargs: Any,
) -> None:
    if kwargs.get("ormbridge_replay") or not needed(using):
        return
    for model in _targets(sender):
        fields = None if created else update_fields
        _write_log(model, "create" if created else "update", [instance.pk], fields, using)


def _on_delete(
    sender: type[models.Model], instance: models.Model, using: str, **kwargs: Any
) -> None:
    if kwargs.get("ormbridge_replay") or not needed(using):
        return
    for model in _targets(sender):
        _write_log(model, "delete", [instance.pk], None, using)


def _on_m2m(
    sender: type[models.Model],
    instance: models.Model,
    action: str,
    model: type[models.Model],
    pk_set: set[Any] | None,
    using: str,
    **kwargs: Any,
) -> None:
    if not action.startswith("post_") or not needed(using):
        return
    table = _through_tables().get(sender._meta.db_table)
    for target in table.targets if table is not None else ():
        if target.label == registry.label_of(type(instance)):
            _write_log(type(instance), "update", [instance.pk], [target.field], using)
        elif pk_set:
            _write_log(
                apps.get_model(target.label), "update", sorted(pk_set), [target.field], using
            )
