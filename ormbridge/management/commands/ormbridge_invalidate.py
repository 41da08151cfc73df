from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import models

from ormbridge import commit, redis_store, registry

__all__ = [
    "Command",
]


class Command(BaseCommand):
    help = (
        "Invalidate every cached instance and queryset of registered models, at once; the "
        "change log carries the invalidation to the relays (events). Examples: "
        "manage.py ormbridge_invalidate shop.Product shop.Tag; manage.py ormbridge_invalidate --all"
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "models", nargs="*", metavar="app_label.Model", help="Registered models to invalidate."
        )
        parser.add_argument(
            "--all", action="store_true", dest="all_models", help="Every registered model."
        )

    def handle(self, *args: Any, models: list[str], all_models: bool, **options: Any) -> None:
        if all_models == bool(models):
            raise CommandError("name models as app_label.Model, or pass --all (not both).")
        chosen = registry.registered_models() if all_models else [self._model(m) for m in models]
        redis_store.breaker.reset()
        for model in chosen:
            commit.invalidate(model)  # autocommit: its tokens are deleted right away
        if redis_store.breaker.open:
            raise CommandError(
                "Redis did not answer; the invalidation is in the change log and the relays "
                "apply it when Redis is back."
            )
        labels = ", ".join(model._meta.label for model in chosen)
        self.stdout.write(self.style.SUCCESS(f"invalidated {labels}"))

    def _model(self, text: str) -> type[models.Model]:
        try:
            return registry.get_model(text)
        except LookupError as exc:
            raise CommandError(str(exc)) from None
