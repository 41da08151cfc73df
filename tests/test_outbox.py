"""With Redis or the broker down, saves succeed and the change log keeps every change."""

import time

import pytest
from django.db import transaction

from ormbridge import outbox, store, tasks
from ormbridge.cache import cached_instance, get_cache, instance_key
from ormbridge.models import ChangeBatch
from shop.models import Category, Product
from tests import emitters
from tests.conftest import wait_until
from tests.factories import make_products

pytestmark = pytest.mark.django_db(transaction=True)


def all_done() -> bool:
    return not ChangeBatch.objects.exclude(state=ChangeBatch.State.DONE).exists()


def test_with_redis_down_saves_succeed_and_sweep_invalidates_after_restart(worker, redis_servers):
    products = make_products(3)
    for product in products:
        cached_instance(Product, product.pk)
    redis_servers["ormbridge"].stop()

    for product in products:
        product.price = 7
        product.save(update_fields=["price"])
    with transaction.atomic():
        category = Category.objects.create(name="made while down")

    batches = ChangeBatch.objects.order_by("id")
    assert [(b.model, b.action, b.state) for b in batches] == [
        ("shop.product", "update", "pending"),
        ("shop.product", "update", "pending"),
        ("shop.product", "update", "pending"),
        ("shop.category", "create", "pending"),
    ]
    assert sorted(int(b.pks[0]) for b in batches[:3]) == [p.pk for p in products]
    assert batches[0].fields == ["price"]
    assert "Error" in batches[0].last_error
    entry = instance_key("shop.product", products[0].pk)
    assert get_cache().get(entry) is not None  # the cache server never went away

    redis_servers["ormbridge"].start()
    tasks.enqueue(tasks.sweep_outbox)
    wait_until(all_done, 30, "the change log to be delivered")

    assert all(get_cache().get(instance_key("shop.product", p.pk)) is None for p in products)
    assert all(cached_instance(Product, p.pk).price == 7 for p in products)
    events = emitters.recorded()
    assert sorted(pk for e in events if e["model"] == "shop.product" for pk in e["pks"]) == [
        p.pk for p in products
    ]
    assert [e["pks"] for e in events if e["model"] == "shop.category"] == [[category.pk]]


def test_with_the_broker_down_saves_succeed_and_sweep_delivers_after_restart(worker, redis_servers):
    [product] = make_products(1)
    cached_instance(Product, product.pk)
    redis_servers["broker"].stop()

    started = time.monotonic()
    product.stock = 42
    product.save(update_fields=["stock"])
    assert time.monotonic() - started < 5

    [batch] = ChangeBatch.objects.all()
    assert (batch.model, batch.action, batch.state) == ("shop.product", "update", "pending")
    assert not store.get_redis().exists(store.scheduled_key("shop.product"))  # guard released

    redis_servers["broker"].start()
    worker.restart()
    result = outbox.sweep()
    assert result.enqueued == 1
    wait_until(all_done, 60, "the change log to be delivered")
    assert cached_instance(Product, product.pk).stock == 42


def test_sweep_hands_out_a_row_whose_worker_died(idle_queue, settings):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "REDELIVER_AFTER": 1}
    batch = ChangeBatch.objects.create(
        model="shop.product",
        action="update",
        pks=[1],
        state=ChangeBatch.State.ENQUEUED,
        enqueued_at=None,
        attempts=1,
    )
    ChangeBatch.objects.filter(pk=batch.pk).update(enqueued_at="2000-01-01T00:00:00Z")
    assert outbox.sweep().enqueued == 1
    batch.refresh_from_db()
    assert (batch.state, batch.attempts) == ("enqueued", 2)
    assert idle_queue() == 1


def test_sweep_leaves_recently_handed_out_rows_alone(idle_queue):
    ChangeBatch.objects.create(model="shop.product", action="update", pks=[1])
    assert outbox.sweep().enqueued == 1
    assert outbox.sweep().enqueued == 0
    assert idle_queue() == 1


def test_processing_a_row_twice_is_harmless(idle_queue):
    [product] = make_products(1)
    batch = ChangeBatch.objects.create(model="shop.product", action="update", pks=[product.pk])
    assert outbox.process(batch.pk).rows == 1
    assert outbox.process(batch.pk).rows == 0
    batch.refresh_from_db()
    assert batch.state == "done"
    assert batch.finished_at is not None


def test_a_row_for_every_pk_invalidates_the_whole_model(idle_queue, django_assert_num_queries):
    products = make_products(2)
    for product in products:
        cached_instance(Product, product.pk)
    batch = ChangeBatch.objects.create(model="shop.product", action="invalidate", pks=None)
    outbox.process(batch.pk)
    with django_assert_num_queries(2):
        for product in products:
            cached_instance(Product, product.pk)
    assert emitters.recorded()[0]["pks"] is None
