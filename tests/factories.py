"""Small helpers that make example rows without sending signals."""

import itertools
from decimal import Decimal

from shop.models import Category, Product

_serial = itertools.count()


def make_products(count: int, category: Category | None = None, price: str = "1.00") -> list:
    """``count`` products in one ``bulk_create`` (no signals), returned with pks."""
    if category is None:
        category = Category.objects.filter(name="default").first()
        category = category or Category.objects.bulk_create([Category(name="default")])[0]
    return Product.objects.bulk_create(
        Product(sku=f"sku-{n}", name=f"product {n}", category=category, price=Decimal(price))
        for n in itertools.islice(_serial, count)
    )
