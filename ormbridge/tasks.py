"""ormbridge's Celery tasks: thin wrappers over plain functions.

Change delivery needs no task: the relay in each worker process does it
(:mod:`ormbridge.relay`). These tasks are for the schedule and the admin.
Every task is fire-and-forget (no result), acknowledged late and rejected
(redelivered) when its worker dies. :func:`enqueue` sends them to
``ORMBRIDGE["QUEUE"]``, so a project writes no routes.

Every message carries its sender's ``KEY_PREFIX`` (``key_prefix``) and the
identity of its site (``site``, :func:`site_id`: a digest of the prefix and of
the default database's engine, host, port and name). A worker refuses a task
sent under another prefix, by another site (two projects on one broker at the
same, default, prefix: they share the queue too), or without either, as an older
ormbridge or beat schedule sends it: it logs a warning, acknowledges the message
without doing anything and counts the refusal (``ormbridge_status`` shows the
counts, and is unhealthy while a refusal is recent: ``stats.record_refusal``). A
call in the worker's own process (a direct call or ``apply()``) needs neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from celery import Task, shared_task
from django.db import connections

from ormbridge import relay, resync, stats
from ormbridge.conf import settings

__all__ = [
    "PUBLISH_RETRY",
    "TASK_OPTIONS",
    "enqueue",
    "message_kwargs",
    "refused",
    "resume_resync",
    "site_id",
    "sweep",
]

logger = logging.getLogger(__name__)

TASK_OPTIONS: dict[str, Any] = {
    "ignore_result": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "bind": True,  # the request says whether the task came through the broker
}


@shared_task(name="ormbridge.sweep", **TASK_OPTIONS)
def sweep(self: Task[..., Any], key_prefix: str | None = None, site: str | None = None) -> None:
    """Delete delivered change-log rows past ``LOG_RETENTION``; deliver what no relay took."""
    if refused(self, key_prefix, site):
        return
    for using in relay.log_databases():
        relay.prune(using)
    relay.drain()


@shared_task(name="ormbridge.resume_resync", **TASK_OPTIONS)
def resume_resync(
    self: Task[..., Any], job_id: int, key_prefix: str | None = None, site: str | None = None
) -> None:
    """Continue a resync job (the admin's "retry"); one it finds finished is left alone."""
    if refused(self, key_prefix, site):
        return
    resync.resume(int(job_id))


def site_id() -> str:
    """This site's identity, carried by every task message it sends (``site``).

    A digest of ``KEY_PREFIX`` and of the default database's engine, host, port and
    name as this process connects to them: two projects sharing a broker at the same
    prefix (the default one, say) still differ by their databases. Every process of
    a site must therefore name its default database alike (the same ``HOST`` text).
    """
    database = connections["default"].settings_dict
    parts = [settings.KEY_PREFIX] + [
        str(database.get(name) or "") for name in ("ENGINE", "HOST", "PORT", "NAME")
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def message_kwargs() -> dict[str, str]:
    """The keyword arguments by which a task message says who sent it (see :func:`refused`)."""
    return {"key_prefix": settings.KEY_PREFIX, "site": site_id()}


def refused(task: Task[..., Any], key_prefix: str | None, site: str | None) -> bool:
    """Whether ``task`` must not run: sent through the broker by another project (another
    ``KEY_PREFIX``, or another site under the same one), or saying neither. A refusal is
    logged and counted."""
    own = settings.KEY_PREFIX
    here = bool(task.request.called_directly or task.request.is_eager)
    if key_prefix == own and (site == site_id() or (site is None and here)):
        return False
    if key_prefix is None and here:
        return False  # called in this process, by this project
    schedule_hint = (
        "sent by hand, by an older ormbridge, or by a beat schedule written before it was "
        "added: run manage.py ormbridge_schedule"
    )
    if key_prefix is None:
        why = f"it carries no KEY_PREFIX ({schedule_hint})"
    elif key_prefix != own:
        why = (
            f"it was sent under KEY_PREFIX {key_prefix!r}, not this project's {own!r} (another "
            "project on the same broker and queue? Give each project its own KEY_PREFIX and "
            "leave QUEUE at its default)"
        )
    elif site is None:
        why = f"it carries no site identity ({schedule_hint})"
    else:
        why = (
            f"it was sent by another site under the same KEY_PREFIX {own!r}: its identity "
            f"{site!r} is not this worker's {site_id()!r}, so its default database is another "
            "(two projects on one broker? Give each its own KEY_PREFIX, and so its own queue; "
            "or one project whose processes name their database differently: give them the "
            "same DATABASES['default'])"
        )
    logger.warning("ormbridge: refused %s[%s]: %s; dropped.", task.name, task.request.id, why)
    stats.record_refusal(task.name, task.request.id, why)
    return True


# One quick reconnect (a broker restarted under a pooled connection), no more.
PUBLISH_RETRY = {"max_retries": 1, "interval_start": 0.1, "interval_step": 0, "interval_max": 0.1}


def enqueue(task: Task[..., Any], *args: Any) -> str:
    """Send ``task`` to ``ORMBRIDGE["QUEUE"]`` under this project's ``KEY_PREFIX`` and site
    identity; returns the task's id.

    Raises kombu's ``OperationalError`` when the broker cannot be reached.
    """
    result = task.apply_async(
        args=args,
        kwargs=message_kwargs(),
        queue=settings.QUEUE,
        retry=True,
        retry_policy=PUBLISH_RETRY,
    )
    return str(result.id)
