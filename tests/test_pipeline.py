"""The whole path on real services: saves -> Redis -> Celery worker -> fresh cache."""

import importlib
import json
import time

import pytest
from celery import current_app
from django.db import transaction

from ormbridge import flush, store, tasks
from ormbridge.cache import cached_instance, get_cache, instance_key
from shop.models import Category, Product
from tests import emitters
from tests.conftest import wait_until
from tests.factories import make_products

pytestmark = pytest.mark.django_db(transaction=True)


def test_ten_thousand_saves_make_tens_of_flushes_and_every_row_reads_fresh(worker, settings):
    delay = 0.5
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "FLUSH_DELAY": delay}
    products = make_products(100)
    for product in products:
        cached_instance(Product, product.pk)

    started = time.monotonic()
    for n in range(10_000):
        product = products[n % 100]
        product.stock = n
        product.save(update_fields=["stock"])  # autocommit: a transaction each
        if n % 500 == 0:
            cached_instance(Product, product.pk)  # readers keep caching meanwhile
    elapsed = time.monotonic() - started

    wait_until(lambda: flush.is_idle("shop.product"), 30, "the last flush")
    flushes = int(store.get_redis().hget(store.stats_key("shop.product"), "flushes"))
    windows = elapsed / delay
    assert flushes <= windows + 3, f"{flushes} flushes in {elapsed:.1f} s"
    assert flushes < 100
    fresh = dict(Product.objects.values_list("pk", "stock"))
    assert {p.pk: cached_instance(Product, p.pk).stock for p in products} == fresh


def test_a_rolled_back_save_leaves_the_cache_untouched_and_emits_nothing(worker):
    [product] = make_products(1)
    cached_instance(Product, product.pk)
    with pytest.raises(RuntimeError), transaction.atomic():
        product.price = 100
        product.save()
        raise RuntimeError
    Category.objects.create(name="a later, committed change")
    wait_until(lambda: emitters.recorded(), 10, "the later change's event")
    assert [event["model"] for event in emitters.recorded()] == ["shop.category"]
    assert get_cache().get(instance_key("shop.product", product.pk)) is not None


def test_a_save_inside_atomic_is_not_flushed_before_the_commit(worker):
    [product] = make_products(1)
    cached_instance(Product, product.pk)
    with transaction.atomic():
        product.price = 100
        product.save()
        time.sleep(1)  # five debounce windows
        assert get_cache().get(instance_key("shop.product", product.pk)) is not None
        assert emitters.recorded() == []
    wait_until(lambda: cached_instance(Product, product.pk).price == 100, 10, "the flush")
    assert [event["pks"] for event in emitters.recorded()] == [[product.pk]]


def test_tasks_reach_the_configured_queue_as_json_without_routes(idle_queue, broker, settings):
    tasks.enqueue(tasks.flush_invalidations, "shop.product", countdown=1)
    assert idle_queue() == 1
    message = json.loads(broker.lindex(settings.ORMBRIDGE["QUEUE"], 0))
    assert message["content-type"] == "application/json"
    assert message["headers"]["task"] == "ormbridge.flush_invalidations"
    assert current_app.conf.task_routes is None


def test_the_pipeline_works_with_eager_tasks(settings):
    """Projects whose tests run Celery eagerly get their invalidations at commit."""
    current_app.conf.task_always_eager = True
    try:
        [product] = make_products(1)
        cached_instance(Product, product.pk)
        product.price = 3
        product.save()
        assert cached_instance(Product, product.pk).price == 3
    finally:
        current_app.conf.task_always_eager = False


def test_the_reference_celeryconfig_is_json_only_and_late_acking(monkeypatch):
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://broker.example:6379/3")
    monkeypatch.setenv("ORMBRIDGE_QUEUE", "invalidation")
    config = importlib.reload(importlib.import_module("celeryconfig"))
    assert config.broker_url == "redis://broker.example:6379/3"
    assert config.accept_content == ["json"]
    assert (config.task_serializer, config.result_serializer) == ("json", "json")
    assert config.task_acks_late and config.task_reject_on_worker_lost
    assert config.task_routes == {"ormbridge.*": {"queue": "invalidation"}}


def test_task_options_survive_a_dead_worker():
    for task in (tasks.flush_invalidations, tasks.process_change_batch, tasks.sweep_outbox):
        assert task.acks_late and task.reject_on_worker_lost and task.ignore_result
