"""Reference Celery configuration for a project running ormbridge.

Load it with ``app.config_from_object("celeryconfig")``, or copy the values
into Django settings with the ``CELERY_`` prefix (as ``example/settings.py``
does). Broker and result backend come from the environment.

Run a worker that also consumes ormbridge's queue::

    celery -A proj worker -Q ormbridge,celery
"""

import os

broker_url = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
# ormbridge's tasks are fire-and-forget; a backend only matters for your own tasks.
result_backend = os.environ.get("CELERY_RESULT_BACKEND") or None

# JSON only: a worker that accepts pickle runs whatever is put on its broker.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]

# A task whose worker dies (ormbridge.sweep, ormbridge.resume_resync) is
# redelivered instead of lost. Changes themselves travel through the change log,
# not the broker: the rows a killed worker's relay held are taken over by another
# relay ORMBRIDGE["RELAY_LEASE"] seconds (10) after its last renewal, long
# before the broker's visibility timeout (one hour on Redis) would.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

# ormbridge sends its tasks to ORMBRIDGE["QUEUE"] itself; this route only
# matters for tasks sent by name from elsewhere (e.g. a beat schedule), which
# must carry ormbridge.tasks.message_kwargs() (KEY_PREFIX and the site's
# identity; ormbridge.schedule.beat_schedule() does) or workers refuse them. Set
# ORMBRIDGE_QUEUE to ORMBRIDGE["QUEUE"]: "ormbridge.<KEY_PREFIX>" when the
# project has a KEY_PREFIX of its own.
ORMBRIDGE_QUEUE = os.environ.get("ORMBRIDGE_QUEUE", "ormbridge")
task_routes = {"ormbridge.*": {"queue": ORMBRIDGE_QUEUE}}

broker_connection_retry_on_startup = True
timezone = "UTC"
