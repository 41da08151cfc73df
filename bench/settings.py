"""Settings for the benchmarks: the example project on PostgreSQL and a TCP Redis.

``DATABASE_URL`` defaults to the ``ormbridge_bench`` database on 127.0.0.1
(created by the benchmark), ``REDIS_URL`` to Redis on 127.0.0.1:6379 db 5.
"""

import os

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/ormbridge_bench")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/5")

from example.settings import *  # noqa: F403
from example.settings import DATABASES, INSTALLED_APPS, ORMBRIDGE

INSTALLED_APPS = [*INSTALLED_APPS, "bench.apps.BenchConfig"]
ORMBRIDGE = {**ORMBRIDGE, "EMITTERS": []}
DEBUG = False  # no query log growing in memory
# Django's connection pool (psycopg[pool]), as a site under ASGI with many clients uses
# it: each event stream's access check borrows a connection instead of opening one.
if DATABASES["default"]["ENGINE"].endswith("postgresql"):
    DATABASES["default"]["OPTIONS"] = {"pool": {"min_size": 2, "max_size": 8}}
