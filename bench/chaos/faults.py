"""The faults a chaos run injects, one every 1.5-4 s, every kind once per round."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.chaos.run import Run


FAULTS = (
    "kill_worker",
    "restart_broker_empty",
    "restart_redis_empty",
    "restart_redis_from_snapshot",
    "pause_redis",
    "pause_broker",
    "kill_writer_mid_transaction",
    "terminate_db_connection",
)
FAULT_INTERVAL = (1.5, 4.0)  # seconds between the end of a fault and the next
CALM = 15.0  # the last seconds of load have no fault: the comparison reads a cache in use


def inject(run: Run, kind: str) -> None:
    """Inject one fault of ``kind`` into the running ``run``."""
    run.faults[kind] += 1
    pause = run.rng.uniform(1.5, 4.0)
    if kind == "kill_worker":
        worker = run.rng.choice(run.workers)
        if worker.process is not None:
            run.expected_deaths.add(worker.process.pid)
        worker.kill()
        worker.start()
    elif kind == "restart_broker_empty":
        run.broker.kill()
        run.broker.start()
    elif kind == "restart_redis_empty":
        run.redis.kill()
        run.redis.start()
    elif kind == "restart_redis_from_snapshot":
        run.redis.kill()
        run.redis.start(from_snapshot=True)
    elif kind in ("pause_redis", "pause_broker"):
        server = run.redis if kind == "pause_redis" else run.broker
        server.pause()
        time.sleep(pause)
        server.resume()
    elif kind == "kill_writer_mid_transaction":
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            inside = [i for i in range(run.args.writers) if run.flags[i]]
            if inside:
                break
            time.sleep(0.005)
        else:
            run.faults[kind] -= 1
            run.faults["kill_writer_outside_transaction"] += 1
            inside = list(range(run.args.writers))
        process = run.writers[run.rng.choice(inside)]
        run.expected_deaths.add(process.pid)
        process.kill()
        process.join()
    elif kind == "terminate_db_connection":
        rows = run.admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'chaos-%%' AND application_name <> 'chaos-main'"
        ).fetchall()
        if rows:
            run.admin.execute("SELECT pg_terminate_backend(%s)", [run.rng.choice(rows)[0]])
