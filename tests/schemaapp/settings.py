"""Settings of the schema test project: ormbridge and ``tests.schemaapp`` alone, on the
database ``SCHEMAAPP_DATABASE_URL`` names, for real ``migrate`` runs in a process of their
own (tests/test_schema_changes.py). ``SCHEMAAPP_STAGE`` says which state of the models the
code is at (tests/schemaapp/models.py)."""

import os

import dj_database_url

SECRET_KEY = "schemaapp-tests-only"
USE_TZ = True
INSTALLED_APPS = ["tests.schemaapp.early", "ormbridge", "tests.schemaapp"]
DATABASES = {"default": dj_database_url.parse(os.environ["SCHEMAAPP_DATABASE_URL"])}
POSTGRESQL = DATABASES["default"]["ENGINE"].endswith("postgresql")

ORMBRIDGE = {
    # Nothing listens there: commits skip Redis after the first refusal, the log is the truth.
    "REDIS_URL": "redis://127.0.0.1:9/0",
    "COMMIT_TIMEOUT": 0.01,
    "MODELS": [
        "schemaapp.Probe",
        "schemaapp.Spaced",
        "early.Ledger",
        # PostgreSQL's own: a table in another schema, a partitioned table.
        *(["schemaapp.Qualified", "schemaapp.PartRow"] if POSTGRESQL else []),
    ],
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"ormbridge": {"level": "ERROR"}},
}
