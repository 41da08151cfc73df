"""Receivers that record replayed signals in Redis, where a test can read what a worker did."""

import json
import os
import time

from django.apps import AppConfig
from django.db import connections
from django.db.models.signals import post_delete, post_save

from ormbridge import redis_store


def replays_key(label: str, kind: str) -> str:
    return redis_store.key("test", "replays", label, kind)


def record_save(sender, instance, created, update_fields, **kwargs):
    if not kwargs.get("ormbridge_replay"):
        return
    label = sender._meta.label_lower
    fields = None if update_fields is None else sorted(update_fields)
    pipe = redis_store.get_redis().pipeline(transaction=False)
    pipe.hincrby(replays_key(label, "save"), instance.pk, 1)
    pipe.sadd(replays_key(label, "update_fields"), json.dumps(fields))
    pipe.sadd(replays_key(label, "created"), json.dumps(created))
    pipe.execute()
    delay = float(os.environ.get("ORMBRIDGE_TEST_REPLAY_DELAY", "0"))
    if delay:
        time.sleep(delay)


def fail_save(sender, instance, **kwargs):
    """A replay of the pks listed in ``ORMBRIDGE_TEST_FAIL_SAVE`` (comma-separated) raises."""
    failing = os.environ.get("ORMBRIDGE_TEST_FAIL_SAVE", "")
    if failing and kwargs.get("ormbridge_replay") and str(instance.pk) in failing.split(","):
        raise ValueError(f"fail_save refuses {sender._meta.label_lower} {instance.pk}")


def hold_key(kind: str) -> str:
    """``hold_save``'s keys: ``backend`` (its connection's backend pid), ``release``, ``once``."""
    return redis_store.key("test", "hold", kind)


def hold_save(sender, instance, using, **kwargs):
    """The first replay of the pk in ``ORMBRIDGE_TEST_HOLD_SAVE`` waits until the test sets
    ``hold_key("release")`` (60 s at most), then reads its row from the database (unless
    ``ORMBRIDGE_TEST_HOLD_SAVE_READS`` is ``0``).

    While it waits, ``hold_key("backend")`` holds the PostgreSQL backend pid of its
    connection, for the test to terminate. Later replays of the pk go through.
    """
    held = os.environ.get("ORMBRIDGE_TEST_HOLD_SAVE", "")
    if not held or not kwargs.get("ormbridge_replay") or str(instance.pk) != held:
        return
    client = redis_store.get_redis()
    if not client.set(hold_key("once"), 1, nx=True):
        return
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        client.set(hold_key("backend"), cursor.fetchone()[0])
    deadline = time.monotonic() + 60
    while not client.exists(hold_key("release")) and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.environ.get("ORMBRIDGE_TEST_HOLD_SAVE_READS", "1") != "0":
        sender._base_manager.using(using).filter(pk=instance.pk).exists()


def record_delete(sender, instance, **kwargs):
    if not kwargs.get("ormbridge_replay"):
        return
    label = sender._meta.label_lower
    values = {f.attname: str(getattr(instance, f.attname)) for f in sender._meta.concrete_fields}
    pipe = redis_store.get_redis().pipeline(transaction=False)
    pipe.hincrby(replays_key(label, "delete"), instance.pk, 1)
    pipe.hset(replays_key(label, "deleted"), instance.pk, json.dumps(values))
    pipe.execute()


class TestAppConfig(AppConfig):
    name = "tests.testapp"
    label = "testapp"

    def ready(self) -> None:
        from django.apps import apps

        for name in ("Product", "Order", "Customer", "Category"):
            model = apps.get_model("shop", name)
            post_save.connect(record_save, sender=model, dispatch_uid=f"test-save-{name}")
            post_save.connect(fail_save, sender=model, dispatch_uid=f"test-fail-save-{name}")
            post_save.connect(hold_save, sender=model, dispatch_uid=f"test-hold-save-{name}")
            post_delete.connect(record_delete, sender=model, dispatch_uid=f"test-delete-{name}")
