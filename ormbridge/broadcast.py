"""Change events: one per batch (a flush batch or a bulk chunk) and namespace.

An event says which rows of which model changed, never their values::

    {"id": "…", "type": "update", "model": "shop.product", "namespace": "shop.product",
     "pks": [1, 2, 3], "fields": ["price"], "ts": 1764200000.0}

``type`` is ``create``, ``update``, ``delete``, ``invalidate`` or ``removed``;
``pks`` is None when every row of the model is concerned; ``fields`` lists the
changed fields of an update (None: unknown or all). A model registered with
``payload=`` adds ``"payload": {pk: data}``.

Every model's events go to its namespace ``app_label.model``; a model
registered with ``namespaces=`` also sends each row's events to
``app_label.model::<name>`` for every name the resolver returns for the row.
The names a row had last time are remembered in Redis: a namespace a row has
left gets a ``removed`` event with its pk only (no fields, no payload), since
its subscribers may no longer see the row's values; the namespaces it is in
now get the batch's own event.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, TypedDict

from django.db import models
from django.utils.module_loading import import_string
from redis.typing import EncodableT, FieldT

from ormbridge import redis_store, registry
from ormbridge.conf import settings

__all__ = [
    "LOAD_SIZE",
    "READ_COUNT",
    "REMOVED",
    "SEPARATOR",
    "Emitter",
    "Event",
    "LoggingEmitter",
    "RedisStreamEmitter",
    "emit",
    "event_log",
    "events_for",
    "make_event",
    "settings_changed",
    "stream_key",
]

logger = logging.getLogger(__name__)
event_log = logging.getLogger("ormbridge.events")
"""Where :class:`LoggingEmitter` writes the events: a sink, not a module's logger."""

SEPARATOR = "::"
READ_COUNT = 500
"""Entries per XREAD of the event streams (the events endpoint's, the fan-out hub's)."""
REMOVED = "removed"
"""Type of the event a namespace gets for rows that left it: their pks, nothing else."""
LOAD_SIZE = 2000


class Event(TypedDict, total=False):
    id: str
    type: str
    model: str
    namespace: str
    pks: list[Any] | None
    fields: list[str] | None
    ts: float
    payload: dict[str, Any]


def make_event(
    type: str,
    label: str,
    pks: list[Any] | None,
    fields: list[str] | None = None,
    namespace: str | None = None,
) -> Event:
    return Event(
        id=uuid.uuid4().hex,
        type=type,
        model=label,
        namespace=namespace or label,
        pks=pks,
        fields=fields,
        ts=time.time(),
    )


def events_for(
    model: type[models.Model],
    action: str,
    pks: list[Any] | None,
    fields: list[str] | None = None,
    rows: Iterable[models.Model] | None = None,
) -> list[Event]:
    """The events of one batch: one per namespace the batch's rows are (or were) in.

    ``rows`` are the deleted rows' last values, when known (bulk deletes).
    """
    label = model._meta.label_lower
    event_fields = fields if action == "update" else None
    options = registry.options(model) if registry.is_registered(model) else None
    if pks is None or options is None or not (options.namespaces or options.payload):
        return [make_event(action, label, pks, event_fields)]
    # (namespace, type) -> pks; a namespace may get both the batch's event and "removed"
    by_namespace: dict[tuple[str, str], list[Any]] = defaultdict(list)
    payload: dict[str, Any] = {}
    loaded = {obj.pk: obj for obj in rows or ()}
    if action != "delete" and not loaded:
        loaded = _load(model, pks)
    now = {pk: _names(options, loaded.get(pk)) for pk in pks}
    before = _remember(label, now, forget=action == "delete") if options.namespaces else {}
    for pk in pks:
        by_namespace[label, action].append(pk)
        # A deleted row is gone from every namespace it was in: "delete" says so there.
        here = now[pk] | before.get(pk, set()) if action == "delete" else now[pk]
        for name in sorted(here):
            by_namespace[f"{label}{SEPARATOR}{name}", action].append(pk)
        for name in sorted(before.get(pk, set()) - here):
            by_namespace[f"{label}{SEPARATOR}{name}", REMOVED].append(pk)
        if options.payload and pk in loaded and action != "delete":
            payload[str(pk)] = options.payload(loaded[pk])
    events = []
    for (namespace, kind), members in by_namespace.items():
        if kind == REMOVED:  # never the row's values: the namespace may not see them now
            events.append(make_event(REMOVED, label, members, None, namespace))
            continue
        event = make_event(kind, label, members, event_fields, namespace)
        if payload:
            event["payload"] = {str(pk): payload[str(pk)] for pk in members if str(pk) in payload}
        events.append(event)
    return events


def _load(model: type[models.Model], pks: list[Any]) -> dict[Any, models.Model]:
    manager = model._base_manager
    loaded = {}
    for start in range(0, len(pks), LOAD_SIZE):
        for obj in manager.filter(pk__in=pks[start : start + LOAD_SIZE]):
            loaded[obj.pk] = obj
    return loaded


def _names(options: registry.Options, obj: models.Model | None) -> set[str]:
    if obj is None or options.namespaces is None:
        return set()
    return {str(name) for name in options.namespaces(obj)}


def _remember(label: str, now: dict[Any, set[str]], forget: bool) -> dict[Any, set[str]]:
    """Swap each row's remembered namespace names for ``now``; returns the old ones."""
    key = redis_store.key(label, "namespaces")
    client = redis_store.get_redis()
    fields = [str(pk) for pk in now]
    old = client.hmget(key, fields) if fields else []
    pipe = client.pipeline(transaction=False)
    if forget:
        pipe.hdel(key, *fields)
    else:
        mapping: dict[FieldT, EncodableT] = {
            str(pk): "\x1f".join(sorted(names)) for pk, names in now.items()
        }
        pipe.hset(key, mapping=mapping)
    pipe.execute()
    return {
        pk: set(filter(None, redis_store.as_text(value).split("\x1f")))
        for pk, value in zip(now, old, strict=True)
    }


class Emitter:
    """Receives change events. Subclass and list the dotted path in ``EMITTERS``."""

    def emit(self, events: list[Event]) -> None:
        raise NotImplementedError


class LoggingEmitter(Emitter):
    """Logs each event as JSON on the ``ormbridge.events`` logger at INFO."""

    def emit(self, events: list[Event]) -> None:
        for event in events:
            event_log.info("%s", json.dumps(event, default=str))


class RedisStreamEmitter(Emitter):
    """Appends each event to its namespace's Redis stream, trimmed to ``EVENTS_MAXLEN``.

    The Server-Sent Events endpoint reads these streams; the stream entry id is
    the event's position for ``Last-Event-ID``.
    """

    def emit(self, events: list[Event]) -> None:
        pipe = redis_store.get_redis().pipeline(transaction=False)
        for event in events:
            pipe.xadd(
                stream_key(event["namespace"]),
                {"event": json.dumps(event, default=str)},
                maxlen=int(settings.EVENTS_MAXLEN),
                approximate=True,
            )
        pipe.execute()


def stream_key(namespace: str) -> str:
    return redis_store.key("events", namespace)


def emit(events: list[Event]) -> int:
    """Hand ``events`` to every configured emitter; returns how many emitters failed.

    An emitter's failure is logged and never propagates: it must not fail the
    write or the flush that produced the events.
    """
    failures = 0
    if not events:
        return failures
    paths = tuple(settings.EMITTERS)
    try:
        emitters = _emitters(paths)
    except Exception:
        logger.exception("ormbridge: the emitters %s could not be set up", ", ".join(paths))
        return len(paths)
    for emitter in emitters:
        try:
            emitter.emit(events)
        except Exception:
            failures += 1
            logger.exception("ormbridge: emitter %s failed", type(emitter).__name__)
    return failures


@functools.lru_cache(maxsize=8)
def _emitters(paths: tuple[str, ...]) -> list[Emitter]:
    return [import_string(path)() for path in paths]


def settings_changed(setting: str, **kwargs: Any) -> None:
    """Emitters are built from settings once; build them again when the settings change."""
    if setting == "ORMBRIDGE":
        _emitters.cache_clear()
