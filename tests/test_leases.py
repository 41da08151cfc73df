"""One delivery at a time: only the holder of a change-log row's lease delivers it and records
its outcome (issue 17, item 6).

Synchronous deliveries (``replay="sync"``, ``ormbridge_resync --sync``) renew their leases
while they work, as a worker's relay does, so a relay never takes over a delivery that is
merely slow; and a delivery whose lease was taken over (its process paused past it) writes
nothing of the row's state: every write is conditional on still holding it. Deliveries are
made slow by ``ORMBRIDGE_TEST_REPLAY_DELAY`` (``tests.testapp.apps.record_save``), and
``RELAY_LEASE`` is one second, so a delivery outlasts several leases.
"""

import json
import os
import signal
from collections.abc import Callable

import pytest
from django.db import transaction
from django.utils import timezone

import ormbridge
from ormbridge import relay, resync
from ormbridge.models import ChangeBatch, ResyncJob
from shop.models import Product
from tests import replays
from tests.conftest import Worker, wait_until
from tests.factories import make_products, wait_delivered
from tests.test_resync import resync_command

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases]

LEASE = 1.0
ROWS = 30
DELAY = "0.1"  # seconds per replayed row: a delivery of ROWS rows lasts three leases


@pytest.fixture
def short_lease(settings, monkeypatch) -> None:
    """This process delivers slowly, under the same short lease as the workers started here."""
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "RELAY_LEASE": LEASE}
    monkeypatch.setenv("ORMBRIDGE_TEST_REPLAY_DELAY", DELAY)


def quick_worker(start_worker: Callable[..., Worker], **env: str) -> Worker:
    """A worker under the short lease; its own replays are quick (unless ``env`` says)."""
    settings = json.dumps({"RELAY_LEASE": LEASE})
    return start_worker(env={"ORMBRIDGE_TEST_SETTINGS": settings, **env})


def each_replayed_once(products: list) -> bool:
    return replays.saves() == {p.pk: 1 for p in products}


def test_a_sync_bulk_delivery_longer_than_the_lease_is_not_taken_over(
    no_relay, start_worker, short_lease
):
    quick_worker(start_worker)
    products = make_products(ROWS)
    wait_delivered()
    result = ormbridge.safe_bulk_update(Product.objects.all(), replay="sync", stock=3)
    [batch] = ChangeBatch.objects.filter(id__in=result.batch_ids)
    assert replays.saves() == {p.pk: 1 for p in products}
    assert (batch.state, batch.attempts) == ("done", 1)
    assert f":{os.getpid()}:" in batch.claimed_by  # this call's own claim


def test_a_sync_bulk_delivery_whose_lease_ran_out_before_its_commit_is_delivered_once(
    no_relay, start_worker, short_lease
):
    """The chunk's row is written claimed, under a lease that runs out while the caller's
    transaction lasts: at the commit a relay may take it at once, and then only it delivers."""
    quick_worker(start_worker)
    products = make_products(ROWS)
    wait_delivered()
    with transaction.atomic():
        result = ormbridge.safe_bulk_update(Product.objects.all(), replay="sync", stock=3)
        [lease] = ChangeBatch.objects.filter(id__in=result.batch_ids).values_list(
            "lease_until", flat=True
        )
        wait_until(lambda: timezone.now() > lease, 10, "the lease to run out")
    result.wait(timeout=60)
    assert each_replayed_once(products), replays.saves()


def test_a_sync_resync_longer_than_the_lease_is_not_taken_over(no_relay, start_worker, short_lease):
    quick_worker(start_worker)
    products = make_products(ROWS)
    wait_delivered()
    resync_command("shop.Product", "--sync")
    assert replays.saves() == {p.pk: 1 for p in products}
    job = ResyncJob.objects.get()
    [chunk] = ChangeBatch.objects.filter(job=job)
    assert (job.state, chunk.state) == ("done", "done")
    assert f":{os.getpid()}:" in chunk.claimed_by


def test_a_sync_resume_leaves_a_chunk_a_relay_holds_to_it(no_relay, start_worker, settings):
    """A chunk handed to the workers, resumed with --sync while a relay delivers it: the
    command waits for that relay rather than taking the chunk and delivering it too."""
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "RELAY_LEASE": LEASE}
    products = make_products(ROWS)
    job = resync.start(resync.select(["shop.Product"]))
    resync.run(job)  # one pending chunk, no relay yet
    quick_worker(start_worker, ORMBRIDGE_TEST_REPLAY_DELAY=DELAY)
    wait_until(lambda: replays.saves(), 60, "the worker's relay to replay the chunk")
    resync_command("--resume", str(job.pk), "--sync")
    assert ResyncJob.objects.get().state == "done"
    assert each_replayed_once(products), replays.saves()


def test_a_relay_paused_past_its_lease_records_nothing(no_relay, start_worker):
    """A worker's relay replays a chunk (a receiver fails one row), is SIGSTOPped past its
    lease, and another relay delivers the chunk in full. Continued, the first relay finishes
    its replays; its outcome (the failed row to retry) is not written over the new holder's."""
    products = make_products(ROWS)
    victim = quick_worker(
        start_worker,
        ORMBRIDGE_TEST_REPLAY_DELAY="0.05",
        ORMBRIDGE_TEST_FAIL_SAVE=str(products[0].pk),
    )
    wait_delivered()
    result = ormbridge.safe_bulk_update(Product.objects.all(), stock=3)
    [batch_id] = result.batch_ids
    wait_until(lambda: len(replays.saves()) >= 3, 60, "the victim to replay a few rows")
    assert victim.process is not None
    os.killpg(victim.process.pid, signal.SIGSTOP)
    try:
        assert ChangeBatch.objects.get(pk=batch_id).state == "claimed"

        def lease_ended() -> bool:  # read again: a renewal may have been under way
            return ChangeBatch.objects.filter(pk=batch_id, lease_until__lt=timezone.now()).exists()

        wait_until(lease_ended, 10, "the victim's lease to end")
        taken = relay.drain(owner="another relay")  # this process, no delay, no failure
        assert taken.batches == 1
    finally:
        os.killpg(victim.process.pid, signal.SIGCONT)
    last = products[-1].pk
    wait_until(lambda: replays.saves().get(last) == 2, 60, "the victim to finish its replays")

    def victim_ended() -> bool:
        written = ChangeBatch.objects.get(pk=batch_id).state != "done"
        return written or "lost its lease" in victim.log_text()

    wait_until(victim_ended, 30, "the victim to end its delivery")
    batch = ChangeBatch.objects.get(pk=batch_id)
    assert (batch.state, batch.claimed_by, batch.errors) == ("done", "another relay", None)
    assert "lost its lease" in victim.log_text()


def test_a_sync_delivery_in_a_transaction_still_open_renews_nothing(
    no_relay, short_lease, django_capture_on_commit_callbacks, caplog
):
    """A test's transaction running its on_commit callbacks (``TestCase``): the rows are not
    committed, so nobody can take them over, and a heartbeat's own connection would wait
    for the transaction's write lock (SQLite) until the delivery's end, and then some."""
    products = make_products(ROWS)
    with transaction.atomic():
        with django_capture_on_commit_callbacks(execute=True):
            ormbridge.safe_bulk_update(Product.objects.all(), replay="sync", stock=3)
        assert each_replayed_once(products), replays.saves()
        transaction.set_rollback(True)  # the callbacks stay registered: they must not run twice
    assert "could not renew" not in caplog.text  # SQLite: "database is locked", 30 s later
