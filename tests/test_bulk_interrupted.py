"""A bulk call cut off by the database tells what committed (issue 10, operations 12).

On PostgreSQL the caller's connection is killed from another connection
(``pg_terminate_backend``) by a ``post_bulk_*`` receiver, right after a given chunk
committed: the next chunk's first query fails. On SQLite another connection takes
the write lock for longer than the caller waits.
"""

import sqlite3

import pytest
from django.db import DatabaseError, connection
from django.db.models import F

import ormbridge
from ormbridge import signals
from ormbridge.bulk import BulkInterrupted
from shop.models import Category, Product
from tests import replays
from tests.factories import make_products

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases]
postgresql = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="kills a PostgreSQL backend from another"
)


def kill_after(signal, chunks: int):
    """A receiver of ``signal`` terminating the caller's backend after ``chunks`` chunks."""
    seen = []

    def kill(sender, **kwargs):
        seen.append(kwargs["pks"])
        if len(seen) != chunks:
            return
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            [pid] = cursor.fetchone()
        other = connection.get_new_connection(connection.get_connection_params())
        try:
            other.autocommit = True
            other.execute("SELECT pg_terminate_backend(%s, 10000)", [pid])  # waits for it
        finally:
            other.close()

    signal.connect(kill, weak=False)
    return kill


@pytest.fixture
def killed_after_two_chunks():
    receiver = kill_after(signals.post_bulk_update, 2)
    yield receiver
    signals.post_bulk_update.disconnect(receiver)


def interrupted_update(products) -> BulkInterrupted:
    with pytest.raises(BulkInterrupted) as interrupted:
        ormbridge.safe_bulk_update(Product.objects.all(), chunk_size=1000, price=F("price") + 1)
    return interrupted.value


@postgresql
def test_an_interrupted_update_raises_with_the_committed_chunks_to_wait_on(
    worker, killed_after_two_chunks
):
    products = make_products(5_000)
    interrupted = interrupted_update(products)
    assert isinstance(interrupted, DatabaseError)  # what callers caught before
    assert (interrupted.result.rows, interrupted.result.chunks) == (2_000, 2)
    assert len(interrupted.result.batch_ids) == 2
    assert interrupted.resume_after == products[1_999].pk
    assert "pk__gt" in str(interrupted) and str(products[1_999].pk) in str(interrupted)
    interrupted.result.wait(timeout=60)
    assert replays.saves() == {p.pk: 1 for p in products[:2_000]}


@postgresql
def test_finishing_after_resume_after_applies_the_update_once(no_relay, killed_after_two_chunks):
    products = make_products(5_000)
    interrupted = interrupted_update(products)
    signals.post_bulk_update.disconnect(killed_after_two_chunks)  # nor the second call
    rest = Product.objects.filter(pk__gt=interrupted.resume_after)
    result = ormbridge.safe_bulk_update(rest, chunk_size=1000, price=F("price") + 1)
    assert result.rows == 3_000
    assert set(Product.objects.values_list("price", flat=True)) == {2}


@postgresql
def test_an_interrupted_create_says_how_many_objects_were_written(no_relay):
    category = Category.objects.create(name="interrupted")
    objs = [Product(sku=f"i-{n}", name="i", category=category, price=1) for n in range(3_000)]
    receiver = kill_after(signals.post_bulk_create, 1)
    try:
        with pytest.raises(BulkInterrupted) as interrupted:
            ormbridge.safe_bulk_create(Product, objs, batch_size=1000)
    finally:
        signals.post_bulk_create.disconnect(receiver)
    result = interrupted.value.result
    assert (result.rows, result.chunks, interrupted.value.resume_after) == (1_000, 1, None)
    assert [p.pk for p in result.objects] == list(
        Product.objects.order_by("pk").values_list("pk", flat=True)
    )
    ormbridge.safe_bulk_create(Product, objs[result.rows :], batch_size=1000)
    assert Product.objects.count() == 3_000


@pytest.fixture
def write_lock_taken_after_two_chunks():
    """SQLite: after the second chunk, another connection holds the write lock, longer than
    the caller's busy timeout (lowered to 0.2 s): the third chunk cannot start."""
    seen = []
    holder = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None)

    def lock(sender, **kwargs):
        seen.append(kwargs["pks"])
        if len(seen) == 2:
            with connection.cursor() as cursor:
                cursor.execute("PRAGMA busy_timeout = 200")
            holder.execute("BEGIN IMMEDIATE")

    signals.post_bulk_update.connect(lock, weak=False)
    yield
    signals.post_bulk_update.disconnect(lock)
    if holder.in_transaction:
        holder.execute("ROLLBACK")
    holder.close()
    connection.close()  # the busy timeout of the settings again


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's database-wide write lock")
def test_a_chunk_that_cannot_get_the_write_lock_raises_with_the_committed_chunks(
    no_relay, write_lock_taken_after_two_chunks
):
    products = make_products(5_000)
    interrupted = interrupted_update(products)
    assert "database is locked" in str(interrupted.__cause__)
    assert (interrupted.result.rows, interrupted.resume_after) == (2_000, products[1_999].pk)
