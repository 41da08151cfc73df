"""Faults (issue 8): hung or restarted Redis servers, killed processes and workers.

Whatever fails between a commit and the delivery of its change, the change
log in the database still carries it: a running relay makes the rows fresh
and emits their events, and a hung Redis never makes a save wait.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from decimal import Decimal

import pytest
import redis
from django.db import connection, transaction

import ormbridge
from ormbridge import redis_store, relay
from ormbridge.cache import cached_instance
from ormbridge.models import ChangeBatch
from shop.models import Product
from tests import emitters, replays
from tests.conftest import ROOT, RedisCluster, RedisServer, wait_until
from tests.factories import cached_entry, make_products

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]


def django_env() -> dict[str, str]:
    """The environment of a Django process on the test database (as ``Worker.start``)."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "ORMBRIDGE_TEST_DB_NAME": connection.settings_dict["NAME"],
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")]),
    }


def fill(product: Product) -> None:
    """Cache ``product``; the entry is there."""
    assert cached_instance(Product, product.pk).price == product.price
    assert cached_entry("shop.product", product.pk) is not None


def price(pk: int) -> Decimal:
    return cached_instance(Product, pk).price


def updated_events(pk: int) -> list[dict]:
    return [
        event
        for event in emitters.recorded()
        if event["model"] == "shop.product"
        and event["type"] == "update"
        and pk in (event["pks"] or [])
    ]


def undelivered() -> int:
    return ChangeBatch.objects.exclude(state=ChangeBatch.State.DONE).count()


# -- 6. a hung Redis never holds a save up -----------------------------------------


@pytest.fixture
def pause(redis_servers: dict[str, RedisServer]) -> Iterator[Callable[[str], None]]:
    """Pause every client of a Redis server (every node of a cluster) for 3 s
    (``CLIENT PAUSE 3000 ALL``)."""
    paused: list[redis.Redis] = []
    redis_store.breaker.reset()

    def pause(name: str) -> None:
        for node in redis_servers[name].nodes:
            client = redis.Redis(unix_socket_path=str(node.socket))
            client.execute_command("CLIENT", "PAUSE", 3000, "ALL")
            paused.append(client)

    yield pause
    for client in paused:
        client.execute_command("CLIENT", "UNPAUSE")  # answered when the pause ends (Redis 7.0)
        client.close()
    redis_store.breaker.reset()


# A save that waited for a paused Redis took the whole pause (3 s) or a client's socket
# timeout (2 s and more); one that did not takes COMMIT_TIMEOUT (50 ms) at most, plus the
# save itself: whatever the machine is busy with, well under this bound.
AT_ONCE = 1.5


def timed_save(product: Product, value: str) -> float:
    product.price = Decimal(value)
    started = time.monotonic()
    product.save()
    return time.monotonic() - started


def test_a_save_returns_at_once_while_ormbridge_redis_hangs(pause, monkeypatch):
    [product] = make_products(1, price="1.00")
    fill(product)
    pause("ormbridge")
    first = timed_save(product, "2.00")
    print(f"save with ormbridge's Redis paused: {first * 1000:.1f} ms")
    assert first < AT_ONCE
    assert redis_store.breaker.open, "the failed commit-time invalidation opened the breaker"

    attempts: list[None] = []
    commit_redis = redis_store.commit_redis

    def counted() -> redis_store.Client:
        attempts.append(None)
        return commit_redis()

    monkeypatch.setattr(redis_store, "commit_redis", counted)
    second = timed_save(product, "3.00")
    print(f"the next save, breaker open: {second * 1000:.1f} ms")
    assert second < AT_ONCE
    assert attempts == [], "a save tried Redis while the breaker was open"
    assert Product.objects.get(pk=product.pk).price == Decimal("3.00")
    assert ChangeBatch.objects.filter(model="shop.product", action="update").exists()


@pytest.fixture
def hang(redis_servers: dict[str, RedisServer]) -> Iterator[Callable[[str], None]]:
    """Stop every process of a Redis server (every node of a cluster) with SIGSTOP: a hang,
    not a closed connection; continued at the end of the test."""
    stopped: list[int] = []

    def hang(name: str) -> None:
        for node in redis_servers[name].nodes:
            assert node.process is not None
            os.kill(node.process.pid, signal.SIGSTOP)
            stopped.append(node.process.pid)

    yield hang
    for pid in stopped:
        os.kill(pid, signal.SIGCONT)
    for server in redis_servers.values():
        if isinstance(server, RedisCluster):  # its nodes may have marked each other failed
            wait_until(server._ok, 30, f"the Redis Cluster {server.name} to be ok again")
    redis_store.read_breaker.reset()


def test_cached_reads_go_to_the_database_at_once_while_ormbridge_redis_hangs(no_relay, hang):
    [product] = make_products(1, price="1.00")
    fill(product)
    hang("ormbridge")
    started = time.monotonic()
    for _ in range(6):  # six reads took 30 s: each waited for its 5 s socket timeout
        assert price(product.pk) == Decimal("1.00")
    elapsed = time.monotonic() - started
    print(f"six cached reads with ormbridge's Redis hung: {elapsed * 1000:.1f} ms")
    assert elapsed < 2 * AT_ONCE, "the reads waited for the hung Redis"
    assert redis_store.read_breaker.open, "the failed read opened the reads' breaker"


def test_a_save_does_not_touch_the_broker(pause):
    [product] = make_products(1, price="1.00")
    fill(product)
    pause("broker")
    elapsed = timed_save(product, "2.00")
    print(f"save with the broker paused: {elapsed * 1000:.1f} ms")
    assert elapsed < AT_ONCE
    assert not redis_store.breaker.open
    assert price(product.pk) == Decimal("2.00")  # invalidated at commit, broker or not


# -- 7. a process killed between its COMMIT and ormbridge's on_commit -----------

KILLED_AFTER_COMMIT = textwrap.dedent(
    """
    import os
    import signal
    import sys
    from decimal import Decimal

    import django

    django.setup()

    from django.db import transaction

    from shop.models import Product

    with transaction.atomic():
        # Registered first, so it runs first: ormbridge's own callback never runs.
        transaction.on_commit(lambda: os.kill(os.getpid(), signal.SIGKILL))
        product = Product.objects.get(pk=int(sys.argv[1]))
        product.price = Decimal(sys.argv[2])
        product.save()
    print("the process outlived its commit", flush=True)
    """
)


def test_a_process_killed_right_after_its_commit_loses_nothing(no_relay, start_worker):
    [product] = make_products(1, price="1.00")
    fill(product)
    done = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_COMMIT, str(product.pk), "7.77"],
        cwd=ROOT,
        env=django_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert Product.objects.get(pk=product.pk).price == Decimal("7.77")  # committed
    assert price(product.pk) == Decimal("1.00"), "the killed process's callback never ran"

    started = time.monotonic()
    start_worker()
    wait_until(lambda: price(product.pk) == Decimal("7.77"), 30, "the relay to invalidate")
    wait_until(lambda: updated_events(product.pk), 30, "the row's event")
    print(f"worker start -> fresh and emitted: {time.monotonic() - started:.2f} s")


# -- 8. ormbridge's Redis restored from an old snapshot ---------------------------


def test_a_restart_from_an_older_snapshot_revives_no_stale_entry(no_relay, redis_servers):
    server = redis_servers["ormbridge"]
    [product] = make_products(1, price="1.00")
    fill(product)
    token = redis_store.token_key("shop.product", product.pk)
    incarnation = redis_store.incarnation()
    try:
        server.save()  # every node of a cluster
        assert all(snapshot.exists() for snapshot in server.snapshots)
        product.price = Decimal("2.00")
        product.save()  # commits; the row's token is deleted
        assert not redis_store.get_redis().exists(token)

        server.stop()
        server.start()  # loads the snapshot: the old token is back, the cache untouched
        assert redis_store.get_redis().exists(token)
        assert redis_store.incarnation() != incarnation
        assert cached_entry("shop.product", product.pk) is not None
        assert undelivered() >= 1  # no relay ran

        assert price(product.pk) == Decimal("2.00")
    finally:
        for snapshot in server.snapshots:
            snapshot.unlink(missing_ok=True)


# -- 9. the broker restarted empty --------------------------------------------------


def broker_clients(server: RedisServer) -> int:
    """Clients connected to the broker over TCP (the worker's; ours uses the socket)."""
    client = redis.Redis(unix_socket_path=str(server.socket))
    try:
        return sum(1 for info in client.client_list() if info["addr"].startswith("127.0.0.1:"))
    finally:
        client.close()


def test_a_broker_restarted_empty_delays_no_delivery(worker, redis_servers):
    broker = redis_servers["broker"]
    [product] = make_products(1, price="1.00")
    wait_until(lambda: undelivered() == 0, 30, "the creation to be delivered")
    fill(product)
    wait_until(lambda: broker_clients(broker), 30, "the worker to be connected to the broker")

    broker.stop()
    transaction.set_autocommit(False)  # no commit-time invalidation: the relay's work
    try:
        product.price = Decimal("4.00")
        product.save()
        transaction.commit()
    finally:
        transaction.set_autocommit(True)
    broker.start()  # empty
    restarted = time.monotonic()

    wait_until(
        lambda: price(product.pk) == Decimal("4.00") and updated_events(product.pk),
        5,
        "the change to be fresh and emitted after the broker restart",
    )
    print(f"broker restart -> fresh and emitted: {time.monotonic() - restarted:.2f} s")
    assert worker.process is not None and worker.process.poll() is None, worker.log_text()
    wait_until(lambda: broker_clients(broker), 60, "the worker to reconnect to the broker")
    assert worker.process.poll() is None, worker.log_text()


# -- 10. a worker killed in the middle of delivering -----------------------------


def test_a_worker_killed_mid_flush_loses_nothing(no_relay, start_worker):
    products = make_products(2000, price="1.00")
    pks = [product.pk for product in products]
    relay.drain()  # the creation, delivered here
    for pk in pks:
        cached_instance(Product, pk)
    slow = start_worker(env={"ORMBRIDGE_TEST_REPLAY_DELAY": "0.05"})

    result = ormbridge.safe_bulk_update(
        Product.objects.all(), price=Decimal("9.99"), chunk_size=200
    )
    assert result.rows == 2000
    chunks = ChangeBatch.objects.filter(id__in=result.batch_ids)
    assert len(result.batch_ids) == result.chunks == 10
    wait_until(
        lambda: chunks.filter(state=ChangeBatch.State.CLAIMED).exists(),
        30,
        "the slow worker's relay to claim chunks",
    )
    slow.kill()
    killed = time.monotonic()
    assert chunks.exclude(state=ChangeBatch.State.DONE).exists()

    start_worker()  # its start is not the relay's doing: timed from when it is up
    wait_until(
        lambda: not chunks.exclude(state=ChangeBatch.State.DONE).exists(),
        30,
        "every chunk to be delivered within 30 s of a new worker's start (RELAY_LEASE 10 s)",
    )
    done = time.monotonic() - killed
    # Nothing is left to deliver, so the cache cannot change any more but by
    # deletions: rows fresh now were fresh when the last chunk was done.
    stale = [pk for pk in pks if price(pk) != Decimal("9.99")]
    checked = time.monotonic() - killed
    print(f"kill -> every chunk done: {done:.2f} s (rows checked fresh at {checked:.2f} s)")
    assert stale == [], f"{len(stale)} rows read stale"
    assert set(replays.saves()) >= set(pks), "a row's post_save was never replayed"


def test_the_first_read_after_a_redis_restart_is_stored(
    no_relay, redis_servers, django_assert_num_queries
):
    first, second = make_products(2)
    cached_instance(Product, first.pk)  # the cache client holds a connection to the old server
    redis_servers["ormbridge"].stop()
    redis_servers["ormbridge"].start()
    cached_instance(Product, second.pk)  # reconnects: a miss, stored under the new run id
    with django_assert_num_queries(0):
        cached_instance(Product, second.pk)
