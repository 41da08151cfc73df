from django.db import migrations


def write(apps, schema_editor):
    """A data migration's writes, right after 0002 renamed the pk column in the same run."""
    probe = apps.get_model("schemaapp", "Probe")
    using = schema_editor.connection.alias
    first = probe.objects.using(using).create(name="data migration 0003")
    probe.objects.using(using).filter(pk=first.pk).update(name="data migration 0003, updated")


class Migration(migrations.Migration):
    dependencies = [("schemaapp", "0002_probe_pk_column")]

    operations = [migrations.RunPython(write, migrations.RunPython.noop)]
