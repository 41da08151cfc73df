from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections, models

from ormbridge import capture, registry


class Command(BaseCommand):
    help = (
        "Install, remove or show ormbridge's capture triggers (migrate installs them too). "
        "Idempotent. Examples: manage.py ormbridge_triggers status; "
        "manage.py ormbridge_triggers install shop.Product; "
        "manage.py ormbridge_triggers uninstall --database default"
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "action",
            choices=["install", "uninstall", "status"],
            help="install: create missing or outdated triggers; uninstall: drop them "
            "(all of ormbridge's, without models); status: one line per captured table.",
        )
        parser.add_argument(
            "models",
            nargs="*",
            metavar="app_label.Model",
            help="Limit to these registered models (default: every one).",
        )
        parser.add_argument(
            "--database",
            default=DEFAULT_DB_ALIAS,
            help="Database alias to work on (default: %(default)s).",
        )

    def handle(
        self, *args: Any, action: str, models: list[str], database: str, **options: Any
    ) -> None:
        if database not in connections:
            raise CommandError(f"unknown database {database!r}; known: {', '.join(connections)}.")
        if not capture.supports(connections[database]):
            raise CommandError(
                f"database {database!r} is {connections[database].vendor}: ormbridge has "
                "capture triggers for PostgreSQL and SQLite only."
            )
        labels = [self._label(text) for text in models] or None
        if action == "install":
            tables = capture.install(database, labels)
            self.stdout.write(
                self.style.SUCCESS(f"installed triggers on {len(tables)} tables")
                + (f": {', '.join(tables)}" if tables else " (all up to date)")
            )
        elif action == "uninstall":
            names = capture.uninstall(database, labels)
            self.stdout.write(self.style.SUCCESS(f"dropped {len(names)} triggers"))
        else:
            states = capture.status(database, labels)
            for state in states:
                style = self.style.SUCCESS if state.state == "installed" else self.style.ERROR
                self.stdout.write(
                    f"{state.table:<40} {style(f'{state.state:<10}')} {', '.join(state.models)}"
                )
            if any(state.state != "installed" for state in states):
                raise CommandError(
                    "some captured tables lack their triggers; run: "
                    f"manage.py ormbridge_triggers install --database {database}"
                )

    def _label(self, text: str) -> str:
        try:
            model: type[models.Model] = apps.get_model(text)
        except (LookupError, ValueError):
            raise CommandError(f"unknown model {text!r}; use app_label.ModelName.") from None
        if not registry.is_registered(model):
            raise CommandError(f"{model._meta.label} is not registered with ormbridge.")
        return model._meta.label_lower
