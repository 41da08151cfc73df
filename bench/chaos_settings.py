"""Settings of every process of the chaos load test (bench/chaos.py): the example project
on the database, ormbridge Redis and broker Redis that the run starts (``DATABASE_URL``,
``REDIS_URL``, ``CELERY_BROKER_URL``, set by it), events also written to files
(``bench.chaos_app``). ormbridge's own settings are its defaults."""

from example.settings import *  # noqa: F403
from example.settings import INSTALLED_APPS, ORMBRIDGE

INSTALLED_APPS = [*INSTALLED_APPS, "bench.chaos_app.ChaosConfig"]
ORMBRIDGE = {
    **ORMBRIDGE,
    "EMITTERS": ["ormbridge.broadcast.RedisStreamEmitter", "bench.chaos_app.FileEmitter"],
}
DEBUG = False
