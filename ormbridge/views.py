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
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from importlib import import_module
from typing import Any, TypeAlias, cast

import redis
import redis.cluster
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import TooManyFieldsSent
from django.core.handlers.asgi import ASGIRequest
from django.db import connections
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.utils.crypto import constant_time_compare
from django.utils.module_loading import import_string
from redis.typing import KeyT, StreamIdT

from ormbridge import fanout, redis_store, registry
from ormbridge.broadcast import SEPARATOR, stream_key
from ormbridge.conf import settings

READ_COUNT = 500
RETRY_MS = 2000  # the browser's wait before it reconnects to a stream that ended
MAX_NAMESPACE_LENGTH = 200

# app_label.model, optionally ::name; printable ASCII without spaces, quotes or
# backslashes, so a namespace needs no escaping in a cursor and bounds its size.
_NAMESPACE = re.compile(r"[A-Za-z0-9_]+\.[A-Za-z0-9_]+(?:::[!#-\[\]-~]+)?")
_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_MAX_STREAM_ID_PART = 2**64 - 1  # Redis stream ids are two unsigned 64-bit numbers
# An encoded cursor entry at most: "namespace":"ms-seq",
_MAX_CURSOR_ENTRY = len('"":"-",') + MAX_NAMESPACE_LENGTH + 2 * 20
_JSON_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026"}


class BadRequest(ValueError):
    """Input the endpoint refuses with a 400; the message never contains the input."""


def may_subscribe(request: HttpRequest, namespace: str) -> bool:
    """The default permission: the user may ``view`` the namespace's registered model.

    A tenant namespace (``app_label.model::name``) is refused: which user may see
    which tenant is the project's to say, with an ``EVENTS_PERMISSION`` hook.
    """
    if SEPARATOR in namespace:
        return False
    try:
        model = registry.get_model(namespace)
    except (LookupError, ValueError):
        return False
    meta = model._meta
    return request.user.has_perm(f"{meta.app_label}.view_{meta.model_name}")


def permission() -> Callable[[HttpRequest, str], bool]:
    """Who may see a namespace: the ``EVENTS_PERMISSION`` hook, else :func:`may_subscribe`.

    The one rule for every way events leave ormbridge: this endpoint, and the
    Channels and django-eventstream integrations (``ormbridge.contrib``).
    """
    hook = settings.EVENTS_PERMISSION
    return cast(Callable[[HttpRequest, str], bool], import_string(hook)) if hook else may_subscribe


def _authorize(
    request: HttpRequest, namespaces: list[str], *, reload: bool = False
) -> tuple[bool, list[str], list[str]]:
    """Whether the user is logged in, and which namespaces they may and may not see.

    With ``reload``, the session and the user are read again from their stores
    first (an open stream's re-check). Closes this thread's database connections
    afterwards: a stream lives long, and must not hold a connection for its whole life.
    """
    try:
        if reload:
            reload_user(request)
        if not request.user.is_authenticated:
            return False, [], namespaces
        allowed_by = permission()
        allowed: list[str] = []
        denied: list[str] = []
        for namespace in namespaces:
            (allowed if allowed_by(request, namespace) else denied).append(namespace)
        return True, allowed, denied
    finally:
        connections.close_all()


def reload_user(request: HttpRequest) -> None:
    """Set ``request.user`` to the user its session names now, checked as Django's
    ``get_user`` checks it (backend, active, password hash), without writing to the
    session: a deleted or expired session, a deactivated user or a changed password
    leave an anonymous user. Without sessions, the same user read again."""
    session = getattr(request, "session", None)
    if session is None:
        user = request.user
        fresh = None
        if user.is_authenticated:
            fresh = get_user_model()._default_manager.filter(pk=user.pk).first()
        active = fresh is not None and getattr(fresh, "is_active", True)
        request.user = fresh if fresh is not None and active else AnonymousUser()
        return
    engine = import_module(django_settings.SESSION_ENGINE)
    data = engine.SessionStore(session.session_key)
    request.user = AnonymousUser()
    try:
        user_id = get_user_model()._meta.pk.to_python(data[SESSION_KEY])
        backend_path = data[BACKEND_SESSION_KEY]
    except KeyError:
        return
    if backend_path not in django_settings.AUTHENTICATION_BACKENDS:
        return
    found = load_backend(backend_path).get_user(user_id)
    if found is None:
        return
    if hasattr(found, "get_session_auth_hash"):
        stored = data.get(HASH_SESSION_KEY)
        hashes = [found.get_session_auth_hash(), *found.get_session_auth_fallback_hash()]
        if not stored or not any(constant_time_compare(stored, h) for h in hashes):
            return
    request.user = found


def refuse(status: int, message: str, **details: Any) -> HttpResponse:
    """A JSON refusal; ``<``, ``>`` and ``&`` escaped, so no browser renders it as markup."""
    body = json.dumps({"error": message, **details}).translate(_JSON_ESCAPES)
    response = HttpResponse(body, status=status, content_type="application/json")
    response["X-Content-Type-Options"] = "nosniff"
    response["Cache-Control"] = "no-store"
    return response


def requested_namespaces(request: HttpRequest) -> list[str]:
    """The request's distinct ``ns`` values, checked; :class:`BadRequest` otherwise."""
    limit = int(settings.EVENTS_MAX_NAMESPACES)
    try:
        namespaces = list(dict.fromkeys(request.GET.getlist("ns")))
    except TooManyFieldsSent:
        raise BadRequest(f"ask for at most {limit} namespaces per request (ns)") from None
    if not namespaces:
        raise BadRequest("ask for at least one namespace: ?ns=app_label.model")
    if len(namespaces) > limit:
        raise BadRequest(
            f"ask for at most {limit} namespaces per request (ns), not {len(namespaces)}"
        )
    for number, namespace in enumerate(namespaces, 1):
        if not is_namespace(namespace):
            raise BadRequest(
                f"namespace {number} of {len(namespaces)} is not app_label.model or "
                f"app_label.model::name of at most {MAX_NAMESPACE_LENGTH} printable ASCII "
                "characters without spaces, quotes or backslashes"
            )
    return namespaces


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
            positions[namespace] = _text(last[0][0]) if last else "0-0"
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


def encode_cursor(positions: dict[str, str]) -> str:
    return _encode_cursor(tuple(positions.items()))


@functools.lru_cache(maxsize=1024)
def _encode_cursor(positions: tuple[tuple[str, str], ...]) -> str:
    """Cached: the streams of a process that follow the same namespaces are at the
    same positions after each event, and each needs the same cursor."""
    raw = json.dumps(dict(positions), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def max_cursor_length() -> int:
    """The longest cursor the endpoint issues: ``EVENTS_MAX_NAMESPACES`` entries at most."""
    raw = 2 + int(settings.EVENTS_MAX_NAMESPACES) * _MAX_CURSOR_ENTRY
    return 4 * math.ceil(raw / 3)


def decode_cursor(value: str) -> dict[str, str]:
    """Stream positions from a ``Last-Event-ID``; "" means from now.

    Raises :class:`BadRequest` for anything this endpoint would not have issued.
    """
    if not value:
        return {}
    limit = max_cursor_length()
    if len(value) > limit:
        raise BadRequest(f"Last-Event-ID is longer than the {limit} characters of a cursor")
    unreadable = BadRequest("Last-Event-ID is not a cursor of this endpoint")
    if not _BASE64URL.fullmatch(value):
        raise unreadable
    try:
        positions: Any = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        raise unreadable from None
    if not isinstance(positions, dict):
        raise unreadable
    for namespace, position in positions.items():
        if not (isinstance(position, str) and _is_stream_id(position) and is_namespace(namespace)):
            raise BadRequest(
                "Last-Event-ID holds a position that is not a stream id (ms-seq, two "
                "numbers below 2**64) or a namespace that is not valid"
            )
    return cast(dict[str, str], positions)


def is_namespace(value: str) -> bool:
    """Whether ``value`` is a namespace this endpoint accepts: ``app_label.model`` or
    ``app_label.model::name``, at most ``MAX_NAMESPACE_LENGTH`` printable ASCII characters
    without spaces, quotes or backslashes."""
    return len(value) <= MAX_NAMESPACE_LENGTH and _NAMESPACE.fullmatch(value) is not None


def _text(value: bytes | str | None) -> str:
    """A reply of the (``decode_responses``) client as ``str``; None is ``""``."""
    if isinstance(value, bytes):
        return value.decode()
    return value or ""


def _is_stream_id(value: str) -> bool:
    match = _STREAM_ID.fullmatch(value)
    return match is not None and all(int(part) <= _MAX_STREAM_ID_PART for part in match.groups())
