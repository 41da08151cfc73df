from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from ormbridge import schedule
from ormbridge.conf import settings

__all__ = [
    "Command",
]


class Command(BaseCommand):
    help = (
        "Install or update ormbridge's periodic tasks (sweep) for "
        "django_celery_beat's DatabaseScheduler, every ORMBRIDGE['SWEEP_INTERVAL'] seconds. "
        "Safe to run again: rows are updated, never duplicated. "
        "Example: manage.py ormbridge_schedule"
    )

    def add_arguments(self, parser: CommandParser) -> None:
        pass

    def handle(self, *args: Any, **options: Any) -> None:
        for name, created in schedule.install():
            verb = "created" if created else "updated"
            self.stdout.write(
                f"{verb}: {name} every {settings.SWEEP_INTERVAL} s on queue {settings.QUEUE}"
            )
