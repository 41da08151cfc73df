"""Registering models: what is accepted, what is refused, what gets connected."""

import pytest
from django.contrib.auth.models import AbstractUser
from django.db.models.signals import post_delete, post_save

import ormbridge
from ormbridge import registry
from shop.models import Category, DiscountedProduct, Order, Product, Tag


def test_models_listed_in_settings_are_registered():
    assert all(registry.is_registered(m) for m in (Category, Tag, Order))


def test_decorator_registers_the_class_and_returns_it():
    assert registry.is_registered(Product)
    assert Product.__name__ == "Product"


def receiver_count(signal, sender) -> int:
    live = signal._live_receivers(sender)
    return len(live[0] if isinstance(live, tuple) else live)


def test_registering_twice_connects_receivers_once():
    before = receiver_count(post_save, Product), receiver_count(post_delete, Product)
    ormbridge.register(Product)
    ormbridge.register(Product)
    assert (receiver_count(post_save, Product), receiver_count(post_delete, Product)) == before


def test_registering_with_other_options_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        ormbridge.register(Product, cache_timeout=5)


@pytest.mark.parametrize("thing", [object(), "shop.Product", 42, Product(sku="x")])
def test_registering_a_non_model_raises_type_error(thing):
    with pytest.raises(TypeError, match="takes a Django model class"):
        ormbridge.register(thing)


def test_registering_an_abstract_model_raises_type_error():
    with pytest.raises(TypeError, match="abstract"):
        ormbridge.register(AbstractUser)


def test_registering_a_proxy_names_the_concrete_model():
    with pytest.raises(TypeError, match=r"register its concrete model shop\.Product"):
        ormbridge.register(DiscountedProduct)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match=r"unknown option.*colour"):
        ormbridge.register(Product, colour="red")


def test_proxy_signals_are_connected_to_the_concrete_model():
    assert registry.targets(DiscountedProduct) == [Product]
    assert post_save.has_listeners(DiscountedProduct)


def test_unregistered_models_get_no_delete_receivers():
    from django.contrib.auth.models import User

    assert not post_delete.has_listeners(User)
