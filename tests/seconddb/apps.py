"""The app of the tests' second database (tests/routers.py): one registered model, whose
replayed signals are recorded like the shop's (tests/testapp/apps.py)."""

from django.apps import AppConfig
from django.db.models.signals import post_save


class SecondDbConfig(AppConfig):
    name = "tests.seconddb"
    label = "seconddb"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from tests.seconddb.models import Item
        from tests.testapp.apps import record_save

        post_save.connect(record_save, sender=Item, dispatch_uid="test-save-seconddb-item")
