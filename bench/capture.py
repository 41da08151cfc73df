"""Benchmark: what capturing changes costs a writer, and how soon others see them.

    python bench/capture.py              # full run, PostgreSQL and SQLite (about 5 minutes)
    python bench/capture.py --quick      # small sizes, a smoke run
    python bench/capture.py --backends sqlite

PostgreSQL: ``DATABASE_URL`` (default
postgres://postgres@127.0.0.1:5432/ormbridge_bench_capture, created if missing);
SQLite: a file in a temporary directory. Redis: two redis-servers this script
starts on free ports of 127.0.0.1 (ormbridge's Redis and the Django cache; the
Celery broker), never the machine's own. Each database runs in its own child
process; nothing is asserted, every figure is printed with its target:

1. ``save()`` in autocommit, a registered model against an unregistered twin
   table (same columns, so no triggers and no read-your-writes work): µs/save;
2. ``save()`` inside one ``atomic()`` of 1,000 saves, registered against twin;
3. ``qs.delete()`` of 200,000 rows, registered against twin;
4. ``QuerySet.update()`` of 1,000,000 rows (SQLite: 100,000, its row-level
   triggers log one change-log row per row), registered against twin;
5. commit -> fresh through ``ormbridge.cache.cached_instance`` in another
   process, 50 writes/s for 10 s (a reader subprocess polls back to back);
6. commit -> event in the namespace's Redis stream, delivered by the relay of
   one real ``celery worker`` subprocess, 50 writes/s for 10 s;
7. 10,000 saves over 100 rows: Celery task messages published (pushes on the
   broker), change-log rows written and relay claims that delivered them.

Times 1-2 are medians over blocks in which the variants take turns, 3-4 single
runs, all in the same process. 1-2 also time a third table, registered but
without triggers, to split the difference into the triggers' part and the
read-your-writes part (noting each write, one Redis DEL at commit), and count
the trips of the commit breaker (Redis slower than COMMIT_TIMEOUT: commits skip
it for BREAKER_COOLDOWN, which a loaded machine causes). Commit times (5, 6) are
taken right after the database returned from the UPDATE, before ormbridge's own
commit-time work. The benchmark's three models exist only in its process: their
tables are created, and dropped at the end, with the schema editor.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bulk_update import ROOT, ensure_database, setup_django

DEFAULT_PG = "postgres://postgres@127.0.0.1:5432/ormbridge_bench_capture"
BACKENDS = ("postgresql", "sqlite")
NAMES = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}
SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "saves": 2_000,
        "atomic": 1_000,
        "rounds": 20,
        "atomic_rounds": 7,
        "delete": 200_000,
        "update": 1_000_000,
        "update_sqlite": 100_000,
        "seconds": 10.0,
        "rate": 50,
        "storm": 10_000,
        "storm_rows": 100,
    },
    "quick": {
        "saves": 200,
        "atomic": 200,
        "rounds": 4,
        "atomic_rounds": 2,
        "delete": 5_000,
        "update": 20_000,
        "update_sqlite": 5_000,
        "seconds": 2.0,
        "rate": 50,
        "storm": 500,
        "storm_rows": 20,
    },
}
SKU = "capture-bench-"
WAIT = 60.0  # bound of every wait for a delivery


def log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S', time.gmtime())}] {message}", file=sys.stderr, flush=True)


# -- Redis servers (parent) ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """A throw-away redis-server on a free TCP port of 127.0.0.1, without persistence."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        import redis

        executable = shutil.which("redis-server")
        if executable is None:
            sys.exit("bench/capture.py needs redis-server on the PATH")
        self.process = subprocess.Popen(
            [
                executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--dbfilename",
                f"{self.name}.rdb",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    sys.exit(f"redis-server {self.name} did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


# -- Django in every process ------------------------------------------------------


def configure() -> None:
    """bench.settings, adjusted for this bench: events go to Redis streams, no receiver.

    bench/apps.py connects a post_save receiver to Product (one Redis DEL per
    saved row, standing in for a project's own cache code in bulk_update.py);
    it is no part of what this bench measures.
    """
    from django.conf import settings
    from django.db.models.signals import post_save

    from shop.models import Product

    settings.ORMBRIDGE = {
        **settings.ORMBRIDGE,
        "EMITTERS": ["ormbridge.broadcast.RedisStreamEmitter"],
    }
    post_save.disconnect(sender=Product, dispatch_uid="bench-receiver")


def make_models() -> dict[str, type[Any]]:
    """Three models with the same columns and their own tables.

    ``registered``: registered, capture triggers installed; ``bare``:
    registered, no triggers (read-your-writes work only, to split the cost);
    ``twin``: not registered, so neither.
    """
    from django.db import models

    made = {}
    for name in ("registered", "bare", "twin"):
        meta = type("Meta", (), {"app_label": "bench", "db_table": f"bench_capture_{name}"})
        made[name] = type(
            f"Capture{name.title()}",
            (models.Model,),
            {
                "__module__": __name__,
                "name": models.CharField(max_length=64),
                "value": models.IntegerField(default=0),
                "Meta": meta,
                "__str__": lambda self: self.name,
            },
        )
    return made


class CommitClock:
    """Innermost execute wrapper: the time.time() at which the database returned.

    In autocommit that is the commit of the statement, before ormbridge's
    read-your-writes wrapper (outside this one) does its Redis round trip.
    """

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        result = execute(sql, params, many, context)
        self.last = time.time()
        return result


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"n": len(ordered), "p50": statistics.median(ordered), "p99": p99, "max": ordered[-1]}


# -- the child per database --------------------------------------------------------


class Bench:
    def __init__(self, backend: str, sizes: dict[str, Any]) -> None:
        from django.db import connection

        from ormbridge import redis_store

        self.backend = backend
        self.sizes = sizes
        self.connection = connection
        self.pg = connection.vendor == "postgresql"
        self.trips = 0
        trip = redis_store.breaker.trip

        def counted(error: BaseException) -> None:
            # Redis took longer than COMMIT_TIMEOUT at a commit: commits skip it for
            # BREAKER_COOLDOWN seconds (cheaper saves, freshness left to the relay).
            self.trips += 1
            trip(error)

        redis_store.breaker.trip = counted  # type: ignore[method-assign]

    # helpers

    @contextlib.contextmanager
    def phase(self, results: dict[str, Any], number: str, what: str) -> Iterator[None]:
        """Log the phase; note in ``results["trips"]`` the breaker trips during it."""
        log(f"{self.backend}: {number}. {what}")
        trips = self.trips
        yield
        if self.trips != trips:
            results.setdefault("trips", {})[number] = self.trips - trips

    def execute(self, sql: str, params: list[Any] | None = None) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)

    def fill(self, model: type[Any], rows: int) -> None:
        """Empty the table, then insert ``rows`` rows (value 1..rows) without logging them."""
        from django.db import transaction

        from ormbridge import capture

        table = model._meta.db_table
        with transaction.atomic(), capture.pause("default", model):
            if self.pg:
                self.execute(f'TRUNCATE "{table}"')
                self.execute(
                    f'INSERT INTO "{table}" (name, value) '
                    f"SELECT 'row ' || g, g FROM generate_series(1, %s) g",
                    [rows],
                )
            else:
                self.execute(f'DELETE FROM "{table}"')
                self.execute(
                    "WITH RECURSIVE seq(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM seq "
                    f'WHERE g < %s) INSERT INTO "{table}" (name, value) '
                    "SELECT 'row ' || g, g FROM seq",
                    [rows],
                )
        self.settle(model)

    def settle(self, model: type[Any]) -> None:
        """Same starting point for both tables: statistics fresh, dirty pages written."""
        self.clear_log()
        table = model._meta.db_table
        if self.pg:
            self.execute(f'VACUUM ANALYZE "{table}"')
            with contextlib.suppress(Exception):
                self.execute("CHECKPOINT")
        else:
            self.execute(f'ANALYZE "{table}"')

    def clear_log(self) -> None:
        from ormbridge.models import ChangeBatch

        ChangeBatch.objects.filter(model__startswith="bench.capture").delete()

    # 1, 2: saves

    def saves(self, variants: dict[str, type[Any]], atomic: bool) -> dict[str, Any]:
        """µs per save() of each variant: medians over blocks, the variants taking turns.

        In autocommit a block is ``saves / rounds`` saves; with ``atomic`` a block
        is one ``atomic()`` of ``atomic`` saves, its commit included.
        """
        from django.db import transaction

        if atomic:
            block, rounds = self.sizes["atomic"], self.sizes["atomic_rounds"]
        else:
            rounds = self.sizes["rounds"]
            block = max(1, self.sizes["saves"] // rounds)
        pools = {
            name: list(model.objects.order_by("pk")[:block]) for name, model in variants.items()
        }
        per_save: dict[str, list[float]] = {name: [] for name in variants}
        for objs in pools.values():  # warm up: connections, Redis, statement caches
            for obj in objs[:50]:
                obj.value += 1
                obj.save()
        names = list(variants)
        trips = self.trips
        for round_ in range(rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                objs = pools[name]
                started = time.perf_counter()
                with transaction.atomic() if atomic else contextlib.nullcontext():
                    for obj in objs:
                        obj.value += 1
                        obj.save()
                per_save[name].append((time.perf_counter() - started) / len(objs) * 1e6)
        medians = {name: statistics.median(values) for name, values in per_save.items()}
        reg, bare, base = medians["registered"], medians["bare"], medians["twin"]
        return {
            "n": block if atomic else block * rounds,
            "registered": reg,
            "twin": base,
            "diff": reg - base,
            "ratio": reg / base,
            "triggers": reg - bare,
            "commit_work": bare - base,
            "trips": self.trips - trips,
            # the least disturbed block of each: less sensitive to other processes
            "best_diff": min(per_save["registered"]) - min(per_save["twin"]),
        }

    # 3, 4: statements over many rows

    def bulk(
        self, registered: type[Any], twin: type[Any], rows: int, run: Callable[[Any], int]
    ) -> dict[str, Any]:
        seconds = {}
        for model in (twin, registered):
            self.fill(model, rows + rows // 10)  # 10% of the rows stay: not a truncation
            started = time.perf_counter()
            changed = run(model.objects.filter(value__lte=rows))
            seconds[model] = time.perf_counter() - started
            if changed != rows:
                log(f"{model.__name__}: {changed} rows changed, expected {rows}")
            self.clear_log()
        reg, base = seconds[registered], seconds[twin]
        return {"n": rows, "registered": reg, "twin": base, "ratio": reg / base}

    # 5, 6, 7: with a worker

    def products(self, count: int) -> list[Any]:
        from shop.models import Category, Product

        Product.objects.filter(sku__startswith=SKU).delete()
        category = Category.objects.get_or_create(name="capture-bench")[0]
        Product.objects.bulk_create(
            Product(sku=f"{SKU}{n}", name=f"p{n}", category=category, price=1, stock=0)
            for n in range(count)
        )
        return list(Product.objects.filter(sku__startswith=SKU).order_by("pk"))

    def paced(self, count: int) -> Iterator[int]:
        """Yield 0..count-1 at ``rate`` per second."""
        interval = 1.0 / self.sizes["rate"]
        start = time.perf_counter()
        for i in range(count):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            yield i

    def freshness(self, product: Any) -> dict[str, Any]:
        """5: commit -> first read of the new value through cached_instance in another process."""
        from ormbridge import redis_store

        count = int(self.sizes["rate"] * self.sizes["seconds"])
        product.stock = 0
        product.save()
        reader = subprocess.Popen(
            [sys.executable, __file__, "--reader", str(product.pk), str(count)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert reader.stdout is not None
        if reader.stdout.readline().strip() != "ready":
            reader.kill()
            return {"error": "the reader did not start"}
        clock = CommitClock()
        committed: dict[int, float] = {}
        skipped: set[int] = set()  # commits whose Redis work the open breaker skipped
        self.connection.ensure_connection()  # ormbridge's wrapper first: ours is inside it
        with self.connection.execute_wrapper(clock):
            for i in self.paced(count):
                product.stock = i + 1
                trips = self.trips
                product.save()
                committed[i + 1] = clock.last
                if redis_store.breaker.open or self.trips != trips:
                    skipped.add(i + 1)
        out, _ = reader.communicate(timeout=WAIT + self.sizes["seconds"])
        report = json.loads(out.strip().splitlines()[-1])
        seen = sorted((int(value), at) for value, at in report["seen"].items())
        # Fresh = this value or a newer one: a reader descheduled for longer than
        # the 20 ms between writes skips values.
        latencies, done_at_commit = [], []
        for value, at in committed.items():
            newer = [t for v, t in seen if v >= value]
            if newer:  # before the noted commit time if the writer was descheduled: 0
                latencies.append(max(0.0, min(newer) - at) * 1000)
                if value not in skipped:
                    done_at_commit.append(latencies[-1])
        result = percentiles(latencies)
        result.update(
            writes=count,
            breaker_open=len(skipped),
            p99_at_commit=percentiles(done_at_commit)["p99"],
            unseen=count - len(latencies),
            skipped=count - len(seen),
            backwards=report["backwards"],
            polls=report["polls"],
            reader_gap=report["gap"] * 1000,
        )
        return result

    def events(self, products: list[Any], redis_url: str) -> dict[str, Any]:
        """6: commit -> arrival of an event naming the row in shop.product's stream."""
        import redis

        from ormbridge.broadcast import stream_key

        count = min(len(products), int(self.sizes["rate"] * self.sizes["seconds"]))
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        key = stream_key("shop.product")
        newest = client.xrevrange(key, count=1)
        arrivals: dict[str, list[float]] = {}
        stop = threading.Event()

        def read() -> None:
            last = newest[0][0] if newest else "0-0"
            while not stop.is_set():
                for _, entries in client.xread({key: last}, block=200, count=1000) or []:
                    now = time.time()
                    for entry_id, fields in entries:
                        last = entry_id
                        for pk in json.loads(fields["event"]).get("pks") or []:
                            arrivals.setdefault(str(pk), []).append(now)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        clock = CommitClock()
        # pk -> (time before save(), commit time): each row is written once, so an
        # event naming it that arrives after its save() began is this write's. It
        # can arrive before the commit time was noted when the writer is
        # descheduled in between: that counts as 0 ms.
        committed: dict[str, tuple[float, float]] = {}
        with self.connection.execute_wrapper(clock):
            for i in self.paced(count):
                product = products[i]
                product.stock += 1
                before = time.time()
                product.save()
                committed[str(product.pk)] = (before, clock.last)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and not all(
            any(t >= before for t in arrivals.get(pk, ())) for pk, (before, _) in committed.items()
        ):
            time.sleep(0.1)
        stop.set()
        reader.join(5)
        latencies = []
        for pk, (before, at) in committed.items():
            after = [t for t in arrivals.get(pk, ()) if t >= before]
            if after:
                latencies.append(max(0.0, min(after) - at) * 1000)
        result = percentiles(latencies)
        result.update(writes=count, unseen=count - len(latencies))
        return result

    def storm(self, products: list[Any], broker_url: str) -> dict[str, Any]:
        """7: saves as fast as they go; task messages pushed to the broker, log rows, claims."""
        import redis
        from django.db.models import Max

        from ormbridge.models import ChangeBatch

        broker = redis.Redis.from_url(broker_url)
        rows = products[: self.sizes["storm_rows"]]
        count = self.sizes["storm"]

        def pushes() -> int:
            stats = broker.info("commandstats")
            return sum(
                stats.get(f"cmdstat_{command}", {}).get("calls", 0)
                for command in ("lpush", "rpush")
            )

        first = (ChangeBatch.objects.aggregate(top=Max("id"))["top"] or 0) + 1
        before = pushes()
        started = time.perf_counter()
        for i in range(count):
            product = rows[i % len(rows)]
            product.stock += 1
            product.save()
        writing = time.perf_counter() - started
        messages = pushes() - before
        written = ChangeBatch.objects.filter(id__gte=first)
        deadline = time.monotonic() + WAIT * 2
        while time.monotonic() < deadline and written.exclude(state="done").exists():
            time.sleep(0.1)
        delivered = time.perf_counter() - started
        claims = written.values("claimed_by", "claimed_at").distinct().count()
        return {
            "saves": count,
            "rows": len(rows),
            "messages": messages,
            "log_rows": written.count(),
            "undelivered": written.exclude(state="done").count(),
            "claims": claims,
            "writing": writing,
            "delivered": delivered,
        }


def start_worker(log_file: Path) -> subprocess.Popen[bytes]:
    with open(log_file.with_suffix(".out"), "wb") as output:
        worker = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(log_file)],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while " ready." not in (log_file.read_text() if log_file.exists() else ""):
        if worker.poll() is not None or time.monotonic() > deadline:
            worker.kill()
            sys.exit(f"the Celery worker did not start; see {log_file}")
        time.sleep(0.1)
    return worker


def wait_for_event(products: list[Any], redis_url: str) -> None:
    """One save, then its event in the stream: the worker's relay is delivering."""
    import redis

    from ormbridge.broadcast import stream_key

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    key = stream_key("shop.product")
    product = products[-1]
    product.stock += 1
    product.save()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for _, fields in client.xrange(key):
            if product.pk in (json.loads(fields["event"]).get("pks") or []):
                return
        time.sleep(0.05)
    sys.exit("the worker's relay delivered no event")


def child(backend: str, sizes: dict[str, Any], work: Path) -> None:
    setup_django()
    configure()
    import sqlite3

    import django
    from django.core.management import call_command
    from django.db import connection, models

    import ormbridge
    from ormbridge import capture
    from ormbridge.conf import settings
    from ormbridge.models import ChangeBatch

    bench = Bench(backend, sizes)
    if bench.pg:
        ensure_database()
    call_command("migrate", verbosity=0)
    ChangeBatch.objects.all().delete()
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "django": django.__version__,
        "sqlite": sqlite3.sqlite_version,
        "delivery_delay": float(settings.DELIVERY_DELAY),
        "relay_poll": float(settings.RELAY_POLL),
    }
    if bench.pg:
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            results["server"] = cursor.fetchone()[0].split()[0]

    variants = make_models()
    registered, twin = variants["registered"], variants["twin"]
    existing = set(connection.introspection.table_names())
    with connection.schema_editor() as editor:
        for model in variants.values():
            if model._meta.db_table in existing:
                editor.delete_model(model)
            editor.create_model(model)
    ormbridge.register(registered)
    ormbridge.register(variants["bare"])
    label = registered._meta.label_lower
    capture.install("default", [label])  # not for "bare": its writes are only noted
    states = {state.state for state in capture.status("default", [label])}
    if states != {"installed"}:
        sys.exit(f"capture triggers of {label}: {states}")
    try:
        pool = max(sizes["saves"] // sizes["rounds"], sizes["atomic"])
        for model in variants.values():
            bench.fill(model, pool)
        with bench.phase(results, "1", "saves in autocommit"):
            results["autocommit"] = bench.saves(variants, atomic=False)
        with bench.phase(results, "2", "saves in atomic()"):
            results["atomic"] = bench.saves(variants, atomic=True)
        with bench.phase(results, "3", f"qs.delete() of {sizes['delete']:,} rows"):
            results["delete"] = bench.bulk(
                registered, twin, sizes["delete"], lambda qs: qs.delete()[0]
            )
        rows = sizes["update"] if bench.pg else sizes["update_sqlite"]
        with bench.phase(results, "4", f"update() of {rows:,} rows"):
            results["update"] = bench.bulk(
                registered, twin, rows, lambda qs: qs.update(value=models.F("value") + 1)
            )
    finally:
        capture.uninstall("default", [label])
        with connection.schema_editor() as editor:
            for model in variants.values():
                editor.delete_model(model)
        bench.clear_log()

    count = int(sizes["rate"] * sizes["seconds"])
    products = bench.products(max(count, sizes["storm_rows"]) + 2)
    ChangeBatch.objects.all().delete()  # the worker starts on an empty change log
    connection.close()
    worker = start_worker(work / f"worker-{backend}.log")
    try:
        wait_for_event(products, os.environ["REDIS_URL"])
        with bench.phase(results, "5", f"commit -> fresh, {count} writes at {sizes['rate']}/s"):
            results["fresh"] = bench.freshness(products[0])
        with bench.phase(results, "6", f"commit -> event, {count} writes at {sizes['rate']}/s"):
            results["event"] = bench.events(products[1:-1], os.environ["REDIS_URL"])
        storm = f"{sizes['storm']:,} saves over {sizes['storm_rows']} rows"
        with bench.phase(results, "7", storm):
            results["storm"] = bench.storm(products, os.environ["CELERY_BROKER_URL"])
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
    print(json.dumps(results))


def reader(pk: int, last: int) -> None:
    """5's reader: poll cached_instance, report when each new value is first seen."""
    setup_django()
    configure()
    from ormbridge.cache import cached_instance
    from shop.models import Product

    seen: dict[int, float] = {}
    current = cached_instance(Product, pk).stock
    print("ready", flush=True)
    backwards = polls = 0
    gap = 0.0
    before = time.time()
    deadline = time.monotonic() + WAIT
    while current != last and time.monotonic() < deadline:
        value = cached_instance(Product, pk).stock
        now = time.time()
        polls += 1
        gap, before = max(gap, now - before), now
        if value != current:
            if value < current:
                backwards += 1
            seen.setdefault(value, now)
            current = value
        time.sleep(0)  # back to back: the poll interval is one read (~1 ms)
    print(json.dumps({"seen": seen, "backwards": backwards, "polls": polls, "gap": gap}))


def worker(log_file: str) -> None:
    """A real Celery worker (solo pool) of the example project; its relay delivers."""
    setup_django()
    configure()
    from example.celery import app

    app.worker_main(
        [
            "worker",
            "-Q",
            "ormbridge",
            "-P",
            "solo",
            "-c",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "INFO",
            "-n",
            f"capture-{os.getpid()}@%h",
            "--logfile",
            log_file,
        ]
    )


# -- the parent: run the children, print the table ---------------------------------


def seconds(value: float) -> str:
    return f"{value:.2f} s" if value >= 1 else f"{value * 1000:.0f} ms"


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def rows_of(results: dict[str, dict[str, Any]], delivery_delay: float) -> list[tuple[str, ...]]:
    """(figure, cell per backend..., target) for every figure."""

    def cells(render: Callable[[dict[str, Any]], str]) -> list[str]:
        out = []
        for backend in results:
            try:
                out.append(render(results[backend]))
            except (KeyError, TypeError, ZeroDivisionError) as exc:
                out.append(f"n/a ({exc})")
        return out

    def saves(key: str, limit: float) -> Callable[[dict[str, Any]], str]:
        def render(r: dict[str, Any]) -> str:
            f = r[key]
            return (
                f"{f['registered']:.0f} vs twin {f['twin']:.0f}: {f['ratio']:.2f}x, "
                f"{f['diff']:+.0f} µs {verdict(f['diff'] <= limit)}"
            )

        return render

    def bulk(key: str, limit: float) -> Callable[[dict[str, Any]], str]:
        def render(r: dict[str, Any]) -> str:
            f = r[key]
            return (
                f"{seconds(f['registered'])} vs twin {seconds(f['twin'])}: {f['ratio']:.2f}x "
                f"{verdict(f['ratio'] <= limit)}"
            )

        return render

    def split(key: str) -> Callable[[dict[str, Any]], str]:
        def render(r: dict[str, Any]) -> str:
            f = r[key]
            trips = f", breaker tripped {f['trips']}x" if f["trips"] else ""
            return (
                f"triggers {f['triggers']:+.0f} µs, read-your-writes {f['commit_work']:+.0f} µs; "
                f"best blocks {f['best_diff']:+.0f} µs{trips}"
            )

        return render

    def latency(key: str, limit: float) -> Callable[[dict[str, Any]], str]:
        def render(r: dict[str, Any]) -> str:
            f = r[key]
            missed = f" ({f['unseen']} unseen)" if f["unseen"] else ""
            return (
                f"p50 {f['p50']:.1f} p99 {f['p99']:.1f} max {f['max']:.1f}{missed} "
                f"{verdict(f['p99'] <= limit and not f['unseen'])}"
            )

        return render

    def reader(r: dict[str, Any]) -> str:
        f = r["fresh"]
        back = f", {f['backwards']} went back" if f["backwards"] else ""
        text = f"{f['polls']:,} polls, longest gap {f['reader_gap']:.0f} ms{back}"
        if f["breaker_open"]:
            text += (
                f"; breaker open at {f['breaker_open']} commits, "
                f"p99 of the others {f['p99_at_commit']:.1f}"
            )
        return text

    def storm(r: dict[str, Any]) -> str:
        f = r["storm"]
        late = f", {f['undelivered']} undelivered" if f["undelivered"] else ""
        return (
            f"task messages: {f['messages']} {verdict(f['messages'] <= 100)} "
            f"({f['log_rows']:,} log rows, {f['claims']} claims{late})"
        )

    any_result = next(iter(results.values()))
    update_rows = " / ".join(f"{r['update']['n']:,}" for r in results.values() if "update" in r)
    event_limit = delivery_delay * 1000 + 100
    return [
        (
            "1 save() in autocommit, µs/save",
            *cells(saves("autocommit", 300)),
            "≤ +300 µs",
        ),
        ("  of which", *cells(split("autocommit")), ""),
        (
            f"2 save() in atomic() of {any_result['atomic']['n']:,}, µs/save",
            *cells(saves("atomic", 30)),
            "≤ +30 µs",
        ),
        ("  of which", *cells(split("atomic")), ""),
        (
            f"3 qs.delete() of {any_result['delete']['n']:,} rows",
            *cells(bulk("delete", 5)),
            "≤ 5x",
        ),
        (f"4 update() of {update_rows} rows", *cells(bulk("update", 1.7)), "≤ 1.7x"),
        ("5 commit -> fresh (cache API), ms", *cells(latency("fresh", 10)), "p99 ≤ 10 ms"),
        ("  reader", *cells(reader), ""),
        (
            "6 commit -> event (stream), ms",
            *cells(latency("event", event_limit)),
            f"p99 ≤ {event_limit:.0f} ms",
        ),
        (
            f"7 {any_result['storm']['saves']:,} saves / {any_result['storm']['rows']} rows",
            *cells(storm),
            "≤ 100",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--reader", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, json.loads(args.sizes), Path(args.work))
        return
    if args.reader:
        reader(*args.reader)
        return
    if args.worker:
        worker(args.worker)
        return

    import redis

    sizes = SIZES["quick" if args.quick else "full"]
    database_url = os.environ.get("DATABASE_URL", DEFAULT_PG)
    if "postgresql" in args.backends and not database_url.startswith(("postgres", "pgsql")):
        sys.exit(f"DATABASE_URL must name a PostgreSQL database, not {database_url}")
    work = Path(tempfile.mkdtemp(prefix="ormbridge-capture-"))
    data, broker = RedisServer("data", work), RedisServer("broker", work)
    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    try:
        data.start()
        broker.start()
        redis_version = redis.Redis(port=data.port).info("server")["redis_version"]
        env = {
            **os.environ,
            "REDIS_URL": f"{data.url}/0",
            "BENCH_RECEIVER_REDIS": f"{data.url}/7",
            "CELERY_BROKER_URL": f"{broker.url}/0",
        }
        for backend in args.backends:
            env["DATABASE_URL"] = (
                database_url if backend == "postgresql" else f"sqlite:///{work / 'bench.sqlite3'}"
            )
            for server in (data, broker):
                redis.Redis(port=server.port).flushall()
            log(f"{backend}: starting")
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    backend,
                    "--sizes",
                    json.dumps(sizes),
                    "--work",
                    str(work),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            if out.returncode != 0:
                sys.exit(f"the {backend} run failed (exit {out.returncode}); work dir {work}")
            results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        data.stop()
        broker.stop()
    shutil.rmtree(work, ignore_errors=True)

    first = next(iter(results.values()))
    versions = [f"Python {first['python']}", f"Django {first['django']}"]
    if "postgresql" in results:
        versions.append(f"PostgreSQL {results['postgresql']['server']}")
    versions += [f"SQLite {first['sqlite']}", f"Redis {redis_version}"]
    delivery_delay = first["delivery_delay"]
    print(
        f"# ormbridge bench/capture.py, {datetime.datetime.now(datetime.UTC):%Y-%m-%d}: "
        f"{os.cpu_count()} CPUs, {', '.join(versions)}"
    )
    print(
        f"# {'quick sizes' if args.quick else 'full sizes'}; registered model vs an unregistered "
        f"twin table in the same process (ratio = registered / twin); DELIVERY_DELAY "
        f"{delivery_delay:g} s; one celery worker (solo pool) runs the relay for 5-7; "
        f"{sizes['rate']} writes/s for {sizes['seconds']:g} s in 5 and 6"
    )
    if "sqlite" in results:
        print(
            "# SQLite's update() count is smaller: its row-level triggers write one "
            "change-log row per updated row; it has no NOTIFY, so the relay looks every "
            f"RELAY_POLL ({results['sqlite']['relay_poll']:g} s) and 6 waits for that"
        )
    table = rows_of(results, delivery_delay)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    heading = ("figure", *(NAMES[b] for b in results), "target")
    widths = [max(w, len(h)) for w, h in zip(widths, heading, strict=True)]
    for row in (heading, *table):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    for backend, result in results.items():
        if result.get("trips"):
            phases = ", ".join(f"{n} in {phase}" for phase, n in result["trips"].items())
            print(
                f"# {NAMES[backend]}: the commit breaker tripped ({phases}): Redis answered a "
                "commit's DEL later than COMMIT_TIMEOUT (0.05 s), so commits skipped it for "
                "BREAKER_COOLDOWN (5 s)"
            )
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"# {time.perf_counter() - started:.0f} s; load average at the end {load}: the 2 CPUs "
        "are shared with other runs, so the figures are noisy"
    )


if __name__ == "__main__":
    main()
