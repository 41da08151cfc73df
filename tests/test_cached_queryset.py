"""CachedQuerySet, CachedManager and cached_queryset(): the surface cacheops users know (issue 9).

The example's ``Product.objects`` is an ``ormbridge.CachedManager``. Each
test delivers its setup's change-log rows before the first cached read
(``relay.drain()``), so that only the change under test can invalidate it.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from django.db import models
from django.db.models import Max, Sum

import ormbridge
from ormbridge import redis_store, relay, stats
from ormbridge.cache import cached_instance, instance_key
from shop.models import Category, Customer, Product
from tests import commands
from tests.factories import make_products

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]


class MyQuerySet(models.QuerySet):
    """A project's own QuerySet, as a project would have it."""

    def expensive(self) -> MyQuerySet:
        return self.filter(price__gt=10)


class Combined(ormbridge.CachedQuerySet, MyQuerySet):
    pass


def products() -> Any:
    """A new cached queryset of every product (a queryset keeps its own results)."""
    return Product.objects.order_by("pk").cache()


def set_price(product: Product, price: str) -> None:
    product.price = Decimal(price)
    product.save()


# -- each cached read: served from the cache, fresh after a committed change


def test_a_cached_count_is_served_from_the_cache_until_a_product_is_added(
    no_relay, django_assert_num_queries
):
    make_products(2)
    relay.drain()
    assert products().count() == 2
    with django_assert_num_queries(0):
        assert products().count() == 2
    make_products(1)
    relay.drain()
    assert products().count() == 3


def test_a_cached_get_is_fresh_in_the_writers_process_right_after_its_commit(
    no_relay, django_assert_num_queries
):
    [product] = make_products(1)
    relay.drain()
    assert Product.objects.cache().get(pk=product.pk).price == Decimal("1.00")
    with django_assert_num_queries(0):
        assert Product.objects.cache().get(pk=product.pk).price == Decimal("1.00")
    set_price(product, "2.50")  # no relay runs: the commit itself invalidates
    assert Product.objects.cache().get(pk=product.pk).price == Decimal("2.50")


def test_a_cached_exists_is_served_from_the_cache_until_a_product_changes(
    no_relay, django_assert_num_queries
):
    [product] = make_products(1)
    relay.drain()
    in_stock = Product.objects.filter(stock__gt=0)
    assert in_stock.cache().exists() is False
    with django_assert_num_queries(0):
        assert in_stock.cache().exists() is False
    Product.objects.filter(pk=product.pk).update(stock=5)
    relay.drain()
    assert in_stock.cache().exists() is True


def test_a_cached_aggregate_is_served_from_the_cache_until_a_price_changes(
    no_relay, django_assert_num_queries
):
    [product, _] = make_products(2, price="1.50")
    relay.drain()
    assert products().aggregate(Sum("price")) == {"price__sum": Decimal("3.00")}
    with django_assert_num_queries(0):
        assert products().aggregate(Sum("price")) == {"price__sum": Decimal("3.00")}
    set_price(product, "4.00")
    relay.drain()
    assert products().aggregate(Sum("price")) == {"price__sum": Decimal("5.50")}


def test_different_aggregates_of_the_same_query_do_not_share_an_entry(no_relay):
    make_products(1, price="1.50")
    make_products(1, price="2.00")
    assert products().aggregate(total=Sum("price")) == {"total": Decimal("3.50")}
    assert products().aggregate(total=Max("price")) == {"total": Decimal("2.00")}


def test_a_cached_first_is_served_from_the_cache_until_the_first_product_changes(
    no_relay, django_assert_num_queries
):
    [first, _] = make_products(2)
    relay.drain()
    assert products().first().pk == first.pk
    with django_assert_num_queries(0):
        assert products().first().name == first.name
    first.name = "renamed"
    first.save()
    relay.drain()
    assert products().first().name == "renamed"


def test_cached_iteration_is_served_from_the_cache_until_a_product_changes(
    no_relay, django_assert_num_queries
):
    made = make_products(2)
    relay.drain()
    assert [p.pk for p in products()] == [p.pk for p in made]
    with django_assert_num_queries(0):
        assert [p.price for p in products()] == [Decimal("1.00")] * 2
    set_price(made[1], "3.00")
    relay.drain()
    assert [p.price for p in products()] == [Decimal("1.00"), Decimal("3.00")]


def test_cache_survives_further_filtering_and_ordering(no_relay, django_assert_num_queries):
    make_products(2, price="20.00")
    query = Product.objects.cache().filter(price__gt=10).order_by("-pk")
    assert len(list(query)) == 2
    with django_assert_num_queries(0):
        assert len(list(Product.objects.cache().filter(price__gt=10).order_by("-pk"))) == 2


# -- what is not cached


def test_nocache_undoes_cache(no_relay, django_assert_num_queries):
    make_products(1)
    for _ in range(2):
        with django_assert_num_queries(1):
            assert Product.objects.cache().nocache().count() == 1


def test_a_queryset_without_cache_is_not_cached(no_relay, django_assert_num_queries):
    make_products(1)
    for _ in range(2):
        with django_assert_num_queries(1):
            assert len(list(Product.objects.all())) == 1


# -- result shapes


def test_values_and_values_lists_of_the_same_query_do_not_share_entries(no_relay):
    [product] = make_products(1)
    query = products().filter(pk=product.pk)
    assert list(query.values("sku")) == [{"sku": product.sku}]
    assert list(query.values_list("sku")) == [(product.sku,)]
    assert list(query.values_list("sku", flat=True)) == [product.sku]
    [row] = query.values_list("sku", named=True)
    assert row.sku == product.sku
    assert list(query) == [product]


# -- a project's own QuerySet


def test_a_combined_queryset_keeps_the_projects_methods_and_caches(
    no_relay, django_assert_num_queries
):
    make_products(1, price="5.00")
    [dear] = make_products(1, price="50.00")
    assert [p.pk for p in Combined(model=Product).expensive().cache()] == [dear.pk]
    with django_assert_num_queries(0):
        assert [p.pk for p in Combined(model=Product).expensive().cache()] == [dear.pk]


def test_a_manager_of_a_combined_queryset_caches(no_relay, django_assert_num_queries):
    [dear] = make_products(1, price="50.00")
    manager = Combined.as_manager()
    manager.model = Product  # what contribute_to_class() does for a model's manager
    assert manager.expensive().cache().get().pk == dear.pk
    with django_assert_num_queries(0):
        assert manager.expensive().cache().get().pk == dear.pk


# -- cached_queryset()


def test_cached_queryset_returns_an_evaluated_queryset(no_relay, django_assert_num_queries):
    made = make_products(3)
    ormbridge.cached_queryset(Product.objects.order_by("pk"))  # a miss stores it
    with django_assert_num_queries(0):
        rows = ormbridge.cached_queryset(Product.objects.order_by("pk"))
        assert isinstance(rows, models.QuerySet)
        assert rows.count() == 3
        assert len(rows) == 3
        assert [p.pk for p in rows] == [p.pk for p in made]
        assert (rows[0].pk, rows[2].pk) == (made[0].pk, made[2].pk)


def test_cached_queryset_of_a_miss_is_evaluated_too(no_relay, django_assert_num_queries):
    made = make_products(2)
    rows = ormbridge.cached_queryset(Product.objects.order_by("pk"))
    with django_assert_num_queries(0):
        assert (rows.count(), len(rows), rows[1].name) == (2, 2, made[1].name)


# -- figures and timeouts


def cache_figures(label: str) -> dict[str, int]:
    done = commands.run("ormbridge_status", "--json")
    assert done.stdout, done.stderr  # without a worker it exits 1, with every figure
    [model] = [m for m in json.loads(done.stdout)["models"] if m["model"] == label]
    return model["cache"]


def test_status_shows_the_hits_and_misses_of_a_scripted_sequence_of_reads(no_relay):
    [product] = make_products(1)
    relay.drain()  # the insert: one row invalidated
    cached_instance(Product, product.pk)  # miss, stored
    cached_instance(Product, product.pk)  # hit
    cached_instance(Product, product.pk)  # hit
    products().count()  # miss, stored
    products().count()  # hit
    set_price(product, "9.00")
    relay.drain()  # the update: one row invalidated
    cached_instance(Product, product.pk)  # miss, stored
    products().count()  # miss, stored
    stats.counts.send()  # hits reach Redis at most a second late; the test does not wait
    figures = cache_figures("shop.product")
    assert figures == {
        "hits": 3,
        "misses": 4,
        "stores": 4,
        "uncached": 0,
        "uncached_by_reason": {},
        "invalidations": 2,
    }


def test_cache_with_a_timeout_gives_its_entry_that_lifetime(no_relay):
    make_products(1)
    assert Product.objects.cache(timeout=30).count() == 1
    client = redis_store.get_redis()
    [entry] = client.keys(redis_store.key("entry", "*"))  # the only entry in this test's Redis
    assert 0 < client.ttl(entry) <= 30


def test_a_models_own_timeout_from_settings_applies_to_its_entries(no_relay):
    """The example lists Customer in MODELS as a dict, with cache_timeout 600."""
    customer = Customer.objects.create(email="ann@example.com")
    category = Category.objects.create(name="default timeout")
    cached_instance(Customer, customer.pk)
    cached_instance(Category, category.pk)
    client = redis_store.get_redis()
    assert 0 < client.ttl(instance_key("shop.customer", customer.pk)) <= 600
    assert client.ttl(instance_key("shop.category", category.pk)) > 600  # CACHE_TIMEOUT


def test_a_cached_get_by_pk_survives_a_write_to_another_row(no_relay, django_assert_num_queries):
    first, second = make_products(2)
    relay.drain()
    assert Product.objects.cache().get(pk=first.pk) == first
    set_price(second, "9.00")
    relay.drain()
    with django_assert_num_queries(0):
        assert Product.objects.cache().get(pk=first.pk) == first
        assert cached_instance(Product, first.pk) == first  # the same entry


def test_a_cached_get_by_pk_is_fresh_after_its_row_changes(no_relay):
    [product] = make_products(1)
    relay.drain()
    Product.objects.cache().get(id=product.pk)
    set_price(product, "9.00")
    relay.drain()
    assert Product.objects.cache().get(id=product.pk).price == Decimal("9.00")


def test_a_query_in_random_order_is_not_cached(no_relay, django_assert_num_queries):
    make_products(2)
    list(Product.objects.cache().order_by("?"))
    with django_assert_num_queries(1):
        assert len(Product.objects.cache().order_by("?")) == 2
