"""A post_save receiver that raises for one row fails that row alone (issue 10, operations 10).

The failing receiver is ``tests.testapp.apps.fail_save``: it raises for the pks
listed in ``ORMBRIDGE_TEST_FAIL_SAVE`` (set here with monkeypatch for the
relay of the test's process, or in a worker's environment).
"""

import json
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema
import pytest
from django.contrib.auth.models import User
from django.urls import reverse

import ormbridge
from ormbridge import relay, status
from ormbridge.bulk import BulkOperationFailed
from ormbridge.cache import cached_instance
from ormbridge.models import ChangeBatch
from shop.models import Product
from tests import commands, emitters, replays
from tests.conftest import wait_until
from tests.factories import cached_entry, make_products, wait_delivered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]

RECEIVER = "tests.testapp.apps.fail_save"
SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "status.schema.json").read_text())


def refusal(pk: int) -> str:
    return f"ValueError: fail_save refuses shop.product {pk}"


class Chunk(NamedTuple):
    products: list[Any]
    victim: Any
    result: ormbridge.BulkResult
    batch_id: int


@pytest.fixture
def chunk(no_relay, monkeypatch, settings) -> Chunk:
    """100 cached products updated in one chunk whose 43rd row's receiver raises (in this
    process); the relay has not run yet."""
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "RETRY_BACKOFF": 60}
    products = make_products(100)
    relay.drain()  # the inserts' own log rows
    for product in products:
        cached_instance(Product, product.pk)
    emitters.clear()
    victim = products[42]
    monkeypatch.setenv("ORMBRIDGE_TEST_FAIL_SAVE", str(victim.pk))
    result = ormbridge.safe_bulk_update(Product.objects.all(), chunk_size=1000, stock=4)
    [batch_id] = result.batch_ids
    return Chunk(products, victim, result, batch_id)


def test_the_failing_rows_chunk_is_still_invalidated_and_emitted(chunk):
    relay.drain()
    assert all(cached_entry("shop.product", p.pk) is None for p in chunk.products)
    events = [e for e in emitters.recorded() if e["type"] == "update"]
    assert sorted(pk for e in events for pk in e["pks"]) == [p.pk for p in chunk.products]


def test_the_other_rows_of_the_chunk_are_replayed(chunk):
    relay.drain()
    # every row once, the victim included: the recording receiver runs before fail_save
    assert replays.saves() == {p.pk: 1 for p in chunk.products}
    assert ChangeBatch.objects.get(pk=chunk.batch_id).retry_pks == [chunk.victim.pk]


def test_the_error_is_recorded_with_the_row_the_receiver_and_the_exception(chunk):
    relay.drain()
    batch = ChangeBatch.objects.get(pk=chunk.batch_id)
    assert batch.errors == [
        {"pk": chunk.victim.pk, "receiver": RECEIVER, "error": refusal(chunk.victim.pk)}
    ]
    assert (batch.state, batch.attempts) == ("pending", 1)
    assert refusal(chunk.victim.pk) in batch.last_error


def test_a_failed_row_is_not_retried_before_its_backoff(chunk):
    relay.drain()
    relay.drain()  # RETRY_BACKOFF is 60 s: nothing is due
    batch = ChangeBatch.objects.get(pk=chunk.batch_id)
    assert (batch.state, batch.attempts) == ("pending", 1)
    assert batch.retry_at is not None
    assert replays.saves()[chunk.victim.pk] == 1


def test_only_the_failed_rows_are_retried(chunk, settings, monkeypatch):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "RETRY_BACKOFF": 0.2}
    relay.drain()
    monkeypatch.delenv("ORMBRIDGE_TEST_FAIL_SAVE")  # the receiver's bug is fixed
    emitters.clear()
    wait_until(lambda: relay.drain().batches, 30, "the retry to be delivered")
    assert replays.saves() == {p.pk: 2 if p == chunk.victim else 1 for p in chunk.products}
    batch = ChangeBatch.objects.get(pk=chunk.batch_id)
    assert (batch.state, batch.attempts, batch.errors, batch.last_error) == ("done", 2, None, "")
    assert emitters.recorded() == []  # the chunk was invalidated and emitted the first time


def test_the_last_attempt_fails_the_batch_at_once(chunk, settings):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "MAX_ATTEMPTS": 1}
    owner = relay.new_owner()
    relay.deliver(relay.claim("default", owner), "default")
    assert ChangeBatch.objects.get(pk=chunk.batch_id).state == "failed"


def test_wait_raises_with_the_receivers_error_once_the_batch_failed(chunk, settings):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "MAX_ATTEMPTS": 1}
    relay.drain()
    with pytest.raises(BulkOperationFailed) as failed:
        chunk.result.wait(timeout=5)
    assert failed.value.errors == [
        {
            "batch": chunk.batch_id,
            "pk": chunk.victim.pk,
            "receiver": RECEIVER,
            "error": refusal(chunk.victim.pk),
        }
    ]
    assert f"pk {chunk.victim.pk}: {RECEIVER}: {refusal(chunk.victim.pk)}" in str(failed.value)


def test_wait_times_out_with_the_errors_so_far(chunk):
    relay.drain()
    with pytest.raises(TimeoutError, match=refusal(chunk.victim.pk)):
        chunk.result.wait(timeout=0.2)


def test_status_lists_the_receiver_errors_of_undelivered_rows_per_model(chunk):
    relay.drain()
    report = status.collect(0.1)
    product = next(m for m in report["models"] if m["model"] == "shop.product")
    jsonschema.validate(product, SCHEMA["properties"]["models"]["items"])
    assert product["receiver_errors"] == [
        {
            "batch": chunk.batch_id,
            "state": "pending",
            "attempts": 1,
            "pk": chunk.victim.pk,
            "receiver": RECEIVER,
            "error": refusal(chunk.victim.pk),
        }
    ]


@pytest.fixture
def admin_client(client):
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "pw"))
    return client


def test_one_failing_row_of_a_10000_row_update_fails_alone_within_the_retry_budget(
    no_relay, start_worker, admin_client
):
    products = make_products(10_000)
    victim = products[4321]
    for product in [*products[::500], victim]:
        cached_instance(Product, product.pk)
    budget = {"MAX_ATTEMPTS": 3, "RETRY_BACKOFF": 0.5}
    env = {
        "ORMBRIDGE_TEST_FAIL_SAVE": str(victim.pk),
        "ORMBRIDGE_TEST_SETTINGS": json.dumps(budget),
    }
    start_worker(env=env)
    wait_delivered()  # the inserts' own log rows
    emitters.clear()

    result = ormbridge.safe_bulk_update(Product.objects.all(), stock=4)
    assert result.chunks > 1
    with pytest.raises(BulkOperationFailed) as failed:
        result.wait(timeout=120)  # three attempts, 0.5 s and 1 s apart: seconds, not minutes

    [error] = failed.value.errors
    assert (error["pk"], error["receiver"], error["error"]) == (
        victim.pk,
        RECEIVER,
        refusal(victim.pk),
    )
    # every other row replayed once; the victim tried on each of the three attempts (wait()
    # raises at the first failed row: the other chunks may still be on their way)
    expected = {p.pk: 3 if p == victim else 1 for p in products}
    wait_until(lambda: replays.saves() == expected, 120, "every other row to be replayed")
    assert all(cached_entry("shop.product", p.pk) is None for p in [*products[::500], victim])

    def updated() -> list[int]:
        events = [e for e in emitters.recorded() if e["type"] == "update"]
        return sorted(pk for e in events for pk in e["pks"])

    wait_until(lambda: updated() == [p.pk for p in products], 60, "an update event for each row")

    done = commands.run("ormbridge_status", "--json")
    assert done.returncode == 1
    product = next(m for m in json.loads(done.stdout)["models"] if m["model"] == "shop.product")
    assert [
        (e["pk"], e["receiver"], e["error"], e["state"]) for e in product["receiver_errors"]
    ] == [(victim.pk, RECEIVER, refusal(victim.pk), "failed")]

    page = admin_client.get(
        reverse("admin:ormbridge_changebatch_changelist") + "?state__exact=failed"
    )
    assert f"pk {victim.pk}: {RECEIVER}: {refusal(victim.pk)}" in page.content.decode()
