from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from ormbridge import capture, registry, relay

__all__ = [
    "Command",
]


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
            choices=["install", "uninstall", "status", "prune"],
            help="install: create missing or outdated triggers, drop stale ones; uninstall: "
            "drop them (all of ormbridge's, without models or --table); status: one line per "
            "captured table, partition and table with orphaned triggers; prune: drop the "
            "triggers on tables of no registered model.",
        )
        parser.add_argument(
            "models",
            nargs="*",
            metavar="app_label.Model",
            help="Limit to these models (default: every one): registered ones, except for "
            "uninstall, which takes any model.",
        )
        parser.add_argument(
            "--table",
            action="append",
            default=[],
            dest="tables",
            metavar="TABLE",
            help="uninstall only: drop the triggers on this table (as status names it); "
            "may be repeated.",
        )
        parser.add_argument(
            "--database",
            default=None,
            help="Database alias to work on (default: every database holding ormbridge's "
            "change log, whose triggers write to it).",
        )

    def handle(
        self,
        *args: Any,
        action: str,
        models: list[str],
        database: str | None,
        tables: list[str],
        **options: Any,
    ) -> None:
        if tables and action != "uninstall":
            raise CommandError("--table goes with uninstall only.")
        if tables and models:
            raise CommandError("give models or --table, not both.")
        aliases = self._databases(database)
        labels = [self._label(text, registered=action != "uninstall") for text in models] or None
        several = len(aliases) > 1
        problems: list[str] = []
        for alias in aliases:
            if action == "install":
                done = capture.install(alias, labels)
                line = self.style.SUCCESS(f"installed triggers on {len(done)} tables") + (
                    f": {', '.join(done)}" if done else " (all up to date)"
                )
            elif action == "uninstall":
                try:
                    names = capture.uninstall(alias, labels, tables or None)
                except LookupError as exc:
                    raise CommandError(str(exc)) from None
                line = self.style.SUCCESS(f"dropped {len(names)} triggers")
            elif action == "prune":
                pruned = capture.prune(alias)
                where = sorted({trigger.table for trigger in pruned})
                line = self.style.SUCCESS(f"dropped {len(pruned)} triggers") + (
                    f" on {', '.join(where)}" if where else " (none left on unregistered tables)"
                )
            else:
                if several:
                    self.stdout.write(f"database {alias}:")
                problems += self._status(alias, labels)
                continue
            self.stdout.write(f"{alias}: {line}" if several else line)
        if problems:
            raise CommandError("; ".join(problems))

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

    def _status(self, alias: str, labels: list[str] | None) -> list[str]:
        """One line per captured table ``alias`` holds; what is wrong there, with the fix.

        A table the database does not hold (its model's rows are in another database)
        is not listed: it has nothing to capture there.
        """
        states = [state for state in capture.status(alias, labels) if state.exists]
        for state in states:
            style = self.style.SUCCESS if state.state == "installed" else self.style.ERROR
            if state.state == "orphaned":
                what = "(no registered model)"
            else:
                what = ", ".join(state.models)
                if state.partition_of:
                    what += f" (partition of {state.partition_of})"
            self.stdout.write(f"{state.table:<40} {style(f'{state.state:<10}')} {what}")
        where = f" --database {alias}"
        problems = []
        if any(state.state not in ("installed", "orphaned") for state in states):
            problems.append(
                "some captured tables lack their triggers or have stale ones; run: "
                f"manage.py ormbridge_triggers install{where}"
            )
        orphaned = [state.table for state in states if state.state == "orphaned"]
        if orphaned:
            problems.append(
                f"tables of no registered model have ormbridge triggers ({', '.join(orphaned)}); "
                f"run: manage.py ormbridge_triggers prune{where}"
            )
        return problems

    def _label(self, text: str, registered: bool = True) -> str:
        try:
            return registry.get_model(text, registered)._meta.label_lower
        except LookupError as exc:
            raise CommandError(str(exc)) from None
