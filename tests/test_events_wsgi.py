"""The events endpoint under WSGI (issue 10, operations 16): ``manage.py runserver``.

Each test talks over real HTTP to the example project under Django's development
server, with the session cookie of a user logged in for real (a session row in
the test database). Under WSGI the endpoint streams with a blocking iterator:
the same cursors, re-checks and maximum age as under ASGI, a server thread per
open stream.
"""

from typing import Any

import pytest
from django.contrib.auth.models import Permission, User

from ormbridge import redis_store, relay
from ormbridge.broadcast import stream_key
from shop.models import Product
from tests import sse
from tests.conftest import wait_until
from tests.factories import make_products

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis]

REAUTH = 1  # seconds between the server's re-checks of an open stream's access
MAX_AGE = 6  # seconds a stream lives (less up to a tenth): ample for a save to be delivered


@pytest.fixture(scope="module")
def serve_wsgi() -> bool:
    """``serve`` starts the example project under ``runserver`` here."""
    return True


@pytest.fixture
def server(serve) -> sse.Server:
    return serve(EVENTS_REAUTH=REAUTH)


@pytest.fixture
def cookie() -> str:
    """The session cookie of a user who may view products."""
    user = User.objects.create_user("viewer")
    user.user_permissions.add(Permission.objects.get(codename="view_product"))
    return sse.session_cookie(user)


def products(count: int) -> list[Product]:
    """``count`` products, their creation delivered and every event stream emptied."""
    rows = make_products(count)
    relay.drain()
    client = redis_store.get_redis()
    for key in client.scan_iter(stream_key("*")):
        client.delete(key)
    return rows


def save(product: Product) -> None:
    """Save ``product`` and deliver the change (the relay's event)."""
    product.save()
    relay.drain()


def opened(server: sse.Server, cookie: str, last_event_id: str | None = None) -> sse.Stream:
    stream = server.open(["shop.product"], cookie=cookie, last_event_id=last_event_id)
    assert stream.status == 200, (stream.status, stream.body[:300])
    assert stream.content_type.startswith("text/event-stream"), stream.content_type
    return stream


def test_under_wsgi_a_subscriber_receives_a_saves_event(server, cookie, no_relay):
    [product] = products(1)
    stream = opened(server, cookie)
    save(product)
    [message] = stream.messages(1)
    assert message["data"]["pks"] == [product.pk]
    assert message["id"]
    stream.close()


def test_under_wsgi_a_client_resumes_with_last_event_id(server, cookie, no_relay):
    first, second, third = products(3)
    stream = opened(server, cookie)
    save(first)
    [seen] = stream.messages(1)
    stream.close()
    save(second)  # while the client is away
    save(third)
    resumed = opened(server, cookie, last_event_id=seen["id"])
    missed = resumed.messages(2)
    assert [message["data"]["pks"] for message in missed] == [[second.pk], [third.pk]]
    resumed.close()


def test_under_wsgi_a_stream_delivers_until_its_maximum_age_then_ends_with_closed(
    serve, cookie, no_relay
):
    server = serve(EVENTS_MAX_AGE=MAX_AGE)
    [product] = products(1)
    stream = opened(server, cookie)
    save(product)
    [event] = stream.messages(1)
    assert event["event"] == "message", event  # not buffered until the stream's end
    assert event["data"]["pks"] == [product.pk]
    [closed] = stream.until_closed(timeout=30)
    assert closed["event"] == "closed"
    assert closed["data"] == {"reason": "max-age"}
    assert closed["id"]


def test_under_wsgi_an_open_stream_closes_once_access_is_revoked(server, no_relay):
    [product] = products(1)
    user = User.objects.create_user("revoked")
    user.user_permissions.add(Permission.objects.get(codename="view_product"))
    stream = opened(server, sse.session_cookie(user))
    user.user_permissions.clear()
    save(product)  # may still arrive: the server re-checks every REAUTH s
    messages = stream.until_closed(timeout=30)
    assert messages[-1]["event"] == "closed"
    assert messages[-1]["data"] == {"reason": "denied", "namespaces": ["shop.product"]}


def stream_readers() -> set[str]:
    """Ids of the connections to ormbridge's Redis (the node of its slot, on a cluster)
    whose last command is XREAD: the servers' open streams."""
    client: Any = redis_store.get_redis()
    if isinstance(client, redis_store.ClusterClient):
        entries = client.client_list(target_nodes=client.get_node_from_key(redis_store.key()))
    else:
        entries = client.client_list()
    return {entry["id"] for entry in entries if entry["cmd"] == "xread"}


def test_under_wsgi_a_stream_the_client_left_lets_go_of_its_thread(serve, cookie):
    server = serve(EVENTS_HEARTBEAT=1)
    before = stream_readers()
    stream = opened(server, cookie)
    wait_until(lambda: stream_readers() - before, 30, "the stream to read Redis")
    [reader] = stream_readers() - before
    stream.close()
    # Noticed at a heartbeat's write: the iterator is closed, and its Redis connection.
    wait_until(lambda: reader not in stream_readers(), 30, "the stream to end")
