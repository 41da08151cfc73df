from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("schemaapp", "0003_probe_rows")]

    operations = [
        migrations.AlterModelTable(name="probe", table="schemaapp_probe_renamed"),
        migrations.AddField(
            model_name="probe", name="note", field=models.CharField(default="", max_length=100)
        ),
        migrations.AlterField(
            model_name="probe", name="name", field=models.CharField(max_length=200)
        ),
    ]
