"""ormbridge: keep caches and live frontends in sync with Django model changes.

The public API is imported lazily, so ``import ormbridge`` (or ``from ormbridge
import register`` in a ``models.py``) loads no models before Django's apps are
ready.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ormbridge.broadcast import Emitter, Event
    from ormbridge.bulk import (
        BulkInterrupted,
        BulkOperationFailed,
        BulkResult,
        safe_bulk_create,
        safe_bulk_delete,
        safe_bulk_update,
        safe_bulk_update_objects,
    )
    from ormbridge.cache import cached_instance
    from ormbridge.commit import invalidate
    from ormbridge.decorators import cached_as, cached_view_as
    from ormbridge.querysets import CachedManager, CachedQuerySet, cached_queryset
    from ormbridge.registry import register

_SOURCES = {
    "BulkInterrupted": "ormbridge.bulk",
    "BulkOperationFailed": "ormbridge.bulk",
    "BulkResult": "ormbridge.bulk",
    "CachedManager": "ormbridge.querysets",
    "CachedQuerySet": "ormbridge.querysets",
    "Emitter": "ormbridge.broadcast",
    "Event": "ormbridge.broadcast",
    "cached_as": "ormbridge.decorators",
    "cached_instance": "ormbridge.cache",
    "cached_queryset": "ormbridge.querysets",
    "cached_view_as": "ormbridge.decorators",
    "invalidate": "ormbridge.commit",
    "register": "ormbridge.registry",
    "safe_bulk_create": "ormbridge.bulk",
    "safe_bulk_delete": "ormbridge.bulk",
    "safe_bulk_update": "ormbridge.bulk",
    "safe_bulk_update_objects": "ormbridge.bulk",
}

__all__ = [
    "BulkInterrupted",
    "BulkOperationFailed",
    "BulkResult",
    "CachedManager",
    "CachedQuerySet",
    "Emitter",
    "Event",
    "cached_as",
    "cached_instance",
    "cached_queryset",
    "cached_view_as",
    "invalidate",
    "register",
    "safe_bulk_create",
    "safe_bulk_delete",
    "safe_bulk_update",
    "safe_bulk_update_objects",
]


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module 'ormbridge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value
