"""Per-model counters of cached reads, kept in ormbridge's Redis for ``ormbridge_status``."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable

import redis

from ormbridge import store

__all__ = ["Counts", "counts"]

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
        if not counted or store.read_breaker.open:
            return  # a Redis that just failed a read is not waited for: the counts go
        try:
            # The cached reads' client: READ_TIMEOUT at most, whoever sends.
            pipe = store.entries_redis().pipeline(transaction=False)
            for (label, field), n in counted.items():
                pipe.hincrby(store.stats_key(label), field, n)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            store.read_breaker.trip(exc, quiet=True)  # the next read says so, if it fails too
            logger.debug("ormbridge: counts not sent: %s", exc)

    def forget(self) -> None:
        """In a forked child: the parent's counts and timer are the parent's."""
        self._lock = threading.Lock()
        self._counts = Counter()
        self._timer = None
        self._sent = time.monotonic()


counts = Counts()


atexit.register(counts.send)


os.register_at_fork(after_in_child=counts.forget)
