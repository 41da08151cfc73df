from django.apps import AppConfig


class PgAppConfig(AppConfig):
    name = "tests.pgapp"
    label = "pgapp"
