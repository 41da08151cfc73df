from django.db import migrations


def write(apps, schema_editor):
    """Writes right after 0004 renamed the table and rebuilt it (SQLite) in the same run."""
    probe = apps.get_model("schemaapp", "Probe")
    using = schema_editor.connection.alias
    probe.objects.using(using).create(name="data migration 0005", note="n")


class Migration(migrations.Migration):
    dependencies = [("schemaapp", "0004_probe_table")]

    operations = [migrations.RunPython(write, migrations.RunPython.noop)]
