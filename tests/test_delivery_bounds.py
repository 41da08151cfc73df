"""What a relay holds at once stays under ``RELAY_MAX_PKS``, whatever a statement changed
(issue 17, item 7).

A 1,000,000-row ``UPDATE`` is one change-log row on PostgreSQL, all its pks in one JSON
array: a relay read it whole (and every row merged with it) into memory. Here the cap is
1,000 pks and the statements 10,000 rows: every merged flush and every replay holds at most
the cap, and every row is delivered as before (tokens, events, replays). The merged flushes
are watched by wrapping ``ormbridge.delivery.deliver`` in this process (the real one runs).
``bench/relay_memory.py`` measures a worker's memory at full size.
"""

import json
from typing import Any

import pytest
from django.db.models import F

import ormbridge
from ormbridge import delivery, redis_store, relay, replay
from ormbridge.cache import cached_instance
from ormbridge.conf import settings as ormbridge_settings
from ormbridge.models import ChangeBatch, ResyncJob
from shop.models import Product
from tests import emitters, replays
from tests.conftest import Worker, wait_until
from tests.factories import cached_entry, make_products, wait_delivered
from tests.test_resync import resync_command

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]

CAP = 1_000
ROWS = 10_000


@pytest.fixture
def capped(settings) -> None:
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "RELAY_MAX_PKS": CAP}


@pytest.fixture
def held(monkeypatch) -> dict[str, list[list[Any]]]:
    """The pks of every flush and every replay of ``post_save`` this process makes."""
    seen: dict[str, list[list[Any]]] = {"flushes": [], "replays": []}
    real_deliver, real_replay = delivery.deliver, replay.replay_saves

    def flushing(model, action, pks, *args, **kwargs):
        if model is Product and pks is not None:
            seen["flushes"].append(list(pks))
        return real_deliver(model, action, pks, *args, **kwargs)

    def replaying(model, pks, *args, **kwargs):
        seen["replays"].append(list(pks))
        return real_replay(model, pks, *args, **kwargs)

    monkeypatch.setattr(delivery, "deliver", flushing)
    monkeypatch.setattr(replay, "replay_saves", replaying)
    return seen


def capped_worker(start_worker) -> Worker:
    return start_worker(env={"ORMBRIDGE_TEST_SETTINGS": json.dumps({"RELAY_MAX_PKS": CAP})})


def product_events() -> list[dict]:
    return [event for event in emitters.recorded() if event["model"] == "shop.product"]


def assert_events_cover(pks: list[int], kind: str) -> None:
    events = [event for event in product_events() if event["type"] == kind]
    assert sorted({pk for event in events for pk in event["pks"]}) == sorted(pks)
    assert max(len(event["pks"]) for event in events) <= ormbridge_settings.DELIVERY_BATCH_SIZE


def flushed(held: dict[str, list[list[Any]]]) -> list[Any]:
    return [pk for pks in held["flushes"] for pk in pks]


@pytest.mark.parametrize("write", ["update", "invalidate"])
def test_a_statement_over_the_cap_is_flushed_in_slices_of_at_most_the_cap(
    no_relay, capped, held, write
):
    """On PostgreSQL the UPDATE is one row of 10,000 pks (on SQLite, 10,000 rows of one);
    ``invalidate()`` of 10,000 pks is one row on both."""
    products = make_products(ROWS)
    pks = [p.pk for p in products]
    relay.drain()
    for pk in pks[::500]:
        cached_instance(Product, pk)
    emitters.clear()
    held["flushes"].clear()
    if write == "update":
        Product.objects.update(stock=F("stock") + 1)
    else:
        ormbridge.invalidate(Product, pks)

    assert relay.drain().failed == 0
    assert max(len(pks) for pks in held["flushes"]) <= CAP
    assert sorted(set(flushed(held))) == pks
    assert all(cached_entry("shop.product", pk) is None for pk in pks[::500])
    assert_events_cover(pks, write)
    assert not ChangeBatch.objects.exclude(state="done").exists()


def test_rows_merged_over_the_cap_share_their_invalidations(no_relay, capped, held):
    """Two rows of the same 10,000 pks (two statements over the same rows): read in step,
    each pk is flushed once, in flushes of at most the cap."""
    pks = [p.pk for p in make_products(ROWS)]
    relay.drain()
    held["flushes"].clear()
    ormbridge.invalidate(Product, pks)
    ormbridge.invalidate(Product, pks)
    assert relay.drain().batches == 2
    assert max(len(pks) for pks in held["flushes"]) <= CAP
    assert sorted(flushed(held)) == pks  # each once


def test_a_delivery_cut_off_half_way_goes_on_from_where_it_stopped(
    no_relay, capped, held, settings
):
    """An emitter fails at the fourth slice: the retry flushes that slice and the rest, not
    the three slices whose delivery was recorded."""
    pks = [p.pk for p in make_products(ROWS)]
    relay.drain()
    settings.ORMBRIDGE = {
        **settings.ORMBRIDGE,
        "EMITTERS": [*settings.ORMBRIDGE["EMITTERS"], "tests.emitters.FailingEmitter"],
        "RETRY_BACKOFF": 0.5,
    }
    held["flushes"].clear()
    ormbridge.invalidate(Product, pks)
    redis_store.get_redis().set(emitters.fail_at_key(), 4)
    assert relay.drain().failed == 1
    [row] = ChangeBatch.objects.filter(model="shop.product", action="invalidate")
    assert (row.state, row.attempts) == ("pending", 1)

    held["flushes"].clear()
    wait_until(lambda: relay.drain().batches, 30, "the retry to be delivered")
    assert flushed(held) == pks[3 * CAP :]  # from the slice that failed on
    row.refresh_from_db()
    assert (row.state, row.attempts) == ("done", 2)


@pytest.mark.parametrize("helper", ["safe_bulk_update", "safe_bulk_delete"])
def test_a_bulk_chunk_over_the_cap_is_logged_in_rows_of_at_most_the_cap(
    no_relay, start_worker, capped, helper
):
    """Each row is delivered whole, replays and deleted rows' values and all: a chunk of
    10,000 rows is logged as ten rows, each replayed once by a worker."""
    products = make_products(ROWS)
    capped_worker(start_worker)
    wait_delivered()
    emitters.clear()
    queryset = Product.objects.all()
    if helper == "safe_bulk_update":
        result = ormbridge.safe_bulk_update(queryset, chunk_size=ROWS, price=F("price") + 1)
    else:
        result = ormbridge.safe_bulk_delete(queryset, chunk_size=ROWS)
    result.wait(timeout=120)

    rows = ChangeBatch.objects.filter(id__in=result.batch_ids, model="shop.product")
    assert result.chunks == 1
    assert sorted(rows.values_list("rows", flat=True)) == [CAP] * (ROWS // CAP)
    pks = [p.pk for p in products]
    if helper == "safe_bulk_update":
        assert replays.saves() == dict.fromkeys(pks, 1)
        assert_events_cover(pks, "update")
    else:
        assert replays.deletes() == dict.fromkeys(pks, 1)
        values = replays.deleted_values()  # each pk replayed with its own row's values
        assert all(values[p.pk]["sku"] == p.sku for p in products)
        assert_events_cover(pks, "delete")


@pytest.mark.parametrize("where", ["--sync", "--wait"])
def test_a_resync_chunk_over_the_cap_is_logged_in_rows_of_at_most_the_cap(
    no_relay, start_worker, capped, held, where
):
    products = make_products(ROWS)
    capped_worker(start_worker)
    wait_delivered()
    resync_command("shop.Product", "--chunk-size", str(ROWS), where)

    job = ResyncJob.objects.get()
    chunks = ChangeBatch.objects.filter(job=job)
    assert job.state == "done"
    assert list(chunks.values_list("rows", flat=True)) == [CAP] * (ROWS // CAP)
    assert replays.saves() == {p.pk: 1 for p in products}
    if where == "--sync":  # this process replayed them
        assert max(len(pks) for pks in held["replays"]) <= CAP


def test_a_worker_delivers_a_statement_over_the_cap_as_before(no_relay, start_worker, capped):
    """End to end on a real worker: every token deleted, every pk in an event, the row done."""
    products = make_products(ROWS)
    capped_worker(start_worker)
    wait_delivered()
    pks = [p.pk for p in products]
    for pk in pks[::500]:
        cached_instance(Product, pk)
    emitters.clear()
    Product.objects.update(stock=F("stock") + 1)
    wait_until(lambda: len({pk for e in product_events() for pk in e["pks"]}) == ROWS, 60)
    wait_delivered()
    assert all(cached_entry("shop.product", pk) is None for pk in pks[::500])
    assert_events_cover(pks, "update")
