"""ormbridge: keep caches and live frontends in sync with Django model changes."""

from ormbridge.buffer import invalidate
from ormbridge.bulk import (
    BulkOperationFailed,
    BulkResult,
    safe_bulk_create,
    safe_bulk_delete,
    safe_bulk_update,
    safe_bulk_update_objects,
)
from ormbridge.cache import cached_instance, cached_queryset
from ormbridge.registry import register

__all__ = [
    "BulkOperationFailed",
    "BulkResult",
    "cached_instance",
    "cached_queryset",
    "invalidate",
    "register",
    "safe_bulk_create",
    "safe_bulk_delete",
    "safe_bulk_update",
    "safe_bulk_update_objects",
]
