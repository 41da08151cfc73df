"""Counters kept in ormbridge's Redis for ``ormbridge_status``: per model, cached reads;
per task, the messages workers refused."""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any

import redis

from ormbridge import redis_store
from ormbridge.conf import settings

__all__ = ["Counts", "counts", "recent_refusals", "record_refusal"]

REFUSALS_KEPT = 1000
"""Recent refusals kept (the newest); older ones are pruned as refusals come."""
REFUSALS_SHOWN = 5

logger = logging.getLogger(__name__)


class Counts:
    """Per-model counters (hits, reads not cached and why), counted in memory and added
    to Redis within ``every`` seconds by a timer thread, and at exit.

    A hit is one MGET: counting it there would cost a second command. Misses
    and stores are counted by the scripts they run anyway. Where threads do
    not run (uWSGI without ``enable-threads``), the first count after
    ``every`` seconds sends them instead.
    """

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._timer: threading.Timer | None = None
        self._sent = time.monotonic()

    def add(self, labels: Iterable[str], field: str) -> None:
        with self._lock:
            self._counts.update((label, field) for label in labels)
            due = time.monotonic() - self._sent >= self.every
            if self._timer is None and not due:
                self._timer = threading.Timer(self.every, self.send)
                self._timer.daemon = True
                self._timer.start()
        if due:
            self.send()

    def send(self) -> None:
        """Add the counts so far to Redis now (the status command reads them there)."""
        with self._lock:
            counted, self._counts = self._counts, Counter()
            self._sent = time.monotonic()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if not counted or redis_store.read_breaker.open:
            return  # a Redis that just failed a read is not waited for: the counts go
        try:
            # The cached reads' client: READ_TIMEOUT at most, whoever sends.
            pipe = redis_store.entries_redis().pipeline(transaction=False)
            for (label, field), n in counted.items():
                pipe.hincrby(redis_store.stats_key(label), field, n)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            redis_store.read_breaker.trip(exc, quiet=True)  # the next read says so, if it fails too
            logger.debug("ormbridge: counts not sent: %s", exc)

    def reset_in_child(self) -> None:
        """In a forked child: the parent's counts and timer are the parent's."""
        self._lock = threading.Lock()
        self._counts = Counter()
        self._timer = None
        self._sent = time.monotonic()


counts = Counts()


atexit.register(counts.send)


os.register_at_fork(after_in_child=counts.reset_in_child)


def record_refusal(task: str, task_id: str | None, reason: str) -> None:
    """Count a task message a worker refused, whatever the reason, and keep it as recent.

    Two keys under the prefix: per task, how many were refused since Redis started
    (``refused_tasks`` in the status), and a sorted set of the refusals themselves
    scored by their time, from which ``ormbridge_status`` reads the recent ones
    (``STATUS_REFUSAL_WINDOW``). Each call prunes the set of refusals older than the
    window, and of all but the newest ``REFUSALS_KEPT``. A Redis failure is logged: the
    worker's warning about the message stays.
    """
    now = time.time()
    member = json.dumps({"task": task, "id": task_id, "reason": reason, "n": uuid.uuid4().hex})
    try:
        pipe = redis_store.get_redis().pipeline(transaction=False)
        pipe.hincrby(redis_store.refused_key(), task, 1)
        pipe.zadd(redis_store.refusals_key(), {member: now})
        pipe.zremrangebyscore(redis_store.refusals_key(), "-inf", now - _window())
        pipe.zremrangebyrank(redis_store.refusals_key(), 0, -REFUSALS_KEPT - 1)
        pipe.execute()
    except (redis.RedisError, OSError):
        logger.exception("ormbridge: could not count the refusal of %s", task)


def recent_refusals() -> dict[str, Any]:
    """The refusals of the last ``STATUS_REFUSAL_WINDOW`` seconds: how many, per task, and
    the newest few, each with its age in seconds and the reason its worker gave.

    Raises:
        redis.RedisError: Redis did not answer.
    """
    now = time.time()
    window = _window()
    # redis-py types a reply as any of its shapes; WITHSCORES gives (member, score) pairs.
    found: list[tuple[bytes, float]] = redis_store.get_redis().zrevrangebyscore(  # type: ignore[assignment]
        redis_store.refusals_key(), "+inf", now - window, withscores=True
    )
    by_task: Counter[str] = Counter()
    last: list[dict[str, Any]] = []
    for raw, when in found:
        try:
            refusal = json.loads(raw)
        except ValueError:
            continue
        by_task[str(refusal.get("task"))] += 1
        if len(last) < REFUSALS_SHOWN:
            last.append(
                {
                    "task": str(refusal.get("task")),
                    "id": refusal.get("id"),
                    "age": max(0.0, now - float(when)),
                    "reason": str(refusal.get("reason", "")),
                }
            )
    return {
        "window": window,
        "count": sum(by_task.values()),
        "by_task": dict(sorted(by_task.items())),
        "last": last,
    }


def _window() -> float:
    return float(settings.STATUS_REFUSAL_WINDOW)
