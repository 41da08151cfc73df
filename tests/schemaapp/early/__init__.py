"""An app of the schema test project whose migrations do not depend on ormbridge's: its
table exists, with triggers, before ormbridge's own migrations rebuild the change log, as
in a project that adds ormbridge to apps already migrated (tests/test_schema_changes.py)."""
