"""Models of the schema test project, at the state ``SCHEMAAPP_STAGE`` names.

A project's code moves on while its database waits for ``migrate``: stage 1 is the code
of migration 0001, stage 2 renames Probe's pk column (0002) and writes rows in a data
migration (0003), stage 3 (the default) renames Probe's table, adds and alters fields
(0004), writes rows again (0005) and adds a partition (0006).
"""

import os

from django.db import models

STAGE = int(os.environ.get("SCHEMAAPP_STAGE", "3"))


class Probe(models.Model):
    if STAGE >= 2:
        id = models.AutoField(primary_key=True, db_column="probe_id")
    else:
        id = models.AutoField(primary_key=True)
    name = models.CharField(max_length=200 if STAGE >= 3 else 100)
    if STAGE >= 3:
        note = models.CharField(max_length=100, default="")

    class Meta:
        db_table = "schemaapp_probe_renamed" if STAGE >= 3 else "schemaapp_probe"

    def __str__(self) -> str:
        return self.name


class Spaced(models.Model):
    """A table named with a space."""

    name = models.CharField(max_length=100)

    class Meta:
        db_table = "schemaapp spaced"

    def __str__(self) -> str:
        return self.name


class Qualified(models.Model):
    """A table in another schema (PostgreSQL): Django's ``'schema"."table'``."""

    name = models.CharField(max_length=100)

    class Meta:
        db_table = 'probe_schema"."probe_item'

    def __str__(self) -> str:
        return self.name


class PartRow(models.Model):
    """Over a table partitioned by ``part`` (PostgreSQL), made by migration 0001's SQL."""

    id = models.BigAutoField(primary_key=True)
    part = models.IntegerField()
    name = models.CharField(max_length=100)

    class Meta:
        db_table = "probe_partrow"

    def __str__(self) -> str:
        return self.name
