"""Benchmark: plain update(), the manual recipe, and safe_bulk_update, on the same filter.

    python bench/bulk_update.py                      # 100,000 and 1,000,000 rows
    python bench/bulk_update.py --rows 100000        # one size only

Needs PostgreSQL (DATABASE_URL, default postgres://postgres@127.0.0.1:5432/ormbridge_bench,
created if missing) and Redis (REDIS_URL, default redis://127.0.0.1:6379/5). Every
method feeds the same post_save receiver, one Redis DEL per row. Each measurement
runs in a fresh process, so its peak RSS is its own; one Celery worker (prefork,
concurrency = CPU count, Celery's default) replays for safe_bulk_update.

Prints, per size: the caller's wall time, the time until every replay and
invalidation is done, the caller's peak RSS, and the ratios to plain update()
and to the manual recipe; then safe_bulk_update's peak RSS at 10,000 rows
against its peak at the largest size. The last row, safe_bulk_update with
replay="none", shows the path where ormbridge's own batched invalidation
replaces a per-row cache-deleting receiver (no per-row signal at all).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILTER = {"stock__lt": 9}  # 90% of the rows: stock cycles 0..9 at seeding
METHODS = ("plain", "manual", "safe", "none")
LABELS = {
    "plain": "plain update()",
    "manual": "manual recipe",
    "safe": "safe_bulk_update",
    "none": "  replay='none'",
}


def setup_django() -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "example")]
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    import django

    django.setup()


def ensure_database() -> None:
    import psycopg
    from django.conf import settings

    db = settings.DATABASES["default"]
    try:
        psycopg.connect(
            host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"]
        ).close()
    except psycopg.OperationalError:
        with psycopg.connect(
            host=db["HOST"], port=db["PORT"], user=db["USER"], dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{db["NAME"]}"')


def seed(rows: int) -> int:
    """Make the product table hold exactly ``rows`` rows; returns how many match FILTER."""
    from django.core.management import call_command
    from django.db import connection

    from shop.models import Category, Product

    call_command("migrate", verbosity=0)
    if Product.objects.count() != rows:
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE shop_product, shop_order, shop_product_tags CASCADE")
        category = Category.objects.get_or_create(name="bench")[0]
        for start in range(0, rows, 20_000):
            Product.objects.bulk_create(
                Product(sku=f"b{n}", name=f"p{n}", category=category, price=1, stock=n % 10)
                for n in range(start, min(rows, start + 20_000))
            )
    return Product.objects.filter(**FILTER).count()


def measure(method: str, rows: int) -> dict[str, float]:
    """One measurement in this (fresh) process."""
    from django.db import connection
    from django.db.models import F
    from django.db.models.signals import post_save

    import ormbridge
    from ormbridge.models import ChangeBatch
    from shop.models import Product

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE shop_product")
    ChangeBatch.objects.all().delete()
    queryset = Product.objects.filter(**FILTER)
    values = {"price": F("price") + 1}
    started = time.perf_counter()
    if method == "plain":
        queryset.update(**values)
        caller = done = time.perf_counter() - started
    elif method == "manual":
        # The recipe as projects write it today, without ormbridge watching the model.
        post_save.disconnect(sender=Product, dispatch_uid="ormbridge:save:shop.product")
        ids = list(queryset.values_list("pk", flat=True))
        queryset.update(**values)
        for obj in Product.objects.filter(pk__in=ids):
            post_save.send(
                sender=Product,
                instance=obj,
                created=False,
                update_fields=frozenset(values),
                raw=False,
                using="default",
            )
        caller = done = time.perf_counter() - started
    else:
        replay = "async" if method == "safe" else "none"
        result = ormbridge.safe_bulk_update(queryset, replay=replay, **values)
        caller = time.perf_counter() - started
        result.wait(timeout=3600)
        done = time.perf_counter() - started
    return {"caller": caller, "done": done, "rss": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak RSS since it started its program.

    Read from /proc (VmHWM): ``getrusage``'s ``ru_maxrss`` also counts the
    parent's memory, inherited by the fork that preceded exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(method: str, rows: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, "--rows", str(rows)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_worker() -> subprocess.Popen[bytes]:
    from celery import current_app

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bench.settings",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")]),
    }
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-q",
            "-A",
            "example",
            "worker",
            "-Q",
            "ormbridge",
            "-l",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=ROOT,
        env=env,
    )
    deadline = time.monotonic() + 60
    while not current_app.control.ping(timeout=0.5):
        if time.monotonic() > deadline:
            worker.kill()
            sys.exit("the Celery worker did not start")
    return worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--rss-rows",
        type=int,
        default=10_000,
        help="small size for the peak-RSS comparison (default 10000)",
    )
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_django()
    if args.child:
        print(json.dumps(measure(args.child, args.rows[0])))
        return

    import celery
    import django
    import redis

    ensure_database()
    print(
        f"# ormbridge bench/bulk_update.py, {datetime.datetime.now(datetime.UTC):%Y-%m-%d}: "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"Django {django.__version__}, Celery {celery.__version__}, redis-py {redis.__version__}"
    )
    print(
        f"# filter {FILTER} (90% of rows), set price=F('price')+1, one post_save receiver "
        "doing one Redis DEL; one worker for safe_bulk_update"
    )
    worker = start_worker()
    try:
        rss = {}
        for rows in sorted(set(args.rows)):
            matching = seed(rows)
            results = {method: run_child(method, rows) for method in METHODS}
            plain, manual = results["plain"], results["manual"]
            print(f"\n{rows:,} rows ({matching:,} updated)")
            print(
                f"  {'method':<18} {'caller s':>9} {'x plain':>8} {'done s':>8} {'x plain':>8} "
                f"{'manual/x':>9} {'peak RSS MB':>12}"
            )
            for method in METHODS:
                r = results[method]
                print(
                    f"  {LABELS[method]:<18} {r['caller']:>9.2f} "
                    f"{r['caller'] / plain['caller']:>8.2f} "
                    f"{r['done']:>8.2f} {r['done'] / plain['done']:>8.2f} "
                    f"{manual['done'] / r['done']:>9.2f} {r['rss']:>12.0f}"
                )
            rss[rows] = results["safe"]["rss"]
        small = args.rss_rows
        seed(small)
        rss[small] = run_child("safe", small)["rss"]
        largest = max(args.rows)
        print(
            f"\nsafe_bulk_update peak RSS: {rss[small]:.0f} MB at {small:,} rows, "
            f"{rss[largest]:.0f} MB at {largest:,} rows ({rss[largest] / rss[small]:.2f}x)"
        )
    finally:
        worker.terminate()
        worker.wait(60)


if __name__ == "__main__":
    main()
