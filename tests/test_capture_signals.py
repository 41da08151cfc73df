"""Capture by signals, for databases without capture triggers (``CAPTURE = "signals"``)."""

from collections.abc import Iterator
from decimal import Decimal

import pytest
from django.db import connection, transaction

from ormbridge import capture, capture_signals, relay
from ormbridge.cache import cached_instance
from ormbridge.models import ChangeBatch
from shop.models import Product, Tag
from tests.factories import log_mark, logged_since, make_products

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]


@pytest.fixture
def signals_capture(no_relay, settings) -> Iterator[None]:
    """The example's database captured by receivers, its triggers removed meanwhile."""
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "CAPTURE": "signals"}
    capture.uninstall(connection.alias)
    capture_signals.connect()
    try:
        yield
    finally:
        capture_signals.disconnect()
        capture.install(connection.alias)


def logged(mark: int) -> list[tuple[str, str, list, list | None]]:
    return [(row.model, row.action, row.pks, row.fields) for row in logged_since(mark)]


def test_saves_and_deletes_are_logged_in_the_writers_transaction(signals_capture):
    [product] = make_products(1)
    mark = log_mark()
    product.price = Decimal("2.00")
    product.save(update_fields=["price"])
    pk = product.pk
    product.delete()
    assert ("shop.product", "update", [pk], ["price"]) in logged(mark)
    assert ("shop.product", "delete", [pk], None) in logged(mark)


def test_a_rolled_back_save_logs_nothing(signals_capture):
    [product] = make_products(1)
    mark = log_mark()
    with pytest.raises(RuntimeError), transaction.atomic():
        product.save()
        raise RuntimeError
    assert logged(mark) == []


def test_m2m_changes_are_updates_of_both_ends(signals_capture):
    [product] = make_products(1)
    tag = Tag.objects.create(name="sale")
    mark = log_mark()
    product.tags.add(tag)
    assert ("shop.product", "update", [product.pk], ["tags"]) in logged(mark)
    assert ("shop.tag", "update", [tag.pk], ["products"]) in logged(mark)


def test_a_queryset_update_is_not_seen_by_signals(signals_capture):
    """The cost of signals: writes that send none are missed (use ormbridge.safe_bulk_*)."""
    make_products(2)
    mark = log_mark()
    Product.objects.update(stock=5)
    assert logged(mark) == []


def test_a_signal_captured_save_is_fresh_at_commit_and_delivered(signals_capture):
    [product] = make_products(1)
    relay.drain()
    cached_instance(Product, product.pk)
    product.price = Decimal("7.00")
    product.save()
    assert cached_instance(Product, product.pk).price == Decimal("7.00")
    assert relay.drain().batches >= 1
    assert not ChangeBatch.objects.filter(state__in=["pending", "claimed"]).exists()
