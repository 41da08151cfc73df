"""An emitter for tests: events go to a Redis list, so a test sees what a worker emitted."""

import json

from ormbridge import store
from ormbridge.broadcast import Emitter, Event


def events_key() -> str:
    return store.key("test", "events")


class RecordingEmitter(Emitter):
    def emit(self, events: list[Event]) -> None:
        store.get_redis().rpush(events_key(), *(json.dumps(event) for event in events))


def recorded() -> list[dict]:
    return [json.loads(item) for item in store.get_redis().lrange(events_key(), 0, -1)]


def clear() -> None:
    store.get_redis().delete(events_key())
