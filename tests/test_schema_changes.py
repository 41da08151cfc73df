"""Capture follows the schema (issue 17): triggers stay right through real ``migrate`` runs.

Each test gets a database of its own, named after the configured one and dropped
afterwards, and runs ``manage.py`` of the schema test project (tests/schemaapp: ormbridge
and one app) in processes of their own, with the models' code at the stage a project's
code would be at (``SCHEMAAPP_STAGE``). Writes are made by another client (psycopg or
Python's sqlite3), as any program would, and the change log is read back from the database.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.conf import settings

from ormbridge import capture
from tests.conftest import ROOT, RUN_DIR

POSTGRESQL = settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
postgresql_only = pytest.mark.skipif(not POSTGRESQL, reason="PostgreSQL's own tables")
STATE = re.compile(r"(?P<table>.+?)\s+(?P<state>installed|missing|outdated|partial|stale|orphaned)")


class Project:
    """The schema test project on a database of its own."""

    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:8]
        configured = settings.DATABASES["default"]
        if POSTGRESQL:
            self.name = f"{configured['NAME']}_schema_{suffix}"
            self.server = {
                "host": configured["HOST"] or "127.0.0.1",
                "port": int(configured["PORT"] or 5432),
                "user": configured["USER"] or "postgres",
                "password": configured["PASSWORD"] or None,
            }
            auth = self.server["user"] + (
                f":{self.server['password']}" if self.server["password"] else ""
            )
            self.url = f"postgres://{auth}@{self.server['host']}:{self.server['port']}/{self.name}"
            self._admin(f'CREATE DATABASE "{self.name}"')
        else:
            self.path = RUN_DIR / f"schema-{suffix}.sqlite3"
            self.url = f"sqlite:///{self.path}"

    def _admin(self, sql: str) -> None:
        with psycopg.connect(dbname="postgres", autocommit=True, **self.server) as db:
            db.execute(sql)

    def drop(self) -> None:
        if POSTGRESQL:
            self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        else:
            self.path.unlink(missing_ok=True)

    def manage(self, *args: str, stage: int = 3) -> subprocess.CompletedProcess[str]:
        """``manage.py <args>`` of the project with its code at ``stage``."""
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.schemaapp.settings",
            "SCHEMAAPP_DATABASE_URL": self.url,
            "SCHEMAAPP_STAGE": str(stage),
            "PYTHONPATH": str(ROOT),
        }
        return subprocess.run(
            [sys.executable, "-m", "django", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def migrate(self, *args: str, stage: int = 3) -> None:
        done = self.manage("migrate", *args, stage=stage)
        assert done.returncode == 0, done.stderr

    def sql(self, *statements: str) -> list[tuple[Any, ...]]:
        """Run ``statements`` in one transaction of another client; the last one's rows."""
        if POSTGRESQL:
            with psycopg.connect(dbname=self.name, **self.server) as db:
                rows: list[tuple[Any, ...]] = []
                for statement in statements:
                    cursor = db.execute(statement)
                    rows = cursor.fetchall() if cursor.description else []
                return rows
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("BEGIN")
            for statement in statements:
                rows = db.execute(statement).fetchall()
            db.execute("COMMIT")
            return rows
        finally:
            db.close()

    def mark(self) -> int:
        return self.sql("SELECT coalesce(max(id), 0) FROM ormbridge_changebatch")[0][0]

    def logged(self, since: int = 0) -> list[tuple[str, str, Any]]:
        """(model, action, pks) of each change-log row after ``since``, in order."""
        rows = self.sql(
            f"SELECT model, action, pks FROM ormbridge_changebatch WHERE id > {since} ORDER BY id"
        )
        return [
            (model, action, pks if POSTGRESQL or pks is None else _json(pks))
            for model, action, pks in rows
        ]

    def status(self, stage: int = 3) -> tuple[int, dict[str, str], str]:
        """``ormbridge_triggers status``: exit code, table -> state, stderr."""
        done = self.manage("ormbridge_triggers", "status", stage=stage)
        states = {}
        for line in done.stdout.splitlines():
            found = STATE.match(line)
            if found:
                states[found.group("table")] = found.group("state")
        return done.returncode, states, done.stderr


def _json(text: str) -> Any:
    import json

    return json.loads(text)


@pytest.fixture
def project() -> Iterator[Project]:
    made = Project()
    try:
        yield made
    finally:
        made.drop()


def probe_pks(project: Project, table: str, pk: str) -> dict[str, int]:
    return dict(project.sql(f'SELECT name, "{pk}" FROM "{table}"'))


# -- pure functions --------------------------------------------------------------------------


@pytest.mark.unit
def test_trigger_names_are_plain_and_distinct_whatever_the_table_is_called():
    tables = ["shop_product", "Shop_Product", "my table", "my_table", 'ledger"."entry',
              "ledger_entry", "x" * 80, "x" * 81]  # fmt: skip
    names = [capture.trigger_name(table, "INSERT") for table in tables]
    assert all(re.fullmatch(r"[a-z0-9_]{1,63}", name) for name in names), names
    assert len(set(names)) == len(tables)
    assert names[0] == "ormbridge_ins_shop_product"  # plain names keep their triggers' names


@pytest.mark.unit
@pytest.mark.parametrize(
    "sql,keyword",
    [
        ('ALTER TABLE "t" RENAME COLUMN "id" TO "pk"', "ALTER"),
        ("  -- a comment\n/* another */ (SELECT 1)", "SELECT"),
        ("insert into t values (1)", "INSERT"),
        ("", ""),
    ],
)
def test_the_migration_guard_reads_a_statements_first_keyword(sql, keyword):
    assert capture._keyword(sql) == keyword


# -- migrations: a renamed pk column, a renamed table --------------------------------------


def test_a_data_migration_after_a_pk_column_rename_in_the_same_run_writes_and_is_captured(
    project,
):
    project.migrate("schemaapp", "0001", stage=1)
    project.migrate("schemaapp", "0003", stage=2)  # 0002 renames the column, 0003 writes
    [pk] = probe_pks(project, "schemaapp_probe", "probe_id").values()
    assert ("schemaapp.probe", "create", [pk]) in project.logged()
    assert ("schemaapp.probe", "update", [pk]) in project.logged()
    mark = project.mark()
    project.sql("INSERT INTO schemaapp_probe (name) VALUES ('after migrate')")
    new = probe_pks(project, "schemaapp_probe", "probe_id")["after migrate"]
    assert project.logged(mark) == [("schemaapp.probe", "create", [new])]
    code, states, _ = project.status(stage=2)
    assert (code, states["schemaapp_probe"]) == (0, "installed")


def test_a_table_renamed_by_migrate_logs_each_write_once(project):
    project.migrate("schemaapp", "0001", stage=1)
    project.migrate("schemaapp", "0003", stage=2)
    mark = project.mark()
    project.migrate(stage=3)  # 0004 renames the table (and rebuilds it on SQLite), 0005 writes
    pks = probe_pks(project, "schemaapp_probe_renamed", "probe_id")
    assert project.logged(mark)[:1] == [("schemaapp.probe", "create", [pks["data migration 0005"]])]
    mark = project.mark()
    project.sql("INSERT INTO schemaapp_probe_renamed (name, note) VALUES ('after', '')")
    after = probe_pks(project, "schemaapp_probe_renamed", "probe_id")["after"]
    assert project.logged(mark) == [("schemaapp.probe", "create", [after])]
    code, states, stderr = project.status()
    assert (code, states["schemaapp_probe_renamed"]) == (0, "installed"), stderr
    assert "schemaapp_probe" not in states


def test_status_names_the_triggers_a_table_rename_left_behind_and_install_drops_them(project):
    project.migrate("schemaapp", "0003", stage=2)
    # Renamed by hand (or another tool): the old triggers go with the table.
    project.sql(
        "ALTER TABLE schemaapp_probe RENAME TO schemaapp_probe_renamed",
        "ALTER TABLE schemaapp_probe_renamed ADD COLUMN note varchar(100) NOT NULL DEFAULT ''",
    )
    code, states, stderr = project.status()
    assert (code, states["schemaapp_probe_renamed"]) == (1, "stale")
    assert "ormbridge_triggers install" in stderr
    done = project.manage("ormbridge_triggers", "install")
    assert done.stdout.strip().endswith("schemaapp_probe_renamed"), done.stdout
    mark = project.mark()
    project.sql("INSERT INTO schemaapp_probe_renamed (name) VALUES ('once')")
    once = probe_pks(project, "schemaapp_probe_renamed", "probe_id")["once"]
    assert project.logged(mark) == [("schemaapp.probe", "create", [once])]
    assert project.status()[0] == 0


def test_ormbridges_own_migrations_run_beside_tables_captured_before_them(project):
    # early.Ledger is migrated first, and its triggers are installed as soon as the change
    # log can take rows, while ormbridge's later migrations still rebuild the log (SQLite
    # rebuilds a table to alter a column): the rebuild must neither fail nor lose capture.
    project.migrate("early")
    project.migrate()
    mark = project.mark()
    project.sql("INSERT INTO early_ledger (name) VALUES ('after')")
    [pk] = probe_pks(project, "early_ledger", "id").values()
    assert project.logged(mark) == [("early.ledger", "create", [pk])]
    code, states, stderr = project.status()
    assert (code, states["early_ledger"]) == (0, "installed"), stderr


def test_writes_go_on_after_ormbridge_is_migrated_to_zero(project):
    project.migrate()
    project.migrate("schemaapp", "zero")
    project.migrate("ormbridge", "zero")  # the change log goes, and its triggers with it
    project.sql("INSERT INTO early_ledger (name) VALUES ('no log')")
    assert list(probe_pks(project, "early_ledger", "id")) == ["no log"]


# -- table names ---------------------------------------------------------------------------


def test_a_table_named_with_a_space_is_captured(project):
    project.migrate()
    mark = project.mark()
    project.sql("""INSERT INTO "schemaapp spaced" (name) VALUES ('a')""")
    [pk] = probe_pks(project, "schemaapp spaced", "id").values()
    assert project.logged(mark) == [("schemaapp.spaced", "create", [pk])]
    assert project.status()[1]["schemaapp spaced"] == "installed"


@postgresql_only
def test_a_table_in_another_schema_is_captured_whatever_the_writers_search_path(project):
    project.migrate()
    code, states, stderr = project.status()
    assert (code, states['probe_schema"."probe_item']) == (0, "installed"), stderr
    mark = project.mark()
    project.sql(
        "SET LOCAL search_path TO pg_catalog",  # neither the table's schema nor the log's
        "INSERT INTO probe_schema.probe_item (name) VALUES ('qualified')",
    )
    [pk] = dict(project.sql("SELECT name, id FROM probe_schema.probe_item")).values()
    assert project.logged(mark) == [("schemaapp.qualified", "create", [pk])]


# -- partitions (PostgreSQL) -------------------------------------------------------------------


def partrows(project: Project) -> dict[str, int]:
    return dict(project.sql("SELECT name, id FROM probe_partrow"))


@postgresql_only
def test_writes_aimed_at_a_partition_are_captured(project):
    project.migrate()
    mark = project.mark()
    project.sql("INSERT INTO probe_partrow_p1 (part, name) VALUES (1, 'p1')")
    pk = partrows(project)["p1"]
    project.sql(f"UPDATE probe_partrow_p1 SET name = 'p1' WHERE id = {pk}")
    project.sql("TRUNCATE probe_partrow_p1")
    assert project.logged(mark) == [
        ("schemaapp.partrow", "create", [pk]),
        ("schemaapp.partrow", "update", [pk]),
        ("schemaapp.partrow", "invalidate", None),
    ]


@postgresql_only
def test_a_write_through_the_partitioned_table_is_logged_once(project):
    project.migrate()
    mark = project.mark()
    project.sql("INSERT INTO probe_partrow (part, name) VALUES (1, 'a'), (2, 'b')")
    rows = partrows(project)
    assert project.logged(mark) == [("schemaapp.partrow", "create", [rows["a"], rows["b"]])]


@postgresql_only
def test_a_partition_a_migration_adds_is_captured_within_that_migration(project):
    project.migrate()  # 0006 attaches probe_partrow_p3 and writes to it
    pk = partrows(project)["migration 0006"]
    assert ("schemaapp.partrow", "create", [pk]) in project.logged()
    assert project.status()[1]["probe_partrow_p3"] == "installed"


@postgresql_only
def test_a_partition_attached_outside_migrate_is_reported_missing_until_installed(project):
    project.migrate()
    project.sql("CREATE TABLE probe_partrow_p9 PARTITION OF probe_partrow FOR VALUES IN (9)")
    code, states, _ = project.status()
    assert (code, states["probe_partrow_p9"], states["probe_partrow_p1"]) == (
        1,
        "missing",
        "installed",
    )
    check = project.manage("check", "--database", "default")
    assert "ormbridge.W005" in check.stderr and "probe_partrow_p9" in check.stderr
    assert "a partition of 'probe_partrow'" in check.stderr
    done = project.manage("ormbridge_triggers", "install")
    assert done.stdout.strip() == "installed triggers on 1 tables: probe_partrow_p9"
    mark = project.mark()
    project.sql("INSERT INTO probe_partrow_p9 (part, name) VALUES (9, 'p9')")
    assert project.logged(mark) == [("schemaapp.partrow", "create", [partrows(project)["p9"]])]
