"""Chaos load test: writers, readers and workers under random faults, then a full comparison.

    python bench/chaos.py                   # 10 minutes of load (docs/guarantees.md quotes it)
    python bench/chaos.py --short           # 75 s of load, about 2 minutes in all (CI runs it)
    python bench/chaos.py --short --seed 7  # the fault schedule and every op choice of seed 7

Needs PostgreSQL (``CHAOS_DATABASE_URL``, default
postgres://postgres@127.0.0.1:5432/ormbridge_chaos, dropped and created again)
and ``redis-server`` on the PATH. The run starts its own ormbridge Redis and
broker Redis on free ports of 127.0.0.1, so it can restart and pause them, and
two Celery worker processes (solo pool; each runs a relay).

Load: ``--writers`` processes (32) each own a set of product rows and do a mix
of ORM saves, creates, deletes, ``QuerySet.update()``, ``safe_bulk_update``
inside a transaction, raw SQL through a second connection of their own,
transactions that roll back, and slow transactions (a fault's target). Each
committed write adds a row to a journal table in the same transaction, so the
journal is exactly what committed. After each commit the writer reads the row
through ``cached_instance`` until it sees its write (commit → fresh). Reader
processes (4) fill the cache all along with ``cached_instance``,
``cached_queryset`` and ``.cache().count()``.

Faults, one every 1.5-4 s, every kind once per round in a random order (none in
the last 15 s of load, while the readers fill the cache again): SIGKILL a
worker (another starts); restart the broker Redis empty; restart ormbridge's
Redis empty, or from a snapshot taken earlier; pause (SIGSTOP) ormbridge's
Redis or the broker for 1.5-4 s; SIGKILL a writer in the middle of a
transaction; terminate a database connection (``pg_terminate_backend``) of a
writer, reader or worker.

Then the load stops, every service runs again, and once the change log is
delivered (bounded by ``--quiesce``) it compares:

- **stale reads**: every row ever written, read through ``cached_instance``,
  and every writer's rows through ``cached_queryset``, against the database;
- **lost changes**: the last committed change of every row must have an event
  (from a worker's ``FileEmitter``) emitted after it, and the last
  ``safe_bulk_update`` of a row a replayed ``post_save`` after it; no change-log
  row may be left undelivered or failed;
- **phantom events**: no event or replay may name a row that never committed
  (every committed row was seeded or journaled; the rest are inserts rolled
  back explicitly, or with their writer killed or connection terminated).

It prints writes/s, the faults by kind, lag p50/p99 (commit → fresh, commit →
event), the largest backlog, the counts above and peak memory per kind of
process, and exits 1 if anything was stale, lost or phantom, or a fault kind
was never injected. PostgreSQL only: SQLite has neither ``NOTIFY`` nor a
second connection's concurrent writes to race.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from bisect import bisect_left
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "example")]  # spawned children run this too

from tests.processes import children, die_with_parent, status_kb  # noqa: E402

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/ormbridge_chaos"
ROWS_PER_WRITER = 30
MIN_ROWS = 10  # a writer deletes only while it owns more
MAX_ROWS = 40  # and creates only while it owns fewer
FAULTS = (
    "kill_worker",
    "restart_broker_empty",
    "restart_redis_empty",
    "restart_redis_from_snapshot",
    "pause_redis",
    "pause_broker",
    "kill_writer_mid_transaction",
    "terminate_db_connection",
)
OPS = {  # op: weight
    "save": 28,
    "create": 10,
    "delete": 8,
    "update": 7,
    "bulk": 7,
    "raw": 15,
    "rollback": 13,
    "slow": 12,
}
FRESH_TIMEOUT = 30.0
BACKLOG = "SELECT count(*) FROM ormbridge_changebatch WHERE state IN ('pending', 'claimed')"
FAULT_INTERVAL = (1.5, 4.0)  # seconds between the end of a fault and the next
CALM = 15.0  # the last seconds of load have no fault: the comparison reads a cache in use
JOURNAL = """
CREATE TABLE chaos_journal (
    id bigserial PRIMARY KEY,
    writer integer NOT NULL,
    op text NOT NULL,
    kind text NOT NULL,
    pks bigint[] NOT NULL,
    t double precision NOT NULL
)
"""


# -- services ---------------------------------------------------------------------------


def _die_with_run() -> None:
    """In a child (before exec, or first thing): SIGKILL when the run's process dies."""
    die_with_parent(signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A redis-server of the run's own, on a free port; restarted on the same port."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.directory = directory / name
        self.directory.mkdir()
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self, from_snapshot: bool = False) -> None:
        """Start it empty, or on the last snapshot (``SAVE`` writes ``snapshot.rdb``; Redis 7
        refuses to change ``dbfilename`` at run time, so an empty start hides the file)."""
        snapshot = self.directory / "snapshot.rdb"
        hidden = self.directory / "snapshot.hidden"
        if not from_snapshot and snapshot.exists():
            snapshot.rename(hidden)
        log = (self.directory / "redis.log").open("ab")
        binary = shutil.which("redis-server") or "redis-server"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--dbfilename", snapshot.name],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_run,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    self.client().ping()
                    return
                except Exception:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise RuntimeError(
                            f"{self.name} Redis did not start on {self.port}"
                        ) from None
                    time.sleep(0.05)
        finally:
            if hidden.exists():
                hidden.rename(snapshot)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def snapshot(self) -> None:
        self.client().save()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


class Worker:
    """A ``celery worker`` process (solo pool: its relay and its tasks)."""

    def __init__(self, index: int, run_dir: Path, queue: str) -> None:
        self.index = index
        self.run_dir = run_dir
        self.queue = queue
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        env = {
            **os.environ,
            "PGAPPNAME": f"chaos-worker-{self.index}",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")]),
        }
        log = self.run_dir / f"worker-{self.index}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "example", "worker", "-Q", self.queue,
             "-P", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-l", "WARNING", "-n", f"chaos-{self.index}-{self.starts}@%h", "--logfile", str(log)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_run,
        )  # fmt: skip

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None


# -- writers and readers (child processes) ----------------------------------------------


class RolledBack(Exception):
    """Raised inside a transaction to roll it back."""


def _child_setup(role: str, index: int, run_dir: str) -> None:
    """Django in a spawned child; its stderr (ormbridge's warnings under faults) to a file."""
    _die_with_run()  # a run killed outright leaves no writer writing
    os.environ["PGAPPNAME"] = f"chaos-{role}-{index}"
    log = os.open(Path(run_dir) / f"{role}-{index}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(log, 2)
    import django

    django.setup()


class Writer:
    def __init__(self, index: int, seed: int, incarnation: int, flags: Any) -> None:
        from shop.models import Category, Product

        self.index = index
        self.prefix = f"w{index:02d}-"
        self.rng = random.Random(f"{seed}-{index}-{incarnation}")
        self.flags = flags
        self.category_id = Category.objects.get(name="chaos").pk
        self.own = list(
            Product.objects.filter(sku__startswith=self.prefix).values_list("pk", flat=True)
        )
        self.raw: Any = None
        self.ops = list(OPS)
        self.weights = list(OPS.values())

    # records
    def note(self, record: dict[str, Any]) -> None:
        from bench.chaos_app import append

        append(f"writer{self.index:02d}", record)

    def journal(self, op: str, kind: str, pks: list[int]) -> None:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO chaos_journal (writer, op, kind, pks, t) VALUES (%s, %s, %s, %s, %s)",
                [self.index, op, kind, pks, time.time()],
            )

    def price(self) -> Decimal:
        return Decimal(self.rng.randrange(100, 10**8)) / 100

    def pick(self, count: int = 1) -> list[int]:
        return self.rng.sample(self.own, min(count, len(self.own)))

    def insert(self, price: Decimal) -> int:
        from shop.models import Product

        product = Product.objects.create(
            sku=self.prefix + uuid.uuid4().hex[:12], name="chaos",
            category_id=self.category_id, price=price,
        )  # fmt: skip
        self.note({"attempt": product.pk})  # committed or not, the journal tells
        return int(product.pk)

    def raw_connection(self) -> Any:
        import psycopg
        from django.db import connection

        if self.raw is None or self.raw.closed or self.raw.broken:
            db = connection.settings_dict
            self.raw = psycopg.connect(
                host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"],
                application_name=f"chaos-writer-{self.index}-raw",
            )  # fmt: skip
        return self.raw

    # ops: each returns (path, pk, expected price or None for gone) once committed, or None
    def op_save(self) -> tuple[str, int, Decimal | None] | None:
        from django.db import transaction

        from shop.models import Product

        [pk], price = self.pick(), self.price()
        with transaction.atomic():
            product = Product.objects.get(pk=pk)
            product.price = price
            product.save()
            self.journal("save", "update", [pk])
        return "django", pk, price

    def op_create(self) -> tuple[str, int, Decimal | None] | None:
        from django.db import transaction

        if len(self.own) >= MAX_ROWS:
            return self.op_delete()
        price = self.price()
        with transaction.atomic():
            pk = self.insert(price)
            self.journal("create", "create", [pk])
        self.own.append(pk)
        return "django", pk, price

    def op_delete(self) -> tuple[str, int, Decimal | None] | None:
        from django.db import transaction

        from shop.models import Product

        if len(self.own) <= MIN_ROWS:
            return self.op_create()
        [pk] = self.pick()
        with transaction.atomic():
            Product.objects.filter(pk=pk).delete()
            self.journal("delete", "delete", [pk])
        self.own.remove(pk)
        return "django", pk, None

    def op_update(self) -> tuple[str, int, Decimal | None] | None:
        from django.db import transaction

        from shop.models import Product

        pks, price = self.pick(self.rng.randint(2, 6)), self.price()
        with transaction.atomic():
            Product.objects.filter(pk__in=pks).update(price=price)
            self.journal("update", "update", pks)
        return "django", pks[0], price

    def op_bulk(self) -> tuple[str, int, Decimal | None] | None:
        from django.db import transaction

        import ormbridge
        from shop.models import Product

        start, price = min(self.pick(8)), self.price()
        queryset = Product.objects.filter(sku__startswith=self.prefix, pk__gte=start)
        with transaction.atomic():
            pks = list(queryset.values_list("pk", flat=True))
            ormbridge.safe_bulk_update(queryset, price=price, chunk_size=5)
            self.journal("bulk", "bulk", pks)
        return "django", pks[-1], price

    def op_raw(self) -> tuple[str, int, Decimal | None] | None:
        pks, price = self.pick(self.rng.randint(1, 4)), self.price()
        raw = self.raw_connection()
        try:
            raw.execute("UPDATE shop_product SET price = %s WHERE id = ANY(%s)", [price, pks])
            raw.execute(
                "INSERT INTO chaos_journal (writer, op, kind, pks, t) VALUES (%s, %s, %s, %s, %s)",
                [self.index, "raw", "update", pks, time.time()],
            )
            raw.commit()
        except BaseException:
            raw.close()
            raise
        return "raw", pks[0], price

    def op_rollback(self) -> tuple[str, int, Decimal | None] | None:
        from django.db import transaction

        from shop.models import Product

        pks, price = self.pick(3), self.price()
        if self.rng.random() < 0.3:  # through the second connection
            raw = self.raw_connection()
            try:
                row = raw.execute(
                    "INSERT INTO shop_product (sku, name, category_id, price, stock, updated_at)"
                    " VALUES (%s, 'chaos', %s, %s, 0, now()) RETURNING id",
                    [self.prefix + uuid.uuid4().hex[:12], self.category_id, price],
                ).fetchone()
                self.note({"attempt": row[0]})
                raw.execute("UPDATE shop_product SET price = %s WHERE id = ANY(%s)", [price, pks])
                raw.rollback()
            except BaseException:
                raw.close()
                raise
            return None
        with contextlib.suppress(RolledBack), transaction.atomic():
            self.insert(price)
            Product.objects.filter(pk__in=pks).update(price=price)
            Product.objects.filter(pk=self.pick()[0]).delete()
            raise RolledBack
        return None

    def op_slow(self) -> tuple[str, int, Decimal | None] | None:
        """A transaction that stays open a while: the fault injector kills writers in one."""
        from django.db import transaction

        from shop.models import Product

        [pk], price = self.pick(), self.price()
        with transaction.atomic():
            created = self.insert(price)
            self.flags[self.index] = 1
            try:
                time.sleep(self.rng.uniform(0.3, 0.8))
            finally:
                self.flags[self.index] = 0
            Product.objects.filter(pk=pk).update(price=price)
            self.journal("slow", "create", [created])
            self.journal("slow", "update", [pk])
            gone = None
            if len(self.own) >= MAX_ROWS:  # keep the writer's rows about as many
                gone = self.rng.choice([own for own in self.own if own != pk])
                Product.objects.filter(pk=gone).delete()
                self.journal("slow", "delete", [gone])
        self.own.append(created)
        if gone is not None:
            self.own.remove(gone)
        return "django", pk, price

    def fresh_after(self, path: str, pk: int, price: Decimal | None, committed: float) -> None:
        """Read ``pk`` through the cache API until it shows this write; note how long."""
        import ormbridge
        from shop.models import Product

        deadline = committed + FRESH_TIMEOUT
        while True:
            try:
                seen: Decimal | None = ormbridge.cached_instance(Product, pk).price
            except Product.DoesNotExist:
                seen = None
            except Exception:
                seen = Decimal(-1)  # a connection killed under the read: try again
                self.close_connections()
            now = time.time()
            if seen == price or now > deadline:
                self.note({"fresh": path, "lag": now - committed, "ok": seen == price})
                return
            time.sleep(0.01)

    def close_connections(self) -> None:
        from django.db import connection

        connection.close()

    def run(self, stop: Any) -> None:
        while not stop.is_set():
            op = self.rng.choices(self.ops, self.weights)[0]
            try:
                written = getattr(self, f"op_{op}")()
            except Exception as error:  # a fault: the transaction rolled back, or its
                # outcome is unknown (the journal says)
                self.note({"error": op, "type": type(error).__name__})
                self.close_connections()
                self.own = self.reload_own()
                continue
            self.note({"op": op, "committed": written is not None})
            if written is not None:
                self.fresh_after(*written, time.time())
            time.sleep(self.rng.uniform(0.1, 0.5))

    def reload_own(self) -> list[int]:
        from shop.models import Product

        for _ in range(50):
            try:
                queryset = Product.objects.filter(sku__startswith=self.prefix)
                return list(queryset.values_list("pk", flat=True))
            except Exception:
                self.close_connections()
                time.sleep(0.1)
        raise RuntimeError("the database stayed unreachable")


def writer_main(
    index: int, seed: int, incarnation: int, run_dir: str, flags: Any, stop: Any
) -> None:
    _child_setup("writer", index, run_dir)
    Writer(index, seed, incarnation, flags).run(stop)


def reader_main(index: int, seed: int, writers: int, run_dir: str, stop: Any) -> None:
    _child_setup("reader", index, run_dir)
    from django.db import connection

    import ormbridge
    from bench.chaos_app import append
    from shop.models import Product

    rng = random.Random(f"{seed}-reader-{index}-{os.getpid()}")
    live: list[int] = []
    refreshed, reported, position, reads = 0.0, time.monotonic(), index * 97, 0
    while not stop.is_set():
        try:
            if time.monotonic() - refreshed > 3:  # each reader sweeps the live rows
                live = list(Product.objects.order_by("pk").values_list("pk", flat=True))
                refreshed = time.monotonic()
            choice = rng.random()
            if choice < 0.85 and live:
                position = (position + 1) % len(live)
                with contextlib.suppress(Product.DoesNotExist):
                    ormbridge.cached_instance(Product, live[position])
            elif choice < 0.98:
                prefix = f"w{rng.randrange(writers):02d}-"
                ormbridge.cached_queryset(
                    Product.objects.filter(sku__startswith=prefix).order_by("pk")
                )
            else:
                Product.objects.cache().count()
            reads += 1
        except Exception:
            connection.close()
            time.sleep(0.05)
        if time.monotonic() - reported > 2:
            append(f"reader{index:02d}", {"reads": reads})
            reads, reported = 0, time.monotonic()
        time.sleep(0.001)


# -- the run ----------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.run_dir = Path(tempfile.mkdtemp(prefix="ormbridge-chaos-"))
        self.redis = RedisServer("redis", self.run_dir)
        self.broker = RedisServer("broker", self.run_dir)
        self.workers: list[Worker] = []
        self.context = multiprocessing.get_context("spawn")
        self.flags = self.context.Array("b", args.writers, lock=False)
        self.stop = self.context.Event()
        self.writers: dict[int, Any] = {}
        self.incarnations: Counter[int] = Counter()
        self.readers: list[Any] = []
        self.faults: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.expected_deaths: set[int] = set()
        self.backlog_max = 0
        self.peaks: defaultdict[str, float] = defaultdict(float)
        self.sampling = True
        self.admin: Any = None

    # setup
    def start_services(self) -> None:
        url = os.environ.get("CHAOS_DATABASE_URL", DEFAULT_DATABASE_URL)
        self.redis.start()
        self.broker.start()
        os.environ.update(
            DJANGO_SETTINGS_MODULE="bench.chaos_settings",
            DATABASE_URL=url,
            REDIS_URL=self.redis.url,
            CELERY_BROKER_URL=self.broker.url,
            CHAOS_RUN_DIR=str(self.run_dir),
            PGAPPNAME="chaos-main",
        )
        import django
        import psycopg

        django.setup()
        from django.conf import settings

        db = settings.DATABASES["default"]
        if not db["ENGINE"].endswith("postgresql"):
            raise SystemExit("chaos.py: CHAOS_DATABASE_URL must name a PostgreSQL database")
        params = {"host": db["HOST"], "port": db["PORT"], "user": db["USER"]}
        with psycopg.connect(**params, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db["NAME"]}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{db["NAME"]}"')
        self.admin = psycopg.connect(**params, dbname=db["NAME"], autocommit=True)
        self.sampler_db = psycopg.connect(**params, dbname=db["NAME"], autocommit=True)

        from django.core.management import call_command
        from django.db import connection

        from shop.models import Category, Product

        call_command("migrate", verbosity=0)
        with connection.cursor() as cursor:
            cursor.execute(JOURNAL)
        category = Category.objects.create(name="chaos")
        Product.objects.bulk_create(
            Product(sku=f"w{w:02d}-seed-{n}", name="chaos", category=category, price=Decimal(1))
            for w in range(self.args.writers)
            for n in range(ROWS_PER_WRITER)
        )
        from ormbridge.models import ChangeBatch

        ChangeBatch.objects.all().delete()  # the seed is not part of the comparison
        self.seeded = set(Product.objects.values_list("pk", flat=True))
        from ormbridge.conf import settings as ormbridge_settings

        self.redis.snapshot()
        self.workers = [
            Worker(n, self.run_dir, ormbridge_settings.QUEUE) for n in range(self.args.workers)
        ]
        for worker in self.workers:
            worker.start()

    def start_writer(self, index: int) -> None:
        self.incarnations[index] += 1
        process = self.context.Process(
            target=writer_main,
            args=(index, self.args.seed, self.incarnations[index], str(self.run_dir),
                  self.flags, self.stop),
            daemon=True,
        )  # fmt: skip
        process.start()
        self.writers[index] = process

    def start_load(self) -> None:
        for index in range(self.args.writers):
            self.start_writer(index)
        for index in range(self.args.readers):
            process = self.context.Process(
                target=reader_main,
                args=(index, self.args.seed, self.args.writers, str(self.run_dir), self.stop),
                daemon=True,
            )
            process.start()
            self.readers.append(process)

    # while the load runs
    def supervise(self) -> None:
        """Start again what died: a killed worker or writer, or one that exited by itself."""
        for worker in self.workers:
            if not worker.alive():
                if worker.process is not None and worker.process.pid not in self.expected_deaths:
                    self.unexpected["worker exited"] += 1
                worker.start()
        if self.stop.is_set():
            return
        for index, process in self.writers.items():
            if not process.is_alive():
                if process.pid not in self.expected_deaths:
                    self.unexpected[f"writer exited ({process.exitcode})"] += 1
                self.start_writer(index)

    def inject(self, kind: str) -> None:
        self.faults[kind] += 1
        pause = self.rng.uniform(1.5, 4.0)
        if kind == "kill_worker":
            worker = self.rng.choice(self.workers)
            if worker.process is not None:
                self.expected_deaths.add(worker.process.pid)
            worker.kill()
            worker.start()
        elif kind == "restart_broker_empty":
            self.broker.kill()
            self.broker.start()
        elif kind == "restart_redis_empty":
            self.redis.kill()
            self.redis.start()
        elif kind == "restart_redis_from_snapshot":
            self.redis.kill()
            self.redis.start(from_snapshot=True)
        elif kind in ("pause_redis", "pause_broker"):
            server = self.redis if kind == "pause_redis" else self.broker
            server.pause()
            time.sleep(pause)
            server.resume()
        elif kind == "kill_writer_mid_transaction":
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                inside = [i for i in range(self.args.writers) if self.flags[i]]
                if inside:
                    break
                time.sleep(0.005)
            else:
                self.faults[kind] -= 1
                self.faults["kill_writer_outside_transaction"] += 1
                inside = list(range(self.args.writers))
            process = self.writers[self.rng.choice(inside)]
            self.expected_deaths.add(process.pid)
            process.kill()
            process.join()
        elif kind == "terminate_db_connection":
            rows = self.admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name LIKE 'chaos-%%' AND application_name <> 'chaos-main'"
            ).fetchall()
            if rows:
                self.admin.execute("SELECT pg_terminate_backend(%s)", [self.rng.choice(rows)[0]])

    def sample(self) -> None:
        """Every second: the backlog, and the peak memory of every process by kind."""
        while self.sampling:
            with contextlib.suppress(Exception):
                backlog = self.sampler_db.execute(BACKLOG).fetchone()[0]
                self.backlog_max = max(self.backlog_max, backlog)
            pids: list[tuple[str, int]] = [("main", os.getpid())]
            pids += [("writer", p.pid) for p in list(self.writers.values()) if p.pid]
            pids += [("reader", p.pid) for p in self.readers if p.pid]
            for worker in self.workers:
                if worker.process is not None:
                    pids += [
                        ("worker", pid)
                        for pid in [worker.process.pid, *children(worker.process.pid)]
                    ]
            for server in (self.redis, self.broker):
                if server.process is not None:
                    pids.append((f"{server.name} Redis", server.process.pid))
            for role, pid in pids:
                self.peaks[role] = max(self.peaks[role], status_kb(pid, "VmHWM") / 1024)
            time.sleep(1)

    def load(self) -> float:
        """The load and the faults for ``--duration`` seconds; returns the seconds it ran."""
        self.start_load()
        started = time.monotonic()
        deadline = started + self.args.duration
        calm = deadline - CALM  # the readers fill the cache again, for the comparison
        plan: list[str] = []
        next_fault = started + self.rng.uniform(*FAULT_INTERVAL)
        next_snapshot = started + 10
        while time.monotonic() < deadline:
            self.supervise()
            now = time.monotonic()
            if now >= next_snapshot:
                with contextlib.suppress(Exception):
                    self.redis.snapshot()
                next_snapshot = now + 10
            if now >= next_fault and now < calm:
                if not plan:
                    plan = self.rng.sample(FAULTS, len(FAULTS))
                kind = plan.pop(0)
                print(f"  {now - started:6.1f} s  {kind}", flush=True)
                self.inject(kind)
                next_fault = time.monotonic() + self.rng.uniform(*FAULT_INTERVAL)
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        self.stop.set()
        for process in [*self.writers.values(), *self.readers]:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
        return elapsed

    def quiesce(self) -> float | None:
        """Every service up, then wait until the change log is delivered; its seconds, or None."""
        for server in (self.redis, self.broker):
            server.resume()
        started = time.monotonic()
        while time.monotonic() - started < self.args.quiesce:
            self.supervise()
            left = self.admin.execute(BACKLOG).fetchone()[0]
            if not left:
                return time.monotonic() - started
            time.sleep(0.5)
        return None

    def stop_all(self) -> None:
        self.sampling = False
        self.stop.set()
        for process in [*self.writers.values(), *self.readers]:
            if process.is_alive():
                process.kill()
        for worker in self.workers:
            worker.kill()
        self.redis.kill()
        self.broker.kill()


def _read_jsonl(run_dir: Path, pattern: str) -> list[dict[str, Any]]:
    records = []
    for path in sorted(run_dir.glob(pattern)):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line cut by SIGKILL mid-write
                records.append(json.loads(line))
    return records


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the comparison ---------------------------------------------------------------------


def compare(run: Run) -> dict[str, Any]:
    """Database against cache, events and replays, after quiescence."""
    from django.db import connection

    import ormbridge
    from ormbridge import cache, redis_store, stats
    from ormbridge.models import ChangeBatch
    from shop.models import Product

    connection.close()  # the main process's connection may have been terminated
    with connection.cursor() as cursor:
        cursor.execute("SELECT writer, op, kind, pks, t FROM chaos_journal")
        journal = cursor.fetchall()
    fields = [field.attname for field in Product._meta.concrete_fields]

    def values(product: Any) -> tuple[Any, ...]:
        return tuple(getattr(product, name) for name in fields)

    truth = {product.pk: values(product) for product in Product.objects.all()}
    created = {pk for _, _, kind, pks, _ in journal if kind == "create" for pk in pks}
    written = run.seeded | created

    # stale reads: every row ever written, through the cache API
    stats_key = redis_store.stats_key("shop.product")
    stats.counts.send()
    hits_before = int(redis_store.get_redis().hget(stats_key, "hits") or 0)
    present = redis_store.entries_redis().exists  # the cached instances the readers left behind
    entries = sum(present(cache.instance_key("shop.product", pk)) for pk in written)
    stale: list[str] = []
    for pk in sorted(written):
        try:
            seen: tuple[Any, ...] | None = values(ormbridge.cached_instance(Product, pk))
        except Product.DoesNotExist:
            seen = None
        if seen != truth.get(pk):
            stale.append(f"row {pk}: cache {seen}, database {truth.get(pk)}")
    stats.counts.send()
    hits = int(redis_store.get_redis().hget(stats_key, "hits") or 0) - hits_before
    for writer in range(run.args.writers):
        queryset = Product.objects.filter(sku__startswith=f"w{writer:02d}-").order_by("pk")
        seen_rows = [values(p) for p in ormbridge.cached_queryset(queryset)]
        if seen_rows != [values(p) for p in queryset.all()]:
            stale.append(f"writer {writer}'s rows through cached_queryset")
    if Product.objects.cache().count() != len(truth):
        stale.append("Product.objects.cache().count()")

    # lost changes: the last committed change of each row, then an event (a replay) after it
    events = [
        e for e in _read_jsonl(run.run_dir, "events-*.jsonl")
        if e.get("model") == "shop.product" and e.get("namespace") == "shop.product"
    ]  # fmt: skip
    event_times: defaultdict[int, list[float]] = defaultdict(list)
    every_row: list[float] = []
    for event in events:
        if event["pks"] is None:
            every_row.append(event["ts"])
        else:
            for pk in event["pks"]:
                event_times[int(pk)].append(event["ts"])
    for times in event_times.values():
        times.sort()
    every_row.sort()
    replays = _read_jsonl(run.run_dir, "replays-*.jsonl")
    replay_times: defaultdict[int, list[float]] = defaultdict(list)
    for replay in replays:
        replay_times[int(replay["pk"])].append(replay["t"])
    for times in replay_times.values():
        times.sort()

    def first_after(times: list[float], t: float) -> float | None:
        index = bisect_left(times, t)
        return times[index] if index < len(times) else None

    last: dict[int, float] = {}
    last_bulk: dict[int, float] = {}
    event_lags: list[float] = []
    for _, _, kind, pks, t in journal:
        for pk in pks:
            last[pk] = max(last.get(pk, 0.0), t)
            if kind == "bulk":
                last_bulk[pk] = max(last_bulk.get(pk, 0.0), t)
            candidates = [
                x for x in (first_after(event_times[pk], t), first_after(every_row, t)) if x
            ]
            if candidates:
                event_lags.append(min(candidates) - t)
    lost = [
        f"row {pk}: no event after its change at {t:.3f}"
        for pk, t in sorted(last.items())
        if first_after(event_times[pk], t) is None and first_after(every_row, t) is None
    ]
    # A replay loads its row: one deleted before its replay ran is not replayed.
    deleted = {pk: t for _, _, kind, pks, t in journal if kind == "delete" for pk in pks}
    deleted_since = {pk for pk, t in last_bulk.items() if deleted.get(pk, 0.0) > t}
    lost += [
        f"row {pk}: no replay after its safe_bulk_update at {t:.3f}"
        for pk, t in sorted(last_bulk.items())
        if pk not in deleted_since and first_after(replay_times[pk], t) is None
    ]
    undelivered = ChangeBatch.objects.exclude(state=ChangeBatch.State.DONE)
    lost += [f"change-log row {b.pk} left {b.state}: {b.last_error[:200]}" for b in undelivered]

    # phantoms: rows that never committed (not seeded, no journaled create), named by an
    # event or a replay; the writers noted the inserts they tried, to count the rest
    notes = _read_jsonl(run.run_dir, "writer*.jsonl")
    attempted = {int(n["attempt"]) for n in notes if "attempt" in n}
    rolled_back = attempted - created
    phantom = sorted((set(event_times) | set(replay_times)) - written)

    fresh = [n for n in notes if "fresh" in n]
    reads = sum(n["reads"] for n in _read_jsonl(run.run_dir, "reader*.jsonl"))
    return {
        "journal": journal,
        "rows": len(written),
        "hits": hits,
        "entries": entries,
        "stale": stale,
        "lost": lost,
        "phantom": phantom,
        "rolled_back": len(rolled_back),
        "events": len(events),
        "replays": len(replays),
        "deleted_since": len(deleted_since),
        "event_lags": event_lags,
        "fresh": fresh,
        "reads": reads,
        "ops": Counter(n["op"] for n in notes if n.get("committed")),
        "rollbacks": sum(1 for n in notes if n.get("op") == "rollback"),
        "errors": Counter(f"{n['error']}: {n['type']}" for n in notes if "error" in n),
    }


def _ms(values: list[float]) -> str:
    p50, p99 = percentile(values, 0.5) * 1000, percentile(values, 0.99) * 1000
    return f"p50 {p50:.0f} ms, p99 {p99:.0f} ms"


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{key} {n}" for key, n in sorted(counts.items()) if n) or "none"


def report(run: Run, elapsed: float, quiet: float | None, result: dict[str, Any]) -> bool:
    """Print the run's figures and verdict; whether it passed."""
    args = run.args
    committed = sum(result["ops"].values())
    changes = sum(len(pks) for *_, pks, _ in result["journal"])
    fresh = {
        path: [n["lag"] for n in result["fresh"] if n["fresh"] == path]
        for path in ("django", "raw")
    }
    not_fresh = sum(1 for n in result["fresh"] if not n["ok"])
    missing = [kind for kind in FAULTS if not run.faults[kind]]
    now = datetime.datetime.now(datetime.UTC)
    lines = [
        "",
        f"ormbridge chaos run, {now:%Y-%m-%d %H:%M} UTC, seed {args.seed}",
        f"  replay: python bench/chaos.py --seed {args.seed} --duration {args.duration:g} "
        f"--writers {args.writers} --readers {args.readers} --workers {args.workers}",
        f"  machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}",
        f"load: {elapsed:.0f} s, {args.writers} writers, {args.readers} readers, "
        f"{args.workers} workers",
        f"  transactions committed: {committed} ({committed / elapsed:.0f}/s), "
        f"{changes} row changes ({changes / elapsed:.0f}/s)",
        f"  by op: {_counts(result['ops'])}",
        f"  rolled back: {result['rollbacks']} on purpose; inserts that never committed: "
        f"{result['rolled_back']}",
        f"  writer errors (faults): {_counts(result['errors'])}",
        f"  reads by the readers: {result['reads']} ({result['reads'] / elapsed:.0f}/s)",
        f"faults: {_counts(run.faults)}",
        *([f"  not injected: {_counts(run.unexpected)}"] if run.unexpected else []),
        f"lag commit -> fresh (cache API, writer's process): Django writes {_ms(fresh['django'])}; "
        f"raw SQL on a second connection {_ms(fresh['raw'])}; "
        f"not fresh within {FRESH_TIMEOUT:.0f} s: {not_fresh}",
        f"lag commit -> event: {_ms(result['event_lags'])}",
        f"max backlog: {run.backlog_max} change-log rows undelivered",
        "quiescence: "
        + (
            f"everything delivered {quiet:.1f} s after the load"
            if quiet is not None
            else f"NOT delivered within {args.quiesce:g} s"
        ),
        f"checked: {result['rows']} rows and {args.writers} querysets through the cache API "
        f"(cached instances there: {result['entries']}, served: {result['hits']}, the rest "
        f"refused: older than their row's or model's last invalidation), "
        f"{result['events']} events, "
        f"{result['replays']} replays (rows deleted after their last safe_bulk_update, "
        f"so not replayed: {result['deleted_since']})",
        f"stale reads after quiescence: {len(result['stale'])}",
        f"lost changes: {len(result['lost'])}",
        f"phantom events for rolled-back work: {len(result['phantom'])}",
        "peak memory (MB): " + ", ".join(f"{r} {mb:.0f}" for r, mb in sorted(run.peaks.items())),
        *(f"  {line}" for line in (result["stale"] + result["lost"])[:20]),
        *([f"  phantom rows: {result['phantom'][:20]}"] if result["phantom"] else []),
        *([f"fault kinds never injected: {', '.join(missing)}"] if missing else []),
    ]
    failed = result["stale"] or result["lost"] or result["phantom"] or missing or quiet is None
    lines.append(f"result: {'FAIL' if failed else 'PASS'} (files: {run.run_dir})")
    print("\n".join(lines), flush=True)
    return not failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (600)")
    parser.add_argument("--short", action="store_true", help="75 s of load: what CI runs")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--quiesce", type=float, default=300, help="seconds allowed to deliver the rest"
    )
    args = parser.parse_args()
    if args.short:
        args.duration = 75
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(10**6)
    if min(args.duration, args.writers, args.workers, args.quiesce) <= 0 or args.readers < 0:
        parser.error("--duration, --writers, --workers and --quiesce must be positive")
    print(f"chaos: seed {args.seed}, {args.duration:g} s of load", flush=True)
    run = Run(args)
    threading.Thread(target=run.sample, daemon=True).start()
    try:
        run.start_services()
        elapsed = run.load()
        quiet = run.quiesce()
        run.sampling = False
        result = compare(run)
        return 0 if report(run, elapsed, quiet, result) else 1
    finally:
        run.stop_all()


if __name__ == "__main__":
    sys.exit(main())
