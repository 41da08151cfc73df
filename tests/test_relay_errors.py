"""A worker's database connection killed mid-replay (issue 10, operations 13).

A real worker replays a chunk; ``tests.testapp.apps.hold_save`` holds one row's
replay until the test has terminated that relay's PostgreSQL connection
(``pg_terminate_backend``), then reads the row on the dead connection. The
outcome must be written on a fresh connection, at once: not left ``claimed``,
without an error, until the claim's lease runs out (made 600 s here, so only a
fix passes the tests' waits).
"""

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NamedTuple

import pytest
from django.db import connection
from django.utils import timezone

import ormbridge
from ormbridge import redis_store
from ormbridge.models import ChangeBatch
from shop.models import Product
from tests import replays
from tests.conftest import Worker, wait_until
from tests.factories import make_products, wait_delivered
from tests.testapp.apps import hold_key

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.redis,
    pytest.mark.skipif(
        "connection.vendor != 'postgresql'", reason="pg_terminate_backend is PostgreSQL's"
    ),
]

RECEIVER = "tests.testapp.apps.hold_save"
LEASE = 600.0


class Killed(NamedTuple):
    products: list[Any]
    victim: Any
    batch_id: int


def kill_mid_replay(start_worker: Callable[..., Worker], backoff: float, read: bool) -> Killed:
    """A chunk of 20 rows replayed by a worker whose connection is terminated while the 8th
    row's receiver waits; that receiver then reads the database (``read``) or not."""
    products = make_products(20)
    victim = products[7]
    start_worker(
        env={
            "ORMBRIDGE_TEST_HOLD_SAVE": str(victim.pk),
            "ORMBRIDGE_TEST_HOLD_SAVE_READS": "1" if read else "0",
            "ORMBRIDGE_TEST_SETTINGS": json.dumps(
                {"RELAY_LEASE": LEASE, "RETRY_BACKOFF": backoff, "RETRY_BACKOFF_MAX": backoff}
            ),
        }
    )
    wait_delivered()  # the inserts' own change-log rows
    result = ormbridge.safe_bulk_update(Product.objects.all(), chunk_size=1000, stock=3)
    [batch_id] = result.batch_ids
    client = redis_store.get_redis()
    wait_until(lambda: client.get(hold_key("backend")), 60, "the receiver to hold the replay")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [int(client.get(hold_key("backend")))])
        assert cursor.fetchone()[0] is True
    client.set(hold_key("release"), 1)
    return Killed(products, victim, batch_id)


def test_a_receiver_failing_on_the_dead_connection_is_recorded_at_once(no_relay, start_worker):
    killed = kill_mid_replay(start_worker, backoff=600, read=True)

    def recorded() -> ChangeBatch | None:
        batch = ChangeBatch.objects.get(pk=killed.batch_id)
        return batch if batch.errors else None

    wait_until(recorded, 60, "the receiver's error to be recorded")
    batch = ChangeBatch.objects.get(pk=killed.batch_id)
    assert (batch.state, batch.attempts, batch.lease_until) == ("pending", 1, None)
    assert batch.retry_pks == [killed.victim.pk]
    [error] = batch.errors
    assert (error["pk"], error["receiver"]) == (killed.victim.pk, RECEIVER)
    assert error["error"].startswith("OperationalError: "), error
    assert batch.retry_at > timezone.now() + timedelta(seconds=300)  # RETRY_BACKOFF, not a lease
    assert batch.last_error.startswith(
        f"1 row(s) failed in receivers; first: pk {killed.victim.pk}"
    )


def test_the_row_is_retried_after_the_backoff_and_only_it(no_relay, start_worker):
    killed = kill_mid_replay(start_worker, backoff=1, read=True)
    wait_until(
        lambda: ChangeBatch.objects.filter(pk=killed.batch_id, state="done").exists(),
        60,
        "the retry to deliver the chunk",
    )
    batch = ChangeBatch.objects.get(pk=killed.batch_id)
    assert (batch.attempts, batch.errors, batch.last_error) == (2, None, "")
    saves = replays.saves()
    assert saves.pop(killed.victim.pk) == 2
    assert saves == {p.pk: 1 for p in killed.products if p.pk != killed.victim.pk}


def test_a_replay_done_when_its_connection_died_is_marked_done_not_redone(no_relay, start_worker):
    killed = kill_mid_replay(start_worker, backoff=600, read=False)
    wait_until(
        lambda: ChangeBatch.objects.filter(pk=killed.batch_id, state="done").exists(),
        60,
        "the chunk to be marked done",
    )
    assert ChangeBatch.objects.get(pk=killed.batch_id).attempts == 1
    assert replays.saves() == {p.pk: 1 for p in killed.products}
