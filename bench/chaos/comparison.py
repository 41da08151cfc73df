"""The comparison after quiescence: database against cache, events and replays."""

from __future__ import annotations

import contextlib
import json
from bisect import bisect_left
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.chaos.run import Run


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
