"""Events never tell a namespace what it may no longer see: a row that leaves a namespace
is announced there as ``removed``, by primary key only."""

import http.client
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from urllib.parse import urlencode

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Permission, User
from django.db import connection, transaction
from django.test import Client

from ormbridge import redis_store, relay
from ormbridge.broadcast import stream_key
from shop.models import Customer, Order
from tests import moving
from tests.conftest import ROOT, Worker, wait_until
from tests.factories import make_products, undelivered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]


@pytest.fixture
def tenants(no_relay, start_worker: Callable[..., Worker]) -> Iterator[str]:
    """The example project under uvicorn, and a worker, both with shop.Customer's events
    in ``shop.customer::<email domain>`` carrying the email (tests/moving.py)."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "ORMBRIDGE_TEST_DB_NAME": connection.settings_dict["NAME"],
        "ORMBRIDGE_TEST_SETTINGS": moving.SETTINGS,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")]),
    }
    start_worker(env={"ORMBRIDGE_TEST_SETTINGS": moving.SETTINGS})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "example.asgi:application", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
    )  # fmt: skip

    def listening() -> bool:
        with socket.socket() as client:
            return client.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, 60, "uvicorn to listen")
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:  # a stream still open holds a graceful shutdown
            server.kill()
            server.wait()


class EventStream:
    """A subscription over real HTTP with a real session cookie, read message by message."""

    def __init__(self, address: str, namespaces: list[str], user: User) -> None:
        client = Client()
        client.force_login(user)  # a session row in the database, as a login makes
        name = django_settings.SESSION_COOKIE_NAME
        cookie = f"{name}={client.cookies[name].value}"
        self.connection = http.client.HTTPConnection(address, timeout=30)
        self.connection.request(
            "GET", "/ormbridge/events/?" + urlencode({"ns": namespaces}, doseq=True),
            headers={"Cookie": cookie},
        )  # fmt: skip
        self.response = self.connection.getresponse()
        assert self.response.status == 200, self.response.read()
        self.raw: list[str] = []
        # The stream's positions are fixed before its first message.
        assert self._block().startswith("retry: ")

    def _block(self) -> str:
        lines = []
        while (line := self.response.readline().decode()) not in ("\n", ""):
            lines.append(line.rstrip("\n"))
        block = "\n".join(lines)
        self.raw.append(block)
        return block

    def next_event(self) -> dict:
        """The next message's data (heartbeats and ``denied`` messages skipped)."""
        while True:
            fields = dict(line.split(": ", 1) for line in self._block().splitlines()
                          if not line.startswith(":"))  # fmt: skip
            if "data" in fields and fields.get("event", "message") == "message":
                return json.loads(fields["data"])

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def follower() -> User:
    user = User.objects.create_user("follower")
    user.user_permissions.add(Permission.objects.get(codename="view_customer"))
    return User.objects.get(pk=user.pk)


def delivered() -> None:
    wait_until(lambda: not undelivered().exists(), 60, "the worker's relay to deliver")


def test_a_namespace_the_row_left_gets_a_removed_event_without_its_new_values(tenants, follower):
    customer = Customer.objects.create(email="ann@old.example")
    delivered()
    stream = EventStream(tenants, ["shop.customer::old.example"], follower)
    try:
        customer.email = "ann@new.example"
        customer.save()
        event = stream.next_event()
    finally:
        stream.close()
    assert not any("new.example" in block for block in stream.raw), stream.raw
    assert "payload" not in event
    assert (event["type"], event["pks"]) == ("removed", [customer.pk])


def stream_events(namespace: str) -> list[dict]:
    return [json.loads(fields["event"]) for _, fields in
            redis_store.get_redis().xrange(stream_key(namespace))]  # fmt: skip


@pytest.fixture
def customers(no_relay) -> tuple[Customer, Customer]:
    return Customer.objects.create(email="a@x.org"), Customer.objects.create(email="b@x.org")


def move(order: Order, customer: Customer) -> None:
    order.customer = customer
    order.save()
    relay.drain()


def test_a_removed_event_carries_only_primary_keys(customers):
    alice, bob = customers
    order = Order.objects.create(product=make_products(1)[0], customer=alice)
    relay.drain()
    move(order, bob)
    removed = stream_events(f"shop.order::customer-{alice.pk}")[-1]
    assert set(removed) == {"id", "type", "model", "namespace", "pks", "fields", "ts"}
    assert (removed["type"], removed["pks"], removed["fields"]) == ("removed", [order.pk], None)


def test_the_namespace_a_row_moved_into_gets_an_update(customers):
    alice, bob = customers
    order = Order.objects.create(product=make_products(1)[0], customer=alice)
    relay.drain()
    move(order, bob)
    [event] = stream_events(f"shop.order::customer-{bob.pk}")
    assert (event["type"], event["pks"]) == ("update", [order.pk])
    assert stream_events("shop.order")[-1]["type"] == "update"  # the model's own namespace


def test_rows_leaving_and_staying_in_one_batch_get_one_event_each(customers):
    alice, bob = customers
    [product] = make_products(1)
    leaving, staying = (Order.objects.create(product=product, customer=alice) for _ in "ab")
    relay.drain()
    before = len(stream_events(f"shop.order::customer-{alice.pk}"))
    with transaction.atomic():
        leaving.customer = bob
        leaving.save()
        staying.quantity = 5
        staying.save()
    relay.drain()
    events = stream_events(f"shop.order::customer-{alice.pk}")[before:]
    assert sorted((event["type"], event["pks"]) for event in events) == [
        ("removed", [leaving.pk]),
        ("update", [staying.pk]),
    ]


def test_a_deleted_row_is_a_delete_event_in_the_namespace_it_was_in(customers):
    alice, _ = customers
    order = Order.objects.create(product=make_products(1)[0], customer=alice)
    relay.drain()
    pk = order.pk
    order.delete()
    relay.drain()
    event = stream_events(f"shop.order::customer-{alice.pk}")[-1]
    assert (event["type"], event["pks"]) == ("delete", [pk])
