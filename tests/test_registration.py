"""Registering models: what is accepted, what is refused, and that no signal is connected."""

import pytest
from django.contrib.auth.models import AbstractUser
from django.db import models
from django.db.models.deletion import Collector
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete, pre_save
from django.test.utils import isolate_apps

import ormbridge
from ormbridge import registry
from shop.models import Category, Customer, DiscountedProduct, Order, Product, Tag
from tests.factories import log_mark, logged_since

# The tests that are not of the unit tier read the test database's triggers and log.
pytestmark = pytest.mark.databases


@pytest.mark.unit
def test_models_listed_in_settings_are_registered():
    assert all(registry.is_registered(m) for m in (Category, Tag, Order, Customer))


@pytest.mark.unit
def test_models_given_as_a_dict_in_settings_get_their_options():
    """The example lists Customer as {"shop.Customer": {"cache_timeout": 600}}."""
    assert registry.options(Customer).cache_timeout == 600
    assert registry.options(Category).cache_timeout is None


@pytest.mark.unit
def test_decorator_registers_the_class_and_returns_it():
    assert registry.is_registered(Product)
    assert Product.__name__ == "Product"


SIGNALS = [pre_save, post_save, pre_delete, post_delete, m2m_changed]


def receiver_counts(sender) -> list[int]:
    counts = []
    for signal in SIGNALS:
        live = signal._live_receivers(sender)
        counts.append(len(live[0] if isinstance(live, tuple) else live))
    return counts


@pytest.mark.unit
def test_registering_connects_no_signal_receivers():
    before = receiver_counts(Product), receiver_counts(Product.tags.through)
    ormbridge.register(Product)
    ormbridge.register(Product)
    assert (receiver_counts(Product), receiver_counts(Product.tags.through)) == before


@pytest.mark.unit
def test_registered_models_keep_djangos_fast_paths():
    # Tag is registered and nobody else listens to it: ormbridge must not either,
    # or Django would load every row before a delete and send m2m_changed.
    assert registry.is_registered(Tag)
    assert not any(signal.has_listeners(Tag) for signal in SIGNALS)
    assert not any(signal.has_listeners(Product.tags.through) for signal in SIGNALS)
    links = Product.tags.through.objects.all()
    assert Collector(using="default", origin=None).can_fast_delete(links)


@pytest.mark.unit
def test_registering_with_other_options_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        ormbridge.register(Product, cache_timeout=5)


@pytest.mark.unit
@pytest.mark.parametrize("thing", [object(), "shop.Product", 42, Product(sku="x")])
def test_registering_a_non_model_raises_type_error(thing):
    with pytest.raises(TypeError, match="takes a Django model class"):
        ormbridge.register(thing)


@pytest.mark.unit
def test_registering_an_abstract_model_raises_type_error():
    with pytest.raises(TypeError, match="abstract"):
        ormbridge.register(AbstractUser)


@pytest.mark.unit
def test_registering_a_proxy_names_the_concrete_model():
    with pytest.raises(TypeError, match=r"register its concrete model shop\.Product"):
        ormbridge.register(DiscountedProduct)


@pytest.mark.unit
def test_registering_a_composite_primary_key_model_raises_type_error_naming_it(scratch_registry):
    from tests.testapp.models import Seat

    with pytest.raises(TypeError, match=r"testapp\.Seat has a composite primary key"):
        ormbridge.register(Seat)
    assert not registry.is_registered(Seat)


@pytest.mark.unit
def test_unknown_option_is_named():
    with pytest.raises(TypeError, match=r"unknown option.*colour"):
        ormbridge.register(Product, colour="red")


@pytest.mark.django_db
def test_a_proxys_writes_are_logged_as_its_concrete_model():
    assert registry.is_registered(DiscountedProduct)
    category = Category.objects.create(name="proxy")
    mark = log_mark()
    product = DiscountedProduct.objects.create(sku="p", name="p", category=category, price=1)
    product.delete()
    logged = logged_since(mark)
    assert {row.model for row in logged} == {"shop.product"}
    assert [row.action for row in logged] == ["create", "delete"]


@pytest.mark.unit
def test_unregistered_models_get_no_delete_receivers():
    from django.contrib.auth.models import User

    assert not post_delete.has_listeners(User)


@pytest.fixture
def scratch_registry():
    """Registrations made by the test are forgotten after it."""
    saved, implied = dict(registry._registry), set(getattr(registry, "_implied", ()))
    yield
    registry._registry.clear()
    registry._registry.update(saved)
    registry._implied.clear()
    registry._implied.update(implied)


@pytest.mark.unit
@isolate_apps("tests.testapp")
def test_registering_a_multi_table_child_registers_its_parents(scratch_registry):
    class Venue(models.Model):  # noqa: DJ008
        class Meta:
            app_label = "testapp"

    class Theatre(Venue):  # noqa: DJ008
        class Meta:
            app_label = "testapp"

    ormbridge.register(Theatre)
    assert registry.is_registered(Venue)
    ormbridge.register(Venue, cache_timeout=5)  # its own registration may still set options
    assert registry.options(Venue).cache_timeout == 5
