"""System checks for ``settings.ORMBRIDGE`` (``manage.py check``)."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any
from urllib.parse import urlsplit

from django.apps import apps
from django.conf import settings as django_settings
from django.core import checks
from django.utils.module_loading import import_string

from ormbridge.conf import settings

__all__ = [
    "CLUSTER_SCHEMES",
    "PICKLE",
    "REDIS_SCHEMES",
    "RETIRED",
    "check_databases",
    "check_settings",
    "check_triggers",
    "register_checks",
]

REDIS_SCHEMES = {"redis", "rediss", "unix"}
CLUSTER_SCHEMES = {"redis", "rediss"}  # cluster nodes announce TCP addresses


def register_checks() -> None:
    checks.register(check_settings, "ormbridge")
    checks.register(check_databases, "ormbridge")
    checks.register(check_triggers, "ormbridge", checks.Tags.database)


# Keys earlier versions read, and what replaced them.
RETIRED = {
    "CACHE_ALIAS": "Cache entries live in ormbridge's own Redis (REDIS_URL) next to their "
    "tokens, so a hit is one round trip; remove CACHE_ALIAS.",
}


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Validate ``settings.ORMBRIDGE``; one message per problem."""
    user = getattr(django_settings, "ORMBRIDGE", {})
    if not isinstance(user, dict):
        return [
            checks.Error(
                f"ORMBRIDGE must be a dict, not {type(user).__name__}.",
                hint='Set ORMBRIDGE = {"REDIS_URL": "redis://localhost:6379/0", ...}.',
                id="ormbridge.E001",
            )
        ]
    errors: list[checks.CheckMessage] = []
    renamed = settings.renamed()
    for old in sorted(set(user) & set(renamed)):
        new = renamed[old]
        errors.append(
            checks.Warning(
                f"ORMBRIDGE[{old!r}] is renamed {new!r}; the old name is read until the "
                "next release"
                + (f", and ignored now that {new!r} is set." if new in user else "."),
                hint=f"Rename the key {old!r} to {new!r}.",
                id="ormbridge.W010",
            )
        )
    for name in sorted(set(user) - set(settings.names()) - set(renamed)):
        errors.append(
            checks.Warning(
                f"ORMBRIDGE has an unknown key {name!r}; it is ignored.",
                hint=RETIRED.get(name, f"Known keys: {', '.join(settings.names())}."),
                id="ormbridge.W001",
            )
        )
    errors += _check_redis_url()
    with warnings.catch_warnings():
        # A deprecated key's value is checked too; W010 above already names it.
        warnings.simplefilter("ignore", DeprecationWarning)
        errors += _check_numbers()
    errors += _check_names()
    errors += _check_models() + _check_emitters() + _check_serializer() + _check_capture()
    errors += _check_beat_schedule()
    return errors


def _check_redis_url() -> list[checks.CheckMessage]:
    url, cluster = settings.REDIS_URL, settings.REDIS_CLUSTER
    if not isinstance(cluster, bool):
        return [
            checks.Error(
                f"ORMBRIDGE['REDIS_CLUSTER'] must be True or False, not {cluster!r}.",
                id="ormbridge.E002",
            )
        ]
    schemes = CLUSTER_SCHEMES if cluster else REDIS_SCHEMES
    if isinstance(url, str) and urlsplit(url).scheme in schemes:
        return []
    if cluster:
        return [
            checks.Error(
                f"ORMBRIDGE['REDIS_URL'] is not the URL of a Redis Cluster node: {url!r}.",
                hint="With REDIS_CLUSTER, use redis://host:port or rediss://host:port "
                "of any node of the cluster.",
                id="ormbridge.E002",
            )
        ]
    return [
        checks.Error(
            f"ORMBRIDGE['REDIS_URL'] is not a Redis URL: {url!r}.",
            hint="Use redis://host:port/db, rediss://… or unix:///path/to/redis.sock.",
            id="ormbridge.E002",
        )
    ]


def _check_numbers() -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    rules = {
        "DELIVERY_DELAY": (settings.DELIVERY_DELAY, 0, "a number of seconds >= 0"),
        "DELIVERY_BATCH_SIZE": (settings.DELIVERY_BATCH_SIZE, 1, "a whole number >= 1"),
        "RELAY_BATCH": (settings.RELAY_BATCH, 1, "a whole number >= 1"),
        "RELAY_MAX_PKS": (settings.RELAY_MAX_PKS, 1, "a whole number >= 1"),
        "RELAY_LEASE": (settings.RELAY_LEASE, 1, "a number of seconds >= 1"),
        "RELAY_POLL": (settings.RELAY_POLL, 0.01, "a number of seconds >= 0.01"),
        "LOG_RETENTION": (settings.LOG_RETENTION, 0, "a number of seconds >= 0"),
        "COMMIT_TIMEOUT": (settings.COMMIT_TIMEOUT, 0.001, "a number of seconds > 0"),
        "READ_TIMEOUT": (settings.READ_TIMEOUT, 0.001, "a number of seconds > 0"),
        "BREAKER_COOLDOWN": (settings.BREAKER_COOLDOWN, 0, "a number of seconds >= 0"),
        "BULK_CHUNK_SECONDS": (settings.BULK_CHUNK_SECONDS, 0.001, "a number of seconds > 0"),
        "MAX_ATTEMPTS": (settings.MAX_ATTEMPTS, 1, "a whole number >= 1"),
        "RETRY_BACKOFF": (settings.RETRY_BACKOFF, 0, "a number of seconds >= 0"),
        "RETRY_BACKOFF_MAX": (settings.RETRY_BACKOFF_MAX, 0, "a number of seconds >= 0"),
        "SWEEP_INTERVAL": (settings.SWEEP_INTERVAL, 1, "a whole number of seconds >= 1"),
        "STATUS_MAX_PENDING_AGE": (settings.STATUS_MAX_PENDING_AGE, 1, "a number of seconds >= 1"),
        "STATUS_REFUSAL_WINDOW": (settings.STATUS_REFUSAL_WINDOW, 1, "a number of seconds >= 1"),
        "EVENTS_REAUTH": (settings.EVENTS_REAUTH, 0.1, "a number of seconds >= 0.1"),
        "EVENTS_MAX_AGE": (settings.EVENTS_MAX_AGE, 1, "a number of seconds >= 1"),
        "EVENTS_MAX_NAMESPACES": (settings.EVENTS_MAX_NAMESPACES, 1, "a whole number >= 1"),
        "EVENTS_BUFFER": (settings.EVENTS_BUFFER, 1, "a whole number >= 1"),
        "EVENTS_GC_PAUSE": (settings.EVENTS_GC_PAUSE, 0, "a number >= 0"),
    }
    for name, (value, minimum, wanted) in rules.items():
        kinds = int if "whole" in wanted else int | float
        if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
            errors.append(
                checks.Error(
                    f"ORMBRIDGE[{name!r}] must be {wanted}, not {value!r}.",
                    id="ormbridge.E004",
                )
            )
    timeout = settings.CACHE_TIMEOUT
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1
    ):
        errors.append(
            checks.Error(
                f"ORMBRIDGE['CACHE_TIMEOUT'] must be a whole number of seconds >= 1 or None, "
                f"not {timeout!r}.",
                id="ormbridge.E004",
            )
        )
    return errors


def _check_names() -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    user = getattr(django_settings, "ORMBRIDGE", {})
    # QUEUE's default derives from KEY_PREFIX: only a QUEUE set by hand is its own problem.
    names = ("KEY_PREFIX", "QUEUE") if "QUEUE" in user else ("KEY_PREFIX",)
    for name in names:
        value = getattr(settings, name)
        if not isinstance(value, str) or not value or any(c.isspace() for c in value):
            errors.append(
                checks.Error(
                    f"ORMBRIDGE[{name!r}] must be a non-empty string without spaces, "
                    f"not {value!r}.",
                    id="ormbridge.E005",
                )
            )
    prefix = settings.KEY_PREFIX
    if isinstance(prefix, str) and ("{" in prefix or "}" in prefix):
        errors.append(
            checks.Error(
                f"ORMBRIDGE['KEY_PREFIX'] must not contain braces, not {prefix!r}.",
                hint="Keys start with {KEY_PREFIX}, a Redis Cluster hash tag that keeps "
                "them in one hash slot; braces inside it would split them.",
                id="ormbridge.E005",
            )
        )
    return errors


def _check_models() -> list[checks.CheckMessage]:
    from ormbridge.registry import Options, _check_model, composite_pk, options_from_settings

    entries = settings.MODELS
    if not isinstance(entries, list | tuple | dict):
        return [
            checks.Error(
                f"ORMBRIDGE['MODELS'] must be a list of 'app_label.ModelName' strings or a "
                f"dict of them to register() options, not {entries!r}.",
                id="ormbridge.E006",
            )
        ]
    errors: list[checks.CheckMessage] = []
    for label in entries:
        try:
            model = apps.get_model(label)
            if isinstance(model, type) and composite_pk(model):
                errors.append(
                    checks.Error(
                        f"ORMBRIDGE['MODELS'] names {label!r}, whose model "
                        f"{model._meta.label} has a composite primary key: ormbridge captures "
                        "models with a single-column primary key only; it is not registered.",
                        hint=f"Remove {label!r} from ORMBRIDGE['MODELS'] (its writes are not "
                        "captured), or give the model a single-column primary key.",
                        id="ormbridge.E009",
                    )
                )
                continue
            _check_model(model)
        except (LookupError, ValueError, TypeError, AttributeError) as exc:
            errors.append(
                checks.Error(
                    f"ORMBRIDGE['MODELS'] names {label!r}, which is not a concrete model: {exc}",
                    hint="Use 'app_label.ModelName' of an installed, concrete model.",
                    id="ormbridge.E006",
                )
            )
    if isinstance(entries, dict):
        for label, options in entries.items():
            try:
                if not isinstance(options, dict):
                    raise TypeError(f"its options are {options!r}, not a dict")
                Options(**options_from_settings(options))
            except (TypeError, ImportError) as exc:
                errors.append(
                    checks.Error(
                        f"ORMBRIDGE['MODELS'][{label!r}] has bad options: {exc}",
                        hint=f"Known options: {', '.join(Options.__dataclass_fields__)}.",
                        id="ormbridge.E006",
                    )
                )
    return errors


def _check_emitters() -> list[checks.CheckMessage]:
    paths = settings.EMITTERS
    if not isinstance(paths, list | tuple):
        return [
            checks.Error(
                f"ORMBRIDGE['EMITTERS'] must be a list of dotted paths, not {paths!r}.",
                id="ormbridge.E007",
            )
        ]
    errors: list[checks.CheckMessage] = []
    for path in paths:
        try:
            import_string(path)
        except ImportError as exc:
            errors.append(
                checks.Error(
                    f"ORMBRIDGE['EMITTERS'] names {path!r}, which cannot be imported: {exc}",
                    hint="Use e.g. 'ormbridge.broadcast.LoggingEmitter'.",
                    id="ormbridge.E007",
                )
            )
    return errors


# Pickle's names in Celery's settings: the serializer's name and its content type.
PICKLE = {"pickle", "application/x-python-serialize"}


def _check_serializer() -> list[checks.CheckMessage]:
    """Pickle anywhere Celery may take it from: Django's ``CELERY_*`` settings, and the
    effective configuration of the project's Celery app (celeryconfig.py, ``app.conf``)."""
    from celery import current_app
    from celery.exceptions import ImproperlyConfigured

    values = {
        "CELERY_ACCEPT_CONTENT": getattr(django_settings, "CELERY_ACCEPT_CONTENT", None),
        "CELERY_TASK_SERIALIZER": getattr(django_settings, "CELERY_TASK_SERIALIZER", None),
        "CELERY_RESULT_SERIALIZER": getattr(django_settings, "CELERY_RESULT_SERIALIZER", None),
    }
    try:
        conf = current_app.conf
        for name in ("accept_content", "result_accept_content", "task_serializer",
                     "result_serializer"):  # fmt: skip
            values[name] = conf.get(name)
    except (ImportError, ImproperlyConfigured):
        pass  # a configuration Celery cannot load: Celery itself says so
    found = [f"{name} = {value!r}" for name, value in values.items() if _pickles(value)]
    if not found:
        return []
    return [
        checks.Warning(
            f"Celery is set to use pickle ({'; '.join(found)}); ormbridge's tasks carry "
            "only JSON and a worker that accepts pickle runs code sent to its broker.",
            hint="Use JSON wherever the Celery app is configured (CELERY_* settings, "
            'celeryconfig.py, app.conf): task_serializer = "json", result_serializer = '
            '"json", accept_content = ["json"].',
            id="ormbridge.W003",
        )
    ]


def _pickles(value: object) -> bool:
    """Whether a serializer name or a list of accepted content names pickle."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list | tuple | set | frozenset):
        return False
    return any(isinstance(name, str) and name.lower() in PICKLE for name in names)


def check_databases(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Databases holding registered models that the router keeps the change log out of:
    the capture triggers of a database write to its own log, so writes there are never
    captured (``W006``). From the routers alone: no database is queried."""
    from ormbridge import relay

    return [
        checks.Warning(
            f"Database {using!r} holds registered models ({', '.join(labels)}) but no "
            "change log: the database routers keep ormbridge's tables out of it, so writes "
            "to those models there are never captured and their caches go stale.",
            hint=f"Let your router's allow_migrate() put the 'ormbridge' app in {using!r} "
            f"too, then run: manage.py migrate --database {using}",
            id="ormbridge.W006",
        )
        for using, labels in relay.unlogged_databases().items()
    ]


def check_triggers(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Registered models whose tables lack their capture triggers (database checks only)."""
    from django.db import DatabaseError, connections, router

    from ormbridge import capture, relay
    from ormbridge.models import ChangeBatch

    messages: list[checks.CheckMessage] = []
    for using in databases or ():
        connection = connections[using]
        messages.extend(_check_periodic_tasks(using))
        if not router.allow_migrate_model(using, ChangeBatch):
            continue
        if not capture.supports(connection) or settings.CAPTURE == "signals":
            messages.append(
                checks.Warning(
                    f"Database {using!r} ({connection.vendor}) is captured by signals, not "
                    "triggers: QuerySet.update(), bulk_create(), bulk_update(), raw SQL and "
                    "other programs are not seen, and registered models lose Django's fast "
                    "delete.",
                    hint="Use PostgreSQL or SQLite with ORMBRIDGE['CAPTURE'] = 'triggers'; "
                    "write in bulk with ormbridge.safe_bulk_*.",
                    id="ormbridge.W004",
                )
            )
            continue
        try:
            tables = set(connection.introspection.table_names())
            if ChangeBatch._meta.db_table not in tables:
                messages.extend(_no_log_table(using, tables, relay.model_databases()))
                continue  # migrate creates it, then installs the triggers
            states = capture.status(using)
        except DatabaseError:
            continue
        for state in states:
            if state.state == "installed" or not state.exists:
                continue
            if state.state == "orphaned":
                messages.append(
                    checks.Warning(
                        f"Table {state.table!r} of no registered model has ormbridge capture "
                        f"triggers in database {using!r}: every write to it is logged for a "
                        "model nobody watches, and breaks once its columns change.",
                        hint=f"Run: manage.py ormbridge_triggers prune --database {using} "
                        f"(or uninstall --table {state.table}); migrate drops them too.",
                        id="ormbridge.W009",
                    )
                )
                continue
            where = f", a partition of {state.partition_of!r}," if state.partition_of else ""
            if state.state == "stale":
                what = (
                    "has ormbridge triggers that are not its own (left by a rename): its "
                    "writes are logged twice, or under another table's columns"
                )
            else:
                what = f"has capture triggers {state.state}: changes to it are not all seen"
            messages.append(
                checks.Warning(
                    f"Table {state.table!r}{where} ({', '.join(state.models)}) {what} "
                    f"in database {using!r}.",
                    hint=f"Run: manage.py ormbridge_triggers install --database {using}",
                    id="ormbridge.W005",
                )
            )
    return messages


def _no_log_table(
    using: str, tables: set[str], held: dict[str, list[str]]
) -> list[checks.CheckMessage]:
    """``W007``: tables of registered models in ``using``, and not its change-log table
    (``migrate`` has not created it there yet): writes to them are not captured."""
    from django.apps import apps

    present = [
        label for label in held.get(using, []) if apps.get_model(label)._meta.db_table in tables
    ]
    if not present:
        return []  # nothing to capture yet: a database migrate has not reached
    return [
        checks.Warning(
            f"Database {using!r} holds tables of registered models ({', '.join(present)}) "
            "but not the change-log table: writes to them are not captured.",
            hint=f"Run: manage.py migrate --database {using}",
            id="ormbridge.W007",
        )
    ]


def _refused_by_workers(task: object, kwargs: object) -> dict[str, Any] | None:
    """What a scheduled call of ``task`` with ``kwargs`` lacks for this project's workers
    to run it (as :func:`ormbridge.schedule.beat_schedule` sends it), or None: not one of
    ormbridge's scheduled tasks, or nothing lacking."""
    from ormbridge import schedule

    wanted = schedule.beat_schedule().get(task) if isinstance(task, str) else None
    if wanted is None:
        return None
    given = kwargs if isinstance(kwargs, dict) else {}
    lacking = {k: v for k, v in wanted["kwargs"].items() if given.get(k) != v}
    return lacking or None


def _refused_entry(
    source: str, name: str, task: object, lacking: dict[str, Any], hint: str
) -> checks.CheckMessage:
    return checks.Warning(
        f"{source} {name!r} sends {task} without {lacking!r} in its kwargs: every worker "
        "refuses it and drops it (ormbridge_status shows the refusals), so it never runs.",
        hint=hint,
        id="ormbridge.W008",
    )


def _check_beat_schedule() -> list[checks.CheckMessage]:
    """``W008``: entries of the beat schedule (``CELERY_BEAT_SCHEDULE``, the Celery app's
    ``beat_schedule``) that send ormbridge's tasks without what workers need to run them."""
    from celery import current_app
    from celery.exceptions import ImproperlyConfigured

    entries: dict[str, Any] = {}
    sources = [getattr(django_settings, "CELERY_BEAT_SCHEDULE", None)]
    # A configuration Celery cannot load: Celery itself says so.
    with contextlib.suppress(ImportError, ImproperlyConfigured):
        sources.append(current_app.conf.get("beat_schedule"))
    for source in sources:
        if isinstance(source, dict):
            entries.update({name: entry for name, entry in source.items() if name not in entries})
    messages = []
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            continue
        task = entry.get("task")
        lacking = _refused_by_workers(task, entry.get("kwargs"))
        if lacking is not None:
            messages.append(
                _refused_entry(
                    "The beat schedule entry",
                    name,
                    task,
                    lacking,
                    f'Give it "kwargs": {_kwargs(task)!r}, or build the schedule with '
                    "ormbridge.schedule.beat_schedule() in the Celery app's module "
                    '(docs/operations.md, "Periodic work").',
                )
            )
    return messages


def _kwargs(task: object) -> dict[str, Any]:
    from ormbridge import schedule

    kwargs: dict[str, Any] = schedule.beat_schedule()[str(task)]["kwargs"]
    return kwargs


def _check_periodic_tasks(using: str) -> list[checks.CheckMessage]:
    """``W008``: django-celery-beat's enabled rows in ``using`` that send ormbridge's
    tasks without what workers need (written by an older ``ormbridge_schedule``, or by
    hand)."""
    import json

    from django.db import DatabaseError, connections, router

    if not apps.is_installed("django_celery_beat"):
        return []
    from django_celery_beat.models import PeriodicTask

    from ormbridge import schedule

    if not router.allow_migrate_model(using, PeriodicTask):
        return []
    try:
        if PeriodicTask._meta.db_table not in connections[using].introspection.table_names():
            return []  # not migrated yet
        rows = list(
            PeriodicTask.objects.using(using)
            .filter(enabled=True, task__in=list(schedule.PERIODIC_TASKS))
            .values_list("name", "task", "kwargs")
        )
    except DatabaseError:
        return []  # the database checks of check_triggers say what is wrong with it
    messages = []
    for name, task, text in rows:
        try:
            kwargs = json.loads(text or "{}")
        except ValueError:
            kwargs = None
        lacking = _refused_by_workers(task, kwargs)
        if lacking is None:
            continue
        hint = "Run: manage.py ormbridge_schedule"
        if schedule.PERIODIC_TASKS.get(task) != name:
            hint += f" (it writes a row of its own), and delete or disable {name!r}"
        where = f"The periodic task (django-celery-beat, database {using!r})"
        messages.append(_refused_entry(where, name, task, lacking, hint))
    return messages


def _check_capture() -> list[checks.CheckMessage]:
    if settings.CAPTURE in ("triggers", "signals"):
        return []
    return [
        checks.Error(
            f"ORMBRIDGE['CAPTURE'] must be 'triggers' or 'signals', not {settings.CAPTURE!r}.",
            id="ormbridge.E008",
        )
    ]
