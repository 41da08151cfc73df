"""ormbridge's periodic tasks, for django-celery-beat or ``CELERY_BEAT_SCHEDULE``.

Each entry sends its task to ``QUEUE`` with this project's ``KEY_PREFIX`` and site
identity in its keyword arguments, as :func:`ormbridge.tasks.enqueue` does: workers
refuse a task without them.
"""

from __future__ import annotations

import json
from typing import Any

from ormbridge.conf import settings
from ormbridge.tasks import message_kwargs

__all__ = [
    "PERIODIC_TASKS",
    "beat_schedule",
    "install",
]

# task name -> name of its PeriodicTask row
PERIODIC_TASKS = {
    "ormbridge.sweep": "ormbridge: prune and deliver the change log (sweep)",
}


def beat_schedule() -> dict[str, dict[str, Any]]:
    """The same schedule as a ``CELERY_BEAT_SCHEDULE`` dict, for projects without the
    database scheduler.

    It reads ormbridge's settings: call it where the Celery app is configured
    (``app.conf.beat_schedule``), not in the settings module itself, which is not
    loaded yet (docs/operations.md shows the dict to write there).
    """
    return {
        task: {
            "task": task,
            "schedule": float(settings.SWEEP_INTERVAL),
            "kwargs": message_kwargs(),
            "options": {"queue": settings.QUEUE},
        }
        for task in PERIODIC_TASKS
    }


def install() -> list[tuple[str, bool]]:
    """Create or update the ``PeriodicTask`` rows; returns ``(name, created)`` per task.

    Idempotent: running it again updates the rows in place, never duplicates them.
    """
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    every = int(settings.SWEEP_INTERVAL)
    interval = IntervalSchedule.objects.filter(every=every, period=IntervalSchedule.SECONDS).first()
    if interval is None:
        interval = IntervalSchedule.objects.create(every=every, period=IntervalSchedule.SECONDS)
    done = []
    for task, name in PERIODIC_TASKS.items():
        _, created = PeriodicTask.objects.update_or_create(
            name=name,
            defaults={
                "task": task,
                "interval": interval,
                "crontab": None,
                "solar": None,
                "clocked": None,
                "queue": settings.QUEUE,
                "args": "[]",
                "kwargs": json.dumps(message_kwargs()),
                "enabled": True,
                "one_off": False,
            },
        )
        done.append((name, created))
    return done
