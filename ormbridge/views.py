"""Server-Sent Events: change events to browsers, resumable with ``Last-Event-ID``.

``GET events/?ns=shop.product&ns=shop.product::tenant-7`` streams
``text/event-stream`` from the namespaces' Redis streams. Each message's
``id:`` is a cursor holding the stream position of every subscribed
namespace, so a client that reconnects with ``Last-Event-ID`` receives what it
missed (within ``EVENTS_MAXLEN``), in order, once. An async view: under ASGI a
client costs a coroutine, not a thread.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from typing import Any, cast

from asgiref.sync import sync_to_async
from django.db import connections
from django.http import (
    HttpRequest,
    HttpResponseBadRequest,
    HttpResponseForbidden,
    StreamingHttpResponse,
)
from django.http.response import HttpResponseBase
from django.utils.module_loading import import_string

from ormbridge import registry, store
from ormbridge.broadcast import SEPARATOR, stream_key
from ormbridge.conf import settings

READ_COUNT = 500

# An XREAD reply of a RESP2 client with decode_responses: [(key, [(entry id, fields)])].
_XReadReply = list[tuple[str, list[tuple[str, dict[str, str]]]]]


def may_subscribe(request: HttpRequest, namespace: str) -> bool:
    """The default permission: the user may ``view`` the namespace's registered model."""
    label = namespace.split(SEPARATOR, 1)[0]
    try:
        model = registry.get_model(label)
    except (LookupError, ValueError):
        return False
    meta = model._meta
    return request.user.has_perm(f"{meta.app_label}.view_{meta.model_name}")


def _authorize(request: HttpRequest, namespaces: list[str]) -> tuple[bool, list[str], list[str]]:
    """Whether the user is logged in, and which namespaces they may and may not see.

    Closes this thread's database connections afterwards: a stream lives long,
    and must not hold a connection for its whole life.
    """
    try:
        if not request.user.is_authenticated:
            return False, [], namespaces
        hook = settings.EVENTS_PERMISSION
        allowed_by = import_string(hook) if hook else may_subscribe
        allowed: list[str] = []
        denied: list[str] = []
        for namespace in namespaces:
            (allowed if allowed_by(request, namespace) else denied).append(namespace)
        return True, allowed, denied
    finally:
        connections.close_all()


async def events(request: HttpRequest) -> HttpResponseBase:
    """Stream change events of the requested namespaces the user may see."""
    namespaces = list(dict.fromkeys(request.GET.getlist("ns")))
    if not namespaces:
        return HttpResponseBadRequest("ask for at least one namespace: ?ns=app_label.model")
    # Not thread-sensitive: that would give this request a thread of its own for as
    # long as the stream lives. _authorize closes the connections it opened.
    logged_in, allowed, denied = await sync_to_async(_authorize, thread_sensitive=False)(
        request, namespaces
    )
    if not logged_in:
        return HttpResponseForbidden("log in to subscribe to change events")
    if not allowed:
        return HttpResponseForbidden(f"not allowed to subscribe to: {', '.join(denied)}")
    cursor = decode_cursor(
        request.headers.get("Last-Event-ID") or request.GET.get("last_event_id", "")
    )
    response = StreamingHttpResponse(
        stream(allowed, denied, cursor), content_type="text/event-stream"
    )
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response


async def stream(
    namespaces: list[str], denied: list[str], cursor: dict[str, str]
) -> AsyncIterator[str]:
    """The event-stream body: events after ``cursor`` (or from now), then heartbeats."""
    heartbeat = float(settings.EVENTS_HEARTBEAT)
    client = store.async_redis(heartbeat + 10)
    try:
        keys = {stream_key(namespace): namespace for namespace in namespaces}
        positions: dict[str, str] = {}
        for key, namespace in keys.items():
            if namespace in cursor:
                positions[namespace] = cursor[namespace]
            else:  # a namespace new to this client starts at the current end
                last = await client.xrevrange(key, count=1)
                positions[namespace] = _text(last[0][0]) if last else "0-0"
        yield "retry: 2000\n\n"
        if denied:
            yield f"event: denied\ndata: {json.dumps(denied)}\n\n"
        block = int(heartbeat * 1000)
        while True:
            reply = cast(
                _XReadReply,
                await client.xread(
                    {key: positions[namespace] for key, namespace in keys.items()},
                    count=READ_COUNT,
                    block=block,
                ),
            )
            if not reply:
                yield ": heartbeat\n\n"
                continue
            entries = [
                (_order(entry_id), entry_id, keys[key], fields)
                for key, items in reply
                for entry_id, fields in items
            ]
            for _, entry_id, namespace, fields in sorted(entries):
                positions[namespace] = entry_id
                yield f"id: {encode_cursor(positions)}\ndata: {fields['event']}\n\n"
    finally:
        await client.aclose()


def encode_cursor(positions: dict[str, str]) -> str:
    raw = json.dumps(positions, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(value: str) -> dict[str, str]:
    """Stream positions from a ``Last-Event-ID``; an unreadable one means "from now"."""
    if not value:
        return {}
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        positions: Any = json.loads(raw)
    except (binascii.Error, ValueError):
        return {}
    if not isinstance(positions, dict):
        return {}
    return {
        str(ns): str(pos)
        for ns, pos in positions.items()
        if isinstance(pos, str) and _is_stream_id(pos)
    }


def _text(value: bytes | str | None) -> str:
    """A reply of the (``decode_responses``) client as ``str``; None is ``""``."""
    if isinstance(value, bytes):
        return value.decode()
    return value or ""


def _is_stream_id(value: str) -> bool:
    ms, _, seq = value.partition("-")
    return ms.isdigit() and seq.isdigit()


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)
