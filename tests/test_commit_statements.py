"""Read-your-writes for every statement form (issue 16, item 9): what the commit path recognises.

The committing process invalidates at commit what each statement it ran wrote
to a captured table (``ormbridge.commit``). Django's backends write with more
than ``INSERT INTO`` / ``UPDATE`` / ``DELETE FROM``: PostgreSQL's ``flush`` is
one ``TRUNCATE`` of every table, SQLite's m2m ``add()`` and
``bulk_create(ignore_conflicts=True)`` are ``INSERT OR IGNORE INTO``, and raw
SQL comes in any case, quoting and shape. These tests specify that:

- every such write, made through the ORM where Django emits it or as raw SQL,
  is read fresh right after its commit, with no relay running (``no_relay``),
  so only the commit path can have invalidated (Redis is shared: a read here
  after the commit reads what any process reads, ``tests/test_freshness.py``
  checks another process);
- rows are exact for the statements of ``save()`` and ``delete()``, a plain
  insert kills querysets only, and any other write kills the model's instances
  and querysets; models a statement only reads stay cached;
- read-only statements note nothing (the classifier's tests call the execute
  wrapper with a table of SQL texts, no database needed: they are of the unit
  tier, in ``tests/test_commit_classifier.py``).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from psycopg.sql import SQL, Identifier

from ormbridge.cache import cached_instance
from ormbridge.querysets import cached_queryset
from shop.models import DigitalProduct, Order, Product, Tag
from tests.factories import make_products

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]

PG = "postgresql"


def postgresql(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(connection.vendor != PG, reason=reason)


def sqlite(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(connection.vendor != "sqlite", reason=reason)


def price(product: Product) -> Decimal:
    """``product``'s price read through the cache API."""
    return cached_instance(Product, product.pk).price


def run(statement: Any, params: list[Any] | None = None) -> None:
    """Raw SQL on Django's connection, committed (autocommit)."""
    with connection.cursor() as cursor:
        cursor.execute(statement, params)


def product_pks(queryset: Any) -> list[int]:
    """The pks of ``queryset`` (of products) read through ``cached_queryset``."""
    return [row.pk for row in cached_queryset(queryset.order_by("pk"))]


def prices() -> list[Decimal]:
    """Every product's price, in pk order, read through ``cached_queryset``."""
    return [row.price for row in cached_queryset(Product.objects.order_by("pk"))]


# -- 1. what Django's backends emit -----------------------------------------------


def test_flush_empties_every_cached_model(no_relay):
    [product] = make_products(1)
    tag = Tag.objects.create(name="flushed")
    assert price(product) == Decimal("1.00")
    assert cached_instance(Tag, tag.pk).name == "flushed"
    assert product_pks(Product.objects.all()) == [product.pk]
    with CaptureQueriesContext(connection) as queries:
        call_command("flush", interactive=False, verbosity=0)
    if connection.vendor == PG:  # one TRUNCATE of every table
        assert any(q["sql"].startswith("TRUNCATE") for q in queries.captured_queries)
    with pytest.raises(Product.DoesNotExist):
        cached_instance(Product, product.pk)
    with pytest.raises(Tag.DoesNotExist):
        cached_instance(Tag, tag.pk)
    assert product_pks(Product.objects.all()) == []


def test_an_m2m_add_is_read_fresh_from_both_ends(no_relay):
    [product] = make_products(1)
    tag = Tag.objects.create(name="new")
    assert product_pks(Product.objects.filter(tags=tag)) == []
    assert [t.pk for t in cached_queryset(Tag.objects.filter(products=product))] == []
    with CaptureQueriesContext(connection) as queries:
        product.tags.add(tag)
    if connection.vendor == "sqlite":
        assert any(q["sql"].startswith("INSERT OR IGNORE INTO") for q in queries.captured_queries)
    assert product_pks(Product.objects.filter(tags=tag)) == [product.pk]
    assert [t.pk for t in cached_queryset(Tag.objects.filter(products=product))] == [tag.pk]


def test_bulk_create_ignoring_conflicts_shows_new_rows_and_keeps_the_existing_ones_cached(
    no_relay, django_assert_num_queries
):
    [existing] = make_products(1, price="1.00")
    assert price(existing) == Decimal("1.00")
    assert product_pks(Product.objects.all()) == [existing.pk]
    with CaptureQueriesContext(connection) as queries:
        Product.objects.bulk_create(
            [
                Product(sku=existing.sku, name="a clash", category=existing.category, price=9),
                Product(sku="brand-new", name="new", category=existing.category, price=2),
            ],
            ignore_conflicts=True,
        )
    if connection.vendor == "sqlite":
        assert any(q["sql"].startswith("INSERT OR IGNORE INTO") for q in queries.captured_queries)
    new = Product.objects.get(sku="brand-new")
    assert product_pks(Product.objects.all()) == [existing.pk, new.pk]
    with django_assert_num_queries(0):  # the existing row did not change: still served
        assert price(existing) == Decimal("1.00")


def test_bulk_create_updating_conflicts_is_read_fresh(no_relay):
    [existing] = make_products(1, price="1.00")
    assert price(existing) == Decimal("1.00")
    assert prices() == [Decimal("1.00")]
    Product.objects.bulk_create(
        [Product(sku=existing.sku, name="upserted", category=existing.category, price=7)],
        update_conflicts=True,
        unique_fields=["sku"],
        update_fields=["price"],
    )
    assert price(existing) == Decimal("7.00")
    assert prices() == [Decimal("7.00")]


def test_a_queryset_update_filtered_on_a_related_model_leaves_that_model_cached(
    no_relay, django_assert_num_queries
):
    [product] = make_products(1, price="1.00")
    order = Order.objects.create(product=product, quantity=1)
    assert cached_instance(Order, order.pk).quantity == 1
    assert price(product) == Decimal("1.00")
    Order.objects.filter(product__sku=product.sku).update(quantity=5)
    assert cached_instance(Order, order.pk).quantity == 5
    with django_assert_num_queries(0):  # only read by the update
        assert price(product) == Decimal("1.00")


def test_an_update_of_a_multi_table_child_is_read_fresh_through_child_and_parent(no_relay):
    digital = DigitalProduct.objects.create(
        sku="d-1", name="ebook", category=make_products(1)[0].category, price=3, download_url=""
    )
    assert cached_instance(DigitalProduct, digital.pk).price == Decimal("3.00")
    assert price(digital) == Decimal("3.00")
    DigitalProduct.objects.filter(download_url="").update(
        price=Decimal("4.00"), download_url="https://example.com/ebook"
    )
    fresh = cached_instance(DigitalProduct, digital.pk)
    assert (fresh.price, fresh.download_url) == (Decimal("4.00"), "https://example.com/ebook")
    assert price(digital) == Decimal("4.00")


# -- 2. raw SQL --------------------------------------------------------------------

RAW_UPDATES = [
    pytest.param("update shop_product set price = %s where id = %s", id="lower-case-unquoted"),
    pytest.param(
        '/* why */ UPDATE "shop_product" SET "price" = %s WHERE "shop_product"."id" = %s',
        id="leading-block-comment",
    ),
    pytest.param(
        "-- why\n  UPDATE shop_product SET price = %s WHERE id = %s", id="leading-line-comment"
    ),
    pytest.param(
        'UPDATE "{schema}"."shop_product" SET "price" = %s WHERE "id" = %s', id="schema-quoted"
    ),
    pytest.param("UPDATE {schema}.shop_product SET price = %s WHERE id = %s", id="schema-bare"),
    pytest.param(
        "WITH new AS (SELECT %s AS price) "
        "UPDATE shop_product SET price = (SELECT price FROM new) WHERE id = %s",
        id="after-a-cte",
    ),
    pytest.param(
        "WITH changed AS (UPDATE shop_product SET price = %s WHERE id = %s RETURNING id) "
        "SELECT count(*) FROM changed",
        id="data-modifying-cte",
        marks=postgresql("a data-modifying CTE is PostgreSQL's"),
    ),
    pytest.param(
        "MERGE INTO shop_product AS p USING (VALUES (%s::numeric, %s::integer)) AS v(price, id) "
        "ON p.id = v.id WHEN MATCHED THEN UPDATE SET price = v.price",
        id="merge",
        marks=postgresql("MERGE is PostgreSQL's (15 and later)"),
    ),
    pytest.param(
        "UPDATE ONLY shop_product SET price = %s WHERE id = %s",
        id="only",
        marks=postgresql("ONLY is PostgreSQL's"),
    ),
    pytest.param(
        "EXPLAIN ANALYZE UPDATE shop_product SET price = %s WHERE id = %s",
        id="explain-analyze",
        marks=postgresql("only PostgreSQL's EXPLAIN ANALYZE runs an UPDATE"),
    ),
    pytest.param(
        "UPDATE OR REPLACE shop_product SET price = %s WHERE id = %s",
        id="update-or-replace",
        marks=sqlite("UPDATE OR REPLACE is SQLite's"),
    ),
]


@pytest.mark.parametrize("sql", RAW_UPDATES)
def test_a_raw_update_is_read_fresh_whatever_its_form(no_relay, sql):
    [product, _] = make_products(2, price="1.00")
    assert price(product) == Decimal("1.00")
    assert prices() == [Decimal("1.00")] * 2
    schema = "public" if connection.vendor == PG else "main"
    run(sql.replace("{schema}", schema), [Decimal("2.50"), product.pk])
    assert price(product) == Decimal("2.50")
    assert prices() == [Decimal("2.50"), Decimal("1.00")]


@pytest.mark.parametrize(
    "sql",
    [
        pytest.param("delete from shop_order where id = %s", id="lower-case-unquoted"),
        pytest.param(
            "DELETE FROM shop_order USING shop_product "
            "WHERE shop_order.product_id = shop_product.id AND shop_order.id = %s",
            id="using",
            marks=postgresql("DELETE ... USING is PostgreSQL's"),
        ),
        pytest.param(
            "DELETE FROM ONLY shop_order WHERE id = %s",
            id="only",
            marks=postgresql("ONLY is PostgreSQL's"),
        ),
    ],
)
def test_a_raw_delete_is_read_fresh_and_leaves_the_tables_it_reads_cached(
    no_relay, django_assert_num_queries, sql
):
    [product] = make_products(1, price="1.00")
    order = Order.objects.create(product=product)
    assert cached_instance(Order, order.pk).quantity == 1
    assert price(product) == Decimal("1.00")
    run(sql, [order.pk])
    with pytest.raises(Order.DoesNotExist):
        cached_instance(Order, order.pk)
    with django_assert_num_queries(0):
        assert price(product) == Decimal("1.00")


@postgresql("sql.Composed and bytes statements are psycopg's")
@pytest.mark.parametrize("form", ["composed", "bytes"])
def test_a_statement_given_as_composed_sql_or_bytes_is_read_fresh(no_relay, form):
    [product] = make_products(1, price="1.00")
    assert price(product) == Decimal("1.00")
    statement = SQL("UPDATE {} SET price = %s WHERE id = %s").format(Identifier("shop_product"))
    run(
        statement if form == "composed" else statement.as_bytes(None), [Decimal("6.00"), product.pk]
    )
    assert price(product) == Decimal("6.00")


@sqlite("INSERT OR REPLACE is SQLite's; REPLACE INTO is MySQL's too, not captured yet")
@pytest.mark.parametrize("verb", ["INSERT OR REPLACE INTO", "REPLACE INTO"])
def test_an_insert_replacing_a_row_is_read_fresh(no_relay, verb):
    [product] = make_products(1, price="1.00")
    assert price(product) == Decimal("1.00")
    run(
        f"{verb} shop_product (id, sku, name, category_id, price, stock, updated_at) "
        "SELECT id, sku, name, category_id, %s, stock, updated_at FROM shop_product WHERE id = %s",
        [Decimal("8.00"), product.pk],
    )
    assert price(product) == Decimal("8.00")


@postgresql("TRUNCATE is PostgreSQL's (SQLite has none)")
def test_a_truncate_of_several_tables_empties_each_and_leaves_the_others_cached(
    no_relay, django_assert_num_queries
):
    [product] = make_products(1, price="1.00")
    tag = Tag.objects.create(name="gone")
    product.tags.add(tag)
    order = Order.objects.create(product=product)
    assert cached_instance(Order, order.pk).quantity == 1
    assert cached_instance(Tag, tag.pk).name == "gone"
    assert product_pks(Product.objects.filter(tags=tag)) == [product.pk]
    assert price(product) == Decimal("1.00")
    run('TRUNCATE "shop_order", "shop_tag", "shop_product_tags" RESTART IDENTITY')
    with pytest.raises(Order.DoesNotExist):
        cached_instance(Order, order.pk)
    with pytest.raises(Tag.DoesNotExist):
        cached_instance(Tag, tag.pk)
    assert product_pks(Product.objects.filter(tags__isnull=False)) == []
    with django_assert_num_queries(0):  # not truncated
        assert price(product) == Decimal("1.00")


@postgresql("TRUNCATE is PostgreSQL's (SQLite has none)")
def test_a_truncate_cascade_empties_the_tables_that_reference_it(no_relay):
    [product] = make_products(1)
    order = Order.objects.create(product=product)
    assert cached_instance(Order, order.pk).quantity == 1
    run("TRUNCATE shop_product CASCADE")  # shop_order references it
    with pytest.raises(Order.DoesNotExist):
        cached_instance(Order, order.pk)


def test_a_write_in_an_atomic_block_is_read_fresh_after_the_block(no_relay):
    [product] = make_products(1, price="1.00")
    assert price(product) == Decimal("1.00")
    with transaction.atomic():
        run("/* batch */ update shop_product set price = %s where id = %s", [3, product.pk])
    assert price(product) == Decimal("3.00")
