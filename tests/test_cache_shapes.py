"""The cache is right for every model shape and read path (issue 9, point 1).

Proxies, multi-table inheritance, ``prefetch_related`` / ``select_related``
(readers whose snapshot predates a write, and reads routed to a replica, are in
tests/test_cache_visibility.py). Most tests deliver the change log themselves
(``no_relay`` and ``relay.drain()``), their setup's rows before the first cached
read, so that only the change under test can invalidate it; the ``worker`` tests go end to
end through a real worker.
Generic relations: ``shop.Note`` is attached to products by a generic foreign
key, and ``Product.notes`` is its ``GenericRelation``.
"""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.db.models import Model, Prefetch
from django.test.utils import CaptureQueriesContext

import ormbridge
from ormbridge import relay
from ormbridge.cache import cached_instance
from shop.models import Category, DigitalProduct, DiscountedProduct, Note, Order, Product, Tag
from tests.factories import make_products, wait_delivered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]


def cached_queryset(queryset: Any) -> list[Any]:
    """The rows ``ormbridge.cached_queryset(queryset)`` returns, as a list."""
    return list(ormbridge.cached_queryset(queryset))


def set_price(model: type[Model], pk: int, price: str) -> None:
    """Load the row through ``model``, change its price and ``save()`` it."""
    row = model._default_manager.get(pk=pk)
    row.price = Decimal(price)
    row.save()


_serial = itertools.count()


def make_digital(price: str = "1.00") -> DigitalProduct:
    category, _ = Category.objects.get_or_create(name="downloads")
    return DigitalProduct.objects.create(
        sku=f"digital-{next(_serial)}",
        name="an e-book",
        category=category,
        price=Decimal(price),
        download_url="https://example.com/book",
    )


def related_names(rows: list[Any], relation: str, field: str = "name") -> list[list[str]]:
    """Each row's related objects' ``field``, sorted; read without any query, so only
    from what the rows carry (their prefetched objects)."""
    with CaptureQueriesContext(connection) as queries:
        names = [sorted(str(getattr(o, field)) for o in getattr(r, relation).all()) for r in rows]
    assert queries.captured_queries == [], f"{relation} of the cached rows were not prefetched"
    return names


def write_and_deliver(pk: int | None, price: str) -> None:
    """Commit a new price (of one product, or of all with ``pk=None``) and deliver it."""
    if pk is None:
        Product.objects.update(price=Decimal(price))
    else:
        set_price(Product, pk, price)
    relay.drain()


# -- proxy models


def test_a_cached_proxy_queryset_is_fresh_after_a_save_through_the_concrete_model(no_relay):
    [product] = make_products(1)
    relay.drain()
    query = DiscountedProduct.objects.order_by("pk")
    assert [p.price for p in cached_queryset(query)] == [Decimal("1.00")]
    set_price(Product, product.pk, "4.00")
    relay.drain()
    assert [p.price for p in cached_queryset(query)] == [Decimal("4.00")]


def test_a_proxy_queryset_is_not_served_the_concrete_models_entry(no_relay):
    make_products(2)
    cached_queryset(Product.objects.order_by("pk"))  # the same SQL as the proxy's
    rows = cached_queryset(DiscountedProduct.objects.order_by("pk"))
    assert [type(row) for row in rows] == [DiscountedProduct, DiscountedProduct]


def test_invalidating_the_concrete_model_reloads_a_cached_proxy_instance(
    no_relay, product_triggers_uninstalled
):
    [product] = make_products(1)
    relay.drain()
    cached_instance(DiscountedProduct, product.pk)
    Product.objects.filter(pk=product.pk).update(price=Decimal("6.00"))  # no trigger logs it
    ormbridge.invalidate(Product)
    relay.drain()
    assert cached_instance(DiscountedProduct, product.pk).price == Decimal("6.00")


# -- multi-table inheritance: DigitalProduct's rows span shop_product and shop_digitalproduct


def test_a_cached_child_instance_is_fresh_after_an_update_of_its_parent_row(no_relay):
    child = make_digital(price="1.00")
    relay.drain()
    assert cached_instance(DigitalProduct, child.pk).price == Decimal("1.00")
    Product.objects.filter(pk=child.pk).update(price=Decimal("7.00"))
    relay.drain()
    assert cached_instance(DigitalProduct, child.pk).price == Decimal("7.00")


def test_a_cached_child_instance_is_fresh_after_its_parent_part_is_saved_through_product(
    no_relay,
):
    child = make_digital()
    relay.drain()
    cached_instance(DigitalProduct, child.pk)
    parent = Product.objects.get(pk=child.pk)
    parent.name = "a renamed e-book"
    parent.save()
    relay.drain()
    cached = cached_instance(DigitalProduct, child.pk)
    assert (cached.name, cached.download_url) == ("a renamed e-book", "https://example.com/book")


def test_a_cached_parent_instance_is_fresh_after_a_child_save_changes_a_parent_field(no_relay):
    child = make_digital(price="1.00")
    relay.drain()
    assert cached_instance(Product, child.pk).price == Decimal("1.00")
    set_price(DigitalProduct, child.pk, "8.00")
    relay.drain()
    assert cached_instance(Product, child.pk).price == Decimal("8.00")


def test_a_cached_child_queryset_is_fresh_after_its_parent_rows_change(no_relay):
    child = make_digital(price="1.00")
    relay.drain()
    query = DigitalProduct.objects.order_by("pk")
    assert [p.price for p in cached_queryset(query)] == [Decimal("1.00")]
    Product.objects.filter(pk=child.pk).update(price=Decimal("9.00"))
    relay.drain()
    assert [p.price for p in cached_queryset(query)] == [Decimal("9.00")]


def test_with_a_worker_a_cached_child_instance_is_fresh_after_its_parent_row_changes(worker):
    child = make_digital(price="1.00")
    wait_delivered()
    assert cached_instance(DigitalProduct, child.pk).price == Decimal("1.00")
    Product.objects.filter(pk=child.pk).update(price=Decimal("3.00"))
    wait_delivered()
    assert cached_instance(DigitalProduct, child.pk).price == Decimal("3.00")


# -- prefetch_related and select_related


def tagged_product(*tags: str) -> Product:
    [product] = make_products(1)
    product.tags.add(*(Tag.objects.get_or_create(name=name)[0] for name in tags))
    return product


def test_a_prefetched_queryset_is_fresh_after_a_prefetched_tag_is_renamed(no_relay):
    tagged_product("sale")
    relay.drain()
    query = Product.objects.prefetch_related("tags")
    assert related_names(cached_queryset(query), "tags") == [["sale"]]
    tag = Tag.objects.get(name="sale")
    tag.name = "clearance"
    tag.save()
    relay.drain()
    assert related_names(cached_queryset(query), "tags") == [["clearance"]]


def test_a_prefetched_queryset_is_fresh_after_a_tag_is_added_to_a_product(no_relay):
    product = tagged_product("sale")
    relay.drain()
    query = Product.objects.prefetch_related("tags")
    assert related_names(cached_queryset(query), "tags") == [["sale"]]
    product.tags.add(Tag.objects.create(name="new"))  # a row of the m2m table only
    relay.drain()
    assert related_names(cached_queryset(query), "tags") == [["new", "sale"]]


def test_a_query_without_the_prefetch_is_not_served_the_prefetched_entry(
    no_relay, django_assert_num_queries
):
    tagged_product("sale")
    cached_queryset(Product.objects.prefetch_related("tags").order_by("pk"))
    with django_assert_num_queries(1):
        rows = cached_queryset(Product.objects.order_by("pk"))
    assert [hasattr(row, "_prefetched_objects_cache") for row in rows] == [False]


def test_a_prefetching_query_is_not_served_the_plain_entry(no_relay, django_assert_num_queries):
    tagged_product("sale")
    cached_queryset(Product.objects.order_by("pk"))
    with django_assert_num_queries(2):  # the products, then their tags
        rows = cached_queryset(Product.objects.prefetch_related("tags").order_by("pk"))
    assert related_names(rows, "tags") == [["sale"]]


def test_prefetches_with_different_querysets_do_not_share_an_entry(no_relay):
    tagged_product("new", "sale")

    def prefetching(name: str) -> Any:
        return Product.objects.prefetch_related(
            Prefetch("tags", queryset=Tag.objects.filter(name=name))
        )

    assert related_names(cached_queryset(prefetching("sale")), "tags") == [["sale"]]
    assert related_names(cached_queryset(prefetching("new")), "tags") == [["new"]]


def test_a_reverse_foreign_key_prefetch_is_fresh_after_an_order_changes(no_relay):
    [product] = make_products(1)
    order = Order.objects.create(product=product)
    relay.drain()
    query = Product.objects.prefetch_related("orders")
    assert related_names(cached_queryset(query), "orders", "status") == [["new"]]
    order.status = Order.Status.PAID
    order.save()
    relay.drain()
    assert related_names(cached_queryset(query), "orders", "status") == [["paid"]]


def test_a_prefetch_through_an_attribute_that_is_not_a_relation_is_fresh(no_relay):
    product = tagged_product("sale")
    relay.drain()
    # Valid Django: "tag_list" is the list the first lookup stores, not a relation; which
    # rows the second lookup reads is learnt from the statements the first load runs.
    query = Product.objects.prefetch_related(
        Prefetch("tags", to_attr="tag_list"), "tag_list__products"
    )
    cached_queryset(query)  # learns the tables the lookups read: not stored yet
    with CaptureQueriesContext(connection) as queries:
        [row] = cached_queryset(query)
    assert queries.captured_queries == [], "the tables the lookups read were not learnt"
    assert [p.name for p in row.tag_list[0].products.all()] == [product.name]
    product.name = "renamed"
    product.save()
    relay.drain()
    [row] = cached_queryset(query)
    assert [p.name for p in row.tag_list[0].products.all()] == ["renamed"]


def test_a_select_related_queryset_is_fresh_after_its_category_is_renamed(no_relay):
    category = Category.objects.create(name="books")
    make_products(1, category=category)
    relay.drain()
    query = Product.objects.select_related("category")
    with CaptureQueriesContext(connection) as queries:
        assert [p.category.name for p in cached_queryset(query)] == ["books"]
    assert len(queries.captured_queries) <= 1  # the category came with its product
    category.name = "novels"
    category.save()
    relay.drain()
    assert [p.category.name for p in cached_queryset(query)] == ["novels"]


def note_on(product: Product, text: str) -> Note:
    return Note.objects.create(subject=product, text=text)


def test_a_query_through_a_generic_relation_is_fresh_after_a_note_is_added(no_relay):
    [product] = make_products(1)
    relay.drain()
    query = Product.objects.filter(notes__text="fragile")
    assert cached_queryset(query) == []
    note_on(product, "fragile")
    relay.drain()
    assert cached_queryset(query) == [product]


def test_a_generic_relation_prefetch_is_fresh_after_a_note_changes(no_relay):
    [product] = make_products(1)
    note = note_on(product, "fragile")
    relay.drain()
    query = Product.objects.prefetch_related("notes")
    assert related_names(cached_queryset(query), "notes", "text") == [["fragile"]]
    note.text = "heavy"
    note.save()
    relay.drain()
    assert related_names(cached_queryset(query), "notes", "text") == [["heavy"]]


def test_a_generic_foreign_key_prefetch_is_fresh_after_its_subject_changes(no_relay):
    [product] = make_products(1)
    note_on(product, "fragile")
    relay.drain()
    query = Note.objects.prefetch_related("subject")  # rows of any model: learnt from the load
    cached_queryset(query)  # learns that the subjects are products: not stored
    cached_queryset(query)  # stored
    with CaptureQueriesContext(connection) as queries:
        assert [note.subject.name for note in cached_queryset(query)] == [product.name]
    assert queries.captured_queries == [], "the subject's table was not learnt"
    product.name = "renamed"
    product.save()
    relay.drain()
    assert [note.subject.name for note in cached_queryset(query)] == ["renamed"]


def test_with_a_worker_a_prefetched_queryset_is_fresh_after_a_tag_is_renamed(worker):
    tagged_product("sale")
    wait_delivered()
    query = Product.objects.prefetch_related("tags")
    assert related_names(cached_queryset(query), "tags") == [["sale"]]
    Tag.objects.filter(name="sale").update(name="clearance")
    wait_delivered()
    assert related_names(cached_queryset(query), "tags") == [["clearance"]]
