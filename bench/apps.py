"""The receiver every benchmarked method feeds: one Redis DEL per saved row."""

import os

import redis
from django.apps import AppConfig
from django.db.models.signals import post_save

_client = redis.Redis.from_url(os.environ.get("BENCH_RECEIVER_REDIS", "redis://127.0.0.1:6379/7"))


def drop_cached_product(sender, instance, **kwargs):
    _client.delete(f"bench:product:{instance.pk}")


class BenchConfig(AppConfig):
    name = "bench"
    label = "bench"

    def ready(self) -> None:
        from shop.models import Product

        post_save.connect(drop_cached_product, sender=Product, dispatch_uid="bench-receiver")
