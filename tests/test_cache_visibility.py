"""Never store what another process must not see (issue 16, items 11 and 12).

A read whose data may be uncommitted (a manual transaction, ``set_autocommit(False)``),
older than the last invalidation (a snapshot: REPEATABLE READ however it was set) or
behind it (a replica) is answered by the database and not stored, through every API:
``cached_instance``, cached querysets, ``@cached_as``, ``@cached_view_as`` and the
template tag. No relay runs: the committing process invalidates at commit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection, connections, transaction
from django.template import Context, Template

import ormbridge
from ormbridge import relay
from ormbridge.cache import cached_instance
from shop.models import Product
from tests.conftest import elsewhere
from tests.factories import make_products

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]

postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="snapshots older than a commit: PostgreSQL's REPEATABLE READ (Django's SQLite "
    "backend has no isolation level, and its writer would wait for the reader's lock)",
)


def set_prices(price: str) -> None:
    """Commit a new price of every product (invalidated at commit, and delivered)."""
    Product.objects.update(price=Decimal(price))
    relay.drain()


@ormbridge.cached_as(Product)
def prices() -> list[Decimal]:
    return [product.price for product in Product.objects.order_by("pk")]


READS: dict[str, Callable[[], list[Decimal]]] = {
    "instance": lambda: [cached_instance(Product, pk).price for pk in product_pks()],
    "queryset": lambda: [
        p.price for p in ormbridge.cached_queryset(Product.objects.order_by("pk"))
    ],
    "cached_as": prices,
}


def product_pks() -> list[int]:
    return list(Product.objects.order_by("pk").values_list("pk", flat=True))


# -- item 11: manual transactions


@contextmanager
def manual_transaction() -> Iterator[None]:
    """A transaction begun with ``set_autocommit(False)``, rolled back at the end."""
    transaction.set_autocommit(False)
    try:
        yield
    finally:
        transaction.rollback()
        transaction.set_autocommit(True)


def test_a_read_in_a_manual_transaction_is_not_stored_for_others_or_after_a_rollback(no_relay):
    [product] = make_products(1, price="1.00")
    relay.drain()
    with manual_transaction():
        Product.objects.filter(pk=product.pk).update(price=Decimal("999.00"))
        own = cached_instance(Product, product.pk).price
        seen = elsewhere(lambda: cached_instance(Product, product.pk).price)
    assert own == Decimal("999.00")
    assert seen == Decimal("1.00")
    assert cached_instance(Product, product.pk).price == Decimal("1.00")
    assert elsewhere(lambda: cached_instance(Product, product.pk).price) == Decimal("1.00")


@pytest.mark.parametrize("read", READS.values(), ids=READS.keys())
def test_a_manual_transaction_reads_its_own_write_not_the_cached_rows(no_relay, read):
    make_products(1, price="1.00")
    relay.drain()
    assert read() == [Decimal("1.00")]  # cached
    with manual_transaction():
        with connection.cursor() as cursor:
            cursor.execute("UPDATE shop_product SET price = 5")
        own = read()
    assert own == [Decimal("5.00")]
    assert read() == [Decimal("1.00")]


# -- item 12: snapshots, however their isolation level was set

HOW = ["options", "libpq", "session", "transaction", "database"]


@contextmanager
def snapshot_reader(how: str) -> Iterator[None]:
    """For the block, a transaction on this thread's default connection (a new connection
    to the same database) at REPEATABLE READ, set the way ``how`` says."""
    import psycopg

    default = connections["default"]
    name = default.settings_dict["NAME"]
    options = dict(default.settings_dict["OPTIONS"])
    if how == "options":  # Django's own option, which ormbridge always saw
        options["isolation_level"] = psycopg.IsolationLevel.REPEATABLE_READ
    elif how == "libpq":
        options["options"] = "-c default_transaction_isolation=repeatable\\ read"
    elif how == "database":
        with default.cursor() as cursor:
            cursor.execute(
                f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'repeatable read'"
            )
    reader = type(default)({**default.settings_dict, "OPTIONS": options}, "default")
    connections["default"] = reader
    try:
        if how == "session":
            with reader.cursor() as cursor:
                cursor.execute(
                    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ"
                )
        with transaction.atomic():
            if how == "transaction":
                with reader.cursor() as cursor:
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            yield
    finally:
        reader.close()
        connections["default"] = default
        if how == "database":
            with default.cursor() as cursor:
                cursor.execute(f'ALTER DATABASE "{name}" RESET default_transaction_isolation')


@postgresql_only
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("read", READS.values(), ids=READS.keys())
def test_a_snapshot_older_than_a_write_is_not_stored(no_relay, how, read):
    make_products(2, price="1.00")
    relay.drain()
    with snapshot_reader(how):
        assert Product.objects.count() == 2  # the reader's snapshot is taken
        elsewhere(lambda: set_prices("2.00"))
        assert read() == [Decimal("1.00")] * 2  # right inside its snapshot
    assert elsewhere(read) == [Decimal("2.00")] * 2
    assert read() == [Decimal("2.00")] * 2


# -- item 12: replicas, through every API


def test_an_instance_read_through_a_replica_is_not_stored(
    no_relay, replica, django_assert_num_queries
):
    [product] = make_products(1)
    for _ in range(2):
        with django_assert_num_queries(1, connection=connections["replica"]):
            assert cached_instance(Product, product.pk).pk == product.pk


def test_a_queryset_read_through_a_replica_is_not_stored(
    no_relay, replica, django_assert_num_queries
):
    [product] = make_products(1)
    for _ in range(2):
        with django_assert_num_queries(1, connection=connections["replica"]):
            assert ormbridge.cached_queryset(Product.objects.filter(pk=product.pk))[0] == product


def test_a_function_reading_a_replica_is_not_stored(no_relay, replica, django_assert_num_queries):
    make_products(1, price="1.00")
    for _ in range(2):
        with django_assert_num_queries(1, connection=connections["replica"]):
            assert prices() == [Decimal("1.00")]


@pytest.mark.urls("tests.testapp.urls")
def test_a_view_reading_a_replica_is_not_stored(
    no_relay, replica, client, django_assert_num_queries
):
    [product] = make_products(1)
    for _ in range(2):
        with django_assert_num_queries(1, connection=connections["replica"]):
            assert client.get("/products/").content == f"{product.name} (page 1)".encode()


def test_a_fragment_reading_a_replica_is_not_stored(no_relay, replica, django_assert_num_queries):
    [product] = make_products(1)
    fragment = Template(
        '{% load ormbridge %}{% cached_as products None "names" %}'
        "{% for p in products %}{{ p.name }}{% endfor %}{% endcached_as %}"
    )
    for _ in range(2):
        with django_assert_num_queries(1, connection=connections["replica"]):
            rendered = fragment.render(Context({"products": Product.objects.all()}))
            assert rendered == product.name


def test_reads_on_the_write_database_are_stored(no_relay, django_assert_num_queries):
    make_products(1, price="1.00")
    relay.drain()
    reads: list[Any] = list(READS.values())
    for read in reads:
        read()
        read()  # the first may only learn which tables it reads
    with django_assert_num_queries(2):  # product_pks() of the instance read, twice
        for read in reads:
            assert read() == [Decimal("1.00")]
        assert READS["instance"]() == [Decimal("1.00")]
