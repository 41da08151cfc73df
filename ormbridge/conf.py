"""ormbridge settings: one dict, ``settings.ORMBRIDGE``, read at call time.

Every key, its default and its meaning is declared here and nowhere else.
Values are looked up on each access, so ``override_settings`` and the
pytest-django ``settings`` fixture take effect immediately. Validation lives
in :mod:`ormbridge.checks`; this module never raises for a bad value.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings as django_settings


class _Setting:
    """A key of ``settings.ORMBRIDGE`` with its default and documentation."""

    def __init__(self, default: Any, doc: str) -> None:
        self.default = default
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: object, owner: type) -> Any:
        if instance is None:
            return self
        user = getattr(django_settings, "ORMBRIDGE", None)
        if isinstance(user, dict) and self.name in user:
            return user[self.name]
        return self.default


class Settings:
    """Typed, lazily read view of ``settings.ORMBRIDGE``."""

    REDIS_URL: str = _Setting(
        "redis://127.0.0.1:6379/0",
        "Redis server holding pending invalidation sets, cache tokens, debounce "
        "guards and statistics. Any URL redis-py accepts (redis://, rediss://, "
        "unix://). Connect and socket timeouts default to 2 s and 5 s unless "
        "the URL sets them.",
    )
    KEY_PREFIX: str = _Setting(
        "ormbridge",
        "Prefix of every Redis key and cache key ormbridge writes.",
    )
    CACHE_ALIAS: str = _Setting(
        "default",
        "Alias in ``settings.CACHES`` of the cache that holds cached instances "
        "and querysets. Must be shared by web processes and workers (not "
        "LocMemCache).",
    )
    CACHE_TIMEOUT: int | None = _Setting(
        3600,
        "Seconds a cached instance or queryset is kept; None keeps it until "
        "invalidated. A model may override it with ``register(cache_timeout=...)``.",
    )
    FLUSH_DELAY: float = _Setting(
        1.0,
        "Debounce window in seconds: changes to a model within this window are "
        "flushed by one task.",
    )
    FLUSH_BATCH_SIZE: int = _Setting(
        1000,
        "Rows handled per Redis round trip and per event when flushing.",
    )
    QUEUE: str = _Setting(
        "ormbridge",
        "Celery queue every ormbridge task is sent to. Run a worker with "
        "``-Q ormbridge`` (plus your own queues).",
    )
    MODELS: list[str] = _Setting(
        [],
        'Models to register at start-up, as ``"app_label.ModelName"`` strings.',
    )
    REDELIVER_AFTER: float = _Setting(
        300,
        "Seconds after which work that was handed to a worker but never "
        "finished (a dead worker, a lost message) is handed out again by "
        "``sweep_outbox``. Longer than your slowest flush.",
    )
    BULK_CHUNK_SECONDS: float = _Setting(
        0.2,
        "Target duration of one chunk's transaction in the ``safe_bulk_*`` helpers when "
        "no chunk size is given: chunks grow or shrink towards it (short row locks, "
        "few round trips).",
    )
    MAX_ATTEMPTS: int = _Setting(
        5,
        "Times ``sweep_outbox`` hands a change-log row out before giving up on it "
        "(state ``failed``, error kept; retry it from the admin).",
    )
    SWEEP_INTERVAL: int = _Setting(
        60,
        "Seconds between runs of ``sweep_outbox`` and ``flush_pending`` in the schedule "
        "``manage.py ormbridge_schedule`` installs.",
    )
    STATUS_MAX_PENDING_AGE: int = _Setting(
        600,
        "``manage.py ormbridge_status`` exits non-zero when the oldest undelivered "
        "change-log row is older than this many seconds.",
    )
    EMITTERS: list[str] = _Setting(
        ["ormbridge.broadcast.RedisStreamEmitter"],
        "Dotted paths of the classes that receive change events (one per batch and "
        "namespace): ``ormbridge.broadcast.RedisStreamEmitter`` (feeds the events "
        "endpoint), ``ormbridge.broadcast.LoggingEmitter``, "
        "``ormbridge.contrib.pusher.PusherEmitter``.",
    )
    PUSHER: dict | None = _Setting(
        None,
        "Keyword arguments of ``pusher.Pusher`` (``app_id``, ``key``, ``secret``, "
        "``cluster`` …) for ``ormbridge.contrib.pusher.PusherEmitter``, plus an optional "
        "``channel_prefix`` (default ``private-``).",
    )
    EVENTS_MAXLEN: int = _Setting(
        10_000,
        "Events kept per namespace stream (approximately): how far back a reconnecting "
        "client can resume with ``Last-Event-ID``.",
    )
    EVENTS_PERMISSION: str | None = _Setting(
        None,
        "Dotted path of ``f(request, namespace) -> bool`` deciding who may subscribe to a "
        "namespace. None: an authenticated user with the model's ``view`` permission.",
    )
    EVENTS_HEARTBEAT: float = _Setting(
        15.0,
        "Seconds between heartbeat comments on an idle events stream.",
    )

    def names(self) -> list[str]:
        """Names of all known settings."""
        return [name for name, value in vars(type(self)).items() if isinstance(value, _Setting)]


settings = Settings()
