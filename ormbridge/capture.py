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
transition tables would cost a join per statement. An update that changes
rows' pks also logs their old pks as a ``delete`` (PostgreSQL: a row-level
trigger whose ``WHEN`` compares the old pk with the new). A many-to-many
change is an update of each registered end, with the relation's name as its
field; a link moved to another row updates the old row and the new.

The triggers are generated from the database as it stands: every identifier
quoted by the backend, the change log qualified by its schema, a model's pk
column the table's own while a ``migrate`` renames it, each partition of a
partitioned table with triggers of its own. :func:`status` tells, per table,
whether its triggers are installed, missing, outdated, partial or stale (not
its own, left by a rename), and names the tables of no registered model that
still hold ormbridge triggers (orphaned); :func:`install` repairs the first,
:func:`prune` drops the last, and :class:`MigrationGuard` keeps them right
through the schema changes of one ``migrate`` run.

The ``safe_bulk_*`` helpers log their chunks themselves and :func:`pause`
capture around their writes, so nothing is logged twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from django.db import connections, models, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from ormbridge import registry
from ormbridge.models import CHANNEL

__all__ = [
    "LOG_TABLE",
    "MOVE",
    "OPERATIONS",
    "PAUSE_SETTING",
    "PAUSE_TABLE",
    "PREFIX",
    "VENDORS",
    "MigrationGuard",
    "Table",
    "TableState",
    "Target",
    "Trigger",
    "definitions",
    "end_migration",
    "guard_migration",
    "install",
    "installed",
    "model_tables",
    "notify",
    "pause",
    "paused",
    "prune",
    "status",
    "supports",
    "sync",
    "tables",
    "trigger_name",
    "uninstall",
]

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
    "MOVE": ("mov", "delete"),  # PostgreSQL only: a row trigger of UPDATEs changing a pk
}
MOVE = "MOVE"


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
    """As Django spells it (``db_table``): ``'schema"."table'`` names a schema."""
    targets: tuple[Target, ...]
    through: bool = False
    partition_of: str | None = None
    """For a partition of a captured partitioned table (PostgreSQL): that table."""

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(target.label for target in self.targets)

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
        # django-stubs: Field.column is Optional; it is set here.
        targets.append(Target(registry.label_of(end), fk.column, name))  # type: ignore[arg-type]
    return Table(through._meta.db_table, tuple(targets), through=True)


_PLAIN = re.compile(r"[a-z0-9_]+")


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def trigger_name(table: str, operation: str) -> str:
    """The name of the trigger (and, on PostgreSQL, its function) for ``operation``.

    Lower-case letters, digits and ``_`` only, whatever the table is called: a name
    with a space, a schema (``'schema"."table'``) or capitals gets a digest of itself
    appended, so two tables never share a trigger name and quoting is all it needs.
    """
    stem = table
    if not _PLAIN.fullmatch(table):
        stem = f"{re.sub(r'[^a-z0-9_]+', '_', table.lower()).strip('_')}_{_digest(table)}"
    name = f"{PREFIX}{OPERATIONS[operation][0]}_{stem}"
    if len(name) > 63:
        name = f"{name[:54]}_{_digest(table)}"
    return name


def model_tables(model: type[models.Model]) -> list[str]:
    """The tables whose triggers log ``model`` (registered or not): its own table and
    the many-to-many tables of its relations, both ways."""
    names = [model._meta.db_table]
    throughs = [field.remote_field.through for field in model._meta.many_to_many]
    throughs += [rel.through for rel in model._meta.related_objects if rel.many_to_many]  # type: ignore[attr-defined]
    for through in throughs:
        if isinstance(through, type) and through._meta.db_table not in names:
            names.append(through._meta.db_table)
    return names


def definitions(table: Table, connection: BaseDatabaseWrapper, log: str) -> dict[str, list[str]]:
    """The SQL creating each trigger of ``table``, by trigger name.

    ``log`` is the change-log table as the triggers name it: on PostgreSQL qualified
    by its schema (a writer's ``search_path`` does not decide where changes go), and
    the functions are created in that schema.
    """
    if connection.vendor == "postgresql":
        found = {
            trigger_name(table.name, op): _postgresql(table, op, connection, log)
            for op in OPERATIONS
            if op != MOVE
        }
        if table.partition_of is None:  # a partitioned table's row trigger covers its partitions
            found[trigger_name(table.name, MOVE)] = _postgresql_moved(table, connection, log)
        return found
    # SQLite has no TRUNCATE: a DELETE without WHERE fires the row triggers.
    return {
        trigger_name(table.name, op): _sqlite(table, op, connection, log)
        for op in OPERATIONS
        if op not in ("TRUNCATE", MOVE)
    }


def _literal(value: str) -> str:
    """A string literal of a model label or field name (identifiers only, never user input)."""
    return "'" + value.replace("'", "''") + "'"


_COLUMNS = (
    "model",
    "action",
    "pks",
    "rows",
    "fields",
    "replay",
    "state",
    "attempts",
    "created_at",
    "last_error",
    "claimed_by",
)


def _function(name: str, connection: BaseDatabaseWrapper, log: str) -> str:
    """A trigger function's name, qualified by the change log's schema."""
    schema = log.rpartition(".")[0]
    return (
        f"{schema}.{connection.ops.quote_name(name)}" if schema else connection.ops.quote_name(name)
    )


def _postgresql(
    table: Table, operation: str, connection: BaseDatabaseWrapper, log: str
) -> list[str]:
    quote = connection.ops.quote_name
    name = trigger_name(table.name, operation)
    function = _function(name, connection, log)
    columns = ", ".join(quote(column) for column in _COLUMNS)
    rows = "old_rows" if operation == "DELETE" else "new_rows"
    if operation == "TRUNCATE":  # no transition table: every row, as an invalidation
        referencing = ""
    else:
        referencing = f"REFERENCING {'OLD' if operation == 'DELETE' else 'NEW'} TABLE AS {rows} "
    steps = []
    for target in table.targets:
        column = quote(target.column)
        fields = "NULL" if target.field is None else f"jsonb_build_array({_literal(target.field)})"
        label, action = _literal(target.label), _literal(table.action(operation))
        tail = f"{fields}, false, 'pending', 0, now(), '', ''"
        inserts = []
        if operation == "TRUNCATE":
            inserts.append(f"VALUES ({label}, {action}, NULL::jsonb, 0, {tail})")
        else:
            distinct = "DISTINCT " if table.through else ""
            inserts.append(
                f"SELECT {label}, {action}, jsonb_agg({distinct}{column}), "
                f"count({distinct}{column}), {tail} FROM {rows} HAVING count(*) > 0"
            )
        # Each end of an m2m table is paused on its own: a bulk helper that logs
        # one end itself leaves the other end to the trigger. strpos, not LIKE:
        # '_' in a label is no wildcard.
        body = "\n    ".join(
            f"INSERT INTO {log} ({columns}) {insert};\n    logged := logged OR FOUND;"
            for insert in inserts
        )
        steps.append(
            f"IF strpos(paused, {_literal(',' + target.label + ',')}) = 0 THEN\n"
            f"    {body}\n"
            "  END IF;"
        )
    body = "\n  ".join(steps)
    quoted_table = quote(table.name)
    return [
        f"""CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
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
        f"DROP TRIGGER IF EXISTS {quote(name)} ON {quoted_table}",
        f"CREATE TRIGGER {quote(name)} AFTER {operation} ON {quoted_table} "
        f"{referencing}FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
    ]


def _postgresql_moved(table: Table, connection: BaseDatabaseWrapper, log: str) -> list[str]:
    """The row-level trigger of an UPDATE that changes a logged column's value.

    A row whose pk changed is gone under its old pk: logged as a ``delete`` of it,
    unless another row of the statement took that pk. A link of an m2m table moved
    to another row: an ``update`` of the row it left. The trigger is ``UPDATE OF``
    those columns, so it is skipped by UPDATEs that do not set them, and its ``WHEN``
    queues nothing for rows whose value stayed: an ordinary UPDATE pays no join of
    transition tables (whose plan, cached by PL/pgSQL after single-row updates,
    made a 100,000-row UPDATE take minutes). A value changed by a ``BEFORE``
    trigger while the statement did not set the column is not seen.
    """
    quote = connection.ops.quote_name
    name = trigger_name(table.name, MOVE)
    function = _function(name, connection, log)
    columns = ", ".join(quote(column) for column in _COLUMNS)
    steps, changed = [], []
    for target in table.targets:
        column = quote(target.column)
        fields = "NULL" if target.field is None else f"jsonb_build_array({_literal(target.field)})"
        moved = f"OLD.{column} IS DISTINCT FROM NEW.{column}"
        changed.append(moved)
        condition = f"strpos(paused, {_literal(',' + target.label + ',')}) = 0 AND {moved}"
        if not table.through:
            condition += (
                f" AND NOT EXISTS (SELECT 1 FROM {quote(table.name)} WHERE {column} = OLD.{column})"
            )
        action = "'update'" if table.through else "'delete'"
        steps.append(
            f"IF {condition} THEN\n"
            f"    INSERT INTO {log} ({columns}) VALUES ({_literal(target.label)}, {action}, "
            f"jsonb_build_array(OLD.{column}), 1, {fields}, false, 'pending', 0, now(), '', '');\n"
            "    logged := true;\n"
            "  END IF;"
        )
    body = "\n  ".join(steps)
    quoted_table = quote(table.name)
    watched = ", ".join(dict.fromkeys(quote(target.column) for target in table.targets))
    return [
        f"""CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
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
        f"DROP TRIGGER IF EXISTS {quote(name)} ON {quoted_table}",
        f"CREATE TRIGGER {quote(name)} AFTER UPDATE OF {watched} ON {quoted_table} "
        f"FOR EACH ROW WHEN ({' OR '.join(changed)}) EXECUTE FUNCTION {function}()",
    ]


def _sqlite(table: Table, operation: str, connection: BaseDatabaseWrapper, log: str) -> list[str]:
    quote = connection.ops.quote_name
    name = trigger_name(table.name, operation)
    row = "OLD" if operation == "DELETE" else "NEW"
    columns = ", ".join(quote(column) for column in _COLUMNS)
    inserts = []
    for target in table.targets:
        fields = "NULL" if target.field is None else f"json_array({_literal(target.field)})"
        label = _literal(target.label)
        paused = f"NOT EXISTS (SELECT 1 FROM {PAUSE_TABLE} WHERE label = {label})"
        tail = f"{fields}, 0, 'pending', 0, strftime('%Y-%m-%d %H:%M:%f', 'now'), '', ''"
        column = quote(target.column)
        inserts.append(
            f"INSERT INTO {log} ({columns}) SELECT {label}, "
            f"{_literal(table.action(operation))}, json_array({row}.{column}), 1, {tail} "
            f"WHERE {paused};"
        )
        if operation == "UPDATE":
            # A changed pk (or a link moved to another row): the old one too.
            action = "'update'" if table.through else "'delete'"
            inserts.append(
                f"INSERT INTO {log} ({columns}) SELECT {label}, {action}, "
                f"json_array(OLD.{column}), 1, {tail} "
                f"WHERE OLD.{column} IS NOT NEW.{column} AND {paused};"
            )
    body = "\n  ".join(inserts)
    return [
        f"DROP TRIGGER IF EXISTS {quote(name)}",
        f"CREATE TRIGGER {quote(name)} AFTER {operation} ON {quote(table.name)} FOR EACH ROW\n"
        f"BEGIN\n  {body}\nEND",
    ]


def _fingerprint(statements: list[str]) -> str:
    return hashlib.sha1("\n".join(statements).encode()).hexdigest()[:16]


def _normal(sql: str) -> str:
    return " ".join(sql.split())


# -- what the database holds ------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    """An ormbridge trigger found in the database."""

    name: str
    table: str
    """Its table as the database names it (schema-qualified off the ``search_path``)."""
    relation: int | str
    """Its table's identity: the oid (PostgreSQL) or the lower-cased name (SQLite)."""
    fingerprint: str
    """Of the SQL that created it ('' if unknown)."""


@dataclass(frozen=True)
class _Found:
    """A captured table as the database has it now."""

    relation: int | str
    columns: frozenset[str]
    primary: tuple[str, ...]
    partitions: tuple[tuple[str, int], ...] = ()
    """PostgreSQL: its partitions at every level, (name as Django spells it, oid)."""


def _triggers(connection: BaseDatabaseWrapper, cursor: Any) -> list[Trigger]:
    if connection.vendor == "postgresql":
        # tgparentid: clones of a partitioned table's row triggers (ormbridge makes none).
        cursor.execute(
            "SELECT t.tgname, t.tgrelid::regclass::text, t.tgrelid, "
            "coalesce(obj_description(t.tgfoid, 'pg_proc'), '') "
            "FROM pg_trigger t WHERE NOT t.tgisinternal AND t.tgparentid = 0 "
            "AND t.tgname LIKE %s",
            [PREFIX.replace("_", r"\_") + "%"],
        )
        return [
            Trigger(name, table, oid, comment.removeprefix("ormbridge:"))
            for name, table, oid, comment in cursor.fetchall()
        ]
    cursor.execute(
        "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger' AND name LIKE %s "
        "ESCAPE '\\'",
        [PREFIX.replace("_", r"\_") + "%"],
    )
    return [
        Trigger(name, table, table.lower(), _fingerprint([_normal(sql)]))
        for name, table, sql in cursor.fetchall()
    ]


def _find(connection: BaseDatabaseWrapper, cursor: Any, names: list[str]) -> dict[str, _Found]:
    """The tables of ``names`` (``db_table`` spellings) that exist, with their columns."""
    if not names:
        return {}
    if connection.vendor == "postgresql":
        cursor.execute(
            "SELECT n.name, c.oid, "
            "ARRAY(SELECT attname FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 "
            "AND NOT attisdropped), "
            "ARRAY(SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = c.oid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = c.oid AND i.indisprimary), "
            "ARRAY(SELECT CASE WHEN pg_table_is_visible(p.relid) THEN r.relname "
            "ELSE s.nspname || '\".\"' || r.relname END || ' ' || p.relid::oid "
            "FROM pg_partition_tree(c.oid) p JOIN pg_class r ON r.oid = p.relid "
            "JOIN pg_namespace s ON s.oid = r.relnamespace WHERE p.level > 0 ORDER BY 1) "
            "FROM unnest(%s::text[], %s::text[]) AS n(name, quoted) "
            "JOIN pg_class c ON c.oid = to_regclass(n.quoted)",
            [names, [connection.ops.quote_name(name) for name in names]],
        )
        return {
            name: _Found(
                oid,
                frozenset(columns),
                tuple(primary),
                tuple(
                    (entry.rpartition(" ")[0], int(entry.rpartition(" ")[2]))
                    for entry in partitions
                ),
            )
            for name, oid, columns, primary, partitions in cursor.fetchall()
        }
    cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    existing = {name.lower() for (name,) in cursor.fetchall()}
    found = {}
    for name in names:
        if name.lower() not in existing:
            continue
        cursor.execute(f"PRAGMA table_info({connection.ops.quote_name(name)})")
        info = cursor.fetchall()  # cid, name, type, notnull, default, pk (its position)
        primary = tuple(row[1] for row in sorted(info, key=lambda row: row[5]) if row[5])
        found[name] = _Found(name.lower(), frozenset(row[1] for row in info), primary)
    return found


def _log_table(connection: BaseDatabaseWrapper, cursor: Any) -> str | None:
    """The change-log table as the triggers name it, or None while it (or a column the
    triggers write, or SQLite's pause table) is not migrated yet."""
    quote = connection.ops.quote_name
    if connection.vendor == "postgresql":
        cursor.execute(
            "SELECT n.nspname, ARRAY(SELECT attname FROM pg_attribute WHERE attrelid = c.oid "
            "AND attnum > 0 AND NOT attisdropped) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
            [quote(LOG_TABLE)],
        )
        row = cursor.fetchone()
        if row is None or not set(_COLUMNS) <= set(row[1]):
            return None
        return f"{quote(row[0])}.{quote(LOG_TABLE)}"
    found = _find(connection, cursor, [LOG_TABLE, PAUSE_TABLE])
    if len(found) < 2 or not set(_COLUMNS) <= found[LOG_TABLE].columns:
        return None
    return quote(LOG_TABLE)


def _bind(table: Table, found: _Found) -> Table | None:
    """``table`` with the columns its database table has now, or None if it cannot be
    captured as it stands.

    A model's pk column that the table lacks (a ``migrate`` renaming it is under way)
    is the table's own single primary-key column; an m2m table's columns must exist.
    """
    targets = []
    for target in table.targets:
        column = target.column
        if column not in found.columns:
            if table.through or len(found.primary) != 1:
                return None
            column = found.primary[0]
        targets.append(replace(target, column=column))
    return replace(table, targets=tuple(targets))


@dataclass
class _Plan:
    """One table ormbridge captures: what its triggers should be and what they are."""

    table: Table
    exists: bool
    expected: dict[str, tuple[str, list[str]]]
    """name -> (fingerprint, statements); empty if the table cannot be captured as it stands."""
    present: dict[str, Trigger]

    @property
    def state(self) -> str:
        if set(self.present) - set(self.expected):
            return "stale"
        if not self.expected:
            return "missing"
        seen = {
            "missing"
            if name not in self.present
            else "installed"
            if self.present[name].fingerprint == fingerprint
            else "outdated"
            for name, (fingerprint, _) in self.expected.items()
        }
        return seen.pop() if len(seen) == 1 else "partial"


@dataclass
class _Survey:
    log: str | None
    plans: list[_Plan]
    orphans: list[Trigger]
    """ormbridge triggers on tables that are no captured table (nor a partition of one)."""


def _survey(using: str) -> _Survey:
    connection = connections[using]
    with connection.cursor() as cursor:
        log = _log_table(connection, cursor)
        present = _triggers(connection, cursor)
        wanted = tables()
        found = _find(connection, cursor, [table.name for table in wanted])
    on: dict[int | str, dict[str, Trigger]] = {}
    for trigger in present:
        on.setdefault(trigger.relation, {})[trigger.name] = trigger
    vendor = connection.vendor
    plans: list[_Plan] = []
    for table in wanted:
        here = found.get(table.name)
        if here is None:
            plans.append(_Plan(table, False, {}, {}))
            continue
        bound = _bind(table, here)
        parts = [(table, bound, here.relation)]
        parts += [
            (
                replace(table, name=name, partition_of=table.name),
                bound and replace(bound, name=name, partition_of=table.name),
                oid,
            )
            for name, oid in here.partitions
        ]
        for part, bound_part, relation in parts:
            expected = {}
            if bound_part is not None and log is not None:
                for name, statements in definitions(bound_part, connection, log).items():
                    if vendor == "sqlite":
                        fingerprint = _fingerprint([_normal(statements[-1])])
                    else:
                        fingerprint = _fingerprint(statements)
                    expected[name] = (fingerprint, statements)
            plans.append(_Plan(part, True, expected, on.pop(relation, {})))
    orphans = [trigger for triggers in on.values() for trigger in triggers.values()]
    return _Survey(log, plans, sorted(orphans, key=lambda t: (t.table, t.name)))


def installed(using: str) -> dict[str, str]:
    """ormbridge's triggers in the database ``using``: name -> fingerprint ('' if unknown)."""
    connection = connections[using]
    with connection.cursor() as cursor:
        return {trigger.name: trigger.fingerprint for trigger in _triggers(connection, cursor)}


@dataclass(frozen=True)
class TableState:
    table: str
    models: tuple[str, ...]
    state: str
    """``installed``; ``missing``, ``outdated`` or ``partial`` (some of its triggers
    missing or outdated); ``stale`` (ormbridge triggers that are not its own, left by a
    rename: writes logged twice, or under another table's columns); ``orphaned``
    (ormbridge triggers on a table of no registered model: ``models`` is empty)."""
    partition_of: str | None = None
    """For a partition of a captured partitioned table (PostgreSQL): that table."""
    exists: bool = True


def status(using: str, labels: list[str] | None = None) -> list[TableState]:
    """The trigger state of each captured table (of ``labels``' models, if given), its
    partitions, and the tables of no registered model that hold ormbridge triggers."""
    survey = _survey(using)
    states = [
        TableState(
            plan.table.name,
            plan.table.labels,
            plan.state,
            plan.table.partition_of,
            plan.exists,
        )
        for plan in survey.plans
        if labels is None or set(plan.table.labels) & set(labels)
    ]
    if labels is None:
        for table in sorted({trigger.table for trigger in survey.orphans}):
            states.append(TableState(table, (), "orphaned"))
    return states


def install(using: str, labels: list[str] | None = None) -> list[str]:
    """Create or replace the triggers that are missing or outdated, and drop the ones
    that are not a captured table's own (left there by a rename); returns the tables.

    Idempotent: triggers already up to date are left alone. Tables that do not exist
    yet (their migrations have not run), and a change log not migrated yet, are
    skipped. Each table's triggers follow its current columns, and partitions of a
    partitioned table get their own (a statement aimed at a partition fires only its
    triggers).
    """
    connection = connections[using]
    if not supports(connection):
        return []
    done: list[str] = []
    with transaction.atomic(using=using), connection.cursor() as cursor:
        survey = _survey(using)
        for plan in survey.plans:
            if labels is not None and not set(plan.table.labels) & set(labels):
                continue
            if not plan.expected:
                continue
            stale = [trigger for name, trigger in plan.present.items() if name not in plan.expected]
            _drop(connection, cursor, stale)
            changed = bool(stale)
            for name, (fingerprint, statements) in plan.expected.items():
                if name in plan.present and plan.present[name].fingerprint == fingerprint:
                    continue
                for statement in statements:
                    cursor.execute(statement)
                if connection.vendor == "postgresql":
                    cursor.execute(
                        f"COMMENT ON FUNCTION {_function(name, connection, survey.log or '')}() "
                        f"IS 'ormbridge:{fingerprint}'"
                    )
                changed = True
            if changed and plan.table.name not in done:
                done.append(plan.table.name)
        _collect_functions(connection, cursor)
    return done


def _drop(connection: BaseDatabaseWrapper, cursor: Any, triggers: list[Trigger]) -> None:
    quote = connection.ops.quote_name
    for trigger in triggers:
        if connection.vendor == "postgresql":
            cursor.execute(
                f"DROP TRIGGER IF EXISTS {quote(trigger.name)} ON {trigger.table}"
            )  # regclass text: quoted and qualified as needed by the database itself
        else:
            cursor.execute(f"DROP TRIGGER IF EXISTS {quote(trigger.name)}")


def _collect_functions(connection: BaseDatabaseWrapper, cursor: Any) -> None:
    """PostgreSQL: drop ormbridge's trigger functions no trigger executes any more."""
    if connection.vendor != "postgresql":
        return
    cursor.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.proname LIKE %s "
        "AND obj_description(p.oid, 'pg_proc') LIKE 'ormbridge:%%' "
        "AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgfoid = p.oid)",
        [PREFIX.replace("_", r"\_") + "%"],
    )
    for (function,) in cursor.fetchall():
        cursor.execute(f"DROP FUNCTION IF EXISTS {function}")


def uninstall(
    using: str, labels: list[str] | None = None, tables: list[str] | None = None
) -> list[str]:
    """Drop ormbridge's triggers (and their functions); returns the names dropped.

    ``labels``: the triggers on those models' tables (their own, their m2m tables and
    partitions), registered or not. ``tables``: the triggers on those tables, named as
    ``status`` shows them. Neither: every trigger named ``ormbridge_…``.

    Raises:
        LookupError: a label names no installed model, or a table does not exist
            (nothing is dropped).
    """
    connection = connections[using]
    if not supports(connection):
        return []
    with transaction.atomic(using=using), connection.cursor() as cursor:
        present = _triggers(connection, cursor)
        if labels is not None or tables is not None:
            relations = _relations(connection, cursor, labels or [], tables or [])
            present = [trigger for trigger in present if trigger.relation in relations]
        _drop(connection, cursor, present)
        _collect_functions(connection, cursor)
    return sorted(trigger.name for trigger in present)


def _relations(
    connection: BaseDatabaseWrapper, cursor: Any, labels: list[str], names: list[str]
) -> set[int | str]:
    """The identities of the tables of ``labels``' models and of the tables ``names``."""
    from django.apps import apps

    model_names = [name for label in labels for name in model_tables(apps.get_model(label))]
    found = _find(connection, cursor, model_names)
    relations: set[int | str] = set()
    for here in found.values():
        relations.add(here.relation)
        relations.update(oid for _, oid in here.partitions)
    for name in names:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT to_regclass(%s)::oid", [name])
            (relation,) = cursor.fetchone()
        else:
            relation = name.lower() if _find(connection, cursor, [name]) else None
        if relation is None:
            raise LookupError(f"no table {name!r} in database {connection.alias!r}.")
        relations.add(relation)
    return relations


def prune(using: str) -> list[Trigger]:
    """Drop the ormbridge triggers on tables of no registered model (and their functions);
    returns them. They keep logging a model nobody watches, or break writes to a table
    whose columns changed."""
    connection = connections[using]
    if not supports(connection):
        return []
    with transaction.atomic(using=using), connection.cursor() as cursor:
        orphans = _survey(using).orphans
        _drop(connection, cursor, orphans)
        _collect_functions(connection, cursor)
    return orphans


# -- during migrate ---------------------------------------------------------------------

# First keywords of statements that change a schema, and of statements that write no row.
_SCHEMA = frozenset({"ALTER", "CREATE", "DROP", "RENAME"})
_NO_ROWS = frozenset(
    {
        *("SELECT", "SHOW", "SET", "RESET", "PRAGMA", "SAVEPOINT", "RELEASE", "ROLLBACK"),
        *("BEGIN", "COMMIT", "END", "START", "EXPLAIN", "VALUES", "LISTEN", "NOTIFY", "LOCK"),
        *("ANALYZE", "VACUUM", "COMMENT", "GRANT", "REVOKE"),
    }
)
_KEYWORD = re.compile(r"(?:\s+|--[^\n]*\n?|/\*.*?\*/|\()*([A-Za-z]+)", re.S)


def _keyword(sql: object) -> str:
    found = _KEYWORD.match(sql if isinstance(sql, str) else str(sql))
    return found.group(1).upper() if found else ""


class MigrationGuard:
    """An ``execute_wrapper`` on the connection ``migrate`` runs on, between
    ``pre_migrate`` and ``post_migrate``.

    Django sends no signal between migrations, and a schema change can make the
    triggers wrong at once: a renamed pk column breaks every write (the functions
    name it), a renamed table keeps its old triggers beside the new ones. So after
    a schema statement (``ALTER``, ``CREATE``, ``DROP``, ``RENAME``), before the next
    statement that may write rows, the triggers are brought in line with the
    database as it is (:func:`sync`): a data migration's writes are captured.
    Statements that write no row (catalogue reads, savepoints) pass untouched, so
    Django's own introspection in the middle of an operation does not trigger it.

    A schema statement on the change log or the pause table (ormbridge's own
    migrations) first drops every trigger: they name those tables, and SQLite refuses
    to rename a table (the last step of rebuilding one to alter a column) while a
    trigger names a table that does not exist, as the log does midway through its own
    rebuild. The next :func:`sync` puts them back, once the log can take rows again.
    """

    def __init__(self, using: str) -> None:
        self.using = using
        self.schema_changed = False
        self.busy = False
        self.installed: list[str] = []
        self.pruned: list[Trigger] = []

    def __call__(
        self, execute: Any, sql: Any, params: Any, many: bool, context: dict[str, Any]
    ) -> Any:
        if self.busy:
            return execute(sql, params, many, context)
        keyword = _keyword(sql)
        if self.schema_changed and keyword not in _SCHEMA and keyword not in _NO_ROWS:
            self.schema_changed = False
            self.busy = True
            try:
                installed, pruned = sync(self.using)
            finally:
                self.busy = False
            self.installed += [name for name in installed if name not in self.installed]
            self.pruned += pruned
        if keyword in _SCHEMA and _names_log(sql):
            self.busy = True
            try:
                uninstall(self.using)
            finally:
                self.busy = False
        result = execute(sql, params, many, context)
        if keyword in _SCHEMA:
            self.schema_changed = True
        return result


def _names_log(sql: object) -> bool:
    """Whether a statement names the change log or the pause table (the triggers' own)."""
    text = sql if isinstance(sql, str) else str(sql)
    return LOG_TABLE in text or PAUSE_TABLE in text


def sync(using: str) -> tuple[list[str], list[Trigger]]:
    """Bring every captured table's triggers in line with the database as it is, and drop
    the ones on tables of no registered model: (tables installed, triggers pruned)."""
    return install(using), prune(using)


def guard_migration(using: str) -> MigrationGuard | None:
    """Watch the migrating connection ``using`` (``pre_migrate``); see :class:`MigrationGuard`."""
    connection = connections[using]
    if not supports(connection):
        return None
    end_migration(using)
    guard = MigrationGuard(using)
    connection.execute_wrappers.append(guard)
    return guard


def end_migration(using: str) -> MigrationGuard | None:
    """Stop watching ``using`` (``post_migrate``); returns the guard that watched it."""
    wrappers = connections[using].execute_wrappers
    for wrapper in list(wrappers):
        if isinstance(wrapper, MigrationGuard):
            wrappers.remove(wrapper)
            return wrapper
    return None


@contextlib.contextmanager
def pause(using: str, *paused: type[models.Model]) -> Iterator[None]:
    """Stop the capture triggers logging these models for the statements inside the block.

    For writers that log their changes themselves (the bulk helpers). Use it
    inside the writer's own atomic block: when the block fails, its rollback
    takes the pause with it.
    """
    connection = connections[using]
    labels = sorted({registry.label_of(model) for model in paused})
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
