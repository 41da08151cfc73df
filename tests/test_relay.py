"""How relays share the change log: claims, replays spread over processes."""

import pytest

import ormbridge
from ormbridge import relay
from ormbridge.models import ChangeBatch
from shop.models import Product
from tests.factories import log_mark, logged_since, make_products

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases]


def test_a_claim_takes_at_most_one_chunk_to_replay(no_relay):
    make_products(300)
    relay.drain()
    result = ormbridge.safe_bulk_update(Product.objects.all(), chunk_size=100, stock=3)
    first = relay.claim("default", "first")
    second = relay.claim("default", "second")
    assert [batch.pk for batch in first] == result.batch_ids[:1]
    assert [batch.pk for batch in second] == result.batch_ids[1:2]


def test_a_claim_takes_every_due_row_that_needs_no_replay(no_relay):
    products = make_products(3)
    relay.drain()
    mark = log_mark()
    for product in products:
        product.save()
    due = [batch.pk for batch in logged_since(mark)]
    assert [batch.pk for batch in relay.claim("default", "one")] == due


def test_a_prefork_worker_replays_chunks_in_each_of_its_processes(no_relay, start_worker):
    """The session's worker is stopped: its relay would claim chunks too."""
    make_products(2_000)
    start_worker(pool="prefork", concurrency=2, env={"ORMBRIDGE_TEST_REPLAY_DELAY": "0.002"})
    result = ormbridge.safe_bulk_update(Product.objects.all(), chunk_size=200, stock=4)
    result.wait(timeout=120)
    chunks = ChangeBatch.objects.filter(id__in=result.batch_ids)
    owners = list(chunks.values_list("claimed_by", flat=True))
    pids = {owner.split(":")[1] for owner in owners}
    assert len(pids) == 2, owners


def test_a_heartbeat_renews_only_the_rows_in_hand(no_relay):
    """Rows whose delivery was abandoned (say its bookkeeping failed) are let go at lease end."""
    products = make_products(2)
    relay.drain()
    for product in products:
        product.save()
    held, dropped = relay.claim("default", "relay-1")[:2]
    before = {b.pk: b.lease_until for b in ChangeBatch.objects.filter(id__in=[held.pk, dropped.pk])}
    assert relay.renew("default", "relay-1", [held.pk]) == 1
    after = {b.pk: b.lease_until for b in ChangeBatch.objects.filter(id__in=[held.pk, dropped.pk])}
    assert after[held.pk] > before[held.pk]
    assert after[dropped.pk] == before[dropped.pk]
