"""``python -m bench.chaos`` (or ``python bench/chaos.py``): the chaos run's command line."""

from __future__ import annotations

import argparse
import random
import sys
import threading

import bench.chaos
from bench.chaos.comparison import compare
from bench.chaos.report import report
from bench.chaos.run import Run


def main() -> int:
    parser = argparse.ArgumentParser(description=(bench.chaos.__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (600)")
    parser.add_argument("--short", action="store_true", help="75 s of load: what CI runs")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--quiesce", type=float, default=300, help="seconds allowed to deliver the rest"
    )
    parser.add_argument(
        "--keep-database",
        action="store_true",
        help="leave the run's database behind for inspection (it is dropped by default)",
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
