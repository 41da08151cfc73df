"""django-eventstream behind a real Pushpin: the relay publishes, Pushpin holds the streams.

The example project runs under uvicorn behind a Pushpin of the test's own (its
directory, its free ports); a real worker's relay emits through
``EventStreamEmitter`` to Pushpin's publish port (``GRIP_URL``). Skipped, saying
so, where Pushpin is not installed (.ci/run installs Debian's ``pushpin``).
"""

import http.client
import json
import sys
import time
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User
from django.core.exceptions import ImproperlyConfigured
from django.db import connection

import ormbridge
from ormbridge.models import ChangeBatch
from shop.models import Product
from tests import pushpin as pushpin_proxy
from tests import sse
from tests.conftest import skip_missing_tool, wait_until
from tests.factories import UNDELIVERED, make_products

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis]

EMITTER = "ormbridge.contrib.eventstream.EventStreamEmitter"


@pytest.fixture
def pushpin(tmp_path):
    if pushpin_proxy.executable() is None:
        skip_missing_tool("pushpin", "install Debian's pushpin (.ci/run does)")
    proxy = pushpin_proxy.Pushpin(tmp_path / "pushpin")
    yield proxy
    proxy.stop()


@pytest.fixture
def behind_pushpin(pushpin, no_relay, start_worker, monkeypatch):
    """The example project behind ``pushpin``, and a worker whose relay publishes to it."""
    monkeypatch.setenv("GRIP_URL", pushpin.grip_url)  # the worker's and the server's settings
    # A publish that fails is tried again after RETRY_BACKOFF: 1 s here, not 5 s doubling.
    settings = {"EMITTERS": [EMITTER], "RETRY_BACKOFF": 1}
    start_worker(env={"ORMBRIDGE_TEST_SETTINGS": json.dumps(settings)})
    server = sse.Server(connection.settings_dict["NAME"], {})
    server.start()
    try:
        pushpin.start(server.port)
        yield pushpin
    except RuntimeError as error:
        pytest.fail(str(error))
    finally:
        server.stop()


@pytest.fixture
def viewer():
    user = User.objects.create_user("viewer")
    user.user_permissions.add(Permission.objects.get(codename="view_product"))
    return user


def delivered() -> bool:
    return not ChangeBatch.objects.filter(state__in=UNDELIVERED).exists()


def subscribe(proxy: pushpin_proxy.Pushpin, channel: str, cookie: str | None) -> sse.Stream:
    headers = {"Accept": "text/event-stream", **({"Cookie": cookie} if cookie else {})}
    return sse.Stream("127.0.0.1", proxy.port, f"/eventstream/?channel={channel}", headers)


def refusal(proxy: pushpin_proxy.Pushpin, channel: str, cookie: str | None) -> str:
    """The body of a subscription that Pushpin closes; fails the test after 30 s.

    A deadline for the whole body: a stream held open sends keep-alives, so a
    socket timeout alone would never fire.
    """
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    headers = {"Accept": "text/event-stream", **({"Cookie": cookie} if cookie else {})}
    deadline = time.monotonic() + 30
    body = b""
    try:
        connection.request("GET", f"/eventstream/?channel={channel}", headers=headers)
        response = connection.getresponse()
        while chunk := response.read1(65536):
            body += chunk
            if time.monotonic() > deadline:
                pytest.fail(f"the subscription was held open, not refused: {body[-300:]!r}")
    finally:
        connection.close()
    return body.decode()


def test_a_bulk_update_reaches_a_client_through_pushpin(behind_pushpin, viewer):
    products = make_products(3)
    wait_until(delivered, 30, "the worker to deliver the products' creation")
    stream = subscribe(behind_pushpin, "shop.product", sse.session_cookie(viewer))
    try:
        assert stream.status == 200, stream.body
        targets = [product.pk for product in products[:2]]
        ormbridge.safe_bulk_update(Product.objects.filter(pk__in=targets), price=Decimal("42.00"))
        [message] = stream.messages(1, timeout=30)
    finally:
        stream.close()
    assert message["event"] == "message"  # what EventSource.onmessage receives
    event = message["data"]
    assert (event["type"], event["namespace"], event["fields"]) == (
        "update",
        "shop.product",
        ["price"],
    )
    assert sorted(event["pks"]) == sorted(targets)


def test_a_user_without_view_permission_is_refused_through_pushpin(behind_pushpin):
    nobody = User.objects.create_user("nobody")
    body = refusal(behind_pushpin, "shop.product", sse.session_cookie(nobody))
    assert "event: stream-error" in body
    assert '"condition": "forbidden"' in body


def test_an_anonymous_client_is_refused_through_pushpin(behind_pushpin):
    body = refusal(behind_pushpin, "shop.product", None)
    assert '"condition": "forbidden"' in body


def test_the_channel_manager_applies_the_events_permission_hook(viewer, settings):
    from ormbridge.contrib.eventstream import NamespaceChannelManager

    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "EVENTS_PERMISSION": "tests.hooks.products_only"}
    manager = NamespaceChannelManager()
    assert manager.can_read_channel(viewer, "shop.product::any-tenant")
    assert not manager.can_read_channel(viewer, "shop.order")


def test_the_default_rule_refuses_tenant_namespaces(viewer):
    from ormbridge.contrib.eventstream import NamespaceChannelManager

    manager = NamespaceChannelManager()
    assert manager.can_read_channel(viewer, "shop.product")
    assert not manager.can_read_channel(viewer, "shop.product::any-tenant")


def test_without_django_eventstream_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "django_eventstream", None)  # an import of it fails
    monkeypatch.delitem(sys.modules, "ormbridge.contrib.eventstream", raising=False)
    with pytest.raises(ImproperlyConfigured, match=r'pip install "ormbridge\[eventstream\]"'):
        import ormbridge.contrib.eventstream  # noqa: F401
