"""Server-Sent Events: change events to browsers, resumable with ``Last-Event-ID``.

``GET events/?ns=shop.product&ns=shop.product::tenant-7`` streams
``text/event-stream`` from the namespaces' Redis streams. Each message's
``id:`` is a cursor holding the stream position of every subscribed
namespace, so a client that reconnects with ``Last-Event-ID`` receives what it
missed (within ``EVENTS_MAXLEN``), in order, once. An async view: under ASGI a
client costs a coroutine, not a thread. Under WSGI (``runserver``, for development)
the same stream is served by a blocking iterator that holds a server thread.

Everything a request brings is validated and bounded before anything else
happens (a 400 naming the problem); refusals are JSON that never echoes input
unescaped. An open stream re-checks its user's access every ``EVENTS_REAUTH``
seconds and ends after ``EVENTS_MAX_AGE`` seconds, each time with a ``closed``
event carrying the cursor to resume from.

Who may ask for what is :mod:`ormbridge.access` (shared with the Channels and
django-eventstream integrations); the ``Last-Event-ID`` cursors are
:mod:`ormbridge.cursors`. Their names stay importable from here.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import redis
import redis.cluster
from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.db import connections
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from redis.typing import KeyT, StreamIdT

from ormbridge import access, fanout, redis_store
from ormbridge.access import (  # the endpoint's names before access had a module of its own
    MAX_NAMESPACE_LENGTH,
    BadRequest,
    is_namespace,
    may_subscribe,
    permission,
    reload_user,
    requested_namespaces,
)
from ormbridge.broadcast import READ_COUNT, stream_key
from ormbridge.conf import settings
from ormbridge.cursors import decode_cursor, encode_cursor, max_cursor_length

__all__ = [
    "MAX_NAMESPACE_LENGTH",
    "BadRequest",
    "blocking_stream",
    "decode_cursor",
    "encode_cursor",
    "events",
    "is_namespace",
    "max_cursor_length",
    "may_subscribe",
    "permission",
    "refuse",
    "reload_user",
    "requested_namespaces",
    "start_positions",
    "stream",
]


RETRY_MS = 2000  # the browser's wait before it reconnects to a stream that ended

_JSON_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026"}


def _authorize(
    request: HttpRequest, namespaces: list[str], *, reload: bool = False
) -> tuple[bool, list[str], list[str]]:
    """:func:`ormbridge.access.authorize`, then this thread's database connections closed:
    a stream lives long, and must not hold a connection for its whole life."""
    try:
        return access.authorize(request, namespaces, reload=reload)
    finally:
        connections.close_all()


def refuse(status: int, message: str, **details: Any) -> HttpResponse:
    """A JSON refusal; ``<``, ``>`` and ``&`` escaped, so no browser renders it as markup."""
    body = json.dumps({"error": message, **details}).translate(_JSON_ESCAPES)
    response = HttpResponse(body, status=status, content_type="application/json")
    response["X-Content-Type-Options"] = "nosniff"
    response["Cache-Control"] = "no-store"
    return response


async def events(request: HttpRequest) -> HttpResponseBase:
    """Stream change events of the requested namespaces the user may see."""
    try:
        namespaces = requested_namespaces(request)
        cursor = decode_cursor(
            request.headers.get("Last-Event-ID") or request.GET.get("last_event_id", "")
        )
    except BadRequest as error:
        return refuse(400, str(error))
    # Not thread-sensitive: that would give this request a thread of its own for as
    # long as the stream lives. _authorize closes the connections it opened.
    logged_in, allowed, denied = await sync_to_async(_authorize, thread_sensitive=False)(
        request, namespaces
    )
    if not logged_in:
        return refuse(403, "log in to subscribe to change events")
    if not allowed:
        return refuse(403, "not allowed to subscribe to these namespaces", namespaces=denied)
    # Where the stream starts is fixed before the response is: a browser counts itself
    # subscribed once the response starts (EventSource's open), so whatever commits
    # after that must come after the starting point.
    asgi = isinstance(request, ASGIRequest)
    try:
        if asgi:
            positions = await fanout.hub().start_positions(allowed, cursor)
        else:
            positions = await sync_to_async(start_positions, thread_sensitive=False)(
                allowed, cursor
            )
    except redis.RedisError:
        return refuse(503, "change events are unavailable: ormbridge's Redis cannot be reached")
    # A WSGI server would buffer an async iterator whole and never stream it; a
    # blocking one works anywhere, so only an ASGI request gets the async one.
    body = (
        stream(request, allowed, denied, positions)
        if asgi
        else blocking_stream(request, allowed, denied, positions)
    )
    response = StreamingHttpResponse(body, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response


@dataclass(frozen=True)
class _Read:
    """Step: XREAD after ``positions`` (stream key -> entry id), blocking ``block_ms`` at
    most. Answer: the reply, ``[(key, [(entry id, fields)])]``, empty on a timeout."""

    positions: dict[str, str]
    block_ms: int


@dataclass(frozen=True)
class _Recheck:
    """Step: the access check again, ``_authorize(..., reload=True)``. Answer: its result."""


# What the conversation asks of its driver: text to send (answer None), or I/O.
_Step: TypeAlias = str | _Read | _Recheck


def start_positions(namespaces: list[str], cursor: dict[str, str]) -> dict[str, str]:
    """Where each namespace's stream starts: after ``cursor``'s entry, else after the
    stream's last entry (one round trip for them all)."""
    positions = {namespace: cursor[namespace] for namespace in namespaces if namespace in cursor}
    new = [namespace for namespace in namespaces if namespace not in cursor]
    if new:
        pipe = redis_store.get_redis().pipeline(transaction=False)
        for namespace in new:
            pipe.xrevrange(stream_key(namespace), count=1)
        for namespace, last in zip(new, pipe.execute(), strict=True):
            # The client decodes its replies (decode_responses): entry ids are str.
            positions[namespace] = cast(str, last[0][0]) if last else "0-0"
    return positions


def _conversation(
    namespaces: list[str], denied: list[str], positions: dict[str, str]
) -> Generator[_Step, Any, None]:
    """The event-stream protocol without its I/O: events after ``positions`` (from
    :func:`start_positions`), then heartbeats.

    Yields the text to send and the Redis reads and re-checks to make, and is sent
    their answers, so the async and the blocking stream share every rule. Ends with a
    ``closed`` event when the user may no longer see every namespace (checked every
    ``EVENTS_REAUTH`` seconds) or the stream is ``EVENTS_MAX_AGE`` seconds old (less up
    to a tenth, so that clients that connected together do not all reconnect together).
    """
    heartbeat = float(settings.EVENTS_HEARTBEAT)
    reauth = float(settings.EVENTS_REAUTH)
    started = time.monotonic()
    end = started + float(settings.EVENTS_MAX_AGE) * random.uniform(0.9, 1.0)
    keys = {stream_key(namespace): namespace for namespace in namespaces}
    positions = dict(positions)
    yield f"retry: {RETRY_MS}\nid: {encode_cursor(positions)}\n\n"
    if denied:
        yield f"event: denied\ndata: {json.dumps(denied)}\n\n"
    next_check = started + reauth
    written = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= end:
            yield _closed(positions, {"reason": "max-age"})
            return
        if now >= next_check:
            logged_in, _, lost = yield _Recheck()
            if not logged_in or lost:
                reason = "denied" if logged_in else "logged-out"
                yield _closed(positions, {"reason": reason, "namespaces": lost})
                return
            now = time.monotonic()
            next_check = now + reauth
        wait = min(next_check, end, written + heartbeat) - now
        reply = yield _Read(
            {key: positions[namespace] for key, namespace in keys.items()},
            max(1, math.ceil(wait * 1000)),
        )
        if reply is fanout.BEHIND:
            yield _closed(positions, {"reason": "behind"})
            return
        if not reply:
            if time.monotonic() >= written + heartbeat:
                yield ": heartbeat\n\n"
                written = time.monotonic()
            continue
        entries = [
            (fanout.order(entry_id), entry_id, keys[key], fields)
            for key, items in reply
            for entry_id, fields in items
        ]
        if len(reply) > 1:  # one stream's entries are in order already
            entries.sort()
        for _, entry_id, namespace, fields in entries:
            positions[namespace] = entry_id
            yield f"id: {encode_cursor(positions)}\ndata: {fields['event']}\n\n"
        written = time.monotonic()


def _advance(steps: Generator[_Step, Any, None], answer: Any) -> _Step | None:
    """The conversation's next step after ``answer``; None once it has ended."""
    try:
        return steps.send(answer)
    except StopIteration:
        return None


def _read_timeout() -> float:
    """A stream client's socket timeout: longer than the longest XREAD block."""
    return float(settings.EVENTS_HEARTBEAT) + 10


async def stream(
    request: HttpRequest, namespaces: list[str], denied: list[str], positions: dict[str, str]
) -> AsyncIterator[str]:
    """The event-stream body under ASGI: :func:`_conversation` reading through the
    process's hub (:mod:`ormbridge.fanout`)."""
    subscriber = await fanout.hub().subscribe(
        {stream_key(namespace): position for namespace, position in positions.items()}
    )
    steps = _conversation(namespaces, denied, positions)
    try:
        step = _advance(steps, None)
        while step is not None:
            answer: Any = None
            if isinstance(step, str):
                yield step
            elif isinstance(step, _Read):
                answer = await subscriber.read(step.positions, step.block_ms)
            else:
                answer = await sync_to_async(_authorize, thread_sensitive=False)(
                    request, namespaces, reload=True
                )
            step = _advance(steps, answer)
    finally:
        steps.close()
        subscriber.close()


def blocking_stream(
    request: HttpRequest, namespaces: list[str], denied: list[str], positions: dict[str, str]
) -> Iterator[str]:
    """The event-stream body under WSGI: :func:`_conversation` with a blocking client.

    Holds a server thread for the stream's life (up to ``EVENTS_MAX_AGE``), which
    suits ``runserver``; a client that left is noticed when a write to it fails (the
    heartbeats write), and the server closes this iterator.
    """
    client = redis_store.blocking_redis(_read_timeout())
    steps = _conversation(namespaces, denied, positions)
    try:
        step = _advance(steps, None)
        while step is not None:
            answer: Any = None
            if isinstance(step, str):
                yield step
            elif isinstance(step, _Read):
                streams = cast(dict[KeyT, StreamIdT], step.positions)
                answer = client.xread(streams, count=READ_COUNT, block=step.block_ms)
            else:
                answer = _authorize(request, namespaces, reload=True)
            step = _advance(steps, answer)
    finally:
        steps.close()
        if isinstance(client, redis.cluster.RedisCluster):
            # Its close() leaves the nodes connected; unannotated in redis-py.
            client.disconnect_connection_pools()  # type: ignore[no-untyped-call]
        client.close()


def _closed(positions: dict[str, str], why: dict[str, Any]) -> str:
    """The last message of a stream the server ends, with the cursor to resume from."""
    return f"id: {encode_cursor(positions)}\nevent: closed\ndata: {json.dumps(why)}\n\n"
