"""The tests' second database, "other" (tests/settings.py).

While :attr:`SecondDatabaseRouter.enabled`, "other" holds ormbridge's tables (a change
log of its own) and the rows of ``seconddb.Item``, which is read and written there. A
test asks for it with the ``second_database`` fixture and ``databases=["default",
"other"]`` on its ``django_db`` mark; every other test sees "default" alone, as before
(tests/conftest.py turns the router off for them), and so do the processes they start.
"""

from typing import Any

from django.db.models import Model

OTHER = "other"
ITEM = ("seconddb", "item")


class SecondDatabaseRouter:
    enabled = True
    """Off: "other" holds nothing and every model is in "default"."""

    def db_for_read(self, model: type[Model], **hints: Any) -> str | None:
        return OTHER if self.enabled and _is_item(model) else None

    def db_for_write(self, model: type[Model], **hints: Any) -> str | None:
        return OTHER if self.enabled and _is_item(model) else None

    def allow_migrate(
        self, db: str, app_label: str, model_name: str | None = None, **hints: Any
    ) -> bool | None:
        if db != OTHER:
            return None  # "default" holds every table, seconddb.Item's too
        return self.enabled and (app_label == "ormbridge" or (app_label, model_name) == ITEM)


def _is_item(model: type[Model]) -> bool:
    return (model._meta.app_label, model._meta.model_name) == ITEM


class LogOnDefaultRouter:
    """A misconfiguration: ``seconddb.Item``'s table and rows in "other", ormbridge's change
    log in "default" only, so writes to Item are never captured (``ormbridge.W006``)."""

    def db_for_read(self, model: type[Model], **hints: Any) -> str | None:
        return OTHER if _is_item(model) else None

    def db_for_write(self, model: type[Model], **hints: Any) -> str | None:
        return OTHER if _is_item(model) else None

    def allow_migrate(
        self, db: str, app_label: str, model_name: str | None = None, **hints: Any
    ) -> bool | None:
        return (app_label, model_name) == ITEM if db == OTHER else None
