"""Change events to browsers: batched, per namespace, permission-checked, resumable."""

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission, User
from django.db import transaction
from django.test import Client

import ormbridge
from ormbridge import redis_store, relay
from ormbridge.broadcast import stream_key
from shop.models import Customer, Order, Product, Tag
from tests import sse
from tests.factories import make_products

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]


@pytest.fixture
def viewer():
    user = User.objects.create_user("viewer")
    for codename in ("view_product", "view_order", "view_tag"):
        user.user_permissions.add(Permission.objects.get(codename=codename))
    return User.objects.get(pk=user.pk)


def stream_length(namespace: str) -> int:
    return redis_store.get_redis().xlen(stream_key(namespace))


def settled(rows: list) -> list:
    """``rows`` with their creation delivered and every event stream emptied."""
    relay.drain()
    client = redis_store.get_redis()
    for stream in client.scan_iter(stream_key("*")):
        client.delete(stream)
    return rows


def test_anonymous_requests_are_forbidden():
    status, _ = sse.read(["shop.product"], 0)
    assert status == 403


def test_a_namespace_is_required(viewer):
    status, _ = sse.read([], 0, user=viewer)
    assert status == 400


def test_users_without_view_permission_are_forbidden():
    user = User.objects.create_user("nobody")
    status, _ = sse.read(["shop.product"], 0, user=user)
    assert status == 403


def test_unknown_namespaces_are_forbidden(viewer):
    status, _ = sse.read(["auth.user"], 0, user=viewer)
    assert status == 403


def test_a_save_reaches_a_subscriber(viewer, no_relay):
    [product] = settled(make_products(1))

    async def change():
        await sync_to_async(product.save)(update_fields=["price"])
        await sync_to_async(relay.drain)()

    status, messages = sse.read(["shop.product"], 1, user=viewer, before_reading=change)
    assert status == 200
    [message] = messages
    assert message["data"]["pks"] == [product.pk]
    assert message["data"]["fields"] is None  # captured by a trigger: columns not compared
    assert message["id"]


def test_a_change_committed_once_the_response_started_is_delivered(viewer, no_relay):
    """Where a stream starts is fixed before its response is: a browser counts itself
    subscribed once the response starts (EventSource's ``open``), so nothing committed
    after that may be taken for history from before the stream."""
    [product] = settled(make_products(1))

    async def change():
        await sync_to_async(product.save)(update_fields=["price"])
        await sync_to_async(relay.drain)()

    status, messages = sse.read(["shop.product"], 1, user=viewer, on_response=change, timeout=5)
    assert status == 200
    assert [message["data"]["pks"] for message in messages] == [[product.pk]]


def test_a_subscription_is_refused_with_503_while_redis_is_down(viewer, redis_servers):
    client = Client()
    client.force_login(viewer)
    redis_servers["ormbridge"].stop()
    response = client.get("/ormbridge/events/", {"ns": "shop.product"})
    assert response.status_code == 503
    assert "ormbridge's Redis cannot be reached" in response.json()["error"]


def test_the_permission_hook_denies_per_namespace(viewer, no_relay, settings):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "EVENTS_PERMISSION": "tests.hooks.products_only"}
    assert sse.read(["shop.order"], 0, user=viewer)[0] == 403
    [product] = settled(make_products(1))

    async def change():
        await sync_to_async(product.save)()
        await sync_to_async(relay.drain)()

    status, messages = sse.read(
        ["shop.product", "shop.order"], 2, user=viewer, before_reading=change
    )
    assert status == 200
    assert messages[0]["event"] == "denied"
    assert messages[0]["data"] == ["shop.order"]
    assert messages[1]["data"]["namespace"] == "shop.product"


def test_events_carry_no_values_unless_the_model_opts_in(no_relay):
    [product] = settled(make_products(1))
    product.name = "secret"
    product.save()
    tag = Tag.objects.create(name="sale")
    relay.drain()
    [product_event] = redis_store.get_redis().xrange(stream_key("shop.product"))
    assert "secret" not in product_event[1]["event"]
    assert "payload" not in product_event[1]["event"]
    [tag_event] = redis_store.get_redis().xrange(stream_key("shop.tag"))
    assert '"payload": {"' + str(tag.pk) + '": {"name": "sale"}}' in tag_event[1]["event"]


def test_a_row_moving_between_namespaces_produces_events_in_both(no_relay):
    [product] = settled(make_products(1))
    alice, bob = Customer.objects.create(email="a@x.org"), Customer.objects.create(email="b@x.org")
    order = Order.objects.create(product=product, customer=alice)
    relay.drain()
    order.customer = bob
    order.save()
    relay.drain()
    assert stream_length("shop.order") == 2
    assert stream_length(f"shop.order::customer-{alice.pk}") == 2  # created there, moved away
    assert stream_length(f"shop.order::customer-{bob.pk}") == 1


def test_a_rolled_back_transaction_produces_no_event(no_relay):
    [product] = settled(make_products(1))
    with pytest.raises(RuntimeError), transaction.atomic():
        product.save()
        raise RuntimeError
    relay.drain()
    assert stream_length("shop.product") == 0


def test_a_bulk_update_produces_one_event_per_chunk(no_relay, settings):
    # A chunk is one event when it fits in a flush batch (events stay bounded in size).
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "DELIVERY_BATCH_SIZE": 2_500}
    settled(make_products(10_000))
    result = ormbridge.safe_bulk_update(Product.objects.all(), chunk_size=2_500, replay="sync",
                                       stock=1)  # fmt: skip
    assert result.chunks == 4
    assert stream_length("shop.product") == 4


def test_a_resync_produces_one_event_per_chunk(no_relay):
    from django.core.management import call_command

    settled(make_products(3_000))
    call_command("ormbridge_resync", "shop.Product", "--sync", "--chunk-size", "1000",
                 "--no-progress", stdout=None)  # fmt: skip
    assert stream_length("shop.product") == 3


def test_a_reconnecting_client_gets_what_it_missed_once_and_in_order(viewer, no_relay):
    products = settled(make_products(1_000))

    async def first_change():
        await sync_to_async(products[0].save)()
        await sync_to_async(relay.drain)()

    _, [first] = sse.read(["shop.product"], 1, user=viewer, before_reading=first_change)
    for product in products:  # 1,000 changes while the client is away
        product.save()
        relay.drain()
    _, missed = sse.read(["shop.product"], 1_000, user=viewer, last_event_id=first["id"])
    assert [m["data"]["pks"] for m in missed] == [[p.pk] for p in products]
    assert len({m["id"] for m in missed}) == 1_000
