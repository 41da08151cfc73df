from django.db import migrations


def partition(apps, schema_editor):
    """A partition attached by a later migration, written to straight away (PostgreSQL)."""
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("CREATE TABLE probe_partrow_p3 PARTITION OF probe_partrow FOR VALUES IN (3)")
    schema_editor.execute("INSERT INTO probe_partrow_p3 (part, name) VALUES (3, 'migration 0006')")


class Migration(migrations.Migration):
    dependencies = [("schemaapp", "0005_probe_rows_again")]

    operations = [migrations.RunPython(partition, migrations.RunPython.noop)]
