"""Test settings: the example project on real services started by the test run.

Each test run gets its own directory with real Redis servers on unix sockets
(ormbridge's Redis and the Celery broker; test_channels adds a channel layer's)
so a test can stop one without touching the others or the machine's Redis. The database is
PostgreSQL unless ``DATABASE_URL`` says otherwise (``sqlite://`` for SQLite).

``ORMBRIDGE_TEST_REDIS_CLUSTER=1``: ormbridge's Redis is a Redis Cluster of three
masters on free TCP ports of 127.0.0.1 instead (``REDIS_CLUSTER``), started by the
run like the others (tests/conftest.py); the cache and the broker stay plain servers.
"""

import copy
import json
import os
import socket
import tempfile
from pathlib import Path

RUN_DIR = Path(
    os.environ.setdefault("ORMBRIDGE_TEST_RUN_DIR", tempfile.mkdtemp(prefix="ormbridge-test-"))
)


def _free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def free_ports(count: int) -> list[str]:
    """``count`` distinct free TCP ports of 127.0.0.1 (all bound at once while chosen)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [str(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


# The broker listens on TCP: kombu cannot reconnect to a restarted broker over a
# unix socket (its worker exits), and a worker must outlive broker restarts.
BROKER_PORT = int(os.environ.setdefault("ORMBRIDGE_TEST_BROKER_PORT", _free_port()))
os.environ["REDIS_URL"] = f"unix://{RUN_DIR}/ormbridge.sock"
CLUSTER = os.environ.get("ORMBRIDGE_TEST_REDIS_CLUSTER", "") not in ("", "0")
if CLUSTER:
    # Each node: a client port and a cluster bus port (redis-server's --cluster-port).
    CLUSTER_PORTS = [
        int(port)
        for port in os.environ.setdefault(
            "ORMBRIDGE_TEST_CLUSTER_PORTS", ",".join(free_ports(6))
        ).split(",")
    ]
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{CLUSTER_PORTS[0]}/0"
os.environ["CELERY_BROKER_URL"] = f"redis://127.0.0.1:{BROKER_PORT}/0"
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")

from example.settings import *  # noqa: E402, F403
from example.settings import DATABASES, INSTALLED_APPS, ORMBRIDGE  # noqa: E402
from tests.routers import SecondDatabaseRouter  # noqa: E402

INSTALLED_APPS = [*INSTALLED_APPS, "polymorphic", "tests.testapp", "tests.seconddb"]
if DATABASES["default"]["ENGINE"].endswith("postgresql"):
    # ArrayField and HStoreField (tests.pgapp): PostgreSQL's own.
    INSTALLED_APPS += ["django.contrib.postgres", "tests.pgapp"]

# ormbridge keeps nothing in Django's cache: no Redis is started for it.
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

ORMBRIDGE = {
    **ORMBRIDGE,
    "EMITTERS": ["tests.emitters.RecordingEmitter", "ormbridge.broadcast.RedisStreamEmitter"],
    "REDIS_CLUSTER": CLUSTER,  # type: ignore[dict-item]  # the example's values are all str/dict
}

# A worker started by the tests may get settings of its own (JSON).
ORMBRIDGE.update(json.loads(os.environ.get("ORMBRIDGE_TEST_SETTINGS", "{}")))

# A worker started by the tests is pointed at the test database by name.
if os.environ.get("ORMBRIDGE_TEST_DB_NAME"):
    DATABASES["default"]["NAME"] = os.environ["ORMBRIDGE_TEST_DB_NAME"]
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATABASES["default"]["TEST"] = {"NAME": str(RUN_DIR / "test.sqlite3")}

# The second database, "other" (tests/routers.py): in the test run's own process always, so
# that pytest-django creates it for the tests that ask for it; in a process a test starts
# (ORMBRIDGE_TEST_DB_NAME set) only when that test uses it and names it.
OTHER_DB_NAME = os.environ.get("ORMBRIDGE_TEST_OTHER_DB_NAME")
if OTHER_DB_NAME or not os.environ.get("ORMBRIDGE_TEST_DB_NAME"):
    DATABASES["other"] = copy.deepcopy(DATABASES["default"])
    if DATABASES["other"]["ENGINE"].endswith("sqlite3"):
        DATABASES["other"]["NAME"] = OTHER_DB_NAME or str(RUN_DIR / "other.sqlite3")
        DATABASES["other"]["TEST"] = {"NAME": str(RUN_DIR / "test-other.sqlite3")}
    else:
        DATABASES["other"]["NAME"] = OTHER_DB_NAME or f"{DATABASES['default']['NAME']}_other"
        DATABASES["other"]["TEST"] = {}
DATABASE_ROUTERS = ["tests.routers.SecondDatabaseRouter"]
SecondDatabaseRouter.enabled = "other" in DATABASES

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
LOGGING = {"version": 1, "disable_existing_loggers": False}
