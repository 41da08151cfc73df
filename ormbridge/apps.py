from __future__ import annotations

from django.apps import AppConfig


class OrmbridgeConfig(AppConfig):
    name = "ormbridge"
    verbose_name = "ormbridge"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core.signals import setting_changed

        from ormbridge import broadcast, checks, registry

        setting_changed.connect(broadcast.settings_changed, dispatch_uid="ormbridge-settings")
        checks.register_checks()
        registry.register_from_settings()
        registry.connect_related()
