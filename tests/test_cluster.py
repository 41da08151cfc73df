"""ormbridge's Redis as a Redis Cluster (issue 10).

Every key of a ``KEY_PREFIX`` is in one hash slot, so the scripts, MGETs,
multi-key deletes and multi-stream reads work on a cluster; the stamp of an
entry carries the run id of the node serving that slot. These tests run on a
cluster of three masters of their own, or on the run's ormbridge Redis when it
is one already (``ORMBRIDGE_TEST_REDIS_CLUSTER=1``, ``make test-cluster``: the
whole suite then runs against the cluster).
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest
import redis
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission, User
from redis.crc import key_slot

from ormbridge import broadcast, cache, redis_store, relay, status
from ormbridge.cache import cached_instance
from ormbridge.checks import check_settings
from shop.models import Product, Tag
from tests import settings as test_settings
from tests import sse
from tests.conftest import RedisCluster, RedisServer
from tests.factories import make_products

pytestmark = pytest.mark.redis


@pytest.fixture(scope="session")
def redis_cluster(redis_servers: dict[str, RedisServer | RedisCluster]) -> Iterator[RedisCluster]:
    """The run's ormbridge Redis if it is a cluster, else a cluster of these tests'.

    Of the session: pytest-django runs the transactional tests after the others,
    so this module's tests need not be contiguous.
    """
    ormbridge = redis_servers["ormbridge"]
    if isinstance(ormbridge, RedisCluster):
        yield ormbridge
        return
    cluster = RedisCluster("cluster", [int(port) for port in test_settings.free_ports(6)])
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def on_cluster(redis_cluster: RedisCluster, settings) -> Iterator[RedisCluster]:
    """ormbridge's Redis is ``redis_cluster``, started and emptied, for this test."""
    if not redis_cluster.running:
        redis_cluster.start()
    settings.ORMBRIDGE = {
        **settings.ORMBRIDGE,
        "REDIS_URL": redis_cluster.url,
        "REDIS_CLUSTER": True,
    }
    redis_store.get_redis().flushall()
    redis_store.breaker.reset()
    yield redis_cluster
    if not redis_cluster.running:
        redis_cluster.start()
    redis_store.breaker.reset()


def node_serving(cluster: RedisCluster, key: str) -> RedisServer:
    """The master of ``cluster`` that serves the hash slot of ``key``."""
    client = redis.Redis(unix_socket_path=str(cluster.nodes[0].socket))
    try:
        slots = client.execute_command("CLUSTER", "SLOTS")
    finally:
        client.close()
    slot = key_slot(key.encode())
    [port] = [int(row[2][1]) for row in slots if int(row[0]) <= slot <= int(row[1])]
    [node] = [node for node in cluster.nodes if node.port == port]
    return node


def run_id_of(node: RedisServer) -> str:
    client = redis.Redis(unix_socket_path=str(node.socket), decode_responses=True)
    try:
        return str(client.info("server")["run_id"])
    finally:
        client.close()


@pytest.mark.unit
def test_every_key_of_a_prefix_is_in_one_hash_slot():
    keys = [
        redis_store.key("anything"),
        redis_store.token_key("shop.product", 1),
        redis_store.epoch_key("shop.product"),
        redis_store.generation_key("shop.tag"),
        redis_store.stats_key("shop.order"),
        cache.instance_key("shop.customer", "a@x.org"),
        broadcast.stream_key("shop.product"),
        broadcast.stream_key("shop.order::customer-7"),
    ]
    assert len({key_slot(key.encode()) for key in keys}) == 1, keys


@pytest.mark.django_db(transaction=True)
def test_a_cluster_serves_cached_reads_and_invalidates_them_at_commit(
    on_cluster, no_relay, django_assert_num_queries
):
    [product] = make_products(1, price="1.00")
    assert cached_instance(Product, product.pk).price == Decimal("1.00")  # a miss, stored
    with django_assert_num_queries(0):
        assert cached_instance(Product, product.pk).price == Decimal("1.00")
    product.price = Decimal("2.00")
    product.save()  # the commit deletes the row's tokens and the model's generation
    assert not redis_store.breaker.open, "the commit-time invalidation failed"
    assert cached_instance(Product, product.pk).price == Decimal("2.00")
    with django_assert_num_queries(0):
        assert cached_instance(Product, product.pk).price == Decimal("2.00")


@pytest.mark.django_db(transaction=True)
def test_the_relay_invalidates_and_emits_on_a_cluster(on_cluster, no_relay):
    [product] = make_products(1, price="1.00")
    relay.drain()
    cached_instance(Product, product.pk)
    Product.objects.filter(pk=product.pk).update(price=Decimal("3.00"))  # delivered by the relay
    result = relay.drain()
    assert result.failed == 0
    assert cached_instance(Product, product.pk).price == Decimal("3.00")
    assert redis_store.get_redis().xlen(broadcast.stream_key("shop.product")) == 2  # create, update


def test_the_incarnation_is_the_run_id_of_the_node_serving_the_prefix(on_cluster, settings):
    prefixes: dict[str, str] = {}  # a prefix per node, by its node's run id
    for n in range(200):
        prefix = f"prefix-{n}"
        prefixes.setdefault(run_id_of(node_serving(on_cluster, "{" + prefix + "}")), prefix)
    assert len(prefixes) == 3
    for run_id, prefix in prefixes.items():
        settings.ORMBRIDGE = {**settings.ORMBRIDGE, "KEY_PREFIX": prefix}
        for client in (redis_store.get_redis(), redis_store.entries_redis()):
            # A command first, as a read does: a node an earlier test restarted is known by
            # its new run id once the client has reconnected to it, not before.
            client.exists(redis_store.key())
            assert redis_store.incarnation(client) == run_id


@pytest.mark.django_db(transaction=True)
def test_a_restart_of_the_node_serving_the_slot_leaves_no_entry_a_hit(on_cluster, no_relay):
    [product] = make_products(1, price="1.00")
    cached_instance(Product, product.pk)
    node = node_serving(on_cluster, redis_store.key())
    before = redis_store.incarnation(redis_store.entries_redis())
    node.save()  # the restarted node comes back with the entry and its tokens
    try:
        node.stop()
        Product.objects.filter(pk=product.pk).update(price=Decimal("4.00"))  # nothing delivers it
        on_cluster.start()  # the node, and the cluster ok again
        assert redis_store.entries_redis().exists(redis_store.token_key("shop.product", product.pk))
        assert cached_instance(Product, product.pk).price == Decimal("4.00")
        assert redis_store.incarnation(redis_store.entries_redis()) == run_id_of(node) != before
    finally:
        for snapshot in node.snapshots:
            snapshot.unlink(missing_ok=True)


@pytest.mark.django_db(transaction=True)
def test_reads_go_to_the_database_while_every_node_is_down(on_cluster, no_relay):
    [product] = make_products(1, price="1.00")
    cached_instance(Product, product.pk)
    on_cluster.stop()
    redis_store._client.cache_clear()  # a new client too: one that cannot find the cluster
    Product.objects.filter(pk=product.pk).update(price=Decimal("5.00"))
    assert cached_instance(Product, product.pk).price == Decimal("5.00")
    assert redis_store.breaker.open, "the commit-time invalidation failed as a Redis failure"


@pytest.mark.django_db(transaction=True)
def test_one_stream_reads_the_events_of_two_models_from_a_cluster(on_cluster, no_relay):
    user = User.objects.create_user("viewer")
    for codename in ("view_product", "view_tag"):
        user.user_permissions.add(Permission.objects.get(codename=codename))
    [product] = make_products(1)
    relay.drain()

    async def change():
        await sync_to_async(product.save)()
        await sync_to_async(Tag.objects.create)(name="sale")
        await sync_to_async(relay.drain)()

    code, messages = sse.read(["shop.product", "shop.tag"], 2, user=user, before_reading=change)
    assert code == 200
    assert sorted(message["data"]["namespace"] for message in messages) == [
        "shop.product",
        "shop.tag",
    ]


@pytest.mark.django_db
def test_a_plain_client_of_a_cluster_node_says_to_set_redis_cluster(on_cluster, settings):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "REDIS_CLUSTER": False}
    redis_status = status.collect()["services"]["redis"]
    assert not redis_status["ok"]
    assert "REDIS_CLUSTER" in redis_status["error"]


def configure(settings, **values):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, **values}


def ids() -> list[str]:
    return [message.id for message in check_settings()]


@pytest.mark.unit
@pytest.mark.parametrize("url", ["redis://127.0.0.1:7000", "rediss://localhost:6380/0"])
def test_a_cluster_node_url_passes_the_checks(settings, url):
    configure(settings, REDIS_URL=url, REDIS_CLUSTER=True)
    assert check_settings() == []


@pytest.mark.unit
def test_a_unix_socket_is_refused_for_a_cluster(settings):
    configure(settings, REDIS_URL="unix:///run/redis.sock", REDIS_CLUSTER=True)
    [message] = check_settings()
    assert message.id == "ormbridge.E002"
    assert "Redis Cluster node" in message.msg


@pytest.mark.unit
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_redis_cluster_must_be_a_bool(settings, value):
    configure(settings, REDIS_CLUSTER=value)
    assert ids() == ["ormbridge.E002"]


@pytest.mark.unit
@pytest.mark.parametrize("prefix", ["{shop}", "a}b", "x{"])
def test_a_key_prefix_with_braces_is_refused(settings, prefix):
    configure(settings, KEY_PREFIX=prefix)
    [message] = check_settings()
    assert message.id == "ormbridge.E005"
    assert "hash tag" in message.hint
