"""The chaos run's load: writer and reader processes (spawned children)."""

from __future__ import annotations

import contextlib
import os
import random
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.chaos.services import _die_with_run

ROWS_PER_WRITER = 30
MIN_ROWS = 10  # a writer deletes only while it owns more
MAX_ROWS = 40  # and creates only while it owns fewer
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
