"""The whole path on real services: writes -> change log -> a worker's relay -> cache, events."""

import importlib
import json
import time

import pytest
from celery import current_app
from django.db import transaction
from django.db.models import Sum

from ormbridge import relay, tasks
from ormbridge.cache import cached_instance
from ormbridge.conf import settings as ormbridge_settings
from ormbridge.models import ChangeBatch
from shop.models import Category, Product
from tests import emitters
from tests.conftest import wait_until
from tests.factories import cached_entry, make_products, undelivered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]


def settled(rows: list) -> list:
    """``rows`` with their creation delivered and the recorded events forgotten."""
    wait_until(lambda: relay.drain().batches == 0 and not undelivered().exists(), 30)
    emitters.clear()
    return rows


def test_ten_thousand_saves_send_no_task_and_every_row_reads_fresh(worker, broker, settings):
    products = settled(make_products(100))
    for product in products:
        cached_instance(Product, product.pk)
    sent_before = broker.info("stats")["total_commands_processed"]
    queue = ormbridge_settings.QUEUE
    for n in range(10_000):
        product = products[n % 100]
        product.stock = n
        product.save(update_fields=["stock"])  # autocommit: a transaction each
        if n % 500 == 0:
            assert cached_instance(Product, product.pk).stock == n  # fresh at once
    assert broker.llen(queue) == 0
    wait_until(lambda: not undelivered().exists(), 60, "the relay to deliver the log")
    fresh = dict(Product.objects.values_list("pk", "stock"))
    assert {p.pk: cached_instance(Product, p.pk).stock for p in products} == fresh
    assert broker.info("stats")["total_commands_processed"] - sent_before < 10_000


def test_a_rolled_back_save_leaves_the_cache_untouched_and_emits_nothing(worker):
    [product] = settled(make_products(1))
    cached_instance(Product, product.pk)
    with pytest.raises(RuntimeError), transaction.atomic():
        product.price = 100
        product.save()
        raise RuntimeError
    Category.objects.create(name="a later, committed change")
    wait_until(lambda: emitters.recorded(), 10, "the later change's event")
    assert [event["model"] for event in emitters.recorded()] == ["shop.category"]
    assert cached_entry("shop.product", product.pk) is not None


def test_a_save_inside_atomic_is_not_delivered_before_the_commit(worker):
    [product] = settled(make_products(1))
    cached_instance(Product, product.pk)
    with transaction.atomic():
        product.price = 100
        product.save()
        time.sleep(1)  # five relay polls
        assert cached_entry("shop.product", product.pk) is not None
        assert emitters.recorded() == []
    assert cached_instance(Product, product.pk).price == 100  # at commit, in this process
    wait_until(lambda: emitters.recorded(), 10, "the relay's event")
    assert [event["pks"] for event in emitters.recorded()] == [[product.pk]]


def test_tasks_reach_the_configured_queue_as_json_without_routes(no_relay, broker, settings):
    tasks.enqueue(tasks.sweep)
    message = json.loads(broker.lindex(ormbridge_settings.QUEUE, 0))
    assert message["content-type"] == "application/json"
    assert message["headers"]["task"] == "ormbridge.sweep"
    assert current_app.conf.task_routes is None


def test_changes_are_fresh_with_eager_tasks_and_no_worker(no_relay):
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


def test_the_sweep_prunes_delivered_rows_past_retention_and_delivers_the_rest(no_relay, settings):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "LOG_RETENTION": 0}
    make_products(3)
    relay.drain()
    assert ChangeBatch.objects.filter(state=ChangeBatch.State.DONE).exists()
    make_products(2)
    tasks.sweep.apply()
    assert not ChangeBatch.objects.exclude(state=ChangeBatch.State.DONE).exists()
    # Only the rows just delivered are left: pruning waits for delivery.
    assert ChangeBatch.objects.aggregate(rows=Sum("rows"))["rows"] == 2


def test_the_sweep_keeps_delivered_rows_within_retention(no_relay):
    make_products(3)
    relay.drain()
    tasks.sweep.apply()
    assert ChangeBatch.objects.filter(state=ChangeBatch.State.DONE).exists()


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
    for task in (tasks.sweep, tasks.resume_resync):
        assert task.acks_late and task.reject_on_worker_lost and task.ignore_result
