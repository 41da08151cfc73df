"""Read-your-writes (issue 8): a committed write is read fresh at once, by any process.

No relay runs in most of these tests (``no_relay``): the committing process
itself invalidates what it wrote, and another process reading through the
cache API right after the commit sees the new data. The change log still
carries every change to the relay, which the tests that start a worker check.

Not covered here: a primary key whose ``str()`` raises or of an odd type (the
example project has no such model).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.db.models import Q

from ormbridge import redis_store
from ormbridge.cache import cached_instance
from ormbridge.models import ChangeBatch
from ormbridge.querysets import cached_queryset
from shop.models import Category, Product, Tag
from tests import emitters
from tests.conftest import ROOT, wait_until
from tests.factories import cached_entry, make_products

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]

READER = textwrap.dedent(
    """
    import sys

    import django

    django.setup()

    from ormbridge import cached_instance, cached_queryset
    from shop.models import Product

    print("ready", flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        try:
            if command == "instance":
                answer = str(cached_instance(Product, int(argument)).price)
            else:
                pks = [int(pk) for pk in argument.split(",")]
                rows = cached_queryset(Product.objects.filter(pk__in=pks).order_by("pk"))
                answer = ",".join(str(row.price) for row in rows)
        except Product.DoesNotExist:
            answer = "DoesNotExist"
        except Exception as exc:
            answer = f"error: {exc!r}"
        print(answer, flush=True)
    """
)


def django_env() -> dict[str, str]:
    """The environment of a Django process on the test database (as ``Worker.start``)."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "ORMBRIDGE_TEST_DB_NAME": connection.settings_dict["NAME"],
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")]),
    }


class Reader:
    """Another Django process that reads products through the cache API on request."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", READER],
            cwd=ROOT,
            env=django_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._line(60) == "ready"

    def _line(self, timeout: float = 30) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            pytest.fail(f"the reader process gave no answer within {timeout} s")
        line = self.process.stdout.readline()
        if not line:
            pytest.fail(f"the reader process exited with {self.process.wait()}")
        return line.strip()

    def ask(self, command: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._line()

    def instance(self, pk: int) -> str:
        """``cached_instance(Product, pk).price`` in the other process, as text."""
        return self.ask(f"instance {pk}")

    def queryset(self, pks: list[int]) -> list[str]:
        """The prices of ``cached_queryset(Product.objects.filter(pk__in=pks).order_by("pk"))``."""
        return self.ask("queryset " + ",".join(map(str, pks))).split(",")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def reader(django_db_setup) -> Iterator[Reader]:
    process = Reader()
    yield process
    process.close()


def cached(pk: int) -> bool:
    return cached_entry("shop.product", pk) is not None


def undelivered(label: str = "shop.product") -> int:
    return ChangeBatch.objects.filter(model=label).exclude(state=ChangeBatch.State.DONE).count()


def product_events(pk: int) -> list[dict]:
    return [
        event
        for event in emitters.recorded()
        if event["model"] == "shop.product" and pk in (event["pks"] or [])
    ]


def fill(product: Product, reader: Reader | None = None) -> None:
    """Cache ``product`` and check the entry is served (to the other process too)."""
    assert cached_instance(Product, product.pk).price == product.price
    assert cached(product.pk)
    if reader is not None:
        assert reader.instance(product.pk) == str(product.price)


# -- 1. another process reads a committed write at once ---------------------------


def test_a_save_is_read_fresh_by_another_process_at_once(no_relay, reader):
    [product] = make_products(1, price="1.00")
    fill(product, reader)
    product.price = Decimal("2.50")
    product.save()
    assert reader.instance(product.pk) == "2.50"
    assert undelivered() >= 1, "the relay did not run: the committing process invalidated"


def test_a_save_in_an_atomic_block_is_read_fresh_after_the_block(no_relay, reader):
    [product] = make_products(1, price="1.00")
    fill(product, reader)
    with transaction.atomic():
        product.price = Decimal("3.25")
        product.save()
        assert reader.instance(product.pk) == "1.00"  # not committed yet
    assert reader.instance(product.pk) == "3.25"


@pytest.mark.parametrize("lookup", ["pk", "sku"], ids=["by-pk", "by-other-field"])
def test_a_queryset_update_is_read_fresh_by_another_process(no_relay, reader, lookup):
    [product, other] = make_products(2, price="1.00")
    fill(product, reader)
    fill(other, reader)
    Product.objects.filter(**{lookup: getattr(product, lookup)}).update(price=Decimal("4.75"))
    assert reader.instance(product.pk) == "4.75"
    assert reader.instance(other.pk) == "1.00"


def test_an_update_of_rows_named_by_pk_leaves_the_other_rows_entries_served(
    no_relay, django_assert_num_queries
):
    [first, second, other] = make_products(3, price="1.00")
    for product in (first, second, other):
        fill(product)
    Product.objects.filter(pk__in=[first.pk, second.pk]).update(price=Decimal("6.00"))
    with django_assert_num_queries(0):
        assert cached_instance(Product, other.pk).price == Decimal("1.00")
    assert cached_instance(Product, first.pk).price == Decimal("6.00")
    assert cached_instance(Product, second.pk).price == Decimal("6.00")


def test_a_deleted_row_is_gone_for_another_process_at_once(no_relay, reader):
    [product] = make_products(1, price="1.00")
    fill(product, reader)
    pk = product.pk
    product.delete()
    assert reader.instance(pk) == "DoesNotExist"
    with pytest.raises(Product.DoesNotExist):
        cached_instance(Product, pk)


def test_a_cached_queryset_sees_a_save_in_another_process_at_once(no_relay, reader):
    products = make_products(3, price="1.00")
    pks = [product.pk for product in products]
    rows = cached_queryset(Product.objects.filter(pk__in=pks).order_by("pk"))
    assert [row.price for row in rows] == [Decimal("1.00")] * 3
    assert reader.queryset(pks) == ["1.00"] * 3  # served from the entry cached here
    products[1].price = Decimal("5.10")
    products[1].save()
    assert reader.queryset(pks) == ["1.00", "5.10", "1.00"]


def add_tag(product: Product, tag: Tag) -> None:
    product.tags.add(tag)  # SQLite: INSERT OR IGNORE INTO


def create_ignoring_conflicts(product: Product, tag: Tag) -> None:
    copy = Product(sku="copy", name="copy", category=product.category, price=product.price)
    Product.objects.bulk_create([copy], ignore_conflicts=True)  # SQLite: INSERT OR IGNORE


@pytest.mark.parametrize(
    "write", [add_tag, create_ignoring_conflicts], ids=["m2m-add", "bulk-create-ignore-conflicts"]
)
def test_an_insert_ignoring_conflicts_is_read_fresh_at_once(no_relay, write):
    [product] = make_products(1)
    tag = Tag.objects.create(name="sale")
    query = Product.objects.filter(Q(tags__name="sale") | Q(sku="copy")).values_list("name")
    for _ in range(2):  # the second read is stored
        assert list(cached_queryset(query)) == []
    write(product, tag)
    assert list(cached_queryset(query)) == list(query.all())
    assert list(query.all()) != []


# -- 2. rolled-back work leaves the cache alone -----------------------------------


def test_a_rolled_back_block_leaves_the_entry_and_its_tokens(no_relay):
    [product] = make_products(1, price="1.00")
    fill(product)
    token = redis_store.token_key("shop.product", product.pk)
    before = (redis_store.get_redis().get(token), cached_entry("shop.product", product.pk))
    assert before[0] is not None
    with pytest.raises(RuntimeError), transaction.atomic():
        product.price = Decimal("9.00")
        product.save()
        raise RuntimeError("roll back")
    after = (redis_store.get_redis().get(token), cached_entry("shop.product", product.pk))
    assert after[0] == before[0], "the row's token was deleted for a rolled-back write"
    assert after[1] is not None and after[1].split(b"\n")[0] == before[1].split(b"\n")[0]
    assert cached_instance(Product, product.pk).price == Decimal("1.00")
    assert not ChangeBatch.objects.filter(model="shop.product", action="update").exists()


def test_a_rolled_back_savepoint_in_a_committed_transaction(no_relay, reader):
    """The committed writes are fresh; a row written only in the savepoint keeps its entry."""
    before, untouched, after = make_products(3, price="1.00")
    for product in (before, untouched, after):
        fill(product, reader)
    untouched_token = redis_store.get_redis().get(
        redis_store.token_key("shop.product", untouched.pk)
    )
    with transaction.atomic():
        before.price = Decimal("2.00")
        before.save()
        with pytest.raises(RuntimeError), transaction.atomic():
            before.price = Decimal("3.00")
            before.save()
            untouched.price = Decimal("3.00")
            untouched.save()
            raise RuntimeError("roll the savepoint back")
        after.price = Decimal("4.00")
        after.save()
    assert reader.instance(before.pk) == "2.00"
    assert reader.instance(after.pk) == "4.00"
    assert reader.instance(untouched.pk) == "1.00"
    assert (
        redis_store.get_redis().get(redis_store.token_key("shop.product", untouched.pk))
        == untouched_token
    )
    assert cached(untouched.pk)


# -- 3. manual transactions: left to the relay -------------------------------------


def test_a_manual_transaction_commit_is_delivered(worker):
    [product] = make_products(1, price="1.00")
    fill(product)
    transaction.set_autocommit(False)
    try:
        product.price = Decimal("6.00")
        product.save()
        transaction.commit()  # must not raise
    finally:
        transaction.set_autocommit(True)
    assert Product.objects.get(pk=product.pk).price == Decimal("6.00")
    wait_until(
        lambda: cached_instance(Product, product.pk).price == Decimal("6.00"),
        30,
        "the relay to invalidate the committed row",
    )
    wait_until(lambda: product_events(product.pk), 30, "the row's event")


def test_a_manual_transaction_rollback_leaves_nothing(worker):
    [product] = make_products(1, price="1.00")
    wait_until(lambda: undelivered() == 0, 30, "the products' creation to be delivered")
    fill(product)
    token = redis_store.get_redis().get(redis_store.token_key("shop.product", product.pk))
    logged = ChangeBatch.objects.count()
    transaction.set_autocommit(False)
    try:
        product.price = Decimal("7.00")
        product.save()
        transaction.rollback()
    finally:
        transaction.set_autocommit(True)
    assert ChangeBatch.objects.count() == logged
    assert redis_store.get_redis().get(redis_store.token_key("shop.product", product.pk)) == token
    Category.objects.create(name="a later, committed change")
    wait_until(
        lambda: any(e["model"] == "shop.category" for e in emitters.recorded()),
        30,
        "the later change's event",
    )
    assert not [e for e in product_events(product.pk) if e["type"] != "create"]
    assert cached(product.pk)
    assert cached_instance(Product, product.pk).price == Decimal("1.00")


# -- 4. a failing on_commit callback before ormbridge's ----------------------------


def test_a_raising_on_commit_callback_does_not_lose_the_change(worker):
    [product] = make_products(1, price="1.00")
    fill(product)

    def boom() -> None:
        raise ZeroDivisionError("a project's callback fails")

    with pytest.raises(ZeroDivisionError), transaction.atomic():
        transaction.on_commit(boom)  # not robust: later callbacks are skipped
        product.price = Decimal("8.00")
        product.save()
    assert Product.objects.get(pk=product.pk).price == Decimal("8.00")  # committed
    # The commit-time invalidation may have been skipped; the change log has the change.
    wait_until(
        lambda: cached_instance(Product, product.pk).price == Decimal("8.00"),
        30,
        "the relay to invalidate the row",
    )
    wait_until(
        lambda: [e for e in product_events(product.pk) if e["type"] == "update"],
        30,
        "the row's event",
    )
