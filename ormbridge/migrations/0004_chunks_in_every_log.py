# A resync job's chunks are in the change log of each of its models' databases, the job
# in one of them: the foreign key from a chunk to its job has no database constraint.

import django.db.models.deletion
from django.db import migrations, models


def legacy_alter_table(value):
    """On SQLite, the table is remade and renamed: a rename checks every trigger that
    names it, and the capture triggers name the change log, which is gone meanwhile.
    SQLite's legacy rename leaves the triggers alone (they name the table by name)."""

    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "sqlite":
            schema_editor.execute(f"PRAGMA legacy_alter_table = {value}")

    return run


class Migration(migrations.Migration):

    dependencies = [
        ('ormbridge', '0003_change_log_retries'),
    ]

    operations = [
        migrations.RunPython(legacy_alter_table("ON"), legacy_alter_table("OFF")),
        migrations.AlterField(
            model_name='changebatch',
            name='job',
            field=models.ForeignKey(blank=True, db_constraint=False, db_index=False, help_text='The resync job this batch is a chunk of.', null=True, on_delete=django.db.models.deletion.CASCADE, related_name='batches', to='ormbridge.resyncjob'),
        ),
        migrations.RunPython(legacy_alter_table("OFF"), legacy_alter_table("ON")),
    ]
