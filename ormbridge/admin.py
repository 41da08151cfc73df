"""Read-only admin lists of the change log and resync jobs, with a "retry" action.

The admin never shows a row's values: deleted rows' snapshots are neither shown nor
searchable or filterable, to superusers and view-only staff alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.db.models.constants import LOOKUP_SEP
from django.http import HttpRequest

from ormbridge import resync, tasks
from ormbridge.models import ChangeBatch, ResyncJob

if TYPE_CHECKING:
    # ModelAdmin is generic in django-stubs only; subscripting it at run time fails.
    _ModelAdmin = admin.ModelAdmin[Any]
else:
    _ModelAdmin = admin.ModelAdmin

__all__ = [
    "ROW_VALUES",
    "ChangeBatchAdmin",
    "ReadOnlyAdmin",
    "ResyncJobAdmin",
]


class ReadOnlyAdmin(_ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_retry_permission(self, request: HttpRequest) -> bool:
        meta = self.model._meta
        return request.user.has_perm(f"{meta.app_label}.change_{meta.model_name}")


# ChangeBatch fields holding rows' values (deleted rows' snapshots, for the replay).
ROW_VALUES = ("snapshot",)


@admin.register(ChangeBatch)
class ChangeBatchAdmin(ReadOnlyAdmin):
    list_display = ("id", "model", "action", "rows", "state", "attempts", "created_at",
                    "finished_at", "last_error", "receiver_errors")  # fmt: skip
    list_filter = ("state", "action", "model")
    search_fields = ("model", "last_error")
    actions = ["retry"]
    exclude = (*ROW_VALUES, "errors")  # no deleted rows' values; errors as receiver_errors
    readonly_fields = ("snapshot_kept", "receiver_errors")

    @admin.display(description="receiver errors")
    def receiver_errors(self, batch: ChangeBatch) -> str:
        """Each row a receiver raised for in the last attempt: pk, receiver, exception."""
        errors = batch.errors if isinstance(batch.errors, list) else []
        return "\n".join(f"pk {e['pk']}: {e['receiver']}: {e['error']}" for e in errors) or "-"

    @admin.display(description="snapshot")
    def snapshot_kept(self, batch: ChangeBatch) -> str:
        """That deleted rows' values are kept for the replay, never what they are."""
        snapshot = batch.snapshot
        if not isinstance(snapshot, dict) or not snapshot.get("rows"):
            return "none"
        return f"{len(snapshot['rows'])} deleted row(s)' values, kept until delivered (not shown)"

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest) -> bool:
        """No filtering on snapshots from the URL: each guess would tell a value."""
        if lookup.split(LOOKUP_SEP, 1)[0] in ROW_VALUES:
            return False
        return super().lookup_allowed(lookup, value, request)

    @admin.action(description="Retry the selected change batches", permissions=["retry"])
    def retry(self, request: HttpRequest, queryset: QuerySet[ChangeBatch]) -> None:
        retried = queryset.filter(state=ChangeBatch.State.FAILED).update(
            state=ChangeBatch.State.PENDING, attempts=0, lease_until=None, retry_at=None
        )
        self.message_user(request, f"{retried} failed change batches handed back to the relays.")


@admin.register(ResyncJob)
class ResyncJobAdmin(ReadOnlyAdmin):
    list_display = ("id", "labels", "mode", "state", "progress", "started_at", "finished_at",
                    "error")  # fmt: skip
    list_filter = ("state", "mode")
    actions = ["retry"]

    @admin.display(description="rows done")
    def progress(self, job: ResyncJob) -> str:
        done, total = resync.progress(job)
        return f"{done:,} / {total:,}"

    @admin.action(description="Resume the selected jobs on the workers", permissions=["retry"])
    def retry(self, request: HttpRequest, queryset: QuerySet[ResyncJob]) -> None:
        jobs = list(queryset.exclude(state=ResyncJob.State.DONE))
        for job in jobs:
            tasks.enqueue(tasks.resume_resync, job.pk)
        level = messages.SUCCESS if jobs else messages.WARNING
        self.message_user(request, f"{len(jobs)} resync jobs handed to the workers.", level)
