"""Resync: replay ``post_save`` for, or invalidate, every selected row, in resumable chunks.

For when data changed behind ormbridge's back (a migration, raw SQL, a
restore). A job walks each model by pk (keyset, bounded memory) and writes
one :class:`~ormbridge.models.ChangeBatch` per chunk, together with the job's
progress, in one transaction. Chunks are delivered by workers, or by the
calling process (``sync``). A job interrupted in any way is continued with
:func:`run` again: chunks already written are not planned twice, chunks not
delivered are delivered (again: at least once), finished chunks are left alone.

Each model's chunks go to the change log of the database its rows are read from
(``router.db_for_write``): a relay delivers a chunk from the database whose log
holds it, and replays its rows from there. The job itself is in
``ResyncJob.database()``. Both are always named, never left to the router's
choice for reads, which may be a replica that lags.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.core.exceptions import (
    EmptyResultSet,
    FieldDoesNotExist,
    FieldError,
    FullResultSet,
    ValidationError,
)
from django.db import DatabaseError, DataError, connections, router, transaction
from django.db.models import IntegerField, Model, Q, QuerySet, Sum, TextField, Value
from django.utils import timezone

from ormbridge import capture, registry, sync_delivery
from ormbridge.conf import settings
from ormbridge.models import log_databases, pieces

if TYPE_CHECKING:
    from django.db.models.options import Options

    from ormbridge.models import ResyncJob

__all__ = [
    "DEFAULT_CHUNK",
    "LIST_LOOKUPS",
    "PATTERN_LOOKUPS",
    "TEXT_LOOKUPS",
    "OnProgress",
    "ResyncError",
    "Selection",
    "count",
    "get_job",
    "interrupt",
    "log_database",
    "lookup",
    "progress",
    "refresh",
    "resume",
    "rows_done",
    "run",
    "select",
    "selection_of",
    "start",
    "wait",
]

TEXT_LOOKUPS = {
    "contains", "icontains", "startswith", "istartswith", "endswith", "iendswith",
    "regex", "iregex", "iexact",
}  # fmt: skip
LIST_LOOKUPS = {"in", "range"}
PATTERN_LOOKUPS = {"regex", "iregex"}
DEFAULT_CHUNK = 5000

logger = logging.getLogger(__name__)


class ResyncError(ValueError):
    """Bad input for a resync, or a conflicting job; nothing was written."""


@dataclass(frozen=True)
class Selection:
    """What a resync touches: models, and lookups as ``(FIELD__LOOKUP, raw value)`` pairs."""

    models: tuple[type[Model], ...]
    filters: tuple[tuple[str, str], ...] = ()
    excludes: tuple[tuple[str, str], ...] = ()

    def queryset(self, model: type[Model]) -> QuerySet[Any]:
        queryset = model._base_manager.using(router.db_for_write(model))
        for key, raw in self.filters:
            queryset = queryset.filter(lookup(model, key, raw))
        for key, raw in self.excludes:
            queryset = queryset.exclude(lookup(model, key, raw))
        return queryset


def log_database(model: type[Model]) -> str:
    """The database whose change log takes the chunks of ``model``: the one its rows
    are read from.

    Raises:
        ResyncError: that database holds no change log (``ormbridge.W006``).
    """
    using = router.db_for_write(model)
    if using not in log_databases():
        raise ResyncError(
            f"{model._meta.label}'s rows are in database {using!r}, which holds no change "
            "log: the router keeps ormbridge's tables out of it (manage.py check says "
            "ormbridge.W006)."
        )
    return using


def select(
    labels: list[str],
    *,
    all_models: bool = False,
    filters: Sequence[str] = (),
    excludes: Sequence[str] = (),
) -> Selection:
    """Validate a selection given as text (as on the command line).

    Raises:
        ResyncError: unknown or unregistered model, malformed lookup, unknown
            field or lookup, a value the field or its column cannot take, or a
            regular expression the database does not compile.
    """
    if all_models == bool(labels):
        raise ResyncError("name models as app_label.Model, or pass --all (not both).")
    chosen = registry.registered_models() if all_models else [_model(label) for label in labels]
    if not chosen:
        raise ResyncError("no model is registered with ormbridge.")
    selection = Selection(
        models=tuple(dict.fromkeys(chosen)),
        filters=tuple(_split(text, "--filter") for text in filters),
        excludes=tuple(_split(text, "--exclude") for text in excludes),
    )
    for model in selection.models:
        log_database(model)
        for option, pairs in (("--filter", selection.filters), ("--exclude", selection.excludes)):
            for key, raw in pairs:
                _check_lookup(model, option, key, raw)
    return selection


def _check_lookup(model: type[Model], option: str, key: str, raw: str) -> None:
    """Turn one lookup into SQL, and have the database compile a pattern, before any write."""
    label = model._meta.label
    try:
        queryset = model._base_manager.using(router.db_for_write(model)).filter(
            lookup(model, key, raw)
        )
        queryset.query.get_compiler(queryset.db).as_sql()
    except (EmptyResultSet, FullResultSet):
        pass  # a lookup that no row (or every row) can match: valid
    except (FieldError, OverflowError) as exc:
        raise ResyncError(f"{label}: {option} {key}={raw!r}: {_first_line(exc)}") from None
    name = _parse(model, key)[1]
    if name in PATTERN_LOOKUPS:
        _check_pattern(model, option, key, name, raw)


def lookup(model: type[Model], key: str, raw: str) -> Q:
    """``Q(key=value)`` with ``raw`` converted by the field ``key`` ends on.

    Raises:
        ResyncError: unknown field or lookup, or a value the field rejects.
    """
    field, name = _parse(model, key)
    return Q(**{key: _convert(model, key, field, name, raw)})


def _parse(model: type[Model], key: str) -> tuple[Any, str]:
    """The field ``key`` ends on and its lookup's name; ``ResyncError`` if either is unknown."""
    parts = key.split("__")
    field = None
    meta: Options[Any] | None = model._meta
    used = 0
    for part in parts:
        if meta is None:
            break
        try:
            field = meta.pk if part == "pk" else meta.get_field(part)
        except FieldDoesNotExist:
            break
        used += 1
        meta = field.related_model._meta if field.is_relation and field.related_model else None
    if field is None:
        raise ResyncError(f"{model._meta.label} has no field {parts[0]!r}.")
    rest = parts[used:]
    name = rest[0] if rest else "exact"
    if len(rest) > 1 or field.get_lookup(name) is None:
        raise ResyncError(
            f"{model._meta.label}: unknown lookup {'__'.join(rest)!r} for field {field.name!r}."
        )
    return field, name


def _convert(model: type[Model], key: str, field: Any, name: str, raw: str) -> Any:
    if name == "isnull":
        if raw.lower() not in {"true", "false", "1", "0"}:
            raise ResyncError(f"{key}: expected true or false, not {raw!r}.")
        return raw.lower() in {"true", "1"}
    if name in TEXT_LOOKUPS:
        return raw
    target = field.target_field if field.is_relation and hasattr(field, "target_field") else field
    try:
        if name in LIST_LOOKUPS:
            values = [target.to_python(item) for item in raw.split(",")]
            if name == "range" and len(values) != 2:
                raise ValidationError("a range takes two values: LOW,HIGH")
        else:
            values = [target.to_python(raw)]
    except (ValidationError, ValueError, TypeError) as exc:
        message = "; ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
        raise ResyncError(f"{model._meta.label}: {key}={raw!r} is not valid: {message}") from None
    if isinstance(target, IntegerField):
        _check_range(model, key, raw, target, values)
    return values if name in LIST_LOOKUPS else values[0]


def _check_range(
    model: type[Model], key: str, raw: str, field: IntegerField[Any, Any], values: list[Any]
) -> None:
    """Refuse integers the column cannot hold (drivers raise on them, or Django matches none)."""
    ops = connections[router.db_for_write(model)].ops
    kind = field.get_internal_type()
    try:
        low, high = ops.integer_field_range(kind)
    except KeyError:  # an integer field of a type of its own: the database decides
        return
    for value in values:
        if value is not None and not low <= value <= high:
            raise ResyncError(
                f"{model._meta.label}: {key}={raw!r} is out of range for {kind} "
                f"({low:,} to {high:,})."
            )


def _check_pattern(model: type[Model], option: str, key: str, name: str, raw: str) -> None:
    """Have the database compile a regular expression, against a constant rather than the rows.

    Databases compile a pattern when a row first reaches it: a bad one fails
    the job whenever that happens, or never if no row does. Comparing it with
    a constant makes the database compile it now, whatever the table holds.
    """
    using = router.db_for_write(model)
    probe = model._base_manager.using(using).annotate(
        _ormbridge_probe=Value("", output_field=TextField())
    )
    try:
        with transaction.atomic(using=using):  # a savepoint: a caller's transaction goes on
            probe.filter(**{f"_ormbridge_probe__{name}": raw}).exists()
    except DatabaseError as exc:
        reason = _pattern_error(connections[using].vendor, raw, exc)
        if reason is None:
            raise ResyncError(
                f"{model._meta.label}: the database refused {option} {key}={raw!r}: "
                f"{_first_line(exc)}"
            ) from None
        raise ResyncError(
            f"{model._meta.label}: {option} {key}={raw!r} is not a valid regular expression "
            f"for {connections[using].display_name}: {reason}."
        ) from None


def _pattern_error(vendor: str, raw: str, exc: DatabaseError) -> str | None:
    """Why the database refused pattern ``raw``, or None if the error is about something else."""
    if vendor == "sqlite":  # Django's REGEXP function on SQLite is Python's re
        try:
            re.compile(raw)
        except re.error as error:
            return str(error)
        return None
    return _first_line(exc) if isinstance(exc, DataError) else None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextmanager
def _refused(model: type[Model]) -> Iterator[None]:
    """A query of the selection that the database or its driver refuses is a ``ResyncError``."""
    using = router.db_for_write(model)
    try:
        with transaction.atomic(using=using):  # a savepoint: a caller's transaction goes on
            yield
    except (DatabaseError, OverflowError) as exc:
        raise ResyncError(
            f"{model._meta.label}: counting the selected rows failed: {_first_line(exc)}"
        ) from None


def count(selection: Selection) -> dict[str, int]:
    """Rows per model label that a resync of ``selection`` would touch.

    Raises:
        ResyncError: the database (or its driver) refused a lookup's value.
    """
    totals = {}
    for model in selection.models:
        with _refused(model):
            totals[model._meta.label_lower] = selection.queryset(model).count()
    return totals


def start(
    selection: Selection,
    *,
    mode: str = "replay",
    chunk_size: int = DEFAULT_CHUNK,
    sync: bool = False,
    force: bool = False,
) -> ResyncJob:
    """Record a new job for ``selection`` (run it with :func:`run`).

    Raises:
        ResyncError: a bad mode or chunk size, or a running job already covers
            one of the models (unless ``force``).
    """
    from ormbridge.models import ResyncJob

    if mode not in ResyncJob.Mode.values:
        raise ResyncError(f"mode must be replay or invalidate, not {mode!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ResyncError(f"the chunk size must be a whole number >= 1, not {chunk_size!r}.")
    labels = [m._meta.label_lower for m in selection.models]
    jobs = ResyncJob.objects.using(ResyncJob.database())
    if not force:
        for job in jobs.filter(state=ResyncJob.State.RUNNING):
            shared = sorted(set(job.labels) & set(labels))
            if shared:
                raise ResyncError(
                    f"resync job {job.pk} is running on {', '.join(shared)} (started "
                    f"{job.started_at:%Y-%m-%d %H:%M:%S}); wait for it, continue it with "
                    f"--resume {job.pk}, or pass --force."
                )
    totals = count(selection)
    return jobs.create(
        labels=labels,
        filters=[list(pair) for pair in selection.filters],
        excludes=[list(pair) for pair in selection.excludes],
        mode=mode,
        chunk_size=chunk_size,
        sync=sync,
        rows_total=sum(totals.values()),
        started_at=timezone.now(),
    )


def get_job(job_id: int) -> ResyncJob:
    """The job to resume. Raises ``ResyncError`` if it does not exist or is done."""
    from ormbridge.models import ResyncJob

    job = ResyncJob.objects.using(ResyncJob.database()).filter(pk=job_id).first()
    if job is None:
        raise ResyncError(f"there is no resync job {job_id}.")
    if job.state == ResyncJob.State.DONE:
        raise ResyncError(f"resync job {job_id} is already done.")
    return job


def resume(job_id: int) -> bool:
    """Continue job ``job_id`` (the admin's retry, on a worker); returns whether it ran.

    A job that finished, or was deleted, while its task waited in the queue (the
    admin's retry clicked twice, the workers delivering its last chunk meanwhile)
    is nothing to do: said in one line, not raised.
    """
    from ormbridge.models import ResyncJob

    job = ResyncJob.objects.using(ResyncJob.database()).filter(pk=job_id).first()
    if job is None:
        logger.warning("ormbridge: there is no resync job %s; nothing to resume.", job_id)
        return False
    if job.state == ResyncJob.State.DONE:
        logger.info("ormbridge: resync job %s is already done; nothing to resume.", job_id)
        return False
    run(job)
    return True


def selection_of(job: ResyncJob) -> Selection:
    return Selection(
        models=tuple(registry.get_model(label) for label in job.labels),
        filters=tuple(tuple(pair) for pair in job.filters),
        excludes=tuple(tuple(pair) for pair in job.excludes),
    )


OnProgress = Callable[[int, int], None]
"""Told ``(rows done, rows in all)`` of a job, as read from its state (see :func:`progress`)."""


def run(job: ResyncJob, *, sync: bool | None = None, on_progress: OnProgress | None = None) -> None:
    """Plan the rest of ``job`` and deliver it (here if ``sync``, else on workers).

    Safe to call again on an interrupted job. ``on_progress`` is told the
    job's progress after each chunk delivered (sync) or handed out (async).
    """
    from ormbridge.models import ChangeBatch, ResyncJob

    job_db = ResyncJob.database()
    sync = job.sync if sync is None else sync
    if job.state != ResyncJob.State.RUNNING or job.sync != sync:
        job.state, job.sync, job.error = ResyncJob.State.RUNNING, sync, ""
        job.save(using=job_db, update_fields=["state", "sync", "error"])
    owner = sync_delivery.new_owner()
    for using in log_databases():
        undone = _chunks(job, using).exclude(state=ChangeBatch.State.DONE)
        if sync:
            for batch_id in undone.order_by("id").values_list("id", flat=True):
                _deliver_here(using, batch_id, owner)
                _tell(on_progress, job)
        else:
            undone.filter(state=ChangeBatch.State.FAILED).update(
                state=ChangeBatch.State.PENDING, attempts=0
            )
    selection = selection_of(job)
    action = "update" if job.mode == ResyncJob.Mode.REPLAY else "invalidate"
    for model in selection.models:
        label = model._meta.label_lower
        using = log_database(model)
        state = _caught_up(job, model, using)
        pk_field = model._meta.pk
        last = None if state["last_pk"] is None else pk_field.to_python(state["last_pk"])
        queryset = selection.queryset(model).order_by("pk")
        while not state["planned"]:
            # The chunk and the progress commit together when the model's log is in the
            # job's database; otherwise the chunk commits first (see _caught_up).
            with transaction.atomic(using=job_db):
                with transaction.atomic(using=using):
                    page = queryset if last is None else queryset.filter(pk__gt=last)
                    pks = list(page.values_list("pk", flat=True)[: job.chunk_size])
                    # A chunk is one change-log row, or several when it holds more pks
                    # than a relay holds at once (RELAY_MAX_PKS): each is delivered whole.
                    batches = [
                        ChangeBatch.objects.using(using).create(
                            model=label,
                            action=action,
                            pks=pks[piece],
                            rows=len(pks[piece]),
                            replay=job.mode == ResyncJob.Mode.REPLAY,
                            job_id=job.pk,
                            # A sync job's chunk is its own: no relay takes it meanwhile.
                            state=ChangeBatch.State.CLAIMED if sync else ChangeBatch.State.PENDING,
                            claimed_by=owner if sync else "",
                            lease_until=_lease() if sync else None,
                        )
                        for piece in (pieces(len(pks)) if pks else [])
                    ]
                    if pks:
                        last = pks[-1]
                    if batches and not sync:
                        capture.notify(using)
                state = {"last_pk": last, "planned": len(pks) < job.chunk_size}
                job.progress[label] = state
                job.rows_planned += len(pks)
                job.save(using=job_db, update_fields=["progress", "rows_planned"])
            if batches:
                for batch in batches if sync else []:
                    _deliver_here(using, batch.pk, owner)
                _tell(on_progress, job)
    job.planned = True
    job.save(using=job_db, update_fields=["planned"])
    ResyncJob.finish_if_complete(job.pk)


def _chunks(job: ResyncJob, using: str) -> QuerySet[Any]:
    """The job's chunks in the change log of ``using``."""
    from ormbridge.models import ChangeBatch

    return ChangeBatch.objects.using(using).filter(job_id=job.pk)


def _caught_up(job: ResyncJob, model: type[Model], using: str) -> dict[str, Any]:
    """The job's progress on ``model``, caught up with the newest chunk written for it.

    When the model's change log is in another database than the job, a chunk commits
    before the progress that names it: a job stopped between the two has one chunk
    more than its progress says. Its last pk is then where planning goes on (the
    newest chunk is the furthest: chunks are planned in pk order), and the progress
    is saved at once, so that a second stop cannot lose it.
    """
    label = model._meta.label_lower
    state: dict[str, Any] = job.progress.get(label, {"last_pk": None, "planned": False})
    newest = _chunks(job, using).filter(model=label).order_by("-id").values_list("pks").first()
    if newest is None or not newest[0]:
        return state
    pks = newest[0]
    to_python = model._meta.pk.to_python
    if state["last_pk"] is not None and to_python(state["last_pk"]) == to_python(pks[-1]):
        return state
    from ormbridge.models import ResyncJob

    state = {"last_pk": pks[-1], "planned": len(pks) < job.chunk_size}
    job.progress[label] = state
    job.rows_planned += len(pks)
    job.save(using=ResyncJob.database(), update_fields=["progress", "rows_planned"])
    return state


def _lease() -> Any:
    return timezone.now() + timedelta(seconds=float(settings.RELAY_LEASE))


def _deliver_here(using: str, batch_id: int, owner: str) -> None:
    """Deliver one chunk of the log of ``using`` in this process, holding its lease
    (renewed) meanwhile.

    A chunk another process holds under a lease still running (a relay
    delivering it, a command still at work) is left to that process: this waits
    until it is done, or until its lease runs out and the chunk can be taken.
    """
    from ormbridge.models import ChangeBatch

    chunk = ChangeBatch.objects.using(using).filter(id=batch_id)
    while True:
        now = timezone.now()
        free = Q(state__in=[ChangeBatch.State.PENDING, ChangeBatch.State.FAILED]) | Q(
            Q(claimed_by=owner) | Q(lease_until__lt=now), state=ChangeBatch.State.CLAIMED
        )
        taken = chunk.filter(free).update(
            state=ChangeBatch.State.CLAIMED, claimed_by=owner, claimed_at=now, lease_until=_lease()
        )
        if taken:
            result = sync_delivery.deliver_held([batch_id], using, owner)
            if result.failed:
                error = chunk.values_list("last_error", flat=True).first()
                raise ResyncError(f"chunk {batch_id} could not be delivered: {error}")
            if result.batches:
                return
            # its lease was taken over meanwhile (this process paused past it)
        if chunk.values_list("state", flat=True).first() in (None, ChangeBatch.State.DONE):
            return
        time.sleep(float(settings.RELAY_POLL))


def rows_done(job: ResyncJob) -> int:
    """Rows of the job's delivered chunks, whichever run or relay delivered them, in the
    change logs of every database."""
    from ormbridge.models import ChangeBatch

    return sum(
        _chunks(job, using).filter(state=ChangeBatch.State.DONE).aggregate(rows=Sum("rows"))["rows"]
        or 0
        for using in log_databases()
    )


def progress(job: ResyncJob) -> tuple[int, int]:
    """``(rows done, rows in all)`` of ``job``, from its state: the same for every run.

    In all: the rows counted at the start, or the rows planned if more were
    (rows added since), so the rows done never exceed it.
    """
    return rows_done(job), max(job.rows_total, job.rows_planned)


def interrupt(job: ResyncJob, reason: str) -> None:
    from ormbridge.models import ResyncJob

    ResyncJob.objects.using(ResyncJob.database()).filter(
        pk=job.pk, state=ResyncJob.State.RUNNING
    ).update(state=ResyncJob.State.INTERRUPTED, error=reason)


def refresh(job: ResyncJob) -> None:
    """Read ``job`` again from its database (not from a replica the router reads from)."""
    from ormbridge.models import ResyncJob

    job.refresh_from_db(using=ResyncJob.database())


def wait(job: ResyncJob, *, poll: float = 0.5, on_progress: OnProgress | None = None) -> None:
    """Follow an async job until its workers finished it, telling ``on_progress`` each poll."""
    from ormbridge.models import ResyncJob

    while True:
        refresh(job)
        _tell(on_progress, job)
        if job.state == ResyncJob.State.DONE or ResyncJob.finish_if_complete(job.pk):
            _tell(on_progress, job)
            return
        time.sleep(poll)


def _tell(on_progress: OnProgress | None, job: ResyncJob) -> None:
    if on_progress is not None:
        on_progress(*progress(job))


def _model(label: str) -> type[Model]:
    try:
        return registry.get_model(label)
    except LookupError as exc:
        raise ResyncError(str(exc)) from None


def _split(text: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ResyncError(f"{option} takes FIELD__LOOKUP=VALUE, not {text!r}.")
    return key.strip(), value
