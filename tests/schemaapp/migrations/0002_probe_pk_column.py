from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("schemaapp", "0001_initial")]

    operations = [
        migrations.AlterField(
            model_name="probe",
            name="id",
            field=models.AutoField(db_column="probe_id", primary_key=True, serialize=False),
        ),
    ]
