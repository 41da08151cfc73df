from __future__ import annotations

from django.apps import AppConfig


class OrmbridgeConfig(AppConfig):
    name = "ormbridge"
    verbose_name = "ormbridge"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from ormbridge import checks, registry

        checks.register_checks()
        registry.register_from_settings()
        registry.connect_related()
