"""Read-only admin lists of the change log and resync jobs, with a "retry" action."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from ormbridge import outbox, resync, tasks
from ormbridge.models import ChangeBatch, ResyncJob


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_retry_permission(self, request: HttpRequest) -> bool:
        meta = self.model._meta
        return request.user.has_perm(f"{meta.app_label}.change_{meta.model_name}")


@admin.register(ChangeBatch)
class ChangeBatchAdmin(ReadOnlyAdmin):
    list_display = ("id", "model", "action", "rows", "state", "attempts", "created_at",
                    "finished_at", "last_error")  # fmt: skip
    list_filter = ("state", "action", "model")
    search_fields = ("model", "last_error")
    actions = ["retry"]

    @admin.action(description="Retry the selected change batches", permissions=["retry"])
    def retry(self, request: HttpRequest, queryset: QuerySet[ChangeBatch]) -> None:
        ids = list(queryset.exclude(state=ChangeBatch.State.DONE).values_list("id", flat=True))
        ChangeBatch.objects.filter(id__in=ids).update(
            state=ChangeBatch.State.ENQUEUED, enqueued_at=timezone.now(), attempts=1
        )
        outbox.dispatch(ids, "default")
        self.message_user(request, f"{len(ids)} change batches handed to the workers.")


@admin.register(ResyncJob)
class ResyncJobAdmin(ReadOnlyAdmin):
    list_display = ("id", "labels", "mode", "state", "rows_total", "rows_done", "started_at",
                    "finished_at", "error")  # fmt: skip
    list_filter = ("state", "mode")
    actions = ["retry"]

    @admin.display(description="rows done")
    def rows_done(self, job: ResyncJob) -> int:
        return resync.rows_done(job)

    @admin.action(description="Resume the selected jobs on the workers", permissions=["retry"])
    def retry(self, request: HttpRequest, queryset: QuerySet[ResyncJob]) -> None:
        jobs = list(queryset.exclude(state=ResyncJob.State.DONE))
        for job in jobs:
            tasks.enqueue(tasks.resume_resync, job.pk)
        level = messages.SUCCESS if jobs else messages.WARNING
        self.message_user(request, f"{len(jobs)} resync jobs handed to the workers.", level)
