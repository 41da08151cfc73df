"""A project's own tests of its cached shop, with ormbridge.testing's TestCase mixin.

A sample kept in the repository: tests/test_testing.py runs it with Django's
test runner, twice in a row in one process. The same tests run as a
``TestCase`` (nothing commits) and as a ``TransactionTestCase`` (everything
does). Each starts by reading the product through the cache: an entry left
by another test, or by the previous run, would show there.
"""

from decimal import Decimal

from django.db import transaction
from django.test import TestCase, TransactionTestCase

import ormbridge
from ormbridge.testing import OrmbridgeTestMixin
from shop.models import Category, Product


def make_lamp() -> Product:
    lights = Category.objects.create(name="lights")
    return Product.objects.create(sku="lamp", name="Lamp", category=lights, price=Decimal("20"))


class ShopTests(OrmbridgeTestMixin):
    """The tests; the classes below run them as a TestCase and as a TransactionTestCase."""

    product: Product

    def test_a_renamed_product_is_read_fresh_from_the_cache(self) -> None:
        self.assertEqual(ormbridge.cached_instance(Product, self.product.pk).name, "Lamp")
        self.product.name = "Desk lamp"
        self.product.save()
        self.assertInvalidated(self.product)
        self.assertEqual(ormbridge.cached_instance(Product, self.product.pk).name, "Desk lamp")

    def test_an_untouched_product_stays_cached(self) -> None:
        self.assertEqual(ormbridge.cached_instance(Product, self.product.pk).name, "Lamp")
        Category.objects.create(name="garden")
        self.assertNotInvalidated(self.product)

    def test_two_saves_in_a_transaction_are_one_event_when_it_commits(self) -> None:
        self.assertEqual(ormbridge.cached_instance(Product, self.product.pk).name, "Lamp")
        with transaction.atomic():
            self.product.price = Decimal("18")
            self.product.save()
            self.product.stock = 3
            self.product.save()
            self.assertEvents("shop.product", 0, type="update")
        self.assertEvents("shop.product", 1, type="update", pk=self.product.pk)
        self.assertEqual(ormbridge.cached_instance(Product, self.product.pk).stock, 3)

    def test_a_cached_product_list_includes_a_new_product(self) -> None:
        products = Product.objects.order_by("sku")
        self.assertEqual([p.sku for p in ormbridge.cached_queryset(products)], ["lamp"])
        Product.objects.create(sku="shade", name="Shade", category=self.product.category, price=5)
        self.assertInvalidated(products)
        self.assertEqual([p.sku for p in ormbridge.cached_queryset(products)], ["lamp", "shade"])

    def test_a_deleted_product_is_one_delete_event(self) -> None:
        pk = self.product.pk
        self.product.delete()
        self.assertEvents("shop.product", 1, type="delete", pk=pk)
        with self.assertRaises(Product.DoesNotExist):
            ormbridge.cached_instance(Product, pk)


class ShopTestCase(ShopTests, TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.product = make_lamp()

    def test_writes_in_on_commit_callbacks_are_delivered(self) -> None:
        self.assertEqual(ormbridge.cached_instance(Product, self.product.pk).name, "Lamp")

        def restock() -> None:
            Product.objects.filter(pk=self.product.pk).update(stock=10)

        with self.captureOnCommitCallbacks(execute=True):
            self.product.name = "Floor lamp"
            self.product.save()
            self.assertEqual(ormbridge.cached_instance(Product, self.product.pk).name, "Floor lamp")
            transaction.on_commit(restock)
        self.assertEqual(ormbridge.cached_instance(Product, self.product.pk).stock, 10)
        self.assertEvents("shop.product", 2, type="update")


class ShopTransactionTestCase(ShopTests, TransactionTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.product = make_lamp()
