"""Small helpers that make example rows, and read the change log they leave behind."""

import itertools
from decimal import Decimal

from django.db.models import Max, QuerySet

from ormbridge import redis_store
from ormbridge.cache import instance_key
from ormbridge.models import ChangeBatch
from shop.models import Category, Product

_serial = itertools.count()

UNDELIVERED = ("pending", "claimed")


def make_products(count: int, category: Category | None = None, price: str = "1.00") -> list:
    """``count`` products in one ``bulk_create`` (no signals), returned with pks.

    The capture triggers log the inserts in the change log, like any other write.
    """
    if category is None:
        category = Category.objects.filter(name="default").first()
        category = category or Category.objects.bulk_create([Category(name="default")])[0]
    return Product.objects.bulk_create(
        Product(sku=f"sku-{n}", name=f"product {n}", category=category, price=Decimal(price))
        for n in itertools.islice(_serial, count)
    )


def log_mark() -> int:
    """The id of the newest change-log row: rows written afterwards have greater ids."""
    return ChangeBatch.objects.aggregate(last=Max("id"))["last"] or 0


def logged_since(mark: int, label: str | None = None) -> QuerySet:
    """Change-log rows written after ``log_mark()`` returned ``mark`` (of ``label`` only)."""
    rows = ChangeBatch.objects.filter(id__gt=mark).order_by("id")
    return rows if label is None else rows.filter(model=label)


def undelivered() -> QuerySet:
    """Change-log rows no relay has delivered yet (failed ones excluded)."""
    return ChangeBatch.objects.filter(state__in=UNDELIVERED)


def wait_delivered(timeout: float = 120) -> None:
    """Wait until a relay (the ``worker`` fixture's) delivered every row logged so far."""
    from tests.conftest import wait_until

    wait_until(lambda: not undelivered().exists(), timeout, "the relay to deliver the change log")


def cached_entry(label: str, pk: object) -> bytes | None:
    """The raw Redis value of an instance's cache entry (None when there is none)."""
    value: bytes | None = redis_store.entries_redis().get(instance_key(label, pk))
    return value
