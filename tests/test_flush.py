"""Flushing: batched, pipelined, one event per batch, nothing lost to a concurrent save."""

import threading

import pytest
import redis

import ormbridge
from ormbridge import flush, store
from ormbridge.cache import cached_instance, get_cache, instance_key
from ormbridge.models import ChangeBatch
from shop.models import Product
from tests import emitters
from tests.conftest import wait_until
from tests.factories import make_products

pytestmark = pytest.mark.django_db(transaction=True)


def pending(label: str) -> set[str]:
    return store.get_redis().smembers(store.pending_key(label))


def test_flush_deletes_cached_entries_of_changed_rows(idle_queue):
    products = make_products(3)
    for product in products:
        cached_instance(Product, product.pk)
    products[0].save()
    result = flush.flush("shop.product")
    cache = get_cache()
    assert cache.get(instance_key("shop.product", products[0].pk)) is None
    assert cache.get(instance_key("shop.product", products[1].pk)) is not None
    assert (result.rows, result.batches, result.entries) == (1, 1, 1)
    assert pending("shop.product") == set()
    assert flush.is_idle("shop.product")


def test_one_event_per_batch_and_action(idle_queue, settings):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "FLUSH_BATCH_SIZE": 1000}
    products = make_products(2500)
    store.get_redis().sadd(store.pending_key("shop.product"), *(f"u:{p.pk}" for p in products))
    store.get_redis().sadd(store.fields_key("shop.product"), "price", "stock")
    flush.flush("shop.product")
    events = emitters.recorded()
    assert len(events) == 3
    assert sorted(pk for event in events for pk in event["pks"]) == [p.pk for p in products]
    assert {event["type"] for event in events} == {"update"}
    assert all(event["fields"] == ["price", "stock"] for event in events)
    assert all(event["model"] == "shop.product" for event in events)


def test_events_carry_pks_and_field_names_but_no_values(idle_queue):
    [product] = make_products(1)
    product.name = "secret name"
    product.save(update_fields=["name"])
    flush.flush("shop.product")
    [event] = emitters.recorded()
    assert event["pks"] == [product.pk]
    assert event["fields"] == ["name"]
    assert "secret name" not in str(event)


def count_round_trips(monkeypatch) -> list[int]:
    """Count requests written to any Redis connection (a pipeline is one)."""
    sent = [0]
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sent[0] += 1
        return original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    return sent


@pytest.mark.parametrize("rows", [2_000, 20_000])
def test_round_trips_grow_with_batches_not_rows(idle_queue, settings, monkeypatch, rows):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "FLUSH_BATCH_SIZE": 1000}
    client = store.get_redis()
    members = [f"u:{pk}" for pk in range(rows)]
    for start in range(0, rows, 5000):
        client.sadd(store.pending_key("shop.product"), *members[start : start + 5000])
    sent = count_round_trips(monkeypatch)
    result = flush.flush("shop.product")
    assert result.rows == rows
    batches = rows // 1000
    # per batch: SSCAN (COUNT is a hint: sometimes two), the token DEL pipeline, the
    # cache's delete_many, one per emitter (two here); a few more per flush
    assert sent[0] <= 6 * batches + 10


def test_a_save_during_a_flush_is_never_dropped(idle_queue, settings):
    """Hold a flush inside its emitter; a save landing then must be flushed later."""
    first, second = make_products(2)
    cached_instance(Product, second.pk)
    first.save()
    Blocking.entered.clear()
    Blocking.release.clear()
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "EMITTERS": ["tests.test_flush.Blocking"]}
    running = threading.Thread(target=flush.flush, args=["shop.product"])
    running.start()
    assert Blocking.entered.wait(10)
    second.price = 99
    second.save()
    Blocking.release.set()
    running.join()
    assert pending("shop.product") == {f"u:{second.pk}"}
    assert idle_queue() == 2  # the save after the drain scheduled its own flush
    flush.flush("shop.product")
    assert cached_instance(Product, second.pk).price == 99


def test_an_abandoned_flush_is_restored_and_rescheduled(idle_queue):
    """A worker killed mid-flush leaves an in-flight set; the sweep puts it back."""
    [product] = make_products(1)
    cached_instance(Product, product.pk)
    Product.objects.filter(pk=product.pk).update(price=5)
    ormbridge.invalidate(Product, [product.pk])
    store.script(store.DRAIN)(
        keys=[
            store.pending_key("shop.product"),
            store.fields_key("shop.product"),
            store.scheduled_key("shop.product"),
            store.inflight_key("shop.product", "dead"),
            store.inflight_key("shop.product", "dead") + ":fields",
            store.inflight_index_key(),
        ],
        args=[0],
    )
    assert pending("shop.product") == set()
    assert not flush.is_idle("shop.product")
    assert flush.restore_abandoned(older_than=60) == 1
    assert pending("shop.product") == {f"i:{product.pk}"}
    assert idle_queue() == 2
    flush.flush("shop.product")
    assert cached_instance(Product, product.pk).price == 5
    assert flush.is_idle("shop.product")


def test_a_recent_in_flight_set_is_left_to_its_flush(idle_queue):
    client = store.get_redis()
    client.sadd(store.inflight_key("shop.product", "live"), "u:1")
    client.zadd(store.inflight_index_key(), {store.inflight_key("shop.product", "live"): 9e12})
    assert flush.restore_abandoned(older_than=60) == 0
    assert pending("shop.product") == set()


def test_orphaned_pending_changes_get_a_flush(idle_queue):
    """A flush task lost with the broker leaves pending changes and no guard."""
    store.get_redis().sadd(store.pending_key("shop.order"), "u:1")
    assert flush.schedule_orphans() == 1
    assert idle_queue() == 1
    assert flush.schedule_orphans() == 0  # guard now set


def test_an_emitter_failure_does_not_fail_the_flush(idle_queue, settings):
    [product] = make_products(1)
    cached_instance(Product, product.pk)
    product.save()
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "EMITTERS": ["tests.test_flush.Exploding"]}
    result = flush.flush("shop.product")
    assert result.emit_failures == 1
    assert get_cache().get(instance_key("shop.product", product.pk)) is None
    [kept] = ChangeBatch.objects.all()  # the change log keeps the batch for the sweep
    assert (kept.model, kept.action, kept.state, kept.pks) == (
        "shop.product",
        "update",
        "pending",
        [str(product.pk)],
    )


class Blocking(emitters.RecordingEmitter):
    """Holds the flush inside its emitter until the test releases it."""

    entered = threading.Event()
    release = threading.Event()

    def emit(self, events):
        self.entered.set()
        self.release.wait(10)
        super().emit(events)


class Exploding(emitters.RecordingEmitter):
    def emit(self, events):
        raise RuntimeError("emitter down")


def test_flush_of_an_unregistered_model_is_refused():
    with pytest.raises(LookupError):
        flush.flush("ormbridge.changebatch")


def test_flush_runs_on_a_real_worker(worker):
    [product] = make_products(1)
    cached_instance(Product, product.pk)
    Product.objects.filter(pk=product.pk).update(stock=3)
    product.refresh_from_db()
    product.save(update_fields=["stock"])
    wait_until(lambda: cached_instance(Product, product.pk).stock == 3, 10, "fresh read")
    wait_until(lambda: flush.is_idle("shop.product"), 10, "idle")
