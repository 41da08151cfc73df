"""The dependency-tracked cache: fresh reads, O(1) query invalidation, no stale sets."""

import random
import threading
import time
from decimal import Decimal

import pytest
from django.db import connection, transaction

import ormbridge
from ormbridge import redis_store, relay
from ormbridge.cache import TOKEN_GRACE, cached_instance, instance_key
from ormbridge.models import ChangeBatch
from ormbridge.querysets import cached_queryset
from shop.models import Category, Customer, DiscountedProduct, Order, Product, Tag
from tests.conftest import wait_until
from tests.factories import make_products

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]


def test_a_miss_loads_and_caches_the_instance(no_relay, django_assert_num_queries):
    [product] = make_products(1)
    with django_assert_num_queries(1):
        assert cached_instance(Product, product.pk) == product
    with django_assert_num_queries(0):
        assert cached_instance(Product, str(product.pk)).name == product.name


def test_a_missing_row_raises_does_not_exist(no_relay):
    with pytest.raises(Product.DoesNotExist):
        cached_instance(Product, 424242)


def test_an_unregistered_model_is_refused():
    with pytest.raises(LookupError, match="not registered"):
        cached_instance(ChangeBatch, 1)


def test_a_flushed_change_is_read_fresh(no_relay):
    [product] = make_products(1)
    cached_instance(Product, product.pk)
    product.price = 12
    product.save()
    relay.drain()
    assert cached_instance(Product, product.pk).price == 12


def test_invalidating_a_model_reloads_all_its_instances(no_relay, django_assert_num_queries):
    products = make_products(3)
    for product in products:
        cached_instance(Product, product.pk)
    Product.objects.update(stock=9)  # behind ormbridge's back
    ormbridge.invalidate(Product)
    relay.drain()
    with django_assert_num_queries(3):
        assert [cached_instance(Product, p.pk).stock for p in products] == [9, 9, 9]


def test_a_cached_queryset_is_served_until_its_model_changes_by_any_writer(
    no_relay, django_assert_num_queries
):
    make_products(2)
    query = Product.objects.order_by("pk")
    assert len(cached_queryset(query)) == 2
    with django_assert_num_queries(0):
        assert len(cached_queryset(Product.objects.order_by("pk"))) == 2
    make_products(1, price="2")  # bulk_create sends no signal; the trigger sees it
    assert len(cached_queryset(query)) == 3


def test_a_queryset_is_invalidated_by_a_joined_model(no_relay):
    category = Category.objects.create(name="books")
    make_products(2, category=category)
    query = Product.objects.filter(category__name="books")
    assert len(cached_queryset(query)) == 2
    category.name = "novels"
    category.save()
    relay.drain()
    assert list(cached_queryset(query)) == []


def test_a_queryset_is_invalidated_by_a_subquery_model(no_relay):
    [product] = make_products(1)
    query = Product.objects.filter(pk__in=Order.objects.values("product_id"))
    assert list(cached_queryset(query)) == []
    Order.objects.create(product=product)
    relay.drain()
    assert list(cached_queryset(query)) == [product]


def test_a_queryset_is_invalidated_by_an_m2m_change(no_relay):
    [product] = make_products(1)
    tag = Tag.objects.create(name="sale")
    query = Product.objects.filter(tags__name="sale")
    assert list(cached_queryset(query)) == []
    product.tags.add(tag)
    relay.drain()
    assert list(cached_queryset(query)) == [product]


def test_a_queryset_reading_an_unregistered_model_is_refused():
    with pytest.raises(LookupError, match=r"reads ormbridge\.changebatch"):
        cached_queryset(ChangeBatch.objects.all())


def test_all_cached_querysets_of_a_model_go_with_one_key(no_relay, django_assert_num_queries):
    make_products(1)
    for n in range(50):
        cached_queryset(Product.objects.filter(stock__gte=n))
    generation = redis_store.generation_key("shop.product")
    assert redis_store.get_redis().exists(generation)
    ormbridge.invalidate(Product, [1])
    relay.drain()
    assert not redis_store.get_redis().exists(generation)
    with django_assert_num_queries(50):
        for n in range(50):
            cached_queryset(Product.objects.filter(stock__gte=n))


def test_reads_survive_redis_being_down(no_relay, redis_servers):
    [product] = make_products(1)
    redis_servers["ormbridge"].stop()
    assert cached_instance(Product, product.pk) == product
    assert len(cached_queryset(Product.objects.all())) == 1


def slow_selects(execute, sql, params, many, context):
    """Widen the window between a reader's SELECT and its cache store."""
    result = execute(sql, params, many, context)
    if sql.lstrip().upper().startswith("SELECT"):
        time.sleep(random.uniform(0, 0.003))
    return result


def test_a_reader_racing_a_writer_never_leaves_a_stale_value(no_relay):
    """Readers hammer the cache while a writer commits and flushes, many times over.

    A reader that loaded the old row before the commit may store it after the
    flush ran; once the readers are done, the cache must still serve the new row.
    """
    [product] = make_products(1)
    rounds, readers = 200, 3
    start, finish = threading.Barrier(readers + 1), threading.Barrier(readers + 1)
    written = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            with connection.execute_wrapper(slow_selects):
                for _ in range(rounds):
                    start.wait()
                    while not written.is_set():
                        cached_instance(Product, product.pk)
                    finish.wait()
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)
            start.abort()
            finish.abort()
        finally:
            connection.close()

    threads = [threading.Thread(target=read) for _ in range(readers)]
    for thread in threads:
        thread.start()
    stale = []
    try:
        for value in range(1, rounds + 1):
            written.clear()
            redis_store.entries_redis().delete(
                instance_key("shop.product", product.pk)
            )  # a cold entry
            start.wait()
            time.sleep(0.002)  # let the readers get going
            Product.objects.filter(pk=product.pk).update(stock=value)
            ormbridge.invalidate(Product, [product.pk])
            relay.drain()
            written.set()
            finish.wait()
            got = cached_instance(Product, product.pk).stock
            if got != value:
                stale.append((value, got))
    finally:
        written.set()
        for thread in threads:
            thread.join(10)
    assert not errors
    assert stale == []


@pytest.mark.parametrize("writer", [Product, DiscountedProduct])
def test_a_cached_proxy_instance_is_fresh_after_a_write_through_either_class(no_relay, writer):
    [product] = make_products(1)
    assert cached_instance(DiscountedProduct, product.pk).price == Decimal("1.00")
    row = writer.objects.get(pk=product.pk)
    row.price = Decimal("5.00")
    row.save()
    cached = cached_instance(DiscountedProduct, product.pk)
    assert (type(cached), cached.price) == (DiscountedProduct, Decimal("5.00"))


def test_an_instance_is_cached_by_a_unique_field(no_relay, django_assert_num_queries):
    category = Category.objects.create(name="books")
    assert cached_instance(Category, name="books") == category
    with django_assert_num_queries(0):
        assert cached_instance(Category, name="books").name == "books"
    category.name = "novels"
    category.save()
    with pytest.raises(Category.DoesNotExist):
        cached_instance(Category, name="books")
    assert cached_instance(Category, name="novels").pk == category.pk


def test_an_instance_is_cached_by_its_slug(no_relay, django_assert_num_queries):
    category = Category.objects.create(name="Books")
    assert cached_instance(Category, slug="books") == category
    with django_assert_num_queries(0):
        assert cached_instance(Category, slug="books").name == "Books"


def test_a_lookup_that_is_not_unique_is_refused(no_relay):
    with pytest.raises(
        TypeError, match=r"name=\.\.\.\): that lookup is not unique on shop\.Product"
    ):
        cached_instance(Product, name="product 1")
    with pytest.raises(TypeError, match="takes a pk or a unique lookup"):
        cached_instance(Product, 1, sku="sku-1")


def test_a_models_own_timeout_from_settings_applies_to_its_entries(no_relay):
    """The example registers Customer through MODELS as a dict with cache_timeout 600."""
    customer = Customer.objects.create(email="ann@example.com")
    category = Category.objects.create(name="default timeout")
    cached_instance(Customer, customer.pk)
    cached_instance(Category, category.pk)
    client = redis_store.get_redis()
    assert (
        600 < client.ttl(redis_store.token_key("shop.customer", customer.pk)) <= 600 + TOKEN_GRACE
    )
    assert client.ttl(redis_store.token_key("shop.category", category.pk)) > 3600  # CACHE_TIMEOUT


def test_a_transaction_that_wrote_reads_its_own_rows_and_stores_none(no_relay):
    make_products(1)
    query = Product.objects.order_by("pk")
    assert len(cached_queryset(query)) == 1
    with pytest.raises(RuntimeError), transaction.atomic():
        make_products(1, price="2")
        assert len(cached_queryset(query)) == 2  # not the entry cached before the write
        assert len(Product.objects.cache().order_by("pk")) == 2
        raise RuntimeError("roll back")
    assert len(cached_queryset(query)) == 1  # nothing of the rolled-back row was stored


def test_hits_reach_redis_within_seconds_without_another_read(no_relay):
    [product] = make_products(1)
    relay.drain()
    cached_instance(Product, product.pk)  # a miss
    cached_instance(Product, product.pk)  # a hit, counted in memory
    client = redis_store.get_redis()
    wait_until(
        lambda: client.hget(redis_store.stats_key("shop.product"), "hits") == "1",
        10,
        "the hit to be counted in Redis",
    )
