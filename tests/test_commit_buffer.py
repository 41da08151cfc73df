"""Receivers record changes per transaction; Redis hears of them only after the commit."""

import pytest
from django.db import transaction

import ormbridge
from ormbridge import store
from ormbridge.models import ChangeBatch
from shop.models import Category, DiscountedProduct, Order, Product, Tag
from tests.factories import make_products

pytestmark = pytest.mark.django_db(transaction=True)


def pending(label: str) -> set[str]:
    return store.get_redis().smembers(store.pending_key(label))


def changed_fields(label: str) -> set[str]:
    return store.get_redis().smembers(store.fields_key(label))


def test_a_save_outside_a_transaction_is_pending_at_once(idle_queue):
    [product] = make_products(1)
    product.save(update_fields=["price"])
    assert pending("shop.product") == {f"u:{product.pk}"}
    assert changed_fields("shop.product") == {"price"}
    assert idle_queue() == 1


def test_create_update_and_delete_are_told_apart(idle_queue):
    category = Category.objects.create(name="a")
    category.name = "b"
    category.save()
    pk = category.pk
    category.delete()
    assert pending("shop.category") == {f"c:{pk}", f"u:{pk}", f"d:{pk}"}
    assert changed_fields("shop.category") == {"*"}


def test_nothing_is_pending_before_the_commit(idle_queue):
    products = make_products(3)
    with transaction.atomic():
        for product in products:
            product.save()
        assert pending("shop.product") == set()
        assert idle_queue() == 0
    assert pending("shop.product") == {f"u:{p.pk}" for p in products}


def test_one_transaction_schedules_one_flush_per_model(idle_queue):
    products = make_products(50)
    with transaction.atomic():
        for product in products:
            product.save()
            Order.objects.create(product=product)
    assert len(pending("shop.product")) == 50
    assert len(pending("shop.order")) == 50
    assert idle_queue() == 2


def test_a_rolled_back_transaction_leaves_nothing(idle_queue):
    [product] = make_products(1)
    with pytest.raises(RuntimeError), transaction.atomic():
        product.save()
        Category.objects.create(name="gone")
        raise RuntimeError
    assert pending("shop.product") == set()
    assert pending("shop.category") == set()
    assert idle_queue() == 0
    assert not ChangeBatch.objects.exists()


def test_changes_of_a_rolled_back_transaction_do_not_leak_into_the_next(idle_queue):
    [first, second] = make_products(2)
    with pytest.raises(RuntimeError), transaction.atomic():
        first.save()
        raise RuntimeError
    with transaction.atomic():
        second.save()
    assert pending("shop.product") == {f"u:{second.pk}"}


def test_a_rolled_back_savepoint_drops_only_its_own_changes(idle_queue):
    [kept, dropped] = make_products(2)
    with transaction.atomic():
        kept.save()
        with pytest.raises(RuntimeError), transaction.atomic():
            dropped.save()
            raise RuntimeError
        with transaction.atomic():
            tag = Tag.objects.create(name="kept")
    assert pending("shop.product") == {f"u:{kept.pk}"}
    assert pending("shop.tag") == {f"c:{tag.pk}"}
    assert idle_queue() == 2


def test_a_proxy_save_is_recorded_for_the_concrete_model(idle_queue):
    [product] = make_products(1)
    DiscountedProduct.objects.get(pk=product.pk).save()
    assert pending("shop.product") == {f"u:{product.pk}"}


def test_m2m_changes_mark_both_ends(idle_queue):
    [product] = make_products(1)
    red, blue = Tag.objects.create(name="red"), Tag.objects.create(name="blue")
    store.get_redis().flushall()
    product.tags.add(red, blue)
    assert pending("shop.product") == {f"u:{product.pk}"}
    assert changed_fields("shop.product") == {"tags"}
    assert pending("shop.tag") == {f"u:{red.pk}", f"u:{blue.pk}"}
    assert changed_fields("shop.tag") == {"products"}


def test_m2m_clear_marks_the_instance(idle_queue):
    [product] = make_products(1)
    product.tags.add(Tag.objects.create(name="red"))
    store.get_redis().flushall()
    product.tags.clear()
    assert pending("shop.product") == {f"u:{product.pk}"}


def test_invalidate_goes_through_the_same_path(idle_queue):
    with transaction.atomic():
        ormbridge.invalidate(Product, [7, 8])
        ormbridge.invalidate(Category)
        assert pending("shop.product") == set()
    assert pending("shop.product") == {"i:7", "i:8"}
    assert pending("shop.category") == {"*"}


def test_invalidate_refuses_an_unregistered_model():
    with pytest.raises(LookupError, match="not registered"):
        ormbridge.invalidate(ChangeBatch)


def test_unregistered_models_record_nothing(idle_queue):
    ChangeBatch.objects.create(model="x", action="update", pks=[1])
    assert store.get_redis().keys("*pending*") == []
    assert idle_queue() == 0
