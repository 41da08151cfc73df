"""What the pipeline is doing: the data behind ``manage.py ormbridge_status``.

The shape of :func:`collect`'s result is documented in ``docs/status.md`` and
``docs/status.schema.json``.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from celery import current_app
from django.db.models import Count, Min
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from ormbridge import capture, registry, relay, resync, store
from ormbridge.conf import settings

RECENT_JOBS = 5
# Status names of the cache counters, and the fields of the stats hash they read.
CACHE_COUNTERS = {"hits": "hits", "misses": "misses", "stores": "stores", "invalidations": "rows"}
UNDELIVERED = ("pending", "claimed", "failed")


def collect(ping_timeout: float = 1.0) -> dict[str, Any]:
    """The status document. Never raises because a service is down: it reports it."""
    from ormbridge.models import ChangeBatch

    now = timezone.now()
    services = {"redis": _redis(), "broker": _broker()}
    services["workers"] = _workers(ping_timeout) if services["broker"]["ok"] else {
        "ok": False, "error": "broker unreachable", "names": []
    }  # fmt: skip
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
    triggers = _triggers()
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
                    name: int(stats.get(label, {}).get(field, 0))
                    for name, field in CACHE_COUNTERS.items()
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
    if failed:
        problems.append(f"{failed} change-log rows failed")
    if oldest_age is not None and oldest_age > settings.STATUS_MAX_PENDING_AGE:
        problems.append(
            f"oldest undelivered change-log row is {oldest_age:.0f} s old "
            f"(limit {settings.STATUS_MAX_PENDING_AGE} s)"
        )
    return {
        "time": now.isoformat(),
        "healthy": not problems,
        "problems": problems,
        "services": services,
        "models": models,
        "jobs": _jobs(),
        "refused_tasks": _refused() if services["redis"]["ok"] else {},
    }


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
    except (BrokerError, OSError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "error": None}


def _workers(timeout: float) -> dict[str, Any]:
    try:
        replies = current_app.control.ping(timeout=timeout) or []
    except (BrokerError, OSError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "names": []}
    names = sorted(name for reply in replies for name in reply)
    return {"ok": bool(names), "error": None if names else "no worker answered", "names": names}


def _triggers() -> dict[str, str]:
    """Per model label, the state of its tables' capture triggers (databases with a log)."""
    states: dict[str, str] = {}
    for using in relay.log_databases():
        for table in capture.status(using):
            for label in table.models:
                if states.get(label, "installed") == "installed":
                    states[label] = table.state
    return states


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


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _jobs() -> list[dict[str, Any]]:
    from ormbridge.models import ResyncJob

    running = list(ResyncJob.objects.filter(state=ResyncJob.State.RUNNING).order_by("id"))
    recent = list(
        ResyncJob.objects.exclude(state=ResyncJob.State.RUNNING).order_by("-id")[:RECENT_JOBS]
    )
    return [
        {
            "id": job.pk,
            "models": job.labels,
            "mode": job.mode,
            "state": job.state,
            "rows_total": job.rows_total,
            "rows_done": resync.rows_done(job),
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "error": job.error,
        }
        for job in [*running, *recent]
    ]


def ago(timestamp: float | None) -> str:
    """A Unix time as "12 s ago" (or "never")."""
    if timestamp is None:
        return "never"
    return f"{max(0.0, time.time() - timestamp):,.0f} s ago"
