"""Settings of the peer check on SQLite: Django's ``tests/test_sqlite.py`` + ormbridge's services.

Used by both runs of a backend (without and with ormbridge), so the runs differ only
in the installed apps. Redis serves ormbridge and the cache; no Celery broker runs:
ormbridge's tasks go to an in-memory transport nobody consumes.
"""

import os

DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3"},
    "other": {"ENGINE": "django.db.backends.sqlite3"},
}

SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
ORMBRIDGE = {"REDIS_URL": REDIS_URL, "KEY_PREFIX": "django-suite"}
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "django-suite",
    }
}
CELERY_BROKER_URL = "memory://"
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
