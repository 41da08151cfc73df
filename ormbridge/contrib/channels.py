"""Django Channels: change events over WebSockets. ``pip install "ormbridge[channels]"``.

    ORMBRIDGE = {
        "EMITTERS": ["ormbridge.broadcast.RedisStreamEmitter",
                     "ormbridge.contrib.channels.ChannelsEmitter"],
    }
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                  "CONFIG": {"hosts": ["redis://127.0.0.1:6379/1"]}}}

:class:`ChannelsEmitter` sends each event to the channel-layer group of its
namespace, as ``{"type": "ormbridge.event", "event": {...}}`` (the event as its
JSON has it: values JSON cannot carry become strings, as in the Redis streams).
:class:`EventsConsumer` is a ready WebSocket consumer for browsers.

Group names (:func:`group_name`): Channels allows only ASCII letters, digits,
``-``, ``_`` and ``.``, fewer than 100 of them. A model's namespace keeps its
name behind ``ormbridge.``: ``shop.product`` is ``ormbridge.shop.product``. A
tenant namespace's ``::`` becomes ``-`` (a model label has no ``-``, so the first
one ends it) and its name keeps letters, digits, ``-`` and ``.``; every other
byte of its UTF-8 is ``_`` and two upper-case hex digits (``_`` itself is
``_5F``): ``shop.order::customer-7`` is ``ormbridge.shop.order-customer-7``,
``shop.order::a_b:c`` is ``ormbridge.shop.order-a_5Fb_3Ac``. A name that would be
longer than 99 characters, or a namespace of another shape, is
``ormbridge-`` and the SHA-256 of the namespace in hex (74 characters; the
``-`` after ``ormbridge`` keeps these apart from the others). Different
namespaces thus never share a group.

The consumer's protocol: connect to ``ws://…/<your route>?ns=shop.product&ns=…``
(the namespaces of the events endpoint, with its rules and its
``EVENTS_MAX_NAMESPACES``). The server accepts, then either sends
``{"subscribed": [allowed…], "denied": [refused…]}`` once it has joined the
allowed namespaces' groups, followed by one message per event (the event
dict), or sends ``{"error": "…"}`` and closes with 4400 (bad namespaces), 4401
(not logged in) or 4403 (no namespace allowed; ``"namespaces"`` lists them).
Messages from the client are ignored. Access is checked when the socket
connects, by :func:`ormbridge.access.authorize` (the rule of the events endpoint:
``EVENTS_PERMISSION`` or the default), with the request of :func:`scope_request`,
and again every ``EVENTS_REAUTH`` seconds: a socket that fails it gets
``{"closed": {"reason": "denied" | "logged-out", "namespaces": [...]}}`` and is
closed with 4403 or 4401.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
from typing import Any

from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest

try:
    from asgiref.sync import async_to_sync
    from channels.db import database_sync_to_async
    from channels.generic.websocket import (
        AsyncJsonWebsocketConsumer,
    )
    from channels.layers import (
        DEFAULT_CHANNEL_LAYER,
        get_channel_layer,
    )
except ImportError:
    raise ImproperlyConfigured(
        'ormbridge.contrib.channels needs Django Channels: pip install "ormbridge[channels]"'
    ) from None

from ormbridge import Emitter, Event
from ormbridge.access import SEPARATOR, BadRequest, authorize, requested_namespaces
from ormbridge.conf import settings

__all__ = [
    "CLOSE_BAD_REQUEST",
    "CLOSE_FORBIDDEN",
    "CLOSE_NOT_LOGGED_IN",
    "MESSAGE_TYPE",
    "ChannelsEmitter",
    "EventsConsumer",
    "group_name",
    "scope_request",
]


PREFIX = "ormbridge."
HASHED_PREFIX = "ormbridge-"
MAX_GROUP_NAME_LENGTH = 99  # Channels: fewer than 100 characters
MESSAGE_TYPE = "ormbridge.event"

CLOSE_BAD_REQUEST = 4400
CLOSE_NOT_LOGGED_IN = 4401
CLOSE_FORBIDDEN = 4403

_LABEL = re.compile(r"[A-Za-z0-9_]+\.[A-Za-z0-9_]+")
_KEPT = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.")


def group_name(namespace: str) -> str:
    """The channel-layer group of ``namespace``: distinct for distinct namespaces,
    always a valid Channels group name (see the module's docstring)."""
    label, separator, tenant = namespace.partition(SEPARATOR)
    if _LABEL.fullmatch(label):
        name = PREFIX + label
        if separator:
            name += "-" + "".join(
                chr(byte) if byte in _KEPT else f"_{byte:02X}" for byte in tenant.encode()
            )
        if len(name) <= MAX_GROUP_NAME_LENGTH:
            return name
    return HASHED_PREFIX + hashlib.sha256(namespace.encode()).hexdigest()


class ChannelsEmitter(Emitter):
    """Sends each event to its namespace's group of the channel layer ``channel_layer_alias``.

    The layer is looked up on each call, so a change of ``CHANNEL_LAYERS`` applies.
    """

    channel_layer_alias: str = DEFAULT_CHANNEL_LAYER

    def emit(self, events: list[Event]) -> None:
        layer = get_channel_layer(self.channel_layer_alias)
        if layer is None:
            raise ImproperlyConfigured(
                f"ChannelsEmitter needs the channel layer {self.channel_layer_alias!r} in "
                "settings.CHANNEL_LAYERS"
            )
        async_to_sync(_send)(layer, events)


async def _send(layer: Any, events: list[Event]) -> None:
    """One event loop for the batch; in order, so each group gets its events in order."""
    for event in events:
        # The layer serializes with msgpack: only what JSON carries, as the streams have it.
        plain = json.loads(json.dumps(event, default=str))
        await layer.group_send(
            group_name(event["namespace"]), {"type": MESSAGE_TYPE, "event": plain}
        )


def scope_request(scope: dict[str, Any]) -> HttpRequest:
    """The request a permission hook gets for a WebSocket: Django's ASGIRequest of the
    handshake (``GET``; ``path``, ``GET``, ``META`` and ``headers``, ``COOKIES``), with
    ``user`` and ``session`` from the scope (``AuthMiddlewareStack``); no user there is
    an anonymous user."""
    request = ASGIRequest({**scope, "method": "GET"}, io.BytesIO())
    user = scope.get("user")  # resolved by AuthMiddleware: no database access here
    request.user = AnonymousUser() if user is None else user
    session = scope.get("session")
    if session is not None:
        request.session = session
    return request


class EventsConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]  # Channels is untyped
    """Change events of the namespaces in the query string (``?ns=…``) the user may see.

    Route it under ``AuthMiddlewareStack``; the protocol is in the module's docstring.
    """

    async def connect(self) -> None:
        self.namespaces: list[str] = []
        if self.channel_layer is None:
            raise ImproperlyConfigured(
                f"EventsConsumer needs the channel layer {self.channel_layer_alias!r} in "
                "settings.CHANNEL_LAYERS"
            )
        await self.accept()
        request = scope_request(self.scope)
        try:
            namespaces = requested_namespaces(request)
        except BadRequest as error:
            await self._refuse(CLOSE_BAD_REQUEST, {"error": str(error)})
            return
        logged_in, allowed, denied = await database_sync_to_async(authorize)(request, namespaces)
        if not logged_in:
            await self._refuse(
                CLOSE_NOT_LOGGED_IN, {"error": "log in to subscribe to change events"}
            )
            return
        if not allowed:
            await self._refuse(
                CLOSE_FORBIDDEN,
                {"error": "not allowed to subscribe to these namespaces", "namespaces": denied},
            )
            return
        for namespace in allowed:
            await self.channel_layer.group_add(group_name(namespace), self.channel_name)
        self.namespaces = allowed
        await self.send_json({"subscribed": allowed, "denied": denied})
        self.watcher = asyncio.create_task(self._recheck(request))

    async def _recheck(self, request: HttpRequest) -> None:
        """Access again every ``EVENTS_REAUTH`` seconds, as the events endpoint checks it:
        a socket whose user is logged out, deactivated, has changed password or may no
        longer see a namespace gets ``{"closed": {...}}`` and is closed."""
        while True:
            await asyncio.sleep(float(settings.EVENTS_REAUTH))
            logged_in, _, lost = await database_sync_to_async(authorize)(
                request, self.namespaces, reload=True
            )
            if not logged_in or lost:
                reason = "denied" if logged_in else "logged-out"
                await self.send_json({"closed": {"reason": reason, "namespaces": lost}})
                await self.close(CLOSE_FORBIDDEN if logged_in else CLOSE_NOT_LOGGED_IN)
                return

    async def _refuse(self, code: int, message: dict[str, Any]) -> None:
        await self.send_json(message)
        await self.close(code)

    async def disconnect(self, code: int) -> None:
        watcher = getattr(self, "watcher", None)
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        for namespace in self.namespaces:
            await self.channel_layer.group_discard(group_name(namespace), self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """The client has nothing to say: its namespaces are fixed at connect."""

    async def ormbridge_event(self, message: dict[str, Any]) -> None:
        """A ``ormbridge.event`` message of the layer: its event, to the client. Only for a
        namespace this socket subscribed to, whoever else writes to the layer's groups."""
        event = message.get("event")
        if isinstance(event, dict) and event.get("namespace") in self.namespaces:
            await self.send_json(event)
