"""PostgreSQL's own field types (``ArrayField``, ``HStoreField``): installed only when the
tests run on PostgreSQL (tests/settings.py)."""

from django.contrib.postgres.fields import ArrayField, HStoreField
from django.db import models

import ormbridge


@ormbridge.register
class Gadget(models.Model):
    name = models.CharField(max_length=100)
    labels = ArrayField(models.CharField(max_length=20), default=list)
    specs = HStoreField(default=dict)

    objects = ormbridge.CachedManager()

    def __str__(self) -> str:
        return self.name
