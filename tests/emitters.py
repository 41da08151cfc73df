"""An emitter for tests: events go to a Redis list, so a test sees what a worker emitted."""

import json

from ormbridge import redis_store
from ormbridge.broadcast import Emitter, Event


def events_key() -> str:
    return redis_store.key("test", "events")


class RecordingEmitter(Emitter):
    def emit(self, events: list[Event]) -> None:
        redis_store.get_redis().rpush(events_key(), *(json.dumps(event) for event in events))


def recorded() -> list[dict]:
    return [json.loads(item) for item in redis_store.get_redis().lrange(events_key(), 0, -1)]


def clear() -> None:
    redis_store.get_redis().delete(events_key())


def fail_at_key() -> str:
    """``FailingEmitter``'s keys: ``fail-at`` (which of its calls raises), ``calls``."""
    return redis_store.key("test", "emit", "fail-at")


def calls_key() -> str:
    return redis_store.key("test", "emit", "calls")


class FailingEmitter(Emitter):
    """Raises on its ``n``-th call once a test set ``fail_at_key()`` to ``n``; else does nothing.

    An emitter failing half-way through a delivery (a push service down), for the
    tests of what a retry delivers again.
    """

    def emit(self, events: list[Event]) -> None:
        client = redis_store.get_redis()
        fail_at = client.get(fail_at_key())
        if fail_at is not None and client.incr(calls_key()) == int(fail_at):
            raise RuntimeError(f"FailingEmitter refuses its call {int(fail_at)}")
