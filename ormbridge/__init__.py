"""ormbridge: keep caches and live frontends in sync with Django model changes."""

from ormbridge.buffer import invalidate
from ormbridge.cache import cached_instance, cached_queryset
from ormbridge.registry import register

__all__ = ["cached_instance", "cached_queryset", "invalidate", "register"]
