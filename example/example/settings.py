"""Settings of the example shop.

Services come from the environment: ``DATABASE_URL`` (default: an SQLite file
beside this project) and ``REDIS_URL`` (default: Redis on 127.0.0.1:6379; the
demo command starts an embedded Redis and sets it when it is unset).
"""

import importlib.util
import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("SECRET_KEY", "example-only-not-secret")
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "ormbridge",
    "shop",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

# django-eventstream (docs/eventstream.md), when installed: /eventstream/?channel=<namespace>,
# with ormbridge's permission rule. With GRIP_URL (Pushpin's publish endpoint) set, Pushpin
# holds the streams and the relay publishes to it.
if importlib.util.find_spec("django_eventstream"):
    INSTALLED_APPS.append("django_eventstream")
    EVENTSTREAM_CHANNELMANAGER_CLASS = "ormbridge.contrib.eventstream.NamespaceChannelManager"
if os.environ.get("GRIP_URL"):
    GRIP_URL = os.environ["GRIP_URL"]
    MIDDLEWARE.insert(0, "django_grip.GripMiddleware")

ROOT_URLCONF = "example.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{BASE_DIR / 'demo.sqlite3'}")
    )
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Web process and worker share the file: WAL lets readers and a writer overlap,
    # and IMMEDIATE transactions wait for the write lock instead of failing when a
    # transaction that began by reading turns into a writer.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
STATIC_URL = "static/"

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "example",
    }
}

ORMBRIDGE = {
    "REDIS_URL": REDIS_URL,
    # Product, Tag and Order register themselves with @ormbridge.register; these by name,
    # with register()'s options.
    "MODELS": {"shop.Category": {}, "shop.Customer": {"cache_timeout": 600}},
}


def _broker_url(url: str) -> str:
    # kombu spells a Redis unix socket redis+socket:///path.
    if url.startswith("unix://"):
        path, _, query = url[len("unix://") :].partition("?")
        return f"redis+socket://{path}" + (f"?{query}" if query else "")
    return url


CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", _broker_url(REDIS_URL))
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "ormbridge": {"handlers": ["console"], "level": "WARNING"},
        "ormbridge.events": {"handlers": ["console"], "level": "WARNING", "propagate": False},
    },
}
LOGIN_URL = "/admin/login/"
