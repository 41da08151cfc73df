"""Benchmark: read latency of a cache hit and a miss, against django-cacheops and django-cachalot.

    python bench/cache_reads.py                      # PostgreSQL and SQLite (about 2 minutes)
    python bench/cache_reads.py --iterations 200     # a smoke run
    python bench/cache_reads.py --backends postgresql

Needs the ``bench`` extra (``pip install -e ".[bench]"``: django-cacheops,
django-cachalot); the test suite does not. PostgreSQL: ``DATABASE_URL``
(default postgres://postgres@127.0.0.1:5432/ormbridge_bench_cache, created if
missing); SQLite: a file in a temporary directory. Redis: one redis-server this
script starts on a free port of 127.0.0.1, shared by the three libraries:
ormbridge in db 0, cachalot (through Django's ``RedisCache``) in db 1,
cacheops in db 2. Each database runs in its own child process, in which all
three libraries are installed at once and read the same model, the example's
``shop.Product`` (1,000 rows):

- one row by pk: ormbridge's ``cached_instance(Product, pk)`` and
  ``Product.objects.cache().get(pk=pk)``; cacheops' ``.cache().get(pk=pk)`` on
  a plain ``QuerySet`` of Product (``Product.objects`` is ormbridge's
  ``CachedManager``, whose ``.cache()`` is ormbridge's own); cachalot's
  ``Product.objects.get(pk=pk)`` (it caches every ORM query, it has no
  per-instance API);
- 100 rows, ``order_by("pk")[:100]``, the same way, plus ormbridge's
  ``cached_queryset()``.

A hit reads a warm entry (for a row: a different pk each read, shuffled); a miss
reads right after the entry was invalidated the way a write to that row
invalidates it: ``ormbridge.invalidate(Product, pks=[pk])`` (autocommit: its
tokens are deleted at once), cacheops' ``invalidate_obj(row)``, cachalot's
``invalidate(Product)``. Only the read is timed, one ``perf_counter_ns`` pair
per call. The libraries take turns, read by read. cachalot is switched off
(``cachalot_disabled()``) while the others read; an execute wrapper counts the
SQL queries of every timed read: a hit must run none, a miss at least one, or
the run stops. Baseline: the same reads by the plain ORM, uncached.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bulk_update import ROOT, ensure_database
from capture import RedisServer, log, percentiles

DEFAULT_PG = "postgres://postgres@127.0.0.1:5432/ormbridge_bench_cache"
BACKENDS = ("postgresql", "sqlite")
NAMES = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}
ROWS = 1_000
OTHERS = ("cacheops", "cachalot")
BASELINE = "Django ORM"
BY_PK = "one row by pk"


# -- Django in the child ------------------------------------------------------------


def setup_django(redis_url: str) -> None:
    """bench.settings plus cacheops and cachalot, configured here rather than in a settings file.

    bench/apps.py (a post_save receiver of the other benches) is left out.
    """
    sys.path[:0] = [str(ROOT), str(ROOT / "example")]
    import django
    from django.conf import settings

    from bench import settings as base

    values = {name: getattr(base, name) for name in dir(base) if name.isupper()}
    values["INSTALLED_APPS"] = [
        *(app for app in base.INSTALLED_APPS if not app.startswith("bench")),
        "cacheops",
        "cachalot",
    ]
    values["CACHES"] = {"default": {**base.CACHES["default"], "LOCATION": f"{redis_url}/1"}}
    values["CACHEOPS_REDIS"] = f"{redis_url}/2"
    values["CACHEOPS"] = {"shop.product": {"ops": (), "timeout": 3600}}
    values["CACHALOT_TIMEOUT"] = 3600
    settings.configure(**values)
    django.setup()


def seed() -> list[int]:
    """Exactly ``ROWS`` products, no change-log rows; returns their pks."""
    from django.core.management import call_command
    from django.db import connection

    from ormbridge.models import ChangeBatch
    from shop.models import Category, Order, Product

    call_command("migrate", verbosity=0)
    Order.objects.all().delete()
    Product.objects.all().delete()
    category = Category.objects.get_or_create(name="bench")[0]
    Product.objects.bulk_create(
        Product(sku=f"c{n}", name=f"product {n}", category=category, price=n % 100, stock=n)
        for n in range(ROWS)
    )
    ChangeBatch.objects.all().delete()
    with connection.cursor() as cursor:
        cursor.execute(
            "VACUUM ANALYZE shop_product" if connection.vendor == "postgresql" else "ANALYZE"
        )
    return list(Product.objects.order_by("pk").values_list("pk", flat=True))


# -- what is measured ---------------------------------------------------------------


@dataclass
class Variant:
    """One library's way of doing one read."""

    library: str
    call: str
    read: Callable[[int], Any]
    invalidate: Callable[[int], None] | None  # None: the uncached baseline
    cachalot: bool = False  # cachalot enabled during the reads
    hit: list[float] = field(default_factory=list)
    miss: list[float] = field(default_factory=list)
    queries: dict[str, int] = field(default_factory=lambda: {"hit": 0, "miss": 0})


class QueryCounter:
    """Execute wrapper: counts the SQL statements run while it is on."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        self.count += 1
        return execute(sql, params, many, context)


def variants(objects: dict[int, Any]) -> dict[str, list[Variant]]:
    """The reads, per group: ormbridge's first, then cacheops', cachalot's, the baseline."""
    from cachalot.api import invalidate as cachalot_invalidate
    from cacheops import invalidate_obj
    from django.db.models import QuerySet

    import ormbridge
    from shop.models import Product

    if not isinstance(Product.objects.all(), ormbridge.CachedQuerySet):
        # cacheops mixes its own cache() into every QuerySet: do not measure it twice.
        sys.exit("shop.Product.objects is not an ormbridge.CachedManager")

    def ormbridge_invalidate(pk: int) -> None:
        ormbridge.invalidate(Product, pks=[pk])

    def cacheops_invalidate(pk: int) -> None:
        invalidate_obj(objects[pk])

    def cachalot_invalidate_model(pk: int) -> None:
        cachalot_invalidate(Product)

    return {
        BY_PK: [
            Variant(
                "ormbridge",
                "cached_instance(Product, pk)",
                lambda pk: ormbridge.cached_instance(Product, pk),
                ormbridge_invalidate,
            ),
            Variant(
                "ormbridge",
                "Product.objects.cache().get(pk=pk)",
                lambda pk: Product.objects.cache().get(pk=pk),
                ormbridge_invalidate,
            ),
            Variant(
                "cacheops",
                "QuerySet(Product).cache().get(pk=pk)",
                lambda pk: QuerySet(Product).cache().get(pk=pk),
                cacheops_invalidate,
            ),
            Variant(
                "cachalot",
                "Product.objects.get(pk=pk)",
                lambda pk: Product.objects.get(pk=pk),
                cachalot_invalidate_model,
                cachalot=True,
            ),
            Variant(
                BASELINE, "Product.objects.get(pk=pk)", lambda pk: Product.objects.get(pk=pk), None
            ),
        ],
        "100 rows, order_by('pk')[:100]": [
            Variant(
                "ormbridge",
                "list(Product.objects.cache().order_by('pk')[:100])",
                lambda pk: list(Product.objects.cache().order_by("pk")[:100]),
                ormbridge_invalidate,
            ),
            Variant(
                "ormbridge",
                "list(cached_queryset(Product.objects.order_by('pk')[:100]))",
                lambda pk: list(ormbridge.cached_queryset(Product.objects.order_by("pk")[:100])),
                ormbridge_invalidate,
            ),
            Variant(
                "cacheops",
                "list(QuerySet(Product).cache().order_by('pk')[:100])",
                lambda pk: list(QuerySet(Product).cache().order_by("pk")[:100]),
                cacheops_invalidate,
            ),
            Variant(
                "cachalot",
                "list(Product.objects.order_by('pk')[:100])",
                lambda pk: list(Product.objects.order_by("pk")[:100]),
                cachalot_invalidate_model,
                cachalot=True,
            ),
            Variant(
                BASELINE,
                "list(Product.objects.order_by('pk')[:100])",
                lambda pk: list(Product.objects.order_by("pk")[:100]),
                None,
            ),
        ],
    }


@contextlib.contextmanager
def reading(variant: Variant) -> Iterator[None]:
    """cachalot on for its own reads only."""
    from cachalot.api import cachalot_disabled

    with contextlib.nullcontext() if variant.cachalot else cachalot_disabled():
        yield


def run_group(
    group: list[Variant], pks: list[int], iterations: int, counter: QueryCounter, per_row: bool
) -> None:
    """Hits, then misses, of every variant of ``group``, taking turns read by read.

    Turns spread the machine's noise evenly over the libraries. ``per_row``: each
    pk reads its own entry (every one read is warmed first); otherwise the pk
    only picks the row whose invalidation makes the miss.
    """
    order = [pks[i % len(pks)] for i in range(iterations)]
    random.Random(9).shuffle(order)
    for variant in group:  # warm every entry (and the code paths) before timing
        with reading(variant):
            for pk in sorted(set(order)) if per_row else pks[:50]:
                variant.read(pk)
    for kind in ("hit", "miss"):
        # the baseline has no cache, so no miss
        players = group if kind == "hit" else [v for v in group if v.invalidate is not None]
        gc.collect()
        for i, pk in enumerate(order):
            turn = i % len(players)
            for variant in players[turn:] + players[:turn]:
                with reading(variant):
                    if kind == "miss" and variant.invalidate is not None:
                        variant.invalidate(pk)
                    before = counter.count
                    started = time.perf_counter_ns()
                    variant.read(pk)
                    elapsed = time.perf_counter_ns() - started
                    variant.queries[kind] += counter.count - before
                getattr(variant, kind).append(elapsed / 1000)
        for variant in players:
            check(variant, kind, iterations)


def check(variant: Variant, kind: str, reads: int) -> None:
    """Stop the run when a hit was not one (a query ran) or a miss was served from the cache."""
    queries = variant.queries[kind]
    name = f"{variant.library} {variant.call}"
    if variant.invalidate is None:
        if queries < reads:
            sys.exit(f"{name}: {queries} queries for {reads} uncached reads")
    elif kind == "hit" and queries:
        sys.exit(f"{name}: {queries} queries during {reads} reads of warm entries: not hits")
    elif kind == "miss" and queries < reads:
        sys.exit(f"{name}: {queries} queries for {reads} reads after invalidation: not misses")


def child(iterations: int) -> None:
    setup_django(os.environ["REDIS_URL"].rsplit("/", 1)[0])
    import sqlite3

    import django
    import redis
    from django.db import connection

    from ormbridge.models import ChangeBatch
    from shop.models import Product

    backend = connection.vendor
    if backend == "postgresql":
        ensure_database()
    pks = seed()
    objects = Product.objects.in_bulk(pks)
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "django": django.__version__,
        "sqlite": sqlite3.sqlite_version,
        "redis_py": redis.__version__,
        "cacheops": importlib.metadata.version("django-cacheops"),
        "cachalot": importlib.metadata.version("django-cachalot"),
        "groups": {},
    }
    if backend == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            results["server"] = cursor.fetchone()[0].split()[0]
    counter = QueryCounter()
    started = time.perf_counter()
    with connection.execute_wrapper(counter):
        for name, group in variants(objects).items():
            log(f"{backend}: {name}")
            run_group(group, pks, iterations, counter, per_row=name == BY_PK)
            results["groups"][name] = [
                {
                    "library": v.library,
                    "call": v.call,
                    "hit": percentiles(v.hit),
                    "miss": percentiles(v.miss),
                }
                for v in group
            ]
    results["seconds"] = time.perf_counter() - started
    ChangeBatch.objects.all().delete()
    print(json.dumps(results))


# -- the parent: run the children, print the table ---------------------------------


def cell(figures: dict[str, float], key: str) -> str:
    return "-" if not figures["n"] else f"{figures[key]:,.0f}"


def table(results: dict[str, Any]) -> list[str]:
    """One block per read group: the rows, then ormbridge's hit against the faster other."""
    lines = []
    for name, rows in results["groups"].items():
        baseline = next(r for r in rows if r["library"] == BASELINE)["hit"]
        width = max(len(r["call"]) for r in rows) + 12
        lines.append(
            f"{name:<{width}} {'hit p50':>8} {'hit p99':>8} {'miss p50':>9} {'miss p99':>9}"
            f" {'hit p50 / uncached':>19}"
        )
        for row in rows:
            hit, miss = row["hit"], row["miss"]
            label = f"  {row['library']:<11}{row['call']}"
            if row["library"] == BASELINE:
                label += " (uncached)"
            lines.append(
                f"{label:<{width}} {cell(hit, 'p50'):>8} {cell(hit, 'p99'):>8} "
                f"{cell(miss, 'p50'):>9} {cell(miss, 'p99'):>9} "
                f"{hit['p50'] / baseline['p50']:>18.2f}x"
            )
        others = [r for r in rows if r["library"] in OTHERS]
        faster = min(others, key=lambda r: r["hit"]["p50"])
        for row in rows:
            if row["library"] != "ormbridge":
                continue
            p50 = row["hit"]["p50"] / faster["hit"]["p50"]
            p99 = row["hit"]["p99"] / faster["hit"]["p99"]
            lines.append(
                f"  -> {row['call']}: hit p50 {p50:.2f}x {faster['library']}'s (p99 {p99:.2f}x) "
                f"{'met' if p50 <= 1 else 'NOT met'}"
            )
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--iterations",
        type=int,
        default=500,
        help="timed hits, and timed misses, per library and read (default 500)",
    )
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.iterations)
        return

    import redis

    database_url = os.environ.get("DATABASE_URL", DEFAULT_PG)
    if "postgresql" in args.backends and not database_url.startswith(("postgres", "pgsql")):
        sys.exit(f"DATABASE_URL must name a PostgreSQL database, not {database_url}")
    work = Path(tempfile.mkdtemp(prefix="ormbridge-cache-reads-"))
    server = RedisServer("cache", work)
    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    try:
        server.start()
        redis_version = redis.Redis(port=server.port).info("server")["redis_version"]
        for backend in args.backends:
            redis.Redis(port=server.port).flushall()
            env = {
                **os.environ,
                "REDIS_URL": f"{server.url}/0",
                "DATABASE_URL": (
                    database_url
                    if backend == "postgresql"
                    else f"sqlite:///{work / 'bench.sqlite3'}"
                ),
            }
            log(f"{backend}: starting")
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--iterations", str(args.iterations)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            if out.returncode != 0:
                sys.exit(f"the {backend} run failed (exit {out.returncode})")
            results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    first = next(iter(results.values()))
    versions = [f"Python {first['python']}", f"Django {first['django']}"]
    if "postgresql" in results:
        versions.append(f"PostgreSQL {results['postgresql']['server']}")
    versions += [
        f"SQLite {first['sqlite']}",
        f"Redis {redis_version}",
        f"redis-py {first['redis_py']}",
        f"django-cacheops {first['cacheops']}",
        f"django-cachalot {first['cachalot']}",
    ]
    print(
        f"# ormbridge bench/cache_reads.py, {datetime.datetime.now(datetime.UTC):%Y-%m-%d}: "
        f"{os.cpu_count()} CPUs, {', '.join(versions)}"
    )
    print(
        f"# shop.Product, {ROWS:,} rows; the three libraries in one process per database, "
        f"one redis-server over TCP; {args.iterations:,} timed reads per row and kind, "
        "the libraries taking turns; µs per read, p50 and p99; target: ormbridge's hit "
        "p50 at most the faster of cacheops' and cachalot's (-> lines)"
    )
    for backend, result in results.items():
        print(f"\n{NAMES[backend]} ({result['seconds']:.0f} s)")
        for line in table(result):
            print(line)
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"# {time.perf_counter() - started:.0f} s; load average at the end {load}: the 2 CPUs "
        "are shared with other runs, so the figures are noisy"
    )


if __name__ == "__main__":
    main()
