"""Benchmark: the relay's claim and the status queries over a change log of 10,000,000 done rows.

    python bench/log_index.py                 # 10,000,000 done rows
    python bench/log_index.py --rows 1000000

PostgreSQL only (same database as bench/bulk_update.py). Fills the change log
with delivered rows in one statement, analyzes it as autovacuum would, adds a
few undelivered rows, then prints each query's plan and its execution time
(``EXPLAIN ANALYZE``), beside the time of a full count of the table.
"""

from __future__ import annotations

import argparse
import datetime
import time

from bulk_update import ensure_database, setup_django


def fill(rows: int) -> None:
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE ormbridge_changebatch CASCADE")
        cursor.execute(
            "INSERT INTO ormbridge_changebatch (model, action, pks, rows, fields, replay, "
            "state, attempts, created_at, finished_at, last_error, claimed_by) "
            "SELECT 'shop.product', 'update', '[1]', 1, NULL, false, 'done', 1, now(), now(), "
            "'', '' FROM generate_series(1, %s)",
            [rows],
        )
        cursor.execute(
            "INSERT INTO ormbridge_changebatch (model, action, pks, rows, fields, replay, "
            "state, attempts, created_at, last_error, claimed_by) "
            "SELECT 'shop.product', 'update', '[1]', 1, NULL, false, 'pending', 0, now(), '', '' "
            "FROM generate_series(1, 10)"
        )
        cursor.execute("VACUUM ANALYZE ormbridge_changebatch")


def explain(name: str, queryset: object) -> None:
    plan = queryset.explain(analyze=True)  # type: ignore[attr-defined]
    execution = next(line for line in plan.splitlines() if line.startswith("Execution Time"))
    scans = [line.strip() for line in plan.splitlines() if "Scan" in line]
    print(f"{name}: {execution.split(':', 1)[1].strip()}")
    for line in scans:
        print(f"    {line.split('  (')[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    setup_django()
    ensure_database()
    from django.db.models import Count, Min
    from django.utils import timezone

    from ormbridge import relay, status
    from ormbridge.models import ChangeBatch

    print(f"# ormbridge bench/log_index.py, {datetime.datetime.now(datetime.UTC):%Y-%m-%d}")
    started = time.perf_counter()
    fill(args.rows)
    print(f"filled {args.rows:,} done rows + 10 pending in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    total = ChangeBatch.objects.count()
    print(
        f"baseline: count(*) of all {total:,} rows: {(time.perf_counter() - started) * 1000:.0f} ms"
    )
    undelivered = ChangeBatch.objects.filter(state__in=status.UNDELIVERED)
    explain(
        "relay claim (500 due rows)",
        ChangeBatch.objects.filter(relay._due(timezone.now())).order_by("id")[:500],
    )
    explain(
        "status: undelivered by state", undelivered.values("model", "state").annotate(n=Count("id"))
    )
    explain(
        "status: oldest undelivered",
        undelivered.exclude(state="failed").values("model").annotate(oldest=Min("created_at")),
    )


if __name__ == "__main__":
    main()
