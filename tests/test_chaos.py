"""The chaos load test's short run (``bench/chaos.py --short``): 32 writers, readers and two
workers under random faults; afterwards nothing is stale, lost or phantom.

The run starts its own database, Redis servers and workers, so it runs in the
suite's PostgreSQL pass only (the SQLite and Redis Cluster passes would repeat
it). Its database is named after ``DATABASE_URL``'s (``<name>_chaos``, on the same
server), and the run drops it at the end. Two seeds: a fixed one, and a random one, in
the test's id and in the run's output, so a failure can be replayed with ``--seed``.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from urllib.parse import urlsplit

import psycopg
import pytest
from django.db import connection

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(
    connection.vendor != "postgresql" or os.environ.get("ORMBRIDGE_TEST_REDIS_CLUSTER") == "1",
    reason="the chaos run is PostgreSQL's, and runs in the suite's PostgreSQL pass only",
)

FIXED_SEED = 12
RANDOM_SEED = random.SystemRandom().randrange(10**6)


def chaos_database_url() -> str:
    """``DATABASE_URL`` with its database's name followed by ``_chaos``."""
    url = urlsplit(os.environ["DATABASE_URL"])
    return url._replace(path=f"/{url.path.lstrip('/')}_chaos").geturl()


def database_exists(url: str) -> bool:
    db = connection.settings_dict
    name = urlsplit(url).path.lstrip("/")
    params = {"host": db["HOST"], "port": db["PORT"], "user": db["USER"]}
    if db.get("PASSWORD"):
        params["password"] = db["PASSWORD"]
    with psycopg.connect(**params, dbname="postgres", autocommit=True) as conn:
        return bool(conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone())


def chaos(seed: int) -> tuple[int, str]:
    env = {**os.environ, "CHAOS_DATABASE_URL": chaos_database_url()}
    run = subprocess.run(
        [sys.executable, "bench/chaos.py", "--short", "--seed", str(seed)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    return run.returncode, run.stdout + run.stderr[-3000:]


def figure(output: str, label: str) -> str:
    for line in output.splitlines():
        if line.startswith(f"{label}:"):
            return line[len(label) + 1 :].strip()
    raise AssertionError(f"no {label!r} line in the chaos run's output:\n{output}")


@pytest.mark.parametrize("seed", [FIXED_SEED, RANDOM_SEED], ids=lambda seed: f"seed-{seed}")
def test_a_short_chaos_run_leaves_nothing_stale_lost_or_phantom(seed):
    returncode, output = chaos(seed)
    assert (
        figure(output, "stale reads after quiescence"),
        figure(output, "lost changes"),
        figure(output, "phantom events for rolled-back work"),
    ) == ("0", "0", "0"), output
    assert "fault kinds never injected" not in output, output
    assert figure(output, "result").startswith("PASS"), output
    assert returncode == 0, output
    assert not database_exists(chaos_database_url()), "the chaos run left its database behind"
