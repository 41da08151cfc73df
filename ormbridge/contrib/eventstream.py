"""django-eventstream for change events: ``pip install "ormbridge[eventstream]"``.

    ORMBRIDGE = {
        "EMITTERS": ["ormbridge.broadcast.RedisStreamEmitter",
                     "ormbridge.contrib.eventstream.EventStreamEmitter"],
    }
    EVENTSTREAM_CHANNELMANAGER_CLASS = "ormbridge.contrib.eventstream.NamespaceChannelManager"

Each namespace is a django-eventstream channel of the same name
(``shop.product``, ``shop.order::customer-7``): django-eventstream takes any
string and percent-encodes it where it must (GRIP channel ``events-<quoted>``,
``Last-Event-ID``); ormbridge namespaces are at most 200 characters, within
its storage's 255. Every event is sent with the SSE type ``message``, its data
the event's JSON, as ormbridge's own endpoint sends it: a browser's
``EventSource.onmessage`` gets it with no listener per type.

Who may read a channel is ormbridge's one rule, ``ormbridge.access.permission()``
(``EVENTS_PERMISSION`` or the default); anonymous users are refused. Behind a
GRIP proxy (Pushpin) it is checked when a client subscribes. See docs/eventstream.md.
"""

from __future__ import annotations

from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest

from ormbridge import Emitter, Event
from ormbridge.access import is_namespace, permission

try:
    from django_eventstream import send_event
    from django_eventstream.channelmanager import DefaultChannelManager
except ImportError:
    raise ImproperlyConfigured(
        "ormbridge.contrib.eventstream needs django-eventstream: "
        'pip install "ormbridge[eventstream]"'
    ) from None

__all__ = ["EVENT_TYPE", "EventStreamEmitter", "NamespaceChannelManager"]


EVENT_TYPE = "message"
"""The SSE ``event:`` of every change event: what ``EventSource.onmessage`` receives."""


class EventStreamEmitter(Emitter):
    """Sends each event to its namespace's channel with ``django_eventstream.send_event``.

    The publish to the GRIP proxy blocks, so a proxy that refuses it fails the
    emitter (logged, counted, the batch delivered again by the sweep) rather
    than a background thread losing it unseen.
    """

    def emit(self, events: list[Event]) -> None:
        for event in events:
            send_event(event["namespace"], EVENT_TYPE, event, async_publish=False)


class NamespaceChannelManager(DefaultChannelManager):  # type: ignore[misc]
    """Channels are namespaces; who may read one is ``ormbridge.access.permission()``.

    django-eventstream passes the user, not the request: the hook gets a bare
    ``HttpRequest`` whose only set attribute is ``user`` (no session, no GET).
    """

    def can_read_channel(self, user: AbstractBaseUser | None, channel: str) -> bool:
        if user is None or not user.is_authenticated:
            return False
        if not is_namespace(channel):
            return False
        request = HttpRequest()
        request.user = user  # type: ignore[assignment]  # any AUTH_USER_MODEL, not only User
        return permission()(request, channel)
