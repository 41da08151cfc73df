"""Chaos load test: writers, readers and workers under random faults, then a full comparison.

    python bench/chaos.py                   # 10 minutes of load (docs/guarantees.md quotes it)
    python bench/chaos.py --short           # 75 s of load, about 2 minutes in all (CI runs it)
    python bench/chaos.py --short --seed 7  # the fault schedule and every op choice of seed 7

(``python -m bench.chaos`` is the same command.) The run is in modules of this package:
``services`` (its database, Redis servers and workers), ``load`` (the writer and reader
processes), ``faults`` (what is injected), ``run`` (the run from start to quiescence),
``comparison`` (database against cache, events and replays) and ``report`` (the figures).

Needs PostgreSQL (``CHAOS_DATABASE_URL``, default
postgres://postgres@127.0.0.1:5432/ormbridge_chaos: dropped and created again at the start,
dropped at the end unless ``--keep-database``; the suite's test names it after its own
``DATABASE_URL``) and ``redis-server`` on the PATH. The run starts its own ormbridge Redis and
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

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
# The example project's apps (``shop``) and this checkout; spawned children get this path too.
sys.path[:0] = [path for path in (str(ROOT), str(ROOT / "example")) if path not in sys.path]
