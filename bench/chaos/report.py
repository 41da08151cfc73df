"""The chaos run's figures and verdict."""

from __future__ import annotations

import datetime
import os
import platform
from collections import Counter
from typing import TYPE_CHECKING, Any

from bench.chaos.comparison import percentile
from bench.chaos.faults import FAULTS
from bench.chaos.load import FRESH_TIMEOUT

if TYPE_CHECKING:
    from bench.chaos.run import Run


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
