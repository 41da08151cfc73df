"""What the pipeline is doing: the data behind ``manage.py ormbridge_status``.

The shape of :func:`collect`'s result is documented in ``docs/status.schema.json``,
its meaning in ``docs/operations.md``.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import redis
from celery import current_app
from django.db.models import Count, Min
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from ormbridge import capture, registry, relay, resync, store
from ormbridge.conf import settings

if TYPE_CHECKING:
    from ormbridge.models import ResyncJob

RECENT_JOBS = 5
# Status names of the cache counters, and the fields of the stats hash they read.
CACHE_COUNTERS = {
    "hits": "hits",
    "misses": "misses",
    "stores": "stores",
    "uncached": "uncached",
    "invalidations": "rows",
}
UNDELIVERED = ("pending", "claimed", "failed")
SHOWN_WORKERS = 5  # workers named in a problem; the JSON lists them all


def collect(worker_timeout: float = 1.0) -> dict[str, Any]:
    """The status document. Never raises because a service is down: it reports it.

    Workers are asked which queues they consume, waiting ``worker_timeout`` seconds for
    their answers; a broker that does not answer is not asked.
    """
    from ormbridge.models import ChangeBatch

    now = timezone.now()
    services = {"redis": _redis(), "broker": _broker()}
    services["workers"] = (
        _workers(worker_timeout) if services["broker"]["ok"] else _no_workers("broker unreachable")
    )
    labels = [model._meta.label_lower for model in registry.registered_models()]
    # Only undelivered rows are counted: the (state, id) index finds them, however
    # many done rows wait for pruning.
    undelivered = ChangeBatch.objects.filter(state__in=UNDELIVERED)
    by_state: dict[str, dict[str, int]] = {label: {} for label in labels}
    for row in undelivered.values("model", "state").annotate(n=Count("id")):
        by_state.setdefault(row["model"], {})[row["state"]] = row["n"]
    oldest = {
        row["model"]: row["oldest"]
        for row in undelivered.exclude(state=ChangeBatch.State.FAILED)
        .values("model")
        .annotate(oldest=Min("created_at"))
    }
    triggers, orphaned = _triggers()
    receiver_errors = relay.receiver_errors()
    stats = _stats(labels) if services["redis"]["ok"] else {}
    models: list[dict[str, Any]] = []
    for label in sorted(by_state):
        counts = {state: by_state[label].get(state, 0) for state in UNDELIVERED}
        age = (now - oldest[label]).total_seconds() if label in oldest else None
        models.append(
            {
                "model": label,
                "registered": label in labels,
                "triggers": triggers.get(label),
                "last_flush": _float(stats.get(label, {}).get("last_flush")),
                "cache": {
                    **{
                        name: int(stats.get(label, {}).get(field, 0))
                        for name, field in CACHE_COUNTERS.items()
                    },
                    "uncached_by_reason": _uncached(stats.get(label, {})),
                },
                "change_log": counts,
                "oldest_undelivered_age": age,
                "receiver_errors": receiver_errors.get(label, []),
            }
        )
    failed = sum(m["change_log"]["failed"] for m in models)
    ages = [m["oldest_undelivered_age"] for m in models if m["oldest_undelivered_age"] is not None]
    oldest_age = max(ages, default=None)
    problems = []
    uncaptured = sorted(m["model"] for m in models if m["triggers"] not in (None, "installed"))
    if uncaptured:
        problems.append(
            f"capture triggers not installed or outdated for {', '.join(uncaptured)} "
            "(run manage.py ormbridge_triggers install)"
        )
    if orphaned:
        problems.append(
            f"capture triggers left on tables of no registered model: {', '.join(orphaned)} "
            "(run manage.py ormbridge_triggers prune)"
        )
    if failed:
        problems.append(f"{failed} change-log rows failed")
    if oldest_age is not None and oldest_age > settings.STATUS_MAX_PENDING_AGE:
        problems.append(
            f"oldest undelivered change-log row is {oldest_age:.0f} s old "
            f"(limit {settings.STATUS_MAX_PENDING_AGE} s)"
        )
    in_flight = _oldest_claim(now)
    if in_flight is not None and in_flight[0] > settings.STATUS_MAX_PENDING_AGE:
        problems.append(
            f"a delivery has been in flight for {in_flight[0]:.0f} s "
            f"(limit {settings.STATUS_MAX_PENDING_AGE} s), claimed by {in_flight[1]}: "
            "its relay is stuck or slow (see that worker's log)"
        )
    problems.extend(_worker_problems(services, worker_timeout))
    return {
        "time": now.isoformat(),
        "healthy": not problems,
        "problems": problems,
        "services": services,
        "delivery": {
            "backlog": sum(m["change_log"]["pending"] + m["change_log"]["claimed"] for m in models),
            "oldest_pending_age": oldest_age,
            "oldest_in_flight_age": None if in_flight is None else in_flight[0],
        },
        "models": models,
        "jobs": _jobs(),
        "refused_tasks": _refused() if services["redis"]["ok"] else {},
    }


def _oldest_claim(now: datetime) -> tuple[float, str] | None:
    """Seconds since the oldest in-flight (claimed) change-log row was claimed, and by whom."""
    from ormbridge.models import ChangeBatch

    claim = (
        ChangeBatch.objects.filter(state=ChangeBatch.State.CLAIMED, claimed_at__isnull=False)
        .order_by("claimed_at")
        .values_list("claimed_at", "claimed_by")
        .first()
    )
    if claim is None or claim[0] is None:
        return None
    return max(0.0, (now - claim[0]).total_seconds()), claim[1]


def _refused() -> dict[str, int]:
    """Per task, how many messages this project's workers refused (see ormbridge.tasks)."""
    counts = store.get_redis().hgetall(store.refused_key())
    return {_str(task): int(count) for task, count in counts.items()}


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _redis() -> dict[str, Any]:
    try:
        store.get_redis().ping()
    except (redis.RedisError, OSError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "error": None}


def _broker() -> dict[str, Any]:
    try:
        with current_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except (BrokerError, OSError, redis.RedisError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "error": None}


def _workers(timeout: float) -> dict[str, Any]:
    """The workers answering within ``timeout`` seconds, the queues each consumes, and
    which of them consume ``QUEUE``: without one, the sweep and resync retries never run."""
    queue = settings.QUEUE
    try:
        replies = current_app.control.inspect(timeout=timeout).active_queues() or {}
    except (BrokerError, OSError, redis.RedisError) as exc:  # a Redis broker's own errors
        return _no_workers(f"{type(exc).__name__}: {exc}")
    queues = {name: sorted(q["name"] for q in consumed or []) for name, consumed in replies.items()}
    consumers = sorted(name for name, names in queues.items() if queue in names)
    if not queues:
        error = f"no worker answered within {timeout:g} s"
    elif not consumers:
        error = f"no worker consumes the queue '{queue}'"
    else:
        error = None
    return {
        "ok": bool(consumers),
        "error": error,
        "names": sorted(queues),
        "queue": queue,
        "queues": queues,
        "consumers": consumers,
    }


def _no_workers(error: str) -> dict[str, Any]:
    return {
        "ok": False,
        "error": error,
        "names": [],
        "queue": settings.QUEUE,
        "queues": {},
        "consumers": [],
    }


def _worker_problems(services: dict[str, Any], timeout: float) -> list[str]:
    """What is wrong with the workers, and the command that fixes it.

    A worker's relay delivers changes whatever queues the worker consumes (it is
    started by Celery's worker signals), so a worker without the queue delivers, but
    the tasks sent to the queue (the scheduled sweep, the admin's resync retries) wait
    there forever and the change log is never pruned.
    """
    workers = services["workers"]
    if workers["ok"]:
        return []
    queue = workers["queue"]
    app = current_app.main or "proj"
    if not services["broker"]["ok"]:
        return [
            f"broker unreachable ({services['broker']['error']}): no worker can be asked "
            f"about, or take tasks from, the queue '{queue}'; check CELERY_BROKER_URL and "
            "that the broker runs"
        ]
    if not workers["names"]:
        command = f"celery -A {app} worker -Q {_joined([queue, _default_queue()])}"
        delivery = (
            "no worker's relay delivers changes"
            if settings.RELAY
            else "with RELAY off, nothing delivers changes"
        )
        return [
            f"no Celery worker answered within {timeout:g} s: nothing consumes the queue "
            f"'{queue}' and {delivery}; start one with `{command}`"
        ]
    queues = workers["queues"]
    shown = list(queues.items())[:SHOWN_WORKERS]
    found = "; ".join(f"{name}: {', '.join(names) or 'nothing'}" for name, names in shown)
    if len(queues) > SHOWN_WORKERS:
        found += f"; {len(queues) - SHOWN_WORKERS} more"
    consumed = sorted({name for names in queues.values() for name in names})
    command = f"celery -A {app} worker -Q {_joined([*consumed, queue])}"
    return [
        f"no worker consumes the queue '{queue}' ({found}): the sweep and the admin's resync "
        f"retries wait in it forever and the change log is never pruned; start the workers "
        f"with `{command}`"
    ]


def _default_queue() -> str:
    return str(current_app.conf.task_default_queue)


def _joined(queues: list[str]) -> str:
    return ",".join(dict.fromkeys(queues))


def _triggers() -> tuple[dict[str, str], list[str]]:
    """Per model label, the state of its tables' capture triggers (partitions included),
    and the tables of no registered model holding ormbridge triggers (databases with a log)."""
    states: dict[str, str] = {}
    orphaned: list[str] = []
    for using in relay.log_databases():
        for table in capture.status(using):
            if table.state == "orphaned":
                orphaned.append(table.table if using == "default" else f"{using}:{table.table}")
            for label in table.models:
                if states.get(label, "installed") == "installed":
                    states[label] = table.state
    return states, orphaned


def _stats(labels: list[str]) -> dict[str, dict[str, str]]:
    """Each model's counters: cache reads (cache.py) and flushes (flush.py)."""
    pipe = store.get_redis().pipeline(transaction=False)
    for label in labels:
        pipe.hgetall(store.stats_key(label))
    try:
        replies = pipe.execute()
    except (redis.RedisError, OSError):
        return {}
    return dict(zip(labels, replies, strict=True))


def _uncached(counters: dict[str, str]) -> dict[str, int]:
    """Reads that went to the database uncached, by reason (docs/design.md, "Reads that
    are never stored")."""
    return {
        field.partition(":")[2]: int(value)
        for field, value in sorted(counters.items())
        if field.startswith("uncached:")
    }


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _jobs() -> list[dict[str, Any]]:
    from ormbridge.models import ResyncJob

    running = list(ResyncJob.objects.filter(state=ResyncJob.State.RUNNING).order_by("id"))
    recent = list(
        ResyncJob.objects.exclude(state=ResyncJob.State.RUNNING).order_by("-id")[:RECENT_JOBS]
    )
    return [_job(job) for job in [*running, *recent]]


def _job(job: ResyncJob) -> dict[str, Any]:
    done, total = resync.progress(job)
    return {
        "id": job.pk,
        "models": job.labels,
        "mode": job.mode,
        "state": job.state,
        "rows_total": total,
        "rows_done": done,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "error": job.error,
    }


def ago(timestamp: float | None) -> str:
    """A Unix time as "12 s ago" (or "never")."""
    if timestamp is None:
        return "never"
    return f"{max(0.0, time.time() - timestamp):,.0f} s ago"
