"""Change events: one per flushed batch, handed to the configured emitters.

An event says which rows of which model changed, never their values::

    {"id": "…", "type": "update", "model": "shop.product", "namespace": "shop.product",
     "pks": [1, 2, 3], "fields": ["price"], "ts": 1764200000.0}

``type`` is ``create``, ``update``, ``delete`` or ``invalidate``; ``pks`` is
None when every row of the model is concerned; ``fields`` lists the changed
fields of an update (None: unknown or all).
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from typing import Any, TypedDict

from django.utils.module_loading import import_string

from ormbridge.conf import settings

logger = logging.getLogger("ormbridge.events")


class Event(TypedDict):
    id: str
    type: str
    model: str
    namespace: str
    pks: list[Any] | None
    fields: list[str] | None
    ts: float


def make_event(
    type: str, label: str, pks: list[Any] | None, fields: list[str] | None = None
) -> Event:
    return Event(
        id=uuid.uuid4().hex,
        type=type,
        model=label,
        namespace=label,
        pks=pks,
        fields=fields,
        ts=time.time(),
    )


class Emitter:
    """Receives change events. Subclass and list the dotted path in ``EMITTERS``."""

    def emit(self, events: list[Event]) -> None:
        raise NotImplementedError


class LoggingEmitter(Emitter):
    """Logs each event as JSON on the ``ormbridge.events`` logger at INFO."""

    def emit(self, events: list[Event]) -> None:
        for event in events:
            logger.info("%s", json.dumps(event, default=str))


def emit(events: list[Event]) -> int:
    """Hand ``events`` to every configured emitter; returns how many emitters failed.

    An emitter's failure is logged and never propagates: it must not fail the
    write or the flush that produced the events.
    """
    failures = 0
    if not events:
        return failures
    for emitter in _emitters(tuple(settings.EMITTERS)):
        try:
            emitter.emit(events)
        except Exception:
            failures += 1
            logger.exception("ormbridge: emitter %s failed", type(emitter).__name__)
    return failures


@functools.lru_cache(maxsize=8)
def _emitters(paths: tuple[str, ...]) -> list[Emitter]:
    return [import_string(path)() for path in paths]
