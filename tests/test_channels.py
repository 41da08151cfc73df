"""Django Channels: the emitter's groups on a real Redis channel layer, and the consumer's
subscriptions, authorized as the events endpoint authorizes them."""

import asyncio
import hashlib
import json
import re
from urllib.parse import urlencode

import pytest
import redis
from asgiref.sync import async_to_sync, sync_to_async
from asgiref.testing import ApplicationCommunicator
from channels.auth import AuthMiddlewareStack
from channels.layers import BaseChannelLayer, get_channel_layer
from django.conf import settings as django_settings
from django.contrib.auth.models import Permission, User
from django.test import Client

from ormbridge import broadcast, relay
from ormbridge.contrib.channels import EventsConsumer, group_name
from shop.models import Customer, Order
from tests.factories import make_products

TIMEOUT = 10  # seconds a socket waits for a message that must come


@pytest.fixture
def channel_layer(settings, channel_layer_server):
    """A Redis channel layer on a Redis of its own (emptied before each test), and the
    Channels emitter beside the others."""
    redis.Redis(unix_socket_path=str(channel_layer_server.socket)).flushall()
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [f"unix://{channel_layer_server.socket}"],
                "prefix": "ormbridge-test",
            },
        }
    }
    settings.ORMBRIDGE = {
        **settings.ORMBRIDGE,
        "EMITTERS": [*settings.ORMBRIDGE["EMITTERS"], "ormbridge.contrib.channels.ChannelsEmitter"],
    }


def user_with(*codenames: str, email: str = "") -> User:
    user = User.objects.create_user(f"user-{User.objects.count()}", email=email)
    for codename in codenames:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    return User.objects.get(pk=user.pk)


class Socket(ApplicationCommunicator):
    """A WebSocket client of an ASGI application, as Channels' ``WebsocketCommunicator``
    (``channels.testing`` cannot be imported without daphne, which the tests do not install)."""

    def __init__(self, application, path: str, query: str, headers: list) -> None:
        scope = {"type": "websocket", "path": path, "query_string": query.encode(),
                 "headers": headers, "subprotocols": []}  # fmt: skip
        super().__init__(application, scope)

    async def connect(self) -> bool:
        """Whether the server accepted the socket."""
        await self.send_input({"type": "websocket.connect"})
        return (await self.receive_output(TIMEOUT))["type"] == "websocket.accept"

    async def receive_json(self) -> dict:
        message = await self.receive_output(TIMEOUT)
        assert message["type"] == "websocket.send", message
        return json.loads(message["text"])

    async def disconnect(self) -> None:
        await self.send_input({"type": "websocket.disconnect", "code": 1000})
        await self.wait(TIMEOUT)


def socket(namespaces: list[str], user: User | None = None) -> Socket:
    """A WebSocket to the consumer behind AuthMiddlewareStack, with ``user``'s session cookie."""
    headers = []
    if user is not None:
        client = Client()
        client.force_login(user)
        cookie = client.cookies[django_settings.SESSION_COOKIE_NAME].value
        headers.append((b"cookie", f"{django_settings.SESSION_COOKIE_NAME}={cookie}".encode()))
    application = AuthMiddlewareStack(EventsConsumer.as_asgi())
    return Socket(application, "/ws/events/", urlencode({"ns": namespaces}, doseq=True), headers)


async def refusal(communicator: Socket) -> tuple[dict, int]:
    """The message and the close code of a socket the server accepts, then refuses."""
    assert await communicator.connect()
    message = await communicator.receive_json()
    closed = await communicator.receive_output(TIMEOUT)
    assert closed["type"] == "websocket.close"
    return message, closed["code"]


# The group-name mapping


VALID_GROUP_NAME = re.compile(r"[A-Za-z0-9._-]{1,99}")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("namespace", "group"),
    [
        ("shop.product", "ormbridge.shop.product"),
        ("shop.order::customer-7", "ormbridge.shop.order-customer-7"),
        ("shop.order::a_b:c", "ormbridge.shop.order-a_5Fb_3Ac"),
        ("shop.order::a::b", "ormbridge.shop.order-a_3A_3Ab"),
    ],
)
def test_namespaces_keep_their_names_in_their_groups(namespace, group):
    assert group_name(namespace) == group


@pytest.mark.unit
@pytest.mark.parametrize(
    "namespace",
    [
        "shop.product",
        "shop.order::customer-7",
        "shop.order::!#$%&'()*+,-./:;<=>?@[]^_`{|}~",
        "shop.order::" + "x" * 187,
        "shop.order::" + "~" * 188,
        "not a namespace",
        "shop.order::ümlaut and spaces",
    ],
)
def test_every_group_name_is_one_channels_accepts(namespace):
    name = group_name(namespace)
    assert VALID_GROUP_NAME.fullmatch(name)
    assert BaseChannelLayer().require_valid_group_name(name)


@pytest.mark.unit
def test_a_group_name_too_long_for_channels_is_a_hash_of_the_namespace():
    namespace = "shop.order::" + "~" * 30  # 30 escapes of 3 characters
    assert group_name(namespace) == "ormbridge-" + hashlib.sha256(namespace.encode()).hexdigest()
    assert group_name("shop.order::" + "x" * 76) == "ormbridge.shop.order-" + "x" * 76  # 97
    assert group_name("shop.order::" + "x" * 79).startswith("ormbridge-")  # would be 100


@pytest.mark.unit
@pytest.mark.parametrize(
    "namespaces",
    [
        ["shop.order::a_b", "shop.order::a__b", "shop.order::a_5Fb", "shop.order::a::b"],
        ["shop.order::a-b", "shop.order::a:b", "shop.order::a::b", "shop.order::a:-b"],
        ["shop.order", "shop.order::", "shop.order-x", "shop.order::x"],
        ["shop.order::_3A", "shop.order:::", "shop.order::%3A", "shop.order::_5F3A"],
        ["shop.order::x", "shop.order::X", "shop.order::.x", "shop.order::x."],
    ],
)
def test_different_namespaces_never_share_a_group(namespaces):
    assert len({group_name(namespace) for namespace in namespaces}) == len(namespaces)


@pytest.mark.unit
def test_hashed_group_names_begin_where_no_readable_one_can():
    readable = ["shop.product", "ormbridge.x", "shop.order::-", "shop.order::" + "x" * 70]
    hashed = ["shop.order::" + "~" * 100, "no namespace", "-.x", "shop.order-x::y"]
    assert all(group_name(namespace).startswith("ormbridge.") for namespace in readable)
    assert all(group_name(namespace).startswith("ormbridge-") for namespace in hashed)


# The emitter


def test_the_emitter_sends_each_event_to_its_namespaces_group(channel_layer):
    events = [
        broadcast.make_event("update", "shop.order", [7], ["status"], "shop.order::customer-7"),
        broadcast.make_event("update", "shop.order", [8], ["status"], "shop.order::customer-8"),
    ]

    async def received() -> dict:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add("ormbridge.shop.order-customer-7", channel)
        await sync_to_async(broadcast.emit)(events)
        message = await layer.receive(channel)
        with pytest.raises(TimeoutError):  # nothing of customer-8's
            await asyncio.wait_for(layer.receive(channel), 0.5)
        return message

    message = async_to_sync(received)()
    assert message == {"type": "ormbridge.event", "event": events[0]}


def test_an_emitter_without_a_channel_layer_fails(settings, caplog):
    settings.CHANNEL_LAYERS = {}
    settings.ORMBRIDGE = {
        **settings.ORMBRIDGE,
        "EMITTERS": ["ormbridge.contrib.channels.ChannelsEmitter"],
    }
    assert broadcast.emit([broadcast.make_event("update", "shop.product", [1])]) == 1
    assert "needs the channel layer 'default' in settings.CHANNEL_LAYERS" in caplog.text


# The consumer


@pytest.mark.django_db(transaction=True)
def test_a_subscriber_receives_a_saves_event(channel_layer, no_relay):
    [product] = make_products(1)
    relay.drain()  # the creation's events, before the socket subscribes
    viewer = user_with("view_product")
    communicator = socket(["shop.product"], viewer)

    async def session() -> dict:
        assert await communicator.connect()
        assert await communicator.receive_json() == {
            "subscribed": ["shop.product"],
            "denied": [],
        }
        await sync_to_async(product.save)(update_fields=["price"])
        await sync_to_async(relay.drain)()
        event = await communicator.receive_json()
        await communicator.disconnect()
        return event

    event = async_to_sync(session)()
    assert event["namespace"] == "shop.product"
    assert event["type"] == "update"
    assert event["pks"] == [product.pk]


@pytest.mark.django_db(transaction=True)
def test_a_denied_namespace_is_reported_and_its_events_never_arrive(channel_layer, no_relay):
    [product] = make_products(1)
    customer = Customer.objects.create(email="c@example.org")
    relay.drain()
    viewer = user_with("view_product")  # not view_order
    communicator = socket(["shop.order", "shop.product"], viewer)

    async def session() -> tuple[dict, dict, bool]:
        assert await communicator.connect()
        subscribed = await communicator.receive_json()
        await sync_to_async(Order.objects.create)(product=product, customer=customer)
        await sync_to_async(product.save)()
        await sync_to_async(relay.drain)()
        event = await communicator.receive_json()
        nothing_else = await communicator.receive_nothing(0.5)
        await communicator.disconnect()
        return subscribed, event, nothing_else

    subscribed, event, nothing_else = async_to_sync(session)()
    assert subscribed == {"subscribed": ["shop.product"], "denied": ["shop.order"]}
    assert event["namespace"] == "shop.product"
    assert nothing_else  # the order's event never came


@pytest.mark.django_db(transaction=True)
def test_a_user_without_view_permission_is_refused(channel_layer):
    nobody = user_with()
    message, code = async_to_sync(refusal)(socket(["shop.product"], nobody))
    assert code == 4403
    assert message == {
        "error": "not allowed to subscribe to these namespaces",
        "namespaces": ["shop.product"],
    }


@pytest.mark.django_db(transaction=True)
def test_anonymous_sockets_are_refused(channel_layer):
    message, code = async_to_sync(refusal)(socket(["shop.product"]))
    assert code == 4401
    assert message == {"error": "log in to subscribe to change events"}


@pytest.mark.django_db(transaction=True)
def test_namespaces_are_validated_as_the_events_endpoint_validates_them(channel_layer):
    viewer = user_with("view_product")
    message, code = async_to_sync(refusal)(socket(["shop.product::a\\b"], viewer))
    assert code == 4400
    assert "is not app_label.model or app_label.model::name" in message["error"]


@pytest.mark.django_db(transaction=True)
def test_more_namespaces_than_the_limit_are_refused(channel_layer, settings):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "EVENTS_MAX_NAMESPACES": 2}
    viewer = user_with("view_product")
    namespaces = ["shop.product", "shop.product::a", "shop.product::b"]
    message, code = async_to_sync(refusal)(socket(namespaces, viewer))
    assert code == 4400
    assert message == {"error": "ask for at most 2 namespaces per request (ns), not 3"}


@pytest.mark.django_db(transaction=True)
def test_a_tenant_namespace_is_refused_by_default(channel_layer):
    customer = Customer.objects.create(email="own@example.org")
    user = user_with("view_order", email="own@example.org")
    namespace = f"shop.order::customer-{customer.pk}"
    message, code = async_to_sync(refusal)(socket([namespace], user))
    assert code == 4403
    assert message["namespaces"] == [namespace]


@pytest.mark.django_db(transaction=True)
def test_a_permission_hook_opens_a_tenant_namespace(channel_layer, no_relay, settings):
    settings.ORMBRIDGE = {
        **settings.ORMBRIDGE,
        "EVENTS_PERMISSION": "tests.hooks.own_customer_orders",
    }
    [product] = make_products(1)
    own = Customer.objects.create(email="own@example.org")
    other = Customer.objects.create(email="other@example.org")
    relay.drain()
    user = user_with("view_order", email="own@example.org")
    mine, theirs = f"shop.order::customer-{own.pk}", f"shop.order::customer-{other.pk}"
    communicator = socket([mine, theirs], user)

    async def session() -> tuple[dict, dict, Order]:
        assert await communicator.connect()
        subscribed = await communicator.receive_json()
        order = await sync_to_async(Order.objects.create)(product=product, customer=own)
        await sync_to_async(relay.drain)()
        event = await communicator.receive_json()
        await communicator.disconnect()
        return subscribed, event, order

    subscribed, event, order = async_to_sync(session)()
    assert subscribed == {"subscribed": [mine], "denied": [theirs]}
    assert (event["namespace"], event["type"], event["pks"]) == (mine, "create", [order.pk])


REAUTH = 0.5  # seconds between an open socket's re-checks in the tests below


def closed_after(change, settings) -> tuple[dict, int]:
    """What an open socket of a viewer of shop.product gets once ``change(user)`` has run:
    the last message and the close code."""
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "EVENTS_REAUTH": REAUTH}
    viewer = user_with("view_product")
    communicator = socket(["shop.product"], viewer)

    async def session() -> tuple[dict, int]:
        assert await communicator.connect()
        assert (await communicator.receive_json())["subscribed"] == ["shop.product"]
        await sync_to_async(change)(viewer)
        message = await communicator.receive_json()
        closed = await communicator.receive_output(TIMEOUT)
        assert closed["type"] == "websocket.close"
        return message, closed["code"]

    return async_to_sync(session)()


@pytest.mark.django_db(transaction=True)
def test_an_open_socket_closes_when_its_user_loses_the_permission(channel_layer, settings):
    def revoke(user: User) -> None:
        user.user_permissions.clear()

    message, code = closed_after(revoke, settings)
    assert code == 4403
    assert message == {"closed": {"reason": "denied", "namespaces": ["shop.product"]}}


@pytest.mark.django_db(transaction=True)
def test_an_open_socket_closes_when_its_user_is_logged_out(channel_layer, settings):
    def deactivate(user: User) -> None:
        User.objects.filter(pk=user.pk).update(is_active=False)

    message, code = closed_after(deactivate, settings)
    assert code == 4401
    assert message == {"closed": {"reason": "logged-out", "namespaces": ["shop.product"]}}
