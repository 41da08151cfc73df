"""A chaos run from start to quiescence: services up, load and faults, delivery."""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import tempfile
import time
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.chaos.faults import CALM, FAULT_INTERVAL, FAULTS, inject
from bench.chaos.load import JOURNAL, ROWS_PER_WRITER, reader_main, writer_main
from bench.chaos.services import (
    BACKLOG,
    DEFAULT_DATABASE_URL,
    RedisServer,
    Worker,
    connection_params,
    create_database,
    drop_database,
)
from tests.processes import children, status_kb


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
        self.database: dict[str, Any] | None = None

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
        params = connection_params(db)
        create_database(db)
        self.database = dict(db)  # dropped by stop_all() unless --keep-database
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
        inject(self, kind)

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
        if self.database is not None and not self.args.keep_database:
            from django.db import connections

            for conn in (self.admin, getattr(self, "sampler_db", None)):
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
            connections.close_all()
            drop_database(self.database)
