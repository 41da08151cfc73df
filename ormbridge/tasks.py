"""ormbridge's Celery tasks: thin wrappers over plain functions.

Change delivery needs no task: the relay in each worker process does it
(:mod:`ormbridge.relay`). These tasks are for the schedule and the admin.
Every task is fire-and-forget (no result), acknowledged late and rejected
(redelivered) when its worker dies. :func:`enqueue` sends them to
``ORMBRIDGE["QUEUE"]``, so a project writes no routes.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from ormbridge import relay, resync
from ormbridge.conf import settings

TASK_OPTIONS: dict[str, Any] = {
    "ignore_result": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
}


@shared_task(name="ormbridge.sweep", **TASK_OPTIONS)
def sweep() -> None:
    """Delete delivered change-log rows past ``LOG_RETENTION``; deliver what no relay took."""
    for using in relay.log_databases():
        relay.prune(using)
    relay.drain()


@shared_task(name="ormbridge.resume_resync", **TASK_OPTIONS)
def resume_resync(job_id: int) -> None:
    """Continue a resync job (the admin's "retry")."""
    resync.run(resync.get_job(int(job_id)))


# One quick reconnect (a broker restarted under a pooled connection), no more.
PUBLISH_RETRY = {"max_retries": 1, "interval_start": 0.1, "interval_step": 0, "interval_max": 0.1}


def enqueue(task: Task[..., Any], *args: Any) -> None:
    """Send ``task`` to ``ORMBRIDGE["QUEUE"]``.

    Raises kombu's ``OperationalError`` when the broker cannot be reached.
    """
    task.apply_async(args=args, queue=settings.QUEUE, retry=True, retry_policy=PUBLISH_RETRY)
