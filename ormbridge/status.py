"""What the pipeline is doing: the data behind ``manage.py ormbridge_status``.

The shape of :func:`collect`'s result is documented in ``docs/status.schema.json``,
its meaning in ``docs/operations.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import redis
from celery import current_app
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.db.models import Count, Min
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from ormbridge import capture, redis_store, registry, relay, resync, stats
from ormbridge.conf import settings

if TYPE_CHECKING:
    from ormbridge.models import ResyncJob

__all__ = [
    "CACHE_COUNTERS",
    "RECENT_JOBS",
    "SHOWN_WORKERS",
    "UNDELIVERED",
    "ago",
    "collect",
]

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


@dataclass
class _Log:
    """What one database's change log holds, as read for the status."""

    using: str
    models: list[str]
    tables: set[str] = field(default_factory=set)
    """The database's tables: a model's capture triggers are looked for where its table is."""
    by_state: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per model label, undelivered rows by state."""
    oldest: dict[str, datetime] = field(default_factory=dict)
    """Per model label, when its oldest pending or claimed row was written."""
    claim: tuple[datetime, str] | None = None
    """When the oldest claim still in flight was made, and by which relay."""
    error: str | None = None
    """Why the log could not be read (no log, no table, the database down)."""

    def counts(self) -> dict[str, int]:
        return {
            state: sum(states.get(state, 0) for states in self.by_state.values())
            for state in UNDELIVERED
        }

    def oldest_age(self, now: datetime) -> float | None:
        if not self.oldest:
            return None
        return max(0.0, (now - min(self.oldest.values())).total_seconds())

    def claim_age(self, now: datetime) -> float | None:
        return None if self.claim is None else max(0.0, (now - self.claim[0]).total_seconds())

    def as_dict(self, now: datetime) -> dict[str, Any]:
        return {
            "log": self.error is None,
            "models": self.models,
            "change_log": self.counts(),
            "oldest_undelivered_age": self.oldest_age(now),
            "oldest_in_flight_age": self.claim_age(now),
            "error": self.error,
        }


def _logs() -> list[_Log]:
    """The change log of every database holding one, and a log-less entry for each
    database that holds registered models without one (their writes are not captured)."""
    from ormbridge.models import ChangeBatch

    held = relay.model_databases()
    logs = []
    for using in relay.log_databases():
        log = _Log(using, held.get(using, []))
        logs.append(log)
        try:
            log.tables = set(connections[using].introspection.table_names())
            if ChangeBatch._meta.db_table not in log.tables:
                log.error = (
                    f"no change-log table: run manage.py migrate --database {using} "
                    "(until then, writes to its registered models are not captured)"
                )
                continue
            _read(log, ChangeBatch.objects.using(using))
        except DatabaseError as exc:
            log.error = f"could not be read: {type(exc).__name__}: {str(exc).strip()}"
    for using, labels in relay.unlogged_databases().items():
        logs.append(
            _Log(
                using,
                labels,
                error="no change log: the router keeps ormbridge's tables out of it, so "
                "writes to its registered models are not captured (ormbridge.W006)",
            )
        )
    return logs


def _read(log: _Log, changes: Any) -> None:
    """Fill ``log`` from its database. Only undelivered rows are counted: the (state, id)
    index finds them, however many done rows wait for pruning."""
    from ormbridge.models import ChangeBatch

    undelivered = changes.filter(state__in=UNDELIVERED)
    for row in undelivered.values("model", "state").annotate(n=Count("id")):
        log.by_state.setdefault(row["model"], {})[row["state"]] = row["n"]
    log.oldest = {
        row["model"]: row["oldest"]
        for row in undelivered.exclude(state=ChangeBatch.State.FAILED)
        .values("model")
        .annotate(oldest=Min("created_at"))
    }
    claim = (
        changes.filter(state=ChangeBatch.State.CLAIMED, claimed_at__isnull=False)
        .order_by("claimed_at")
        .values_list("claimed_at", "claimed_by")
        .first()
    )
    log.claim = None if claim is None or claim[0] is None else (claim[0], claim[1])


def collect(worker_timeout: float = 1.0) -> dict[str, Any]:
    """The status document. Never raises because a service is down: it reports it.

    Workers are asked which queues they consume, waiting ``worker_timeout`` seconds for
    their answers; a broker that does not answer is not asked. Every database holding
    registered models is read, each by name (never a replica the router reads from).
    """
    now = timezone.now()
    services = {"redis": _redis(), "broker": _broker()}
    services["workers"] = (
        _workers(worker_timeout) if services["broker"]["ok"] else _no_workers("broker unreachable")
    )
    labels = [model._meta.label_lower for model in registry.registered_models()]
    logs = _logs()
    by_state: dict[str, dict[str, int]] = {label: {} for label in labels}
    oldest: dict[str, datetime] = {}
    for log in logs:
        for label, states in log.by_state.items():
            for state, n in states.items():
                by_state.setdefault(label, {})[state] = by_state[label].get(state, 0) + n
        for label, written in log.oldest.items():
            oldest[label] = min(written, oldest.get(label, written))
    triggers, orphaned = _triggers(logs)
    receiver_errors = relay.receiver_errors(
        databases=[log.using for log in logs if log.error is None]
    )
    stats = _stats(labels) if services["redis"]["ok"] else {}
    models: list[dict[str, Any]] = []
    for label in sorted(by_state):
        counts = {state: by_state[label].get(state, 0) for state in UNDELIVERED}
        age = max(0.0, (now - oldest[label]).total_seconds()) if label in oldest else None
        models.append(
            {
                "model": label,
                "registered": label in labels,
                "triggers": triggers.get(label),
                "last_delivery": _float(stats.get(label, {}).get("last_delivery")),
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
    problems.extend(_log_problems(logs, now))
    problems.extend(_worker_problems(services, worker_timeout))
    refusals = _refusals() if services["redis"]["ok"] else None
    problems.extend(_refusal_problems(refusals))
    ages = [age for log in logs if (age := log.oldest_age(now)) is not None]
    claims = [age for log in logs if (age := log.claim_age(now)) is not None]
    return {
        "time": now.isoformat(),
        "healthy": not problems,
        "problems": problems,
        "services": services,
        "delivery": {
            "backlog": sum(m["change_log"]["pending"] + m["change_log"]["claimed"] for m in models),
            "oldest_pending_age": max(ages, default=None),
            "oldest_in_flight_age": max(claims, default=None),
        },
        "databases": {log.using: log.as_dict(now) for log in logs},
        "models": models,
        "jobs": _jobs(),
        "refused_tasks": _refused() if services["redis"]["ok"] else {},
        "recent_refusals": refusals,
    }


def _log_problems(logs: list[_Log], now: datetime) -> list[str]:
    """What is wrong with the change logs, each naming its database: no log where
    registered models are, failed rows, deliveries overdue or stuck in flight."""
    limit = settings.STATUS_MAX_PENDING_AGE
    problems = []
    for log in logs:
        if log.error is not None:
            problems.append(f"database {log.using!r}: {log.error}")
        failed = log.counts()["failed"]
        if failed:
            problems.append(f"{failed} change-log rows failed in database {log.using!r}")
    oldest = max(logs, key=lambda log: log.oldest_age(now) or -1.0, default=None)
    age = None if oldest is None else oldest.oldest_age(now)
    if oldest is not None and age is not None and age > limit:
        problems.append(
            f"oldest undelivered change-log row is {age:.0f} s old, in database "
            f"{oldest.using!r} (limit {limit} s)"
        )
    stuck = max(logs, key=lambda log: log.claim_age(now) or -1.0, default=None)
    age = None if stuck is None else stuck.claim_age(now)
    if stuck is not None and stuck.claim is not None and age is not None and age > limit:
        problems.append(
            f"a delivery has been in flight for {age:.0f} s (limit {limit} s), claimed by "
            f"{stuck.claim[1]} in database {stuck.using!r}: its relay is stuck or slow "
            "(see that worker's log)"
        )
    return problems


def _refusals() -> dict[str, Any] | None:
    """The recent refusals (``stats.recent_refusals``); None when Redis does not answer."""
    try:
        return stats.recent_refusals()
    except (redis.RedisError, OSError):
        return None


def _refusal_problems(refusals: dict[str, Any] | None) -> list[str]:
    """Task messages refused within ``STATUS_REFUSAL_WINDOW``, whatever the reason: each was
    dropped, not run (a sweep refused at every run, and the change log is never pruned)."""
    if not refusals or not refusals["count"]:
        return []
    count, last = refusals["count"], refusals["last"][0]
    tasks = ", ".join(f"{task} {n:,}" for task, n in refusals["by_task"].items())
    return [
        f"{count:,} task message{'' if count == 1 else 's'} refused by the workers in the "
        f"last {refusals['window']:g} s ({tasks}), the last {last['age']:.0f} s ago: "
        f"{last['task']}[{last['id']}]: {last['reason']}; they were dropped, not run"
    ]


def _refused() -> dict[str, int]:
    """Per task, how many messages this project's workers refused (see ormbridge.tasks)."""
    counts = redis_store.get_redis().hgetall(redis_store.refused_key())
    return {_str(task): int(count) for task, count in counts.items()}


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _redis() -> dict[str, Any]:
    try:
        redis_store.get_redis().ping()
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


def _triggers(logs: list[_Log]) -> tuple[dict[str, str], list[str]]:
    """Per model label, the state of its tables' capture triggers (partitions included), in
    each database with a log that holds the table (a model's rows may be in one database
    only); and the tables of no registered model holding ormbridge triggers."""
    states: dict[str, str] = {}
    orphaned: list[str] = []
    for log in logs:
        if log.error is not None:
            continue
        for table in capture.status(log.using):
            if table.state == "orphaned":
                where = "" if log.using == DEFAULT_DB_ALIAS else f"{log.using}:"
                orphaned.append(f"{where}{table.table}")
                continue
            if not table.exists:
                continue
            for label in table.models:
                if states.get(label, "installed") == "installed":
                    states[label] = table.state
    return states, orphaned


def _stats(labels: list[str]) -> dict[str, dict[str, str]]:
    """Each model's counters: cache reads (cache.py, stats.py) and deliveries (delivery.py)."""
    pipe = redis_store.get_redis().pipeline(transaction=False)
    for label in labels:
        pipe.hgetall(redis_store.stats_key(label))
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

    jobs = ResyncJob.objects.using(ResyncJob.database())
    running = list(jobs.filter(state=ResyncJob.State.RUNNING).order_by("id"))
    recent = list(jobs.exclude(state=ResyncJob.State.RUNNING).order_by("-id")[:RECENT_JOBS])
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
