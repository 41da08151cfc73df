"""Reading what the recording receivers of ``tests.testapp`` saw."""

import json

from ormbridge import redis_store
from tests.testapp.apps import replays_key


def saves(label: str = "shop.product") -> dict[int, int]:
    """Replayed post_save count per pk."""
    raw = redis_store.get_redis().hgetall(replays_key(label, "save"))
    return {int(pk): int(count) for pk, count in raw.items()}


def deletes(label: str = "shop.product") -> dict[int, int]:
    raw = redis_store.get_redis().hgetall(replays_key(label, "delete"))
    return {int(pk): int(count) for pk, count in raw.items()}


def deleted_values(label: str = "shop.product") -> dict[int, dict]:
    raw = redis_store.get_redis().hgetall(replays_key(label, "deleted"))
    return {int(pk): json.loads(values) for pk, values in raw.items()}


def update_fields(label: str = "shop.product") -> set:
    raw = redis_store.get_redis().smembers(replays_key(label, "update_fields"))
    return {None if v == "null" else tuple(json.loads(v)) for v in raw}


def created_flags(label: str = "shop.product") -> set:
    return {json.loads(v) for v in redis_store.get_redis().smembers(replays_key(label, "created"))}
