"""The change log stays cheap to read however many delivered rows wait for pruning."""

import pytest
from django.db import connection
from django.db.models import Count, Min
from django.utils import timezone

from ormbridge import relay, status
from ormbridge.models import ChangeBatch

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases]

DONE_ROWS = 200_000


@pytest.fixture
def many_done_rows(no_relay) -> None:
    """``DONE_ROWS`` delivered rows, written in one statement, with fresh statistics."""
    now = timezone.now()
    if connection.vendor == "postgresql":
        series = "generate_series(1, %s)"
    else:
        series = (
            "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < %s) "
            "SELECT i FROM n)"
        )
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO ormbridge_changebatch (model, action, pks, rows, fields, replay, "
            "state, attempts, created_at, finished_at, last_error, claimed_by) "
            "SELECT 'shop.product', 'update', '[1]', 1, NULL, %s, 'done', 1, %s, %s, '', '' "
            f"FROM {series} AS s",
            [False, now, now, DONE_ROWS],
        )
        if connection.vendor == "postgresql":
            # Statistics as autovacuum keeps them. (On SQLite, which has no
            # autovacuum, ANALYZE would record only the average rows per state
            # and make its planner scan: docs/operations.md says so.)
            cursor.execute("ANALYZE ormbridge_changebatch")
    ChangeBatch.objects.create(model="shop.product", action="update", pks=[1], rows=1)


def reads_by_state(plan: str) -> bool:
    """Whether a query plan reads the change log through its (state, id) index, never whole."""
    table = ChangeBatch._meta.db_table
    whole = f"Seq Scan on {table}" in plan or f"SCAN {table}\n" in plan + "\n"
    return "ormbridge_state_id_idx" in plan and not whole


def test_the_relays_claim_reads_only_undelivered_rows(many_done_rows):
    due = ChangeBatch.objects.filter(relay._due(timezone.now())).order_by("id")[:500]
    plan = due.explain()
    assert reads_by_state(plan), plan


def test_the_status_queries_read_only_undelivered_rows(many_done_rows):
    undelivered = ChangeBatch.objects.filter(state__in=status.UNDELIVERED)
    for query in (
        undelivered.values("model", "state").annotate(n=Count("id")),
        undelivered.exclude(state="failed").values("model").annotate(oldest=Min("created_at")),
    ):
        plan = query.explain()
        assert reads_by_state(plan), plan


def test_pruning_deletes_only_delivered_rows_past_retention(many_done_rows):
    assert relay.prune("default", older_than=0) == DONE_ROWS
    assert list(ChangeBatch.objects.values_list("state", flat=True)) == ["pending"]
