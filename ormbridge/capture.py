"""Capture: database triggers that write the change log in the writer's transaction.

Every insert, update and delete on a registered model's table, and on the
many-to-many tables of its relations, is recorded by the database itself, so
ORM saves, ``QuerySet.update()``, ``bulk_create()``, raw SQL and other
programs are all seen, and the record commits or rolls back with the change.

- PostgreSQL: statement-level ``AFTER`` triggers with transition tables write
  one :class:`~ormbridge.models.ChangeBatch` row per statement holding every
  affected pk, then ``NOTIFY ormbridge`` wakes the relay.
- SQLite: row-level triggers write one row per changed row; the relay merges
  them.

An update's ``fields`` is ``null`` (unknown): comparing every column of the
transition tables would cost a join per statement. A many-to-many change is
an update of each registered end, with the relation's name as its field.

The ``safe_bulk_*`` helpers log their chunks themselves and :func:`pause`
capture around their writes, so nothing is logged twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from django.db import connections, models, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from ormbridge import registry
from ormbridge.models import CHANNEL

VENDORS = ("postgresql", "sqlite")
PREFIX = "ormbridge_"
LOG_TABLE = "ormbridge_changebatch"
PAUSE_TABLE = "ormbridge_capturepause"
PAUSE_SETTING = "ormbridge.pause"
OPERATIONS = {
    "INSERT": ("ins", "create"),
    "UPDATE": ("upd", "update"),
    "DELETE": ("del", "delete"),
    "TRUNCATE": ("trn", "invalidate"),  # PostgreSQL only: every row, pks unknown
}


@dataclass(frozen=True)
class Target:
    """A registered model whose pks a statement on a table changes."""

    label: str
    column: str
    """The table's column holding the model's pk."""
    field: str | None = None
    """The m2m relation's name on the model, for a many-to-many table."""


@dataclass(frozen=True)
class Table:
    """A captured table and the models its changes are logged for."""

    name: str
    targets: tuple[Target, ...]
    through: bool = False

    def action(self, operation: str) -> str:
        if self.through and operation != "TRUNCATE":
            return "update"
        return OPERATIONS[operation][1]


def supports(connection: BaseDatabaseWrapper) -> bool:
    """Whether ormbridge captures changes with triggers on this database."""
    return connection.vendor in VENDORS


def tables() -> list[Table]:
    """Every table to capture: registered models' own tables and their m2m tables."""
    found: dict[str, Table] = {}
    for model in registry.registered_models():
        meta = model._meta
        if registry.composite_pk(model):
            continue  # refused by register() and checks (E009): no column to log
        # django-stubs: Field.column is Optional; a primary key's column is always set.
        column: str = meta.pk.column  # type: ignore[assignment]
        found[meta.db_table] = Table(meta.db_table, (Target(meta.label_lower, column),))
    for model in registry.registered_models():
        for field in model._meta.many_to_many:
            # django-stubs: Optional; an m2m's through model is set once models are loaded.
            through: type[models.Model] | str = field.remote_field.through  # type: ignore[assignment]
            if isinstance(through, str) or through._meta.db_table in found:
                continue
            found[through._meta.db_table] = _through_table(through)
    return sorted(found.values(), key=lambda table: table.name)


def _through_table(through: type[models.Model]) -> Table:
    targets = []
    for fk in through._meta.fields:
        end = fk.related_model
        if not fk.is_relation or not isinstance(end, type) or not registry.is_registered(end):
            continue
        name = next(
            (
                # mypy cannot narrow on f.concrete: the others here are ForeignObjectRel.
                f.name if f.concrete else f.get_accessor_name() or f.name  # type: ignore[union-attr]
                for f in end._meta.get_fields()
                if (f.many_to_many and getattr(f.remote_field, "through", None) is through)
                or getattr(f, "through", None) is through
            ),
            through._meta.model_name,
        )
        # django-stubs: concrete_model and Field.column are Optional; both are set here.
        targets.append(Target(end._meta.concrete_model._meta.label_lower, fk.column, name))  # type: ignore[union-attr, arg-type]
    return Table(through._meta.db_table, tuple(targets), through=True)


def trigger_name(table: str, operation: str) -> str:
    """The name of the trigger (and, on PostgreSQL, its function) for ``operation``."""
    name = f"{PREFIX}{OPERATIONS[operation][0]}_{table}"
    if len(name) > 63:
        name = f"{name[:54]}_{hashlib.sha1(table.encode()).hexdigest()[:8]}"
    return name


def definitions(table: Table, vendor: str) -> dict[str, list[str]]:
    """The SQL creating each trigger of ``table``, by trigger name."""
    if vendor == "postgresql":
        return {trigger_name(table.name, op): _postgresql(table, op) for op in OPERATIONS}
    # SQLite has no TRUNCATE: a DELETE without WHERE fires the row triggers.
    return {
        trigger_name(table.name, op): _sqlite(table, op) for op in OPERATIONS if op != "TRUNCATE"
    }


def _literal(value: str) -> str:
    """A string literal of a model label or field name (identifiers only, never user input)."""
    return "'" + value.replace("'", "''") + "'"


_COLUMNS = (
    '"model", "action", "pks", "rows", "fields", "replay", "state", "attempts", '
    '"created_at", "last_error", "claimed_by"'
)


def _postgresql(table: Table, operation: str) -> list[str]:
    name = trigger_name(table.name, operation)
    rows = "old_rows" if operation == "DELETE" else "new_rows"
    referencing = f"{'OLD' if operation == 'DELETE' else 'NEW'} TABLE AS {rows}"
    steps = []
    for target in table.targets:
        column = f'"{target.column}"'
        fields = "NULL" if target.field is None else f"jsonb_build_array({_literal(target.field)})"
        distinct = "DISTINCT " if table.through else ""
        action = _literal(table.action(operation))
        if operation == "TRUNCATE":  # no transition table: every row, as an invalidation
            source = f"VALUES ({_literal(target.label)}, {action}, NULL::jsonb, 0, NULL::jsonb"
            insert = f"{source}, false, 'pending', 0, now(), '', '');"
        else:
            insert = (
                f"SELECT {_literal(target.label)}, {action}, jsonb_agg({distinct}{column}), "
                f"count({distinct}{column}), {fields}, false, 'pending', 0, now(), '', '' "
                f"FROM {rows} HAVING count(*) > 0;"
            )
        # Each end of an m2m table is paused on its own: a bulk helper that logs
        # one end itself leaves the other end to the trigger.
        steps.append(
            f"IF paused NOT LIKE {_literal('%,' + target.label + ',%')} THEN\n"
            f"    INSERT INTO {LOG_TABLE} ({_COLUMNS}) {insert}\n"
            "    logged := logged OR FOUND;\n"
            "  END IF;"
        )
    body = "\n  ".join(steps)
    return [
        f"""CREATE OR REPLACE FUNCTION "{name}"() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  paused text := coalesce(current_setting({_literal(PAUSE_SETTING)}, true), '');
  logged boolean := false;
BEGIN
  {body}
  IF logged THEN
    PERFORM pg_notify({_literal(CHANNEL)}, '');
  END IF;
  RETURN NULL;
END
$$""",
        f'DROP TRIGGER IF EXISTS "{name}" ON "{table.name}"',
        f'CREATE TRIGGER "{name}" AFTER {operation} ON "{table.name}" '
        f"{'' if operation == 'TRUNCATE' else f'REFERENCING {referencing} '}"
        f'FOR EACH STATEMENT EXECUTE FUNCTION "{name}"()',
    ]


def _sqlite(table: Table, operation: str) -> list[str]:
    name = trigger_name(table.name, operation)
    row = "OLD" if operation == "DELETE" else "NEW"
    inserts = []
    for target in table.targets:
        fields = "NULL" if target.field is None else f"json_array({_literal(target.field)})"
        inserts.append(
            f"INSERT INTO {LOG_TABLE} ({_COLUMNS}) SELECT "
            f"{_literal(target.label)}, {_literal(table.action(operation))}, "
            f"json_array({row}.\"{target.column}\"), 1, {fields}, 0, 'pending', 0, "
            f"strftime('%Y-%m-%d %H:%M:%f', 'now'), '', '' "
            f"WHERE NOT EXISTS (SELECT 1 FROM {PAUSE_TABLE} "
            f"WHERE label = {_literal(target.label)});"
        )
    body = "\n  ".join(inserts)
    return [
        f'DROP TRIGGER IF EXISTS "{name}"',
        f'CREATE TRIGGER "{name}" AFTER {operation} ON "{table.name}" FOR EACH ROW\n'
        f"BEGIN\n  {body}\nEND",
    ]


def _fingerprint(statements: list[str]) -> str:
    return hashlib.sha1("\n".join(statements).encode()).hexdigest()[:16]


def installed(using: str) -> dict[str, str]:
    """ormbridge's triggers in the database ``using``: name -> fingerprint ('' if unknown)."""
    connection = connections[using]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT t.tgname, coalesce(obj_description(p.oid, 'pg_proc'), '') "
                "FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid "
                "WHERE NOT t.tgisinternal AND t.tgname LIKE %s",
                [PREFIX.replace("_", r"\_") + "%"],
            )
            return {name: comment.removeprefix("ormbridge:") for name, comment in cursor.fetchall()}
        cursor.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name LIKE %s "
            "ESCAPE '\\'",
            [PREFIX.replace("_", r"\_") + "%"],
        )
        return {name: _fingerprint([_normal(sql)]) for name, sql in cursor.fetchall()}


def _normal(sql: str) -> str:
    return " ".join(sql.split())


def expected(using: str) -> dict[str, tuple[Table, str, list[str]]]:
    """The triggers ``using`` should have: name -> (table, fingerprint, statements)."""
    vendor = connections[using].vendor
    wanted = {}
    for table in tables():
        for name, statements in definitions(table, vendor).items():
            if vendor == "sqlite":
                fingerprint = _fingerprint([_normal(statements[-1])])
            else:
                fingerprint = _fingerprint(statements)
            wanted[name] = (table, fingerprint, statements)
    return wanted


@dataclass(frozen=True)
class TableState:
    table: str
    models: tuple[str, ...]
    state: str
    """``installed``, ``missing``, ``outdated`` or ``partial``."""


def status(using: str, labels: list[str] | None = None) -> list[TableState]:
    """The trigger state of each captured table (of ``labels``' models, if given)."""
    present = installed(using)
    by_table: dict[str, list[str]] = {}
    for name, (table, fingerprint, _) in expected(using).items():
        if labels is not None and not {t.label for t in table.targets} & set(labels):
            continue
        if name not in present:
            by_table.setdefault(table.name, []).append("missing")
        elif present[name] != fingerprint:
            by_table.setdefault(table.name, []).append("outdated")
        else:
            by_table.setdefault(table.name, []).append("installed")
    states = []
    for table in tables():
        if table.name not in by_table:
            continue
        seen = set(by_table[table.name])
        state = seen.pop() if len(seen) == 1 else "partial"
        states.append(TableState(table.name, tuple(t.label for t in table.targets), state))
    return states


def install(using: str, labels: list[str] | None = None) -> list[str]:
    """Create or replace the triggers that are missing or outdated; returns their tables.

    Idempotent: triggers already up to date are left alone. Tables that do not
    exist yet (their migrations have not run) are skipped.
    """
    connection = connections[using]
    if not supports(connection):
        return []
    present = installed(using)
    existing = set(connection.introspection.table_names())
    done: list[str] = []
    with transaction.atomic(using=using), connection.cursor() as cursor:
        for name, (table, fingerprint, statements) in expected(using).items():
            if labels is not None and not {t.label for t in table.targets} & set(labels):
                continue
            if present.get(name) == fingerprint or table.name not in existing:
                continue
            for statement in statements:
                cursor.execute(statement)
            if connection.vendor == "postgresql":
                cursor.execute(f"COMMENT ON FUNCTION \"{name}\"() IS 'ormbridge:{fingerprint}'")
            if table.name not in done:
                done.append(table.name)
    return done


def uninstall(using: str, labels: list[str] | None = None) -> list[str]:
    """Drop ormbridge's triggers (and their functions); returns the names dropped.

    Without ``labels``, every trigger named ``ormbridge_…`` goes, registered or not.
    """
    connection = connections[using]
    if not supports(connection):
        return []
    names = set(installed(using))
    if labels is not None:
        names &= {
            name
            for name, (table, _, _) in expected(using).items()
            if {t.label for t in table.targets} & set(labels)
        }
    with transaction.atomic(using=using), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT t.tgname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                "WHERE NOT t.tgisinternal AND t.tgname LIKE %s",
                [PREFIX.replace("_", r"\_") + "%"],
            )
            for name, table in cursor.fetchall():
                if name in names:
                    cursor.execute(f'DROP TRIGGER IF EXISTS "{name}" ON "{table}"')
                    cursor.execute(f'DROP FUNCTION IF EXISTS "{name}"()')
        else:
            for name in names:
                cursor.execute(f'DROP TRIGGER IF EXISTS "{name}"')
    return sorted(names)


@contextlib.contextmanager
def pause(using: str, *paused: type[models.Model]) -> Iterator[None]:
    """Stop the capture triggers logging these models for the statements inside the block.

    For writers that log their changes themselves (the bulk helpers). Use it
    inside the writer's own atomic block: when the block fails, its rollback
    takes the pause with it.
    """
    connection = connections[using]
    # django-stubs: concrete_model is Optional; it is set on every model class.
    labels = sorted({model._meta.concrete_model._meta.label_lower for model in paused})  # type: ignore[union-attr]
    if not supports(connection) or not labels:
        yield
        return
    _paused.labels = set(labels)
    try:
        with _pausing(connection, labels):
            yield
    finally:
        _paused.labels = set()


class _Paused(threading.local):
    labels: set[str] = set()


_paused = _Paused()


def paused(label: str) -> bool:
    """Whether this thread is inside :func:`pause` for ``label``."""
    return label in _paused.labels


@contextlib.contextmanager
def _pausing(connection: BaseDatabaseWrapper, labels: list[str]) -> Iterator[None]:
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            value = "," + ",".join(labels) + ","
            cursor.execute("SELECT set_config(%s, %s, true)", [PAUSE_SETTING, value])
            yield
            cursor.execute("SELECT set_config(%s, '', true)", [PAUSE_SETTING])
        else:
            values = ", ".join(["(%s)"] * len(labels))
            cursor.execute(f"INSERT INTO {PAUSE_TABLE} (label) VALUES {values}", labels)
            yield
            cursor.execute(f"DELETE FROM {PAUSE_TABLE}")


def notify(using: str) -> None:
    """Wake the relays when the current transaction commits (PostgreSQL; others poll)."""
    connection = connections[using]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [CHANNEL])
