"""One Redis reader per server process for all its event streams (ASGI).

Every open stream of a process subscribes to the process's :class:`Hub`. The hub
keeps one connection blocked in ``XREAD`` over the streams of every namespace that
has a subscriber, and hands each entry it reads to the subscribers of that
namespace, each through a bounded buffer of its own. Redis connections per
process: the reader's and a small pool (stream starts, catch-up reads, waking
the reader), however many clients are connected.

A subscriber starts from its own positions: it reads what it missed
(``Last-Event-ID``) from the streams itself, through the pool, while the hub
already buffers what arrives; entries it has seen are dropped by position, so
each arrives once, in order. A subscriber whose buffer overflows while it is
live (``EVENTS_BUFFER``) is dropped from the hub and told it is :data:`BEHIND`:
its stream ends with a ``closed`` event, which a client that stopped reading
gets when it reads again, and resumes from with ``Last-Event-ID``. No
subscriber ever makes the hub, or another subscriber, wait.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import weakref
from collections.abc import Iterable
from typing import Any, Final, TypeAlias, cast

import redis
import redis.asyncio
import redis.asyncio.cluster

from ormbridge.broadcast import READ_COUNT, stream_key
from ormbridge.conf import settings

__all__ = [
    "BEHIND",
    "BLOCK",
    "GC_PAUSE_MIN",
    "POOL",
    "RETRY_DELAY",
    "Behind",
    "Entry",
    "Hub",
    "Reply",
    "Subscriber",
    "hub",
    "order",
]

logger = logging.getLogger(__name__)

# An XREAD reply: [(stream key, [(entry id, fields)])].
Reply: TypeAlias = list[tuple[str, list[tuple[str, dict[str, str]]]]]
Entry: TypeAlias = tuple[str, str, dict[str, str]]  # stream key, entry id, fields

POOL: Final = 4
"""Connections of a hub's pool: starts, catch-ups and wake-ups queue for them."""
BLOCK: Final = 5.0
"""Seconds the reader's XREAD blocks at most: how long it may take to notice it must stop."""
RETRY_DELAY: Final = 1.0
"""Seconds between the reader's attempts while Redis cannot be read."""
GC_PAUSE_MIN: Final = 100
"""Streams a hand-out must reach for the collector to wait (see :class:`_GcPause`)."""


class Behind:
    """The answer of :meth:`Subscriber.read` to a subscriber the hub dropped."""

    def __repr__(self) -> str:
        return "BEHIND"


BEHIND: Final = Behind()


def order(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``ms-seq``) as numbers, to compare ids."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


class _GcPause:
    """Holds Python's cyclic garbage collector back while a hand-out reaches many streams.

    A full collection scans every live object, some hundreds per open stream: with
    thousands of streams it stops the process for a good part of a second, and the
    allocations of a delivery tend to set one off in its middle. Held back, it runs
    once every stream has taken its entries, or after ``EVENTS_GC_PAUSE`` seconds,
    whichever comes first; a collector turned off by the project stays off.
    """

    def __init__(self) -> None:
        self.waiting = 0  # streams of the current pause yet to take their entries
        self.pause = 0  # the current pause's number; 0: none
        self.count = 0
        self.timer: asyncio.TimerHandle | None = None

    def hold(self, streams: int) -> int:
        """Hold the collector for ``streams`` more streams; the pause's number, or 0."""
        limit = float(settings.EVENTS_GC_PAUSE)
        if streams < GC_PAUSE_MIN or limit <= 0:
            return 0
        if not self.pause:
            if not gc.isenabled():
                return 0
            gc.disable()
            self.count += 1
            self.pause = self.count
            self.timer = asyncio.get_running_loop().call_later(limit, self.release)
        self.waiting += streams
        return self.pause

    def taken(self, pause: int) -> None:
        """A stream of pause ``pause`` took its entries (or left)."""
        if pause and pause == self.pause:
            self.waiting -= 1
            if self.waiting <= 0:
                self.release()

    def release(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pause:
            self.pause = self.waiting = 0
            gc.enable()


class Subscriber:
    """One open stream's place at the hub: the keys it follows and what waits for it."""

    def __init__(self, hub: Hub, keys: Iterable[str]) -> None:
        self.hub = hub
        self.keys = frozenset(keys)
        self.pending: collections.deque[Entry] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None  # set while it waits for entries
        self.behind = False
        self.live = False  # caught up: what it missed has been read from the streams
        self.cleared = 0  # buffer overflows while catching up (the catch-up reads them)
        self.pause = 0  # the collector pause waiting for this one to take its entries
        self.limit = int(settings.EVENTS_BUFFER)

    def offer(self, entries: list[Entry]) -> None:
        """Called by the hub: never waits, never fails."""
        if self.behind:
            return
        if len(self.pending) > self.limit:  # it has not taken what came last time
            if self.live:
                self.behind = True
                self.hub.leave(self)
                self._taken()
            else:
                self.pending.clear()
                self.cleared += 1
        else:
            self.pending.extend(entries)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def read(self, positions: dict[str, str], block_ms: int) -> Reply | Behind:
        """Entries after ``positions`` (stream key -> entry id), waiting ``block_ms`` at
        most; ``[]`` on a timeout, :data:`BEHIND` once the hub has dropped this one."""
        if self.behind:
            return BEHIND
        if not self.live:
            cleared = self.cleared
            reply = await self.hub.read_after(positions)
            if reply:
                return reply
            if self.cleared == cleared:
                self.live = True
            return await self.read(positions, block_ms)
        if not self.pending:
            # A bare future and a timer: thousands of streams wake at each event.
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(block_ms / 1000):
                    await self.waiter
            except TimeoutError:
                pass
            finally:
                self.waiter = None
            if self.behind:
                return BEHIND
        after = {key: order(position) for key, position in positions.items()}
        grouped: dict[str, list[tuple[str, dict[str, str]]]] = {}
        while self.pending:
            key, entry_id, fields = self.pending.popleft()
            if order(entry_id) > after[key]:
                grouped.setdefault(key, []).append((entry_id, fields))
        self._taken()
        return list(grouped.items())

    def _taken(self) -> None:
        pause, self.pause = self.pause, 0
        self.hub.gc_pause.taken(pause)

    def close(self) -> None:
        self.hub.leave(self)
        self._taken()


class Hub:
    """A process's (an event loop's) one reader of the event streams."""

    def __init__(self) -> None:
        self.subscribers: dict[str, set[Subscriber]] = {}
        self.positions: dict[str, str] = {}  # where the reader reads each key from
        self.version = 0  # bumped whenever the reader must take new keys
        self.reading_version = -1  # the version of the reader's XREAD in flight
        self.reader: asyncio.Task[None] | None = None
        self.reader_id: int | None = None  # CLIENT ID of the reader's connection
        self.pool: redis.asyncio.Redis | None = None
        self.gc_pause = _GcPause()

    async def _pool(self) -> redis.asyncio.Redis:
        if self.pool is None:
            self.pool = await _node_client(max_connections=POOL)
        return self.pool

    async def start_positions(
        self, namespaces: list[str], cursor: dict[str, str]
    ) -> dict[str, str]:
        """:func:`ormbridge.views.start_positions` through this hub's pool."""
        positions = {ns: cursor[ns] for ns in namespaces if ns in cursor}
        new = [namespace for namespace in namespaces if namespace not in cursor]
        if new:
            pipe = (await self._pool()).pipeline(transaction=False)
            for namespace in new:
                pipe.xrevrange(stream_key(namespace), count=1)
            for namespace, last in zip(new, await pipe.execute(), strict=True):
                positions[namespace] = last[0][0] if last else "0-0"
        return positions

    async def read_after(self, positions: dict[str, str]) -> Reply:
        """What the streams hold after ``positions``, without blocking (a catch-up)."""
        reply = await (await self._pool()).xread(positions, count=READ_COUNT)  # type: ignore[arg-type]
        return cast(Reply, reply or [])

    async def subscribe(self, positions: dict[str, str]) -> Subscriber:
        """A subscriber of ``positions``' keys (stream key -> entry id), buffering from now."""
        subscriber = Subscriber(self, positions)
        new = False
        for key, position in positions.items():
            followers = self.subscribers.setdefault(key, set())
            if not followers:
                # The reader starts at the first subscriber's position: it may hand out
                # entries that subscriber reads itself too, never skip one.
                self.positions[key] = position
                new = True
            followers.add(subscriber)
        if self.reader is None or self.reader.done():
            self.reader = asyncio.create_task(self._read(), name="ormbridge events reader")
        elif new:
            await self._wake()
        return subscriber

    def leave(self, subscriber: Subscriber) -> None:
        for key in subscriber.keys:
            followers = self.subscribers.get(key)
            if followers is not None:
                followers.discard(subscriber)
                if not followers:
                    del self.subscribers[key]
                    self.positions.pop(key, None)
        if not self.subscribers and self.reader is not None:
            # Woken rather than only cancelled: a cancellation can fail to interrupt
            # redis-py's blocked read, which then runs to the end of its block.
            self.reader.cancel()
            self.reader = None
            if self.reader_id is not None:
                asyncio.get_running_loop().create_task(self._unblock(self.reader_id))

    async def _unblock(self, reader_id: int) -> None:
        with contextlib.suppress(redis.RedisError):
            await (await self._pool()).client_unblock(reader_id)

    async def _wake(self) -> None:
        """Make the reader take the current keys: its XREAD in flight may be older."""
        self.version += 1
        version = self.version
        while self.reader is not None and not self.reader.done():
            if self.reading_version >= version:
                return
            if self.reader_id is not None:
                await self._unblock(self.reader_id)
            await asyncio.sleep(0.002)

    async def _read(self) -> None:
        """The reader: XREAD over every followed key, then fan the entries out."""
        block_ms = int(min(BLOCK, float(settings.EVENTS_HEARTBEAT)) * 1000) or 1
        task = asyncio.current_task()
        while self.subscribers:
            client: redis.asyncio.Redis | None = None
            try:
                client = await _node_client(max_connections=1)
                self.reader_id = await client.client_id()
                while self.subscribers:
                    if task is not None and task.cancelling():
                        # A cancellation redis-py's read let through as a reply or an error.
                        raise asyncio.CancelledError
                    self.reading_version = self.version
                    reply = await client.xread(
                        dict(self.positions),  # type: ignore[arg-type]
                        count=READ_COUNT,
                        block=block_ms,
                    )
                    self._hand_out(cast(Reply, reply or []))
            except redis.RedisError as error:
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from error
                logger.warning("events: the reader cannot read Redis (%s); retrying", error)
                if self.pool is not None:  # a failover may have moved the keys
                    pool, self.pool = self.pool, None
                    await pool.aclose()
                await asyncio.sleep(RETRY_DELAY)
            finally:
                self.reader_id = None
                if client is not None:
                    await client.aclose()

    def _hand_out(self, reply: Reply) -> None:
        for key, items in reply:
            if not items or key not in self.positions:
                continue
            self.positions[key] = items[-1][0]
            entries = [(key, entry_id, fields) for entry_id, fields in items]
            followers = list(self.subscribers.get(key, ()))
            pause = self.gc_pause.hold(len(followers))
            for subscriber in followers:
                if pause and subscriber.pause == pause:
                    self.gc_pause.taken(pause)  # counted once per pause
                elif pause:
                    subscriber.pause = pause
                subscriber.offer(entries)


async def _node_client(max_connections: int) -> redis.asyncio.Redis:
    """A client (answers as ``str``) of the server holding ormbridge's keys: on a Redis
    Cluster, the node serving their hash slot (every key of a prefix is in one)."""
    options: dict[str, Any] = {
        "client_name": f"ormbridge-events:{os.getpid()}",
        "decode_responses": True,
        "socket_timeout": float(settings.EVENTS_HEARTBEAT) + 10,
        "max_connections": max_connections,
    }
    if not settings.REDIS_CLUSTER:
        pool = redis.asyncio.BlockingConnectionPool.from_url(settings.REDIS_URL, **options)
        return redis.asyncio.Redis(connection_pool=pool)
    cluster = redis.asyncio.cluster.RedisCluster.from_url(settings.REDIS_URL)
    try:
        await cluster.initialize()
        node = cluster.get_node_from_key(stream_key("-"))
        if node is None:
            raise redis.exceptions.ClusterDownError("no node serves ormbridge's hash slot")
    finally:
        await cluster.aclose()
    pool = redis.asyncio.BlockingConnectionPool(host=node.host, port=node.port, **options)
    return redis.asyncio.Redis(connection_pool=pool)


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = weakref.WeakKeyDictionary()


def hub() -> Hub:
    """The running event loop's hub (one per server process under ASGI)."""
    loop = asyncio.get_running_loop()
    found = _hubs.get(loop)
    if found is None:
        found = _hubs[loop] = Hub()
    return found
