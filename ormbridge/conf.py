"""ormbridge settings: one dict, ``settings.ORMBRIDGE``, read at call time.

Every key, its default and its meaning is declared here and nowhere else.
Values are looked up on each access, so ``override_settings`` and the
pytest-django ``settings`` fixture take effect immediately. Validation lives
in :mod:`ormbridge.checks`; this module never raises for a bad value.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

from django.conf import settings as django_settings

__all__ = [
    "Settings",
    "settings",
]

T = TypeVar("T")


class _Setting(Generic[T]):
    """A key of ``settings.ORMBRIDGE`` with its default and documentation.

    ``derive``, if given, computes the default from the other settings at call time
    (``default`` is then the value with every other setting at its default).
    ``renamed_from``, if given, is the key's name in the previous release: still read,
    with a ``DeprecationWarning``, when the new name is not set (the check
    ``ormbridge.W010`` names the new key).
    """

    def __init__(
        self,
        default: T,
        doc: str,
        derive: Callable[[Any], T] | None = None,
        renamed_from: str | None = None,
    ) -> None:
        self.default = default
        self.derive = derive
        self.renamed_from = renamed_from
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type) -> _Setting[T]: ...
    @overload
    def __get__(self, instance: object, owner: type) -> T: ...
    def __get__(self, instance: object | None, owner: type) -> _Setting[T] | T:
        if instance is None:
            return self
        user = getattr(django_settings, "ORMBRIDGE", None)
        if isinstance(user, dict) and self.name in user:
            value: T = user[self.name]  # the user's value, unchecked (see ormbridge.checks)
            return value
        if isinstance(user, dict) and self.renamed_from is not None and self.renamed_from in user:
            warnings.warn(
                f"ORMBRIDGE[{self.renamed_from!r}] is renamed {self.name!r}; the old name "
                "is read until the next release.",
                DeprecationWarning,
                stacklevel=2,
            )
            old: T = user[self.renamed_from]
            return old
        if self.derive is not None:
            return self.derive(instance)
        return self.default


def _default_queue(conf: Settings) -> str:
    """``ormbridge`` for the default ``KEY_PREFIX``, else ``ormbridge.<KEY_PREFIX>``."""
    prefix = conf.KEY_PREFIX
    return "ormbridge" if prefix == "ormbridge" else f"ormbridge.{prefix}"


def _refusal_window(conf: Settings) -> float:
    """600 s, or twice ``SWEEP_INTERVAL`` when that is longer (a bad value: 600 s)."""
    interval = conf.SWEEP_INTERVAL
    if isinstance(interval, bool) or not isinstance(interval, int | float):
        return 600
    return max(600, 2 * interval)


class Settings:
    """Typed, lazily read view of ``settings.ORMBRIDGE``."""

    REDIS_URL: _Setting[str] = _Setting(
        "redis://127.0.0.1:6379/0",
        "Redis server holding cache tokens, event streams and statistics: a cache of "
        "the change log, which may be lost or restored at any time. Any URL redis-py "
        "accepts (redis://, rediss://, unix://). Connect and socket timeouts default "
        "to 2 s and 5 s unless the URL sets them.",
    )
    REDIS_CLUSTER: _Setting[bool] = _Setting(
        False,
        "True: ``REDIS_URL`` (redis:// or rediss://) names one node of a Redis Cluster; the "
        "others are found from it. Every key of a ``KEY_PREFIX`` is in one hash slot, so "
        "one master (and its replicas) holds them all: the cluster gives failover, not "
        "sharding. The Celery broker stays a plain Redis (kombu has no cluster support).",
    )
    KEY_PREFIX: _Setting[str] = _Setting(
        "ormbridge",
        "Prefix of every Redis key ormbridge writes: tokens, cache entries, streams, counters. "
        "Keys start with ``{prefix}``, a Redis Cluster hash tag: no braces in the prefix.",
    )
    CACHE_TIMEOUT: _Setting[int | None] = _Setting(
        3600,
        "Seconds a cached instance or queryset is kept; None keeps it until "
        "invalidated. A model may override it with ``register(cache_timeout=...)``.",
    )
    DELIVERY_DELAY: _Setting[float] = _Setting(
        0.05,
        "Seconds the relay waits after a wake-up before it claims change-log rows, so a "
        "burst of commits is delivered as one batch. Readers through the cache API do not "
        "wait for it: the committing process invalidates at commit. Formerly ``FLUSH_DELAY``, "
        "still read for one release (deprecated: a ``DeprecationWarning`` and check "
        "``ormbridge.W010``).",
        renamed_from="FLUSH_DELAY",
    )
    DELIVERY_BATCH_SIZE: _Setting[int] = _Setting(
        1000,
        "Rows handled per Redis round trip and per event when delivering. Formerly "
        "``FLUSH_BATCH_SIZE``, still read for one release (deprecated: a "
        "``DeprecationWarning`` and check ``ormbridge.W010``).",
        renamed_from="FLUSH_BATCH_SIZE",
    )
    QUEUE: _Setting[str] = _Setting(
        "ormbridge",
        "Celery queue ormbridge's tasks (resync, sweep) are sent to. Default: derived from "
        "``KEY_PREFIX``, ``ormbridge`` for the default prefix and ``ormbridge.<KEY_PREFIX>`` "
        "otherwise, so projects sharing a broker (with their own prefixes) never take each "
        "other's tasks; a worker also refuses a task sent under another prefix, or by another "
        "site (another default database) under the same prefix. Run a worker "
        "with ``-Q <this queue>`` (plus your own queues).",
        derive=_default_queue,
    )
    MODELS: _Setting[list[str] | dict[str, dict[str, Any]]] = _Setting(
        [],
        'Models to register at start-up: a list of ``"app_label.ModelName"`` strings, or a '
        "dict of them to ``register()`` options, e.g. "
        '``{"shop.Product": {"cache_timeout": 600, "payload": "shop.events.product"}}`` '
        "(callables as dotted paths).",
    )
    CAPTURE: _Setting[str] = _Setting(
        "triggers",
        'How changes are captured: ``"triggers"`` (database triggers on PostgreSQL and '
        'SQLite; other backends fall back to signals) or ``"signals"`` (``post_save``, '
        "``post_delete`` and ``m2m_changed`` receivers, for a database that refuses "
        "triggers: they miss ``QuerySet.update()``, bulk and raw writes, and turn off "
        "Django's fast delete for registered models).",
    )
    RELAY: _Setting[bool] = _Setting(
        True,
        "Run the relay in every Celery worker process of the project: it claims "
        "undelivered change-log rows and delivers them. False: run it yourself "
        "(``ormbridge.relay.Relay``) or not at all.",
    )
    RELAY_BATCH: _Setting[int] = _Setting(
        500,
        "Change-log rows the relay claims at once (each may hold many rows' pks).",
    )
    RELAY_MAX_PKS: _Setting[int] = _Setting(
        50_000,
        "Primary keys a relay holds at once, whatever a statement changed: a merged "
        "delivery reads its change-log rows' pks in slices of at most this many (and "
        "records how far each row got, so a relay taken over goes on from there), and "
        "``safe_bulk_*`` and ``ormbridge_resync`` write change-log rows of at most this many "
        "pks, so a row delivered whole (replays, deleted rows' values) is bounded too. "
        "A worker's memory stays flat however large the statements.",
    )
    RELAY_LEASE: _Setting[float] = _Setting(
        10.0,
        "Seconds a relay's claim on change-log rows lasts unless renewed; a relay (or a "
        'caller delivering its own rows: ``replay="sync"``, ``ormbridge_resync --sync``) '
        "renews its claims every third of it while it works, so rows of a killed relay are "
        "taken over this long after it died, and a slow delivery never is.",
    )
    RELAY_POLL: _Setting[float] = _Setting(
        0.2,
        "Seconds between the relay's looks at the change log when nothing wakes it "
        "(on PostgreSQL the capture triggers' NOTIFY wakes it at once).",
    )
    LOG_RETENTION: _Setting[float] = _Setting(
        86_400,
        "Seconds a delivered change-log row is kept before ``sweep`` deletes it.",
    )
    COMMIT_TIMEOUT: _Setting[float] = _Setting(
        0.05,
        "Redis connect and socket timeout, in seconds, of the invalidation a committing "
        "process makes itself: the longest a hung Redis can delay a commit.",
    )
    READ_TIMEOUT: _Setting[float] = _Setting(
        0.25,
        "Redis connect and socket timeout, in seconds, of a cached read: the longest a "
        "hung Redis can delay a read, which then goes to the database.",
    )
    BREAKER_COOLDOWN: _Setting[float] = _Setting(
        5.0,
        "After Redis failed at a commit, seconds during which commits skip it (the "
        "change log still carries every change to the relay); after it failed on a "
        "cached read, seconds during which cached reads go to the database.",
    )
    BULK_CHUNK_SECONDS: _Setting[float] = _Setting(
        0.2,
        "Target duration of one chunk's transaction in the ``safe_bulk_*`` helpers when "
        "no chunk size is given: chunks grow or shrink towards it (short row locks, "
        "few round trips).",
    )
    MAX_ATTEMPTS: _Setting[int] = _Setting(
        5,
        "Times the relay tries to deliver a change-log row before giving up on it "
        "(state ``failed``, error kept, ``BulkResult.wait()`` raises; retry it from the "
        "admin). A retry replays only the rows whose receivers raised.",
    )
    RETRY_BACKOFF: _Setting[float] = _Setting(
        5.0,
        "Seconds before a failed delivery is tried again, doubled after each attempt (at "
        "most ``RETRY_BACKOFF_MAX``). With ``MAX_ATTEMPTS`` 5 a row is given up about "
        "5 + 10 + 20 + 40 = 75 s after its first attempt.",
    )
    RETRY_BACKOFF_MAX: _Setting[float] = _Setting(
        300.0,
        "The longest wait between two delivery attempts of a change-log row, in seconds.",
    )
    SWEEP_INTERVAL: _Setting[int] = _Setting(
        60,
        "Seconds between runs of ``sweep`` (prune the change log, deliver what no "
        "relay took) in the schedule ``manage.py ormbridge_schedule`` installs.",
    )
    STATUS_MAX_PENDING_AGE: _Setting[int] = _Setting(
        600,
        "``manage.py ormbridge_status`` exits non-zero when the oldest undelivered "
        "change-log row is older than this many seconds.",
    )
    STATUS_REFUSAL_WINDOW: _Setting[float] = _Setting(
        600,
        "Seconds a task message refused by a worker (sent under another ``KEY_PREFIX`` or "
        "none, or refused for any other reason) counts as recent: ``manage.py "
        "ormbridge_status`` exits non-zero while one is. Default: 600, or twice "
        "``SWEEP_INTERVAL`` if that is longer, so that a sweep refused at every run stays "
        "recent.",
        derive=_refusal_window,
    )
    EMITTERS: _Setting[list[str]] = _Setting(
        ["ormbridge.broadcast.RedisStreamEmitter"],
        "Dotted paths of the classes that receive change events (one per batch and "
        "namespace): ``ormbridge.broadcast.RedisStreamEmitter`` (feeds the events "
        "endpoint), ``ormbridge.broadcast.LoggingEmitter``, "
        "``ormbridge.contrib.pusher.PusherEmitter``, "
        "``ormbridge.contrib.channels.ChannelsEmitter``, "
        "``ormbridge.contrib.eventstream.EventStreamEmitter``.",
    )
    PUSHER: _Setting[dict[str, Any] | None] = _Setting(
        None,
        "Keyword arguments of ``pusher.Pusher`` (``app_id``, ``key``, ``secret``, "
        "``cluster`` …) for ``ormbridge.contrib.pusher.PusherEmitter``, plus an optional "
        "``channel_prefix`` (default ``private-``).",
    )
    EVENTS_MAXLEN: _Setting[int] = _Setting(
        10_000,
        "Events kept per namespace stream (approximately): how far back a reconnecting "
        "client can resume with ``Last-Event-ID``.",
    )
    EVENTS_PERMISSION: _Setting[str | None] = _Setting(
        None,
        "Dotted path of ``f(request, namespace) -> bool`` deciding who may subscribe to a "
        "namespace (called again on every re-check of an open stream). None: an "
        "authenticated user with the model's ``view`` permission, and no tenant namespace "
        "(``app_label.model::name``) for anyone.",
    )
    EVENTS_HEARTBEAT: _Setting[float] = _Setting(
        15.0,
        "Seconds between heartbeat comments on an idle events stream.",
    )
    EVENTS_REAUTH: _Setting[float] = _Setting(
        60.0,
        "Seconds between re-checks of an open events stream's access (its session, its "
        "user, ``EVENTS_PERMISSION``): a stream whose user is logged out or may no longer "
        "see one of its namespaces ends with a ``closed`` event.",
    )
    EVENTS_MAX_AGE: _Setting[float] = _Setting(
        3600.0,
        "Seconds an events stream lives at most (less up to a tenth, at random): it then "
        "ends with a ``closed`` event and the browser reconnects with ``Last-Event-ID``, "
        "missing nothing.",
    )
    EVENTS_BUFFER: _Setting[int] = _Setting(
        2000,
        "Events an open stream may have waiting in its server process (ASGI) when more "
        "arrive; more than that, and it is dropped as too slow: it ends with a ``closed`` "
        "event (reason ``behind``), which a client that stopped reading gets when it reads "
        "again, and the browser resumes with ``Last-Event-ID``. The other streams never "
        "wait for it.",
    )
    EVENTS_GC_PAUSE: _Setting[float] = _Setting(
        1.0,
        "Seconds at most that Python's cyclic garbage collector is held back while an "
        "event reaches the open streams of a server process (ASGI, 100 streams or more): "
        "a full collection scans some hundreds of objects per open stream and, landing "
        "mid-delivery, would hold every stream up. It runs once they have their events. "
        "0 never holds it back.",
    )
    EVENTS_MAX_NAMESPACES: _Setting[int] = _Setting(
        20,
        "Namespaces one request to the events endpoint may subscribe to; more is a 400. "
        "Bounds the Redis reads of a stream and the size of its cursors.",
    )

    def names(self) -> list[str]:
        """Names of all known settings."""
        return [name for name, value in vars(type(self)).items() if isinstance(value, _Setting)]

    def renamed(self) -> dict[str, str]:
        """Deprecated names still read, and the keys that replaced them."""
        return {
            value.renamed_from: name
            for name, value in vars(type(self)).items()
            if isinstance(value, _Setting) and value.renamed_from is not None
        }


settings = Settings()
