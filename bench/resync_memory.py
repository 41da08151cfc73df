"""Benchmark: peak memory of ``manage.py ormbridge_resync --sync`` at 10,000 and 1,000,000 rows.

    python bench/resync_memory.py                     # 10,000 and 1,000,000 rows
    python bench/resync_memory.py --rows 10000 200000

Same services and receiver as bench/bulk_update.py. Each resync runs as its own
``manage.py`` process; its peak RSS is read from the kernel when it exits.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

from bulk_update import ROOT, ensure_database, seed, setup_django


def resync_peak(rows: int) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of one ``ormbridge_resync --sync`` over ``rows`` rows."""
    seed(rows)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bench.settings",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")]),
    }
    started = time.perf_counter()
    child = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "example" / "manage.py"),
            "ormbridge_resync",
            "shop.Product",
            "--sync",
            "--no-progress",
            "--force",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        sys.exit(f"ormbridge_resync failed over {rows:,} rows (status {status})")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs=2, default=[10_000, 1_000_000])
    args = parser.parse_args()
    setup_django()
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
