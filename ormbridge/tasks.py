"""ormbridge's Celery tasks: thin wrappers over plain functions.

Change delivery needs no task: the relay in each worker process does it
(:mod:`ormbridge.relay`). These tasks are for the schedule and the admin.
Every task is fire-and-forget (no result), acknowledged late and rejected
(redelivered) when its worker dies. :func:`enqueue` sends them to
``ORMBRIDGE["QUEUE"]``, so a project writes no routes.

Every message carries its sender's ``KEY_PREFIX`` (``key_prefix``): a worker
refuses a task sent under another prefix, or sent with none, as another project
sharing the broker (and, by misconfiguration, the queue) would send it. It logs a
warning, acknowledges the message without doing anything and counts the refusal
(``ormbridge_status`` shows the counts). A call in the worker's own process (a
direct call or ``apply()``) needs no prefix.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task, shared_task

from ormbridge import relay, resync, store
from ormbridge.conf import settings

logger = logging.getLogger("ormbridge")

TASK_OPTIONS: dict[str, Any] = {
    "ignore_result": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "bind": True,  # the request says whether the task came through the broker
}


@shared_task(name="ormbridge.sweep", **TASK_OPTIONS)
def sweep(self: Task[..., Any], key_prefix: str | None = None) -> None:
    """Delete delivered change-log rows past ``LOG_RETENTION``; deliver what no relay took."""
    if refused(self, key_prefix):
        return
    for using in relay.log_databases():
        relay.prune(using)
    relay.drain()


@shared_task(name="ormbridge.resume_resync", **TASK_OPTIONS)
def resume_resync(self: Task[..., Any], job_id: int, key_prefix: str | None = None) -> None:
    """Continue a resync job (the admin's "retry"); one it finds finished is left alone."""
    if refused(self, key_prefix):
        return
    resync.resume(int(job_id))


def refused(task: Task[..., Any], key_prefix: str | None) -> bool:
    """Whether ``task`` must not run: sent through the broker under another ``KEY_PREFIX``
    than this project's, or under none. A refusal is logged and counted."""
    own = settings.KEY_PREFIX
    if key_prefix == own:
        return False
    if key_prefix is None and (task.request.called_directly or task.request.is_eager):
        return False  # called in this process, by this project
    if key_prefix is None:
        why = (
            "it carries no KEY_PREFIX (sent by hand, by an older ormbridge, or by a beat "
            "schedule written before the prefix was added: run manage.py ormbridge_schedule)"
        )
    else:
        why = (
            f"it was sent under KEY_PREFIX {key_prefix!r}, not this project's {own!r} (another "
            "project on the same broker and queue? Give each project its own KEY_PREFIX and "
            "leave QUEUE at its default)"
        )
    logger.warning("ormbridge: refused %s[%s]: %s; dropped.", task.name, task.request.id, why)
    try:
        store.get_redis().hincrby(store.refused_key(), task.name, 1)
    except redis.RedisError:
        logger.exception("ormbridge: could not count the refusal of %s", task.name)
    return True


# One quick reconnect (a broker restarted under a pooled connection), no more.
PUBLISH_RETRY = {"max_retries": 1, "interval_start": 0.1, "interval_step": 0, "interval_max": 0.1}


def enqueue(task: Task[..., Any], *args: Any) -> str:
    """Send ``task`` to ``ORMBRIDGE["QUEUE"]`` under this project's ``KEY_PREFIX``;
    returns the task's id.

    Raises kombu's ``OperationalError`` when the broker cannot be reached.
    """
    result = task.apply_async(
        args=args,
        kwargs={"key_prefix": settings.KEY_PREFIX},
        queue=settings.QUEUE,
        retry=True,
        retry_policy=PUBLISH_RETRY,
    )
    return str(result.id)
