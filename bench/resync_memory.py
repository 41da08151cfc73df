"""Benchmark: peak memory of ``manage.py ormbridge_resync --sync`` at 10,000 and 1,000,000 rows.

    python bench/resync_memory.py                     # 10,000 and 1,000,000 rows
    python bench/resync_memory.py --rows 10000 200000

Same services and receiver as bench/bulk_update.py. Each resync runs in a fresh
process, which reports its own peak RSS (VmHWM) when the command returns.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

from bulk_update import ensure_database, peak_rss_mb, seed, setup_django


def resync_peak(rows: int) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of one ``ormbridge_resync --sync`` over ``rows`` rows."""
    seed(rows)
    out = subprocess.run(
        [sys.executable, __file__, "--child"], check=True, capture_output=True, text=True
    )
    seconds, peak = out.stdout.split()[-2:]
    return float(seconds), float(peak)


def child() -> None:
    """Run the command in this process, then print its duration and this process's peak."""
    from django.core.management import call_command

    started = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        call_command(
            "ormbridge_resync", "shop.Product", "--sync", "--no-progress", "--force", stdout=quiet
        )
    print(time.perf_counter() - started, peak_rss_mb())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs=2, default=[10_000, 1_000_000])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_django()
    if args.child:
        child()
        return
    ensure_database()
    small, large = sorted(args.rows)
    print(f"# ormbridge bench/resync_memory.py, {datetime.datetime.now(datetime.UTC):%Y-%m-%d}")
    results = {rows: resync_peak(rows) for rows in (small, large)}
    for rows, (seconds, peak) in results.items():
        print(
            f"ormbridge_resync --sync over {rows:>9,} rows: "
            f"{seconds:7.1f} s, peak RSS {peak:5.0f} MB"
        )
    ratio = results[large][1] / results[small][1]
    print(f"peak RSS {large:,} rows / {small:,} rows: {ratio:.2f}x")


if __name__ == "__main__":
    main()
