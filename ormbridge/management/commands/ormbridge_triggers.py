from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections, models

from ormbridge import capture, registry, relay


class Command(BaseCommand):
    help = (
        "Install, remove or show ormbridge's capture triggers (migrate installs them too), in "
        "every database holding ormbridge's change log, or in --database. Idempotent. "
        "Examples: manage.py ormbridge_triggers status; "
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
            default=None,
            help="Database alias to work on (default: every database holding ormbridge's "
            "change log, whose triggers write to it).",
        )

    def handle(
        self, *args: Any, action: str, models: list[str], database: str | None, **options: Any
    ) -> None:
        aliases = self._databases(database)
        labels = [self._label(text) for text in models] or None
        lacking = []
        for alias in aliases:
            several = len(aliases) > 1
            if action == "install":
                tables = capture.install(alias, labels)
                done = self.style.SUCCESS(f"installed triggers on {len(tables)} tables") + (
                    f": {', '.join(tables)}" if tables else " (all up to date)"
                )
                self.stdout.write(f"{alias}: {done}" if several else done)
            elif action == "uninstall":
                names = capture.uninstall(alias, labels)
                done = self.style.SUCCESS(f"dropped {len(names)} triggers")
                self.stdout.write(f"{alias}: {done}" if several else done)
            else:
                if several:
                    self.stdout.write(f"database {alias}:")
                if not self._status(alias, labels):
                    lacking.append(alias)
        if lacking:
            where = f" --database {lacking[0]}" if len(lacking) == 1 else ""
            raise CommandError(
                f"some captured tables lack their triggers; run: manage.py ormbridge_triggers "
                f"install{where}"
            )

    def _databases(self, database: str | None) -> list[str]:
        """``--database``, or every database holding a change log that has triggers."""
        if database is not None:
            if database not in connections:
                raise CommandError(
                    f"unknown database {database!r}; known: {', '.join(connections)}."
                )
            if not capture.supports(connections[database]):
                raise CommandError(
                    f"database {database!r} is {connections[database].vendor}: ormbridge has "
                    "capture triggers for PostgreSQL and SQLite only."
                )
            return [database]
        aliases = [using for using in relay.log_databases() if capture.supports(connections[using])]
        if not aliases:
            raise CommandError(
                "no database holding ormbridge's change log is PostgreSQL or SQLite: there "
                "are no capture triggers to manage (writes are captured by signals)."
            )
        return aliases

    def _status(self, alias: str, labels: list[str] | None) -> bool:
        """One line per captured table that ``alias`` holds; whether all have their triggers.

        A table the database does not hold (its model's rows are in another database)
        is not listed: it has nothing to capture there.
        """
        held = set(connections[alias].introspection.table_names())
        states = [state for state in capture.status(alias, labels) if state.table in held]
        for state in states:
            style = self.style.SUCCESS if state.state == "installed" else self.style.ERROR
            self.stdout.write(
                f"{state.table:<40} {style(f'{state.state:<10}')} {', '.join(state.models)}"
            )
        return all(state.state == "installed" for state in states)

    def _label(self, text: str) -> str:
        try:
            model: type[models.Model] = apps.get_model(text)
        except (LookupError, ValueError):
            raise CommandError(f"unknown model {text!r}; use app_label.ModelName.") from None
        if not registry.is_registered(model):
            raise CommandError(f"{model._meta.label} is not registered with ormbridge.")
        return model._meta.label_lower
