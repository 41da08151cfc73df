"""Settings of the peer check on PostgreSQL: the SQLite ones with PostgreSQL databases.

The test runner creates ``test_<NAME>`` and ``test_<NAME>_other`` and drops them at the
end; ``DJANGO_SUITE_PG_NAME`` (default ``django_suite``) picks the names.
"""

import os

from tests.django_suite.settings_sqlite import *  # noqa: F403

_NAME = os.environ.get("DJANGO_SUITE_PG_NAME", "django_suite")
_SERVER = {
    "ENGINE": "django.db.backends.postgresql",
    "HOST": os.environ.get("DJANGO_SUITE_PG_HOST", "127.0.0.1"),
    "PORT": os.environ.get("DJANGO_SUITE_PG_PORT", "5432"),
    "USER": os.environ.get("DJANGO_SUITE_PG_USER", "postgres"),
}
DATABASES = {
    "default": {**_SERVER, "NAME": _NAME},
    "other": {**_SERVER, "NAME": f"{_NAME}_other"},
}
