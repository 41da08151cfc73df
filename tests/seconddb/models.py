"""A registered model whose rows the tests' second database, "other", holds while a test
asks for it (tests/routers.py); its table is in "default" too, unused there."""

from django.db import models

import ormbridge


@ormbridge.register
class Item(models.Model):
    name = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.name
