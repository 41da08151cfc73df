"""A project's own tests of its cached shop, with ormbridge.testing's pytest fixture.

A sample kept in the repository: tests/test_testing.py runs it with
pytest-django, twice in a row in one process. The same tests run in a
transaction that never commits (``django_db``) and with real commits
(``django_db(transaction=True)``). The fixture comes from ``-p ormbridge.testing``
on the command line here; a project lists it in its root ``conftest.py``:
``pytest_plugins = ["ormbridge.testing"]``.
"""

from decimal import Decimal

import pytest
from django.db import transaction

import ormbridge
from ormbridge.testing import assert_events, assert_invalidated, assert_not_invalidated
from shop.models import Category, Product


@pytest.fixture
def lamp(ormbridge_testing) -> Product:
    lights = Category.objects.create(name="lights")
    return Product.objects.create(sku="lamp", name="Lamp", category=lights, price=Decimal("20"))


class ShopTests:
    """The tests; the classes below run them without and with commits."""

    def test_a_renamed_product_is_read_fresh_from_the_cache(self, lamp):
        assert ormbridge.cached_instance(Product, lamp.pk).name == "Lamp"
        lamp.name = "Desk lamp"
        lamp.save()
        assert_invalidated(lamp)
        assert ormbridge.cached_instance(Product, lamp.pk).name == "Desk lamp"

    def test_an_untouched_product_stays_cached(self, lamp):
        assert ormbridge.cached_instance(Product, lamp.pk).name == "Lamp"
        Category.objects.create(name="garden")
        assert_not_invalidated(lamp)

    def test_two_saves_in_a_transaction_are_one_event_when_it_commits(self, lamp):
        with transaction.atomic():
            lamp.price = Decimal("18")
            lamp.save()
            lamp.stock = 3
            lamp.save()
            assert_events("shop.product", 0, type="update")
        assert_events("shop.product", 1, type="update", pk=lamp.pk)
        assert ormbridge.cached_instance(Product, lamp.pk).stock == 3

    def test_a_cached_product_list_includes_a_new_product(self, lamp):
        products = Product.objects.order_by("sku")
        assert [p.sku for p in ormbridge.cached_queryset(products)] == ["lamp"]
        Product.objects.create(sku="shade", name="Shade", category=lamp.category, price=5)
        assert_invalidated(products)
        assert [p.sku for p in ormbridge.cached_queryset(products)] == ["lamp", "shade"]

    def test_a_deleted_product_is_one_delete_event(self, lamp):
        pk = lamp.pk
        lamp.delete()
        assert_events("shop.product", 1, type="delete", pk=pk)
        with pytest.raises(Product.DoesNotExist):
            ormbridge.cached_instance(Product, pk)


@pytest.mark.django_db
class TestWithoutCommits(ShopTests):
    def test_writes_in_on_commit_callbacks_are_delivered(
        self, lamp, django_capture_on_commit_callbacks
    ):
        def restock():
            Product.objects.filter(pk=lamp.pk).update(stock=10)

        with django_capture_on_commit_callbacks(execute=True):
            lamp.name = "Floor lamp"
            lamp.save()
            assert ormbridge.cached_instance(Product, lamp.pk).name == "Floor lamp"
            transaction.on_commit(restock)
        assert ormbridge.cached_instance(Product, lamp.pk).stock == 10
        assert_events("shop.product", 2, type="update")


@pytest.mark.django_db(transaction=True)
class TestWithCommits(ShopTests):
    pass
