"""ormbridge's Celery tasks: thin wrappers over plain functions.

Every task is fire-and-forget (no result), acknowledged late and rejected
(redelivered) when its worker dies. They are sent with :func:`enqueue`, which
routes them to ``ORMBRIDGE["QUEUE"]`` so a project writes no routes.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from ormbridge import flush, outbox, resync
from ormbridge.conf import settings

TASK_OPTIONS: dict[str, Any] = {
    "ignore_result": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
}


@shared_task(name="ormbridge.flush_invalidations", **TASK_OPTIONS)
def flush_invalidations(model_label: str) -> None:
    """Flush the pending invalidations of one model (``app_label.modelname``)."""
    flush.flush(model_label)


@shared_task(name="ormbridge.process_change_batch", **TASK_OPTIONS)
def process_change_batch(batch_id: int, using: str = "default") -> None:
    """Deliver one change-log row."""
    outbox.process(int(batch_id), str(using))


@shared_task(name="ormbridge.sweep_outbox", **TASK_OPTIONS)
def sweep_outbox() -> None:
    """Re-deliver what a dead broker, Redis or worker left behind."""
    outbox.sweep()


# One quick reconnect (a broker restarted under a pooled connection), no more:
# when the broker is really down the change log is the retry.
PUBLISH_RETRY = {"max_retries": 1, "interval_start": 0.1, "interval_step": 0, "interval_max": 0.1}


@shared_task(name="ormbridge.flush_pending", **TASK_OPTIONS)
def flush_pending() -> None:
    """Safety net: flush every registered model that has pending invalidations."""
    flush.flush_waiting()


@shared_task(name="ormbridge.resume_resync", **TASK_OPTIONS)
def resume_resync(job_id: int) -> None:
    """Continue a resync job on the workers (the admin's "retry")."""
    resync.run(resync.get_job(int(job_id)), sync=False)


def enqueue(task: Task, *args: Any, countdown: float | None = None) -> None:
    """Send ``task`` to ``ORMBRIDGE["QUEUE"]``.

    Raises kombu's ``OperationalError`` when the broker cannot be reached.
    """
    task.apply_async(
        args=args,
        countdown=countdown,
        queue=settings.QUEUE,
        retry=True,
        retry_policy=PUBLISH_RETRY,
    )
