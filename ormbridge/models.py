"""The change log: durable records of changes still to be delivered."""

from __future__ import annotations

import base64
from typing import Any

from django.conf import settings as django_settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models, router
from django.utils import timezone

from ormbridge.conf import settings

__all__ = [
    "CHANNEL",
    "CapturePause",
    "ChangeBatch",
    "ResyncJob",
    "SnapshotEncoder",
    "log_databases",
    "pieces",
    "snapshot",
]

CHANNEL = "ormbridge"
"""The PostgreSQL ``NOTIFY`` channel on which a new change-log row wakes the relays."""


def pieces(count: int) -> list[slice]:
    """Slices cutting a list of ``count`` pks into change-log rows of at most ``RELAY_MAX_PKS``.

    For the writers whose rows are delivered whole (replays, deleted rows' values):
    each row then fits what a relay holds at once. One empty slice when ``count`` is 0.
    """
    size = max(1, int(settings.RELAY_MAX_PKS))
    return [slice(start, start + size) for start in range(0, count, size)] or [slice(0, 0)]


def snapshot(model: type[models.Model], instances: list[models.Model]) -> dict[str, Any]:
    """The concrete field values of ``instances``, in a form the change log can store
    (a deleted row's values, which its replay rebuilds the instance from)."""
    fields = model._meta.concrete_fields
    return {
        "fields": [field.attname for field in fields],
        "rows": [[getattr(obj, field.attname) for field in fields] for obj in instances],
    }


class SnapshotEncoder(DjangoJSONEncoder):
    """JSON for row snapshots: Django's types, and bytes as base64 (as BinaryField reads them)."""

    def default(self, o: object) -> object:
        if isinstance(o, bytes | memoryview):
            return base64.b64encode(bytes(o)).decode("ascii")
        return super().default(o)


class ChangeBatch(models.Model):
    """Changes to rows of one model: the change log, and the truth ormbridge delivers from.

    Written in the same transaction as the change it records: by the capture
    triggers (one row per statement on PostgreSQL, one per row on SQLite), by
    the bulk helpers (one row per chunk) and by resync jobs. The relay claims
    pending rows, and rows whose claim's lease ran out, delivers them and
    marks them done; done rows are deleted after ``LOG_RETENTION``.
    """

    class State(models.TextChoices):
        PENDING = "pending"
        CLAIMED = "claimed"
        DONE = "done"
        FAILED = "failed"

    class Action(models.TextChoices):
        CREATE = "create"
        UPDATE = "update"
        DELETE = "delete"
        INVALIDATE = "invalidate"

    model = models.CharField(max_length=255, help_text="app_label.modelname")
    action = models.CharField(max_length=10, choices=Action.choices)
    pks = models.JSONField(
        null=True, encoder=DjangoJSONEncoder, help_text="Primary keys; null means every row."
    )
    fields = models.JSONField(
        null=True, blank=True, help_text="Changed field names of an update; null means all."
    )
    replay = models.BooleanField(
        default=False, help_text="Send post_save/post_delete for each row when delivered."
    )
    snapshot = models.JSONField(
        null=True,
        blank=True,
        encoder=SnapshotEncoder,
        help_text='Deleted rows\' values: {"fields": [attname, ...], "rows": [[value, ...], ...]}.',
    )
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    lease_until = models.DateTimeField(
        null=True, blank=True, help_text="A claim not renewed by then is taken over."
    )
    claimed_by = models.CharField(max_length=100, blank=True, help_text="The relay holding it.")
    finished_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    rows = models.PositiveIntegerField(default=0, help_text="Number of pks (0: every row).")
    # Nullable: the capture triggers insert rows without these columns.
    delivered_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When its rows were invalidated and their events emitted; a retry only replays.",
    )
    pks_delivered = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        help_text="How many of pks, from the first, a merged delivery in slices has "
        "invalidated and emitted: a relay taking the row over goes on from there.",
    )
    retry_pks = models.JSONField(
        null=True,
        blank=True,
        encoder=DjangoJSONEncoder,
        help_text="Primary keys whose replay failed, replayed again on the next attempt; "
        "null means every row of pks.",
    )
    errors = models.JSONField(
        null=True,
        blank=True,
        encoder=DjangoJSONEncoder,
        help_text='Receiver errors of the last attempt: [{"pk": …, "receiver": "dotted.name", '
        '"error": "Type: message"}, …] (at most 100).',
    )
    retry_at = models.DateTimeField(
        null=True, blank=True, help_text="Not claimed again before then (backoff after a failure)."
    )
    job = models.ForeignKey(
        "ResyncJob",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="batches",
        db_index=False,  # indexed below for job rows only: captured rows have no job
        # A job over models of several databases has chunks in each one's log, and the
        # job itself in one of them (ResyncJob.database()): no constraint can span them.
        db_constraint=False,
        help_text="The resync job this batch is a chunk of.",
    )

    class Meta:
        verbose_name = "change batch"
        verbose_name_plural = "change batches"
        indexes = [
            # The relay's claim and the status query read only undelivered rows:
            # with the state first, both stay index range scans however many
            # done rows wait for pruning. (Not a partial index: SQLite uses one
            # only for a query repeating its condition with literal values.)
            models.Index(fields=["state", "id"], name="ormbridge_state_id_idx"),
            models.Index(
                fields=["finished_at"],
                name="ormbridge_done_idx",
                condition=models.Q(state="done"),
            ),
            models.Index(
                fields=["job"], name="ormbridge_job_idx", condition=models.Q(job__isnull=False)
            ),
        ]

    def __str__(self) -> str:
        count = "all" if self.pks is None else len(self.pks)
        return f"{self.action} {self.model} ({count} rows, {self.state})"


class ResyncJob(models.Model):
    """A run of ``manage.py ormbridge_resync``: which rows, how far it got, how it ended.

    Its chunks are :class:`ChangeBatch` rows (``job`` points here), written
    together with ``last_pks``, so a resumed job plans no chunk twice and
    redoes only chunks that never finished.
    """

    class State(models.TextChoices):
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"
        INTERRUPTED = "interrupted"

    class Mode(models.TextChoices):
        REPLAY = "replay"
        INVALIDATE = "invalidate"

    labels = models.JSONField(help_text='Model labels, e.g. ["shop.product"].')
    filters = models.JSONField(default=list, help_text='[["field__lookup", "value"], ...]')
    excludes = models.JSONField(default=list, help_text='[["field__lookup", "value"], ...]')
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.REPLAY)
    chunk_size = models.PositiveIntegerField()
    sync = models.BooleanField(default=False, help_text="Worked in the command's own process.")
    state = models.CharField(max_length=12, choices=State.choices, default=State.RUNNING)
    rows_total = models.PositiveBigIntegerField(default=0)
    rows_planned = models.PositiveBigIntegerField(default=0)
    progress = models.JSONField(
        default=dict,
        encoder=DjangoJSONEncoder,
        help_text='Per model label: {"last_pk": pk put in the last chunk, "planned": bool}.',
    )
    planned = models.BooleanField(default=False, help_text="Every chunk has been written.")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        verbose_name = "resync job"

    def __str__(self) -> str:
        return f"resync job {self.pk} ({', '.join(self.labels)}, {self.state})"

    @classmethod
    def database(cls) -> str:
        """The database jobs are written to, and read from: never a replica the router
        sends reads to, whose answer may lag (a job done twice, or not found)."""
        return router.db_for_write(cls)

    @classmethod
    def finish_if_complete(cls, job_id: int) -> bool:
        """Mark the job done if it is fully planned and every chunk delivered.

        A job's chunks are in the change log of each of its models' databases: every
        one is asked, by name, so that no router sends the question to a replica.
        """
        for using in log_databases():
            chunks = ChangeBatch.objects.using(using).filter(job_id=job_id)
            if chunks.exclude(state=ChangeBatch.State.DONE).exists():
                return False
        return bool(
            cls.objects.using(cls.database())
            .filter(pk=job_id, planned=True, state=cls.State.RUNNING)
            .update(state=cls.State.DONE, finished_at=timezone.now())
        )


def log_databases() -> list[str]:
    """Aliases of the databases holding a change log: those the router lets ormbridge's
    tables into (the capture triggers of a database write to its own log)."""
    return [
        using
        for using in django_settings.DATABASES
        if router.allow_migrate_model(using, ChangeBatch)
    ]


class CapturePause(models.Model):
    """Models whose capture triggers skip the statements of the current transaction (SQLite).

    ormbridge's own bulk helpers log their chunks themselves. On SQLite, which
    has no session variables, they insert a row here before their write and
    delete it right after, inside the same transaction: a writer holds the
    database's write lock for that time, so no other transaction sees it.
    PostgreSQL uses a transaction-local setting instead.
    """

    label = models.CharField(max_length=255)

    class Meta:
        verbose_name = "capture pause"

    def __str__(self) -> str:
        return self.label
