"""Benchmark: a worker's peak memory and time delivering a backlog of huge statements.

    python bench/relay_memory.py                         # 3 UPDATEs of 1,000,000 rows each
    python bench/relay_memory.py --rows 200000 --updates 2 --database my_bench

Builds a table of ``--rows`` products in a PostgreSQL database of its own
(``--database``, created on ``DATABASE_URL``'s server and dropped at the end unless
``--keep``), runs ``--updates`` UPDATEs of every row with no worker running (each
statement is one change-log row holding all its pks), then starts one real Celery
worker (solo pool unless ``--pool``) and measures, until the backlog is delivered:
the peak RSS (``VmHWM`` of ``/proc/<pid>/status``) of the worker process and of its
pool children, and the time from its start and from its "ready" line. Redis (the
cache, events, the broker) is two redis-servers of its own on free ports.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bulk_update import ROOT
from capture import RedisServer

sys.path[:0] = [str(ROOT)]

from tests.processes import children, status_kb  # noqa: E402

SERVER = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")


def setup_django(database: str) -> None:
    """Django on ``database`` (on ``DATABASE_URL``'s server), bench.settings, events emitted."""
    base = SERVER.rsplit("/", 1)[0]
    os.environ["DATABASE_URL"] = f"{base}/{database}"
    sys.path[:0] = [str(ROOT / "example")]
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    import django

    django.setup()
    from django.conf import settings

    # Events as a project emits them, to Redis streams: their size is part of the cost.
    settings.ORMBRIDGE = {
        **settings.ORMBRIDGE,
        "EMITTERS": ["ormbridge.broadcast.RedisStreamEmitter"],
    }


def admin(sql: str) -> None:
    """``sql`` on the server's ``postgres`` database (CREATE / DROP DATABASE)."""
    import psycopg

    base = SERVER.rsplit("/", 1)[0]
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(sql)


def build(rows: int) -> None:
    """Migrate, fill the product table with ``rows`` rows, empty the change log."""
    from django.core.management import call_command
    from django.db import connection

    from ormbridge.models import ChangeBatch
    from shop.models import Category

    call_command("migrate", verbosity=0)
    category = Category.objects.create(name="bench")
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO shop_product (sku, name, category_id, price, stock, updated_at) "
            "SELECT 'r' || n, 'product ' || n, %s, 1, 0, now() FROM generate_series(1, %s) n",
            [category.pk, rows],
        )
        cursor.execute("VACUUM ANALYZE shop_product")
    ChangeBatch.objects.all().delete()  # the fill's own log row is no part of the backlog


def backlog(updates: int) -> list[float]:
    """``updates`` UPDATEs of every row, each its own statement and change-log row."""
    from django.db import connection

    spent = []
    with connection.cursor() as cursor:
        for _ in range(updates):
            started = time.perf_counter()
            cursor.execute("UPDATE shop_product SET stock = stock + 1")
            spent.append(time.perf_counter() - started)
    return spent


def worker(log_file: str, pool: str) -> None:
    """The worker itself (run as ``--worker``): the example project's Celery app."""
    from example.celery import app

    app.worker_main(
        ["worker", "-Q", "ormbridge", "-P", pool, "-c", "1", "--without-gossip",
         "--without-mingle", "--without-heartbeat", "-l", "INFO", "-n",
         f"relay-memory-{os.getpid()}@%h", "--logfile", log_file]
    )  # fmt: skip


def undelivered() -> int:
    from ormbridge.models import ChangeBatch

    return ChangeBatch.objects.exclude(state=ChangeBatch.State.DONE).count()


def deliver(args: argparse.Namespace, env: dict[str, str], work: Path) -> dict[str, Any]:
    """Start the worker, wait for the backlog to be delivered; its figures."""
    log = work / "worker.log"
    command = [sys.executable, __file__, "--worker", str(log), "--pool", args.pool,
               "--database", args.database]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    peaks: dict[int, int] = {}
    ready = None
    try:
        deadline = started + args.timeout
        while True:
            for pid in [process.pid, *children(process.pid)]:
                peaks[pid] = max(peaks.get(pid, 0), status_kb(pid, "VmHWM"))
            if ready is None and log.exists() and " ready." in log.read_text():
                ready = time.monotonic()
            if process.poll() is not None:
                sys.exit(f"the worker exited with {process.returncode}:\n{log.read_text()}")
            if undelivered() == 0:
                break
            if time.monotonic() > deadline:
                sys.exit(f"not delivered after {args.timeout} s")
            time.sleep(0.2)
        done = time.monotonic()
        for pid in [process.pid, *children(process.pid)]:
            peaks[pid] = max(peaks.get(pid, 0), status_kb(pid, "VmHWM"))
    finally:
        process.terminate()
        process.wait(60)
    return {
        "seconds": done - started,
        "after_ready": done - ready if ready is not None else float("nan"),
        "worker_kb": peaks.get(process.pid, 0),
        "children_kb": {pid: kb for pid, kb in peaks.items() if pid != process.pid},
    }


def claims() -> dict[str, Any]:
    """What the change log says of the delivery: rows, pks, claims, the largest row."""
    from django.db.models import Max, Sum

    from ormbridge.models import ChangeBatch

    log = ChangeBatch.objects.all()
    return {
        "log_rows": log.count(),
        "pks": log.aggregate(pks=Sum("rows"))["pks"],
        "claims": log.values("claimed_by", "claimed_at").distinct().count(),
        "largest_row": log.aggregate(most=Max("rows"))["most"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--database", default="ormbridge_bench_relay_memory")
    parser.add_argument("--pool", default="solo", choices=["solo", "prefork", "threads"])
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        setup_django(args.database)
        worker(args.worker, args.pool)
        return

    work = Path(tempfile.mkdtemp(prefix="relay-memory-"))
    data, broker = RedisServer("data", work), RedisServer("broker", work)
    admin(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
    admin(f'CREATE DATABASE "{args.database}"')
    try:
        data.start()
        broker.start()
        env = {
            **os.environ,
            "REDIS_URL": f"{data.url}/0",
            "CELERY_BROKER_URL": f"{broker.url}/0",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")]),
        }
        os.environ.update(env)
        setup_django(args.database)
        from django.db import connection

        commit = subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True, text=True
        ).stdout.strip()
        print(f"# ormbridge bench/relay_memory.py, {datetime.datetime.now(datetime.UTC):%Y-%m-%d}")
        from ormbridge.conf import settings as ormbridge_settings

        cap = getattr(ormbridge_settings, "RELAY_MAX_PKS", None)
        print(f"# code: {commit[:100]}")
        print(f"# RELAY_MAX_PKS: {cap if cap is not None else 'none (this code has no cap)'}")
        started = time.perf_counter()
        build(args.rows)
        print(f"table of {args.rows:,} rows built in {time.perf_counter() - started:.1f} s")
        spent = backlog(args.updates)
        print(f"{args.updates} UPDATEs of {args.rows:,} rows with no worker: "
              + ", ".join(f"{s:.1f} s" for s in spent)
              + f"; backlog: {undelivered()} change-log rows")  # fmt: skip
        connection.close()
        figures = deliver(args, env, work)
        print(f"worker ({args.pool} pool) peak RSS (VmHWM): {figures['worker_kb'] / 1024:.0f} MB")
        for pid, kb in figures["children_kb"].items():
            print(f"  pool child {pid} peak RSS (VmHWM): {kb / 1024:.0f} MB")
        print(
            f"backlog delivered {figures['seconds']:.1f} s after the worker started "
            f"({figures['after_ready']:.1f} s after its 'ready' line)"
        )
        log = claims()
        print(
            f"change log: {log['log_rows']} rows holding {log['pks']:,} pks (the largest "
            f"{log['largest_row']:,}), delivered in {log['claims']} claim(s)"
        )
    finally:
        from django.db import connections

        for connection in connections.all():
            connection.close()
            if hasattr(connection, "close_pool"):
                connection.close_pool()
        if not args.keep:
            admin(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
        data.stop()
        broker.stop()


if __name__ == "__main__":
    main()
