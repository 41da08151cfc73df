"""The change log: durable records of changes still to be delivered."""

from __future__ import annotations

import base64

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models


class SnapshotEncoder(DjangoJSONEncoder):
    """JSON for row snapshots: Django's types, and bytes as base64 (as BinaryField reads them)."""

    def default(self, o: object) -> object:
        if isinstance(o, bytes | memoryview):
            return base64.b64encode(bytes(o)).decode("ascii")
        return super().default(o)


class ChangeBatch(models.Model):
    """Changes to rows of one model, kept in the database until they are delivered.

    Written when Redis or the broker could not take a change at commit time,
    and (by the bulk helpers) in the same transaction as a bulk write.
    ``sweep_outbox`` hands out rows that are pending, or that were handed out
    more than ``REDELIVER_AFTER`` seconds ago and never finished.
    """

    class State(models.TextChoices):
        PENDING = "pending"
        ENQUEUED = "enqueued"
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
    enqueued_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    rows = models.PositiveIntegerField(default=0, help_text="Number of pks (0: every row).")
    job = models.ForeignKey(
        "ResyncJob",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="batches",
        help_text="The resync job this batch is a chunk of.",
    )

    class Meta:
        verbose_name = "change batch"
        verbose_name_plural = "change batches"
        indexes = [models.Index(fields=["state", "enqueued_at"], name="ormbridge_state_idx")]

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
