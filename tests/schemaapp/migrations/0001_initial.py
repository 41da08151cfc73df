from django.db import migrations, models

POSTGRESQL_TABLES = [
    "CREATE SCHEMA probe_schema",
    "CREATE TABLE probe_schema.probe_item (id serial PRIMARY KEY, name varchar(100) NOT NULL)",
    "CREATE TABLE probe_partrow (id bigserial, part integer NOT NULL, "
    "name varchar(100) NOT NULL, PRIMARY KEY (id, part)) PARTITION BY LIST (part)",
    "CREATE TABLE probe_partrow_p1 PARTITION OF probe_partrow FOR VALUES IN (1)",
    "CREATE TABLE probe_partrow_p2 PARTITION OF probe_partrow FOR VALUES IN (2)",
]


def postgresql_tables(apps, schema_editor):
    """A table in another schema and a partitioned one: PostgreSQL's, by its own SQL."""
    if schema_editor.connection.vendor == "postgresql":
        for sql in POSTGRESQL_TABLES:
            schema_editor.execute(sql)


class Migration(migrations.Migration):
    initial = True
    dependencies = [("ormbridge", "0003_change_log_retries")]

    operations = [
        migrations.CreateModel(
            name="Probe",
            fields=[
                ("id", models.AutoField(primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=100)),
            ],
            options={"db_table": "schemaapp_probe"},
        ),
        migrations.CreateModel(
            name="Spaced",
            fields=[
                ("id", models.AutoField(primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=100)),
            ],
            options={"db_table": "schemaapp spaced"},
        ),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="Qualified",
                    fields=[
                        ("id", models.AutoField(primary_key=True, serialize=False)),
                        ("name", models.CharField(max_length=100)),
                    ],
                    options={"db_table": 'probe_schema"."probe_item'},
                ),
                migrations.CreateModel(
                    name="PartRow",
                    fields=[
                        ("id", models.BigAutoField(primary_key=True, serialize=False)),
                        ("part", models.IntegerField()),
                        ("name", models.CharField(max_length=100)),
                    ],
                    options={"db_table": "probe_partrow"},
                ),
            ],
            database_operations=[migrations.RunPython(postgresql_tables, migrations.RunPython.noop)],
        ),
    ]
