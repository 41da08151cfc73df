from django.db import models


class Ledger(models.Model):
    """A table migrated before ormbridge's change log."""

    name = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.name
