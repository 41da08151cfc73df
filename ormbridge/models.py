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

    class Meta:
        verbose_name = "change batch"
        verbose_name_plural = "change batches"
        indexes = [models.Index(fields=["state", "enqueued_at"], name="ormbridge_state_idx")]

    def __str__(self) -> str:
        count = "all" if self.pks is None else len(self.pks)
        return f"{self.action} {self.model} ({count} rows, {self.state})"
