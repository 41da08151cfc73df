"""ormbridge.testing: a project's tests see their changes delivered at commit without a
worker, each test under a key prefix of its own, and assert on invalidations and events.

The modules in tests/sample are what a project writes; they run here in processes of
their own, twice in a row each.
"""

import json
import os
import subprocess
import sys
from decimal import Decimal

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.test.utils import override_settings

import ormbridge
from ormbridge import redis_store
from ormbridge.models import ChangeBatch
from ormbridge.testing import (
    DeliveryError,
    Harness,
    assert_events,
    assert_invalidated,
    assert_not_invalidated,
    events,
)
from shop.models import Category, DigitalProduct, Product
from tests.conftest import ROOT
from tests.factories import make_products
from tests.testapp.apps import replays_key


class DeliveryAtCommit:
    """Run below without commits (a TestCase's transaction) and with them."""

    def test_a_save_is_read_fresh_from_the_cache_at_once(self, no_relay, ormbridge_testing):
        [product] = make_products(1)
        ormbridge.cached_instance(Product, product.pk)
        product.name = "renamed"
        product.save()
        assert ormbridge.cached_instance(Product, product.pk).name == "renamed"

    def test_a_write_in_an_atomic_block_is_delivered_when_the_block_ends(
        self, no_relay, ormbridge_testing
    ):
        [product] = make_products(1)
        with transaction.atomic():
            Product.objects.filter(pk=product.pk).update(stock=4)
            assert_events("shop.product", 0, type="update")
        assert_events("shop.product", 1, type="update", pk=product.pk)

    def test_a_raw_write_behind_a_comment_is_delivered(self, no_relay, ormbridge_testing):
        [product] = make_products(1)
        with connection.cursor() as cursor:
            cursor.execute(
                "/* by hand */ UPDATE shop_product SET stock = 9 WHERE id = %s", [product.pk]
            )
        assert_events("shop.product", 1, type="update", pk=product.pk)

    def test_a_rolled_back_block_delivers_nothing(self, no_relay, ormbridge_testing):
        [product] = make_products(1)
        ormbridge.cached_instance(Product, product.pk)
        with pytest.raises(ZeroDivisionError), transaction.atomic():
            Product.objects.filter(pk=product.pk).update(stock=4)
            1 / 0  # noqa: B018
        assert_events("shop.product", 0, type="update")
        assert_not_invalidated(product)

    def test_signals_are_replayed_at_commit(self, no_relay, ormbridge_testing):
        [product] = make_products(1)
        ormbridge.safe_bulk_update(Product.objects.filter(pk=product.pk), stock=7)
        saves = redis_store.get_redis().hgetall(replays_key("shop.product", "save"))
        assert saves == {str(product.pk): "1"}

    def test_a_queryset_is_invalidated_by_a_change_to_a_model_it_joins(
        self, no_relay, ormbridge_testing
    ):
        make_products(1)
        products = Product.objects.filter(category__name="default")
        ormbridge.cached_queryset(products)
        assert_not_invalidated(products)
        Category.objects.update(name="other")
        assert_invalidated(products)

    def test_a_multi_table_child_is_invalidated_by_its_parent_row(
        self, no_relay, ormbridge_testing
    ):
        category = Category.objects.create(name="e-books")
        digital = DigitalProduct.objects.create(sku="e1", name="E", category=category, price=1)
        ormbridge.cached_instance(DigitalProduct, digital.pk)
        assert_not_invalidated(digital)
        Product.objects.filter(pk=digital.pk).update(name="renamed")
        assert_invalidated(digital)

    def test_the_relays_queries_are_not_counted_as_the_tests(
        self, no_relay, ormbridge_testing, django_assert_num_queries
    ):
        [product] = make_products(1)
        with django_assert_num_queries(1):
            Product.objects.filter(pk=product.pk).update(stock=2)
        assert_events("shop.product", 1, type="update")


@pytest.mark.django_db
class TestWithoutCommits(DeliveryAtCommit):
    def test_a_write_in_a_block_without_a_savepoint_is_delivered_after_its_statement(
        self, no_relay, ormbridge_testing
    ):
        [product] = make_products(1)
        with transaction.atomic(savepoint=False):
            Product.objects.filter(pk=product.pk).update(stock=4)
            assert_events("shop.product", 1, type="update")

    def test_writes_of_on_commit_callbacks_run_by_a_capture_are_delivered(
        self, no_relay, ormbridge_testing, django_capture_on_commit_callbacks
    ):
        [product] = make_products(1)
        with django_capture_on_commit_callbacks(execute=True):
            transaction.on_commit(lambda: Product.objects.update(stock=5))
            assert_events("shop.product", 0, type="update")
        assert_events("shop.product", 1, type="update", pk=product.pk)


@pytest.mark.django_db(transaction=True)
class TestWithCommits(DeliveryAtCommit):
    def test_a_manual_transaction_is_delivered_by_deliver(self, no_relay, ormbridge_testing):
        [product] = make_products(1)
        transaction.set_autocommit(False)
        try:
            Product.objects.filter(pk=product.pk).update(stock=4)
            transaction.commit()
        finally:
            transaction.set_autocommit(True)
        assert_events("shop.product", 0, type="update")
        ormbridge_testing.deliver()
        assert_events("shop.product", 1, type="update")


@pytest.mark.django_db
def test_each_test_has_a_key_prefix_of_its_own(no_relay, django_assert_num_queries):
    [product] = make_products(1)
    with Harness() as first:
        ormbridge.cached_instance(Product, product.pk)
    with Harness() as second, django_assert_num_queries(1):
        ormbridge.cached_instance(Product, product.pk)
    assert first.prefix != second.prefix


@pytest.mark.django_db
def test_the_keys_of_a_test_are_deleted_when_it_ends(no_relay):
    with Harness() as harness:
        [product] = make_products(1)
        ormbridge.cached_instance(Product, product.pk)
        assert redis_store.get_redis().keys(f"{redis_store.tag(harness.prefix)}:*")
    assert redis_store.get_redis().keys(f"{redis_store.tag(harness.prefix)}:*") == []


@pytest.mark.django_db
def test_rows_logged_before_a_test_are_delivered_as_it_starts_and_leave_nothing(no_relay):
    make_products(2)
    with Harness():
        assert set(ChangeBatch.objects.values_list("state", flat=True)) == {"done"}
        assert events("shop.product") == []


@pytest.mark.django_db
def test_a_delivery_that_raised_fails_the_test_when_it_ends(no_relay):
    with pytest.raises(DeliveryError, match="ValueError"), Harness():
        broken = {**settings.ORMBRIDGE, "RELAY_BATCH": "many"}
        with override_settings(ORMBRIDGE=broken):
            Category.objects.update(name="x")


@pytest.mark.django_db
def test_assert_invalidated_fails_for_an_instance_still_cached(no_relay, ormbridge_testing):
    [product] = make_products(1)
    ormbridge.cached_instance(Product, product.pk)
    with pytest.raises(AssertionError, match="is not invalidated"):
        assert_invalidated(product)


@pytest.mark.django_db
def test_assert_not_invalidated_fails_for_a_changed_instance(no_relay, ormbridge_testing):
    [product] = make_products(1)
    ormbridge.cached_instance(Product, product.pk)
    product.save()
    with pytest.raises(AssertionError, match="is invalidated"):
        assert_not_invalidated(product)


@pytest.mark.django_db
def test_assert_events_counts_the_events_of_a_type_and_row(no_relay, ormbridge_testing):
    first, second = make_products(2)
    Product.objects.filter(pk=first.pk).update(price=Decimal("3"))
    assert_events("shop.product", 1, type="update", pk=first.pk)
    assert_events("shop.product", 0, type="update", pk=second.pk)
    with pytest.raises(AssertionError, match="expected some delete events"):
        assert_events("shop.product", type="delete")


def sample_env() -> dict[str, str]:
    """A process of the sample modules: the test services, a test database of its own."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.sample.settings",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")]),
    }
    env.pop("ORMBRIDGE_TEST_DB_NAME", None)
    return env


def test_the_sample_test_cases_pass_twice_in_one_process_and_leave_no_key(no_relay):
    process = subprocess.run(
        [sys.executable, "-m", "tests.sample.twice", "tests.sample.shop_tests"],
        cwd=ROOT,
        env=sample_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr
    runs = json.loads(process.stdout.splitlines()[-1])
    assert runs == [{"tests": 11, "failures": 0, "keys": []}] * 2, process.stderr


def test_the_sample_pytest_module_passes_twice_in_one_process_and_leaves_no_key(no_relay):
    module = "tests/sample/shop_pytest.py"
    process = subprocess.run(
        [
            *[sys.executable, "-m", "pytest", "--noconftest", "-p", "ormbridge.testing"],
            *["--ds", "tests.sample.settings", "-p", "no:randomly", "-q"],
            *["--keep-duplicates", module, module],
        ],
        cwd=ROOT,
        env=sample_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stdout
    assert "22 passed" in process.stdout
    assert redis_store.get_redis().keys("*") == []
