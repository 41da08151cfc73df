from django.apps import AppConfig


class EarlyConfig(AppConfig):
    name = "tests.schemaapp.early"
    label = "early"
    default_auto_field = "django.db.models.AutoField"
