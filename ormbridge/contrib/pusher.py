"""An emitter for Pusher Channels: ``pip install "ormbridge[pusher]"``.

    ORMBRIDGE = {
        "EMITTERS": ["ormbridge.broadcast.RedisStreamEmitter",
                     "ormbridge.contrib.pusher.PusherEmitter"],
        "PUSHER": {"app_id": "…", "key": "…", "secret": "…", "cluster": "eu"},
    }

Each namespace is a channel: ``app_label.model::tenant-7`` becomes
``private-app_label.model;tenant-7`` (Pusher channel names allow no ``:``;
``channel_prefix`` in ``PUSHER`` changes the ``private-`` prefix). Private
channels make Pusher ask your own auth endpoint before a browser may
subscribe: check the namespace there as the events endpoint does. The event
name is ``ormbridge.<type>``. Pusher takes at most 10 kB per event: a larger
event is sent with ``"pks": null`` and ``"truncated": true`` (refetch the
namespace). Unlike the Redis streams, Pusher keeps nothing for a client that
was away.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from ormbridge import Emitter, Event
from ormbridge.access import SEPARATOR
from ormbridge.conf import settings

__all__ = ["MAX_EVENT_BYTES", "PusherEmitter"]


MAX_EVENT_BYTES = 10_000
BATCH = 10  # events per Pusher batch request


class PusherEmitter(Emitter):
    def __init__(self) -> None:
        try:
            import pusher
        except ImportError:
            raise ImproperlyConfigured(
                'PusherEmitter needs the pusher package: pip install "ormbridge[pusher]"'
            ) from None
        config: dict[str, Any] = dict(settings.PUSHER or {})
        self.prefix: str = config.pop("channel_prefix", "private-")
        if not {"app_id", "key", "secret"} <= set(config):
            raise ImproperlyConfigured(
                'ORMBRIDGE["PUSHER"] needs app_id, key and secret (and cluster or host).'
            )
        self.client = pusher.Pusher(**config)

    def emit(self, events: list[Event]) -> None:
        batch = [
            {"channel": self.channel(event["namespace"]), "name": f"ormbridge.{event['type']}",
             "data": _data(event)}
            for event in events
        ]  # fmt: skip
        for start in range(0, len(batch), BATCH):
            self.client.trigger_batch(batch[start : start + BATCH])

    def channel(self, namespace: str) -> str:
        return self.prefix + namespace.replace(SEPARATOR, ";")


def _data(event: Event) -> str:
    data = json.dumps(event, default=str)
    if len(data.encode()) <= MAX_EVENT_BYTES:
        return data
    smaller = {key: value for key, value in event.items() if key != "payload"}
    return json.dumps({**smaller, "pks": None, "truncated": True}, default=str)
