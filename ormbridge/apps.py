from __future__ import annotations

from typing import Any

from django.apps import AppConfig

__all__ = [
    "OrmbridgeConfig",
    "guard_triggers",
    "install_triggers",
]


class OrmbridgeConfig(AppConfig):
    name = "ormbridge"
    verbose_name = "ormbridge"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from celery.signals import (
            worker_process_init,
            worker_process_shutdown,
            worker_ready,
            worker_shutdown,
        )
        from django.core.signals import setting_changed
        from django.db import connections
        from django.db.backends.signals import connection_created
        from django.db.models.signals import post_migrate, pre_migrate

        from ormbridge import broadcast, capture_signals, checks, commit, loads, registry, relay

        setting_changed.connect(broadcast.settings_changed, dispatch_uid="ormbridge-settings")
        checks.register_checks()
        registry.register_from_settings()
        registry.on_change(commit.tables_changed)
        registry.on_change(capture_signals.tables_changed)
        if any(capture_signals.needed(using) for using in _write_databases()):
            capture_signals.connect()
        connection_created.connect(commit.watch, dispatch_uid="ormbridge-watch")
        connection_created.connect(loads.watch, dispatch_uid="ormbridge-watch-loads")
        for connection in connections.all(initialized_only=True):
            commit.watch(connection)
            loads.watch(connection)
        pre_migrate.connect(guard_triggers, sender=self, dispatch_uid="ormbridge-guard")
        post_migrate.connect(install_triggers, sender=self, dispatch_uid="ormbridge-triggers")
        worker_process_init.connect(relay.start_in_process, dispatch_uid="ormbridge-relay-process")
        worker_ready.connect(relay.start_in_worker, dispatch_uid="ormbridge-relay-start")
        worker_process_shutdown.connect(relay.stop_in_worker, dispatch_uid="ormbridge-relay-end")
        worker_shutdown.connect(relay.stop_in_worker, dispatch_uid="ormbridge-relay-stop")


def _write_databases() -> set[str]:
    from django.db import router

    from ormbridge import registry

    return {router.db_for_write(model) for model in registry.registered_models()}


def _captures(using: str) -> bool:
    from django.db import router

    from ormbridge.conf import settings
    from ormbridge.models import ChangeBatch

    return settings.CAPTURE == "triggers" and router.allow_migrate_model(using, ChangeBatch)


def guard_triggers(using: str, **kwargs: Any) -> None:
    """``pre_migrate``: keep the triggers in line with each schema change of the run, so a
    data migration after a renamed pk column or table writes (and is captured)."""
    from ormbridge import capture

    if _captures(using):
        capture.guard_migration(using)


def install_triggers(using: str, verbosity: int = 1, stdout: Any = None, **kwargs: Any) -> None:
    """``post_migrate``: install (or bring up to date) the capture triggers of ``using``,
    and drop the ones left on tables of no registered model, saying so."""
    import sys

    from ormbridge import capture

    guard = capture.end_migration(using)
    if not _captures(using):
        return
    _, pruned = capture.sync(using)
    pruned = [*(guard.pruned if guard else []), *pruned]
    if pruned and verbosity >= 1:
        tables = sorted({trigger.table for trigger in pruned})
        (stdout or sys.stdout).write(
            f"ormbridge: dropped {len(pruned)} capture triggers left on tables of no "
            f"registered model ({', '.join(tables)}) in database {using!r}.\n"
        )
