"""Settings of the sample test modules, which tests/test_testing.py runs in processes of
their own: the test settings, with a test database of their own."""

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES, RUN_DIR

if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATABASES["default"]["TEST"] = {"NAME": str(RUN_DIR / "sample.sqlite3")}
else:
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_sample"}

# One database: the sample runs are single-database projects.
DATABASES.pop("other", None)
DATABASE_ROUTERS: list[str] = []
