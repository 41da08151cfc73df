from typing import Any

from django.contrib.contenttypes.fields import GenericForeignKey, GenericRelation
from django.contrib.contenttypes.models import ContentType
from django.db import models
from django.utils.text import slugify

import ormbridge


class Category(models.Model):
    name = models.CharField(max_length=100, unique=True)
    slug = models.SlugField(max_length=100, unique=True, null=True, blank=True)

    class Meta:
        verbose_name_plural = "categories"

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self.slug:
            self.slug = slugify(self.name)
        super().save(*args, **kwargs)


@ormbridge.register(payload=lambda tag: {"name": tag.name})  # tags are public: events carry them
class Tag(models.Model):
    name = models.CharField(max_length=50, unique=True)

    def __str__(self) -> str:
        return self.name


@ormbridge.register
class Product(models.Model):
    sku = models.CharField(max_length=32, unique=True)
    name = models.CharField(max_length=200)
    category = models.ForeignKey(Category, on_delete=models.PROTECT, related_name="products")
    tags = models.ManyToManyField(Tag, blank=True, related_name="products")
    price = models.DecimalField(max_digits=10, decimal_places=2)
    stock = models.IntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    notes = GenericRelation("Note", related_query_name="product")

    objects = ormbridge.CachedManager()  # Product.objects.cache()...

    def __str__(self) -> str:
        return f"{self.sku} {self.name}"


class DiscountedProduct(Product):
    """A proxy: its saves must still invalidate Product's cache."""

    class Meta:
        proxy = True


@ormbridge.register
class DigitalProduct(Product):
    """Multi-table inheritance: its rows span two tables, both captured."""

    download_url = models.URLField(blank=True)


class Customer(models.Model):
    email = models.EmailField(unique=True)

    def __str__(self) -> str:
        return self.email


def order_namespaces(order: "Order") -> list[str]:
    """Each customer's orders also go to their own namespace: shop.order::customer-<id>."""
    return [f"customer-{order.customer_id}"] if order.customer_id else []


@ormbridge.register(namespaces=order_namespaces)
class Order(models.Model):
    class Status(models.TextChoices):
        NEW = "new"
        PAID = "paid"
        SHIPPED = "shipped"

    product = models.ForeignKey(Product, on_delete=models.CASCADE, related_name="orders")
    customer = models.ForeignKey(
        Customer, null=True, blank=True, on_delete=models.SET_NULL, related_name="orders"
    )
    quantity = models.PositiveIntegerField(default=1)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.NEW)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"order {self.pk} ({self.status})"


@ormbridge.register
class Note(models.Model):
    """A note on any row (a generic foreign key): its changes reach what reads it."""

    content_type = models.ForeignKey(ContentType, on_delete=models.CASCADE)
    object_id = models.PositiveBigIntegerField()
    subject = GenericForeignKey("content_type", "object_id")
    text = models.CharField(max_length=200)

    class Meta:
        indexes = [models.Index(fields=["content_type", "object_id"])]

    def __str__(self) -> str:
        return self.text
