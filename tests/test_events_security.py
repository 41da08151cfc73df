"""The events endpoint under hostile input and revoked access (issue 10), over real HTTP.

Each test talks to the example project under uvicorn with the session cookie of
a user logged in for real (a session row in the test database).
"""

import base64
import json
import time
from typing import Any
from urllib.parse import urlencode

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Permission, User
from django.contrib.sessions.models import Session

from ormbridge import broadcast
from ormbridge.checks import check_settings
from shop.models import Customer
from tests import sse
from tests.conftest import wait_until
from tests.test_browser import browser as headless_chromium  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis]

REAUTH = 1  # seconds between the servers' re-checks of an open stream's access
MAX_NAMESPACES = 20  # the default of EVENTS_MAX_NAMESPACES


@pytest.fixture
def server(serve) -> sse.Server:
    return serve(EVENTS_REAUTH=REAUTH)


def user_with(*codenames: str, name: str = "viewer") -> User:
    user = User.objects.create_user(name, email=f"{name}@example.org")
    for codename in codenames:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    return user


def emit(namespace: str, pk: int = 1) -> None:
    """An event in ``namespace``'s stream, as the relay writes it."""
    label = namespace.split(broadcast.SEPARATOR, 1)[0]
    event = broadcast.make_event("update", label, [pk], ["price"], namespace=namespace)
    broadcast.RedisStreamEmitter().emit([event])


def cursor_of(positions: object) -> str:
    """A ``Last-Event-ID`` holding ``positions`` in the endpoint's cursor encoding."""
    raw = json.dumps(positions, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def refused(stream: sse.Stream, status: int) -> dict:
    """The JSON body of a refusal with ``status``, checked to be no HTML."""
    assert stream.status == status, (stream.status, stream.body[:300])
    assert stream.content_type.startswith("application/json"), stream.content_type
    body = stream.json()
    assert body["error"]
    return body


# Security 1: reflected XSS


def test_a_denied_namespace_is_echoed_as_escaped_json_never_as_html(server):
    cookie = sse.session_cookie(user_with())
    namespace = "shop.product::<script>alert(1)</script>"
    stream = server.open([namespace], cookie=cookie)
    body = refused(stream, 403)
    assert b"<script>" not in stream.body
    assert body["namespaces"] == [namespace]


def test_a_malformed_namespace_is_refused_without_echoing_it(server):
    cookie = sse.session_cookie(user_with())
    stream = server.open(["<script>alert(1)</script>"], cookie=cookie)
    refused(stream, 400)
    assert b"<script>" not in stream.body


# Security 2: tenant namespaces


def test_a_tenant_namespace_is_refused_without_a_permission_hook(server):
    cookie = sse.session_cookie(user_with("view_order"))
    other = Customer.objects.create(email="someone-else@example.org")
    stream = server.open([f"shop.order::customer-{other.pk}"], cookie=cookie)
    body = refused(stream, 403)
    assert body["namespaces"] == [f"shop.order::customer-{other.pk}"]


def test_a_per_tenant_hook_opens_a_users_own_tenant_only(serve):
    server = serve(EVENTS_PERMISSION="tests.hooks.own_customer_orders")
    user = user_with("view_order")
    own = Customer.objects.create(email=user.email)
    other = Customer.objects.create(email="someone-else@example.org")
    cookie = sse.session_cookie(user)
    refused(server.open([f"shop.order::customer-{other.pk}"], cookie=cookie), 403)
    stream = server.open([f"shop.order::customer-{own.pk}"], cookie=cookie)
    assert stream.status == 200
    emit(f"shop.order::customer-{own.pk}", pk=7)
    [message] = stream.messages(1)
    assert message["data"]["namespace"] == f"shop.order::customer-{own.pk}"
    stream.close()


# Security 4: open streams and revoked access


def remove_permission(user: User) -> None:
    user.user_permissions.clear()


def deactivate(user: User) -> None:
    user.is_active = False
    user.save()


def change_password(user: User) -> None:
    user.set_password("a new password")
    user.save()


def delete_sessions(user: User) -> None:
    Session.objects.all().delete()


@pytest.mark.parametrize(
    "revoke", [remove_permission, deactivate, change_password, delete_sessions]
)
def test_an_open_stream_closes_once_access_is_revoked(server, revoke):
    user = user_with("view_product")
    stream = server.open(["shop.product"], cookie=sse.session_cookie(user))
    assert stream.status == 200
    emit("shop.product")
    stream.messages(1)
    revoke(user)
    emit("shop.product", pk=2)  # may still arrive: the server re-checks every REAUTH s
    messages = stream.until_closed(timeout=30)
    assert messages[-1]["event"] == "closed"
    assert messages[-1]["data"]["reason"] in ("denied", "logged-out")


def test_an_open_stream_stays_open_while_access_lasts(server):
    stream = server.open(["shop.product"], cookie=sse.session_cookie(user_with("view_product")))
    assert stream.status == 200
    time.sleep(3 * REAUTH)  # several re-checks pass
    emit("shop.product", pk=3)
    [message] = stream.messages(1)
    assert message["data"]["pks"] == [3]
    stream.close()


def test_a_stream_ends_at_its_maximum_age_and_resumes_where_it_ended(serve):
    server = serve(EVENTS_MAX_AGE=2)
    cookie = sse.session_cookie(user_with("view_product"))
    stream = server.open(["shop.product"], cookie=cookie)
    assert stream.status == 200
    [closed] = stream.until_closed(timeout=30)
    assert closed["event"] == "closed"
    assert closed["data"] == {"reason": "max-age"}
    emit("shop.product", pk=4)  # between the end and the browser's reconnection
    resumed = server.open(["shop.product"], cookie=cookie, last_event_id=closed["id"])
    [message] = resumed.messages(1)
    assert message["data"]["pks"] == [4]
    resumed.close()


def open_page(request: pytest.FixtureRequest, server: sse.Server, user: User) -> Any:
    """Headless Chromium as ``user`` on a page that loads ormbridge.js, subscribed to
    shop.product and recording what the client reports in ``window.seen``."""
    browser = request.getfixturevalue("headless_chromium")  # skips when there is none
    browser.get(f"{server.url}/admin/login/")
    browser.add_cookie(
        {"name": django_settings.SESSION_COOKIE_NAME, "value": sse.session_key(user), "path": "/"}
    )
    browser.get(f"{server.url}/products/")
    browser.execute_script(
        "window.seen = {opened: 0, pks: [], closed: null};"
        "ormbridge.subscribe(['shop.product'], {"
        "  onOpen: function () { window.seen.opened += 1; },"
        "  onEvent: function (event) { window.seen.pks.push(event.pks[0]); },"
        "  onClosed: function (reason) { window.seen.closed = reason; },"
        "});"
    )
    wait_until(lambda: seen(browser)["opened"] == 1, 30, "the client to subscribe")
    return browser


def seen(browser: Any) -> dict:
    return browser.execute_script("return window.seen")


def test_the_browser_client_stops_when_its_user_is_logged_out(server, request):
    browser = open_page(request, server, user_with("view_product"))
    Session.objects.all().delete()
    wait_until(lambda: seen(browser)["closed"] == "logged-out", 30, "the client to stop")


def test_the_browser_client_goes_on_after_a_stream_reaches_its_maximum_age(serve, request):
    browser = open_page(request, serve(EVENTS_MAX_AGE=2), user_with("view_product"))
    wait_until(lambda: seen(browser)["opened"] >= 2, 30, "the browser to reconnect")
    emit("shop.product", pk=8)
    wait_until(lambda: seen(browser)["pks"] == [8], 30, "the event")
    assert seen(browser)["closed"] is None


# Security 6: unbounded and malformed input


def test_a_deeply_nested_last_event_id_is_refused(server):
    cookie = sse.session_cookie(user_with("view_product"))
    nested = base64.urlsafe_b64encode(b"[" * 3000 + b"]" * 3000).decode()
    refused(server.open(["shop.product"], cookie=cookie, last_event_id=nested), 400)


@pytest.mark.parametrize(
    "position",
    ["\u0663-\u0663", "18446744073709551616-0", "0-18446744073709551616", "1-2-3", "-1", "1-"],
)
def test_a_cursor_position_redis_would_reject_is_refused(server, position):
    cookie = sse.session_cookie(user_with("view_product"))
    cursor = cursor_of({"shop.product": position})
    refused(server.open(["shop.product"], cookie=cookie, last_event_id=cursor), 400)


def test_a_cursor_that_is_not_an_object_of_positions_is_refused(server):
    cookie = sse.session_cookie(user_with("view_product"))
    for cursor in ("not base64!", cursor_of(["0-1"]), cursor_of({"shop.product": 5})):
        refused(server.open(["shop.product"], cookie=cookie, last_event_id=cursor), 400)


def test_an_oversized_last_event_id_is_refused(server):
    cookie = sse.session_cookie(user_with("view_product"))
    positions = {f"shop.product::{n:0200}": "1-1" for n in range(MAX_NAMESPACES + 5)}
    cursor = cursor_of(positions)
    refused(server.open(["shop.product"], cookie=cookie, last_event_id=cursor), 400)


# Short names for 1,001 of them: uvicorn's h11 refuses a request head over 16 KB.
@pytest.mark.parametrize("count, prefix", [(MAX_NAMESPACES + 1, "shop.product"), (1001, "a.b")])
def test_more_namespaces_than_allowed_per_request_are_refused(server, count, prefix):
    cookie = sse.session_cookie(user_with("view_product"))
    query = urlencode([("ns", f"{prefix}::{n}") for n in range(count)], safe=":")
    body = refused(server.open([], cookie=cookie, query=query), 400)
    assert str(MAX_NAMESPACES) in body["error"]


def test_an_overlong_namespace_is_refused(server):
    cookie = sse.session_cookie(user_with("view_product"))
    refused(server.open(["shop.product::" + "x" * 300], cookie=cookie), 400)


def test_a_valid_cursor_resumes_a_stream(server):
    cookie = sse.session_cookie(user_with("view_product"))
    first = server.open(["shop.product"], cookie=cookie)
    emit("shop.product", pk=5)
    [seen] = first.messages(1)
    first.close()
    emit("shop.product", pk=6)
    again = server.open(["shop.product"], cookie=cookie, last_event_id=seen["id"])
    [missed] = again.messages(1)
    assert missed["data"]["pks"] == [6]
    again.close()


def test_the_events_limits_are_checked(settings):
    settings.ORMBRIDGE = {
        **settings.ORMBRIDGE,
        "EVENTS_REAUTH": 0,
        "EVENTS_MAX_AGE": "1h",
        "EVENTS_MAX_NAMESPACES": 2.5,
    }
    messages = [m.msg for m in check_settings() if m.id == "ormbridge.E004"]
    assert messages == [
        "ORMBRIDGE['EVENTS_REAUTH'] must be a number of seconds >= 0.1, not 0.",
        "ORMBRIDGE['EVENTS_MAX_AGE'] must be a number of seconds >= 1, not '1h'.",
        "ORMBRIDGE['EVENTS_MAX_NAMESPACES'] must be a whole number >= 1, not 2.5.",
    ]
