"""Model tables: which registered models cover a read of each, and which a SQL text names.

A read of a table is *covered* by the registered models whose tokens every
change to it kills: a registered model's own table by its concrete model, a
many-to-many table by the registered models at its ends. Which tables a
statement reads is found in its text (:func:`tables_in`), so joins,
subqueries, combined queries and a backend's follow-up queries are all seen.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

from django.apps import apps

from ormbridge import registry
from ormbridge.registry import label_of

__all__ = ["covering", "owners", "tables_in"]


@functools.cache
def owners() -> tuple[dict[str, frozenset[str]], dict[str, str]]:
    """Which registered models' tokens cover a read of each table (none: a table whose
    changes ormbridge does not capture), and the model label each table belongs to.

    A registered model's table is covered by its concrete model; a many-to-many
    table by the registered models at its ends, when it is the table of a
    registered model's relation (the capture logs its changes for them).
    ContentType's table is left out: Django caches its rows for the life of a
    process anyway.
    """
    covered_by: dict[str, frozenset[str]] = {}
    names: dict[str, str] = {}
    immutable = _content_types_table()
    for model in apps.get_models(include_auto_created=True):
        meta = model._meta
        if meta.proxy or meta.db_table == immutable:
            continue
        names[meta.db_table] = meta.label_lower
        watched = registry.is_registered(model) and not meta.auto_created
        covered_by[meta.db_table] = frozenset([label_of(model)] if watched else [])
    for model in registry.registered_models():
        for field in model._meta.many_to_many:
            through: Any = field.remote_field.through
            if isinstance(through, str):  # not resolved: the model is not loaded
                continue
            ends: set[str] = set()
            for fk in through._meta.fields:
                end: Any = fk.related_model
                if fk.is_relation and not isinstance(end, str) and registry.is_registered(end):
                    ends.add(label_of(end))
            table = through._meta.db_table
            covered_by[table] = covered_by.get(table, frozenset()) | ends
    return covered_by, names


def _content_types_table() -> str | None:
    if not apps.is_installed("django.contrib.contenttypes"):
        return None
    return apps.get_model("contenttypes", "ContentType")._meta.db_table


_IDENTIFIER = re.compile(r'"((?:[^"]|"")+)"|`((?:[^`]|``)+)`|([A-Za-z_][\w$]*)')


@functools.cache
def _tables_finder() -> tuple[dict[str, str], dict[str, str], re.Pattern[str] | None]:
    """Model tables by their lower-cased name; schema-qualified ones (a ``db_table`` of
    ``'schema"."table'``) by their lower-cased quoted and bare spellings, and a pattern
    finding those in SQL."""
    _, names = owners()
    simple = {table.lower(): table for table in names if '"."' not in table}
    dotted: dict[str, str] = {}
    for table in names:
        if '"."' in table:
            dotted[f'"{table}"'.lower()] = table
            dotted[table.replace('"', "").lower()] = table
    if not dotted:
        return simple, dotted, None
    pattern = "|".join(re.escape(spelling) for spelling in sorted(dotted, key=len, reverse=True))
    return simple, dotted, re.compile(pattern, re.IGNORECASE)


@functools.lru_cache(maxsize=4096)
def tables_in(sql: str) -> frozenset[str]:
    """The model tables ``sql`` names, quoted (``"t"``, `` `t` ``) or not: a word that
    is also a table's name counts, so more is found than read, which is safe."""
    simple, dotted, pattern = _tables_finder()
    found: set[str] = set()
    for match in _IDENTIFIER.finditer(sql):
        name = next(group for group in match.groups() if group is not None)
        table = simple.get(name.replace('""', '"').replace("``", "`").lower())
        if table is not None:
            found.add(table)
    if pattern is not None:
        found.update(dotted[match.group(0).lower()] for match in pattern.finditer(sql))
    return frozenset(found)


def covering(tables: Iterable[str], what: str) -> set[str]:
    """The registered models whose tokens cover reads of ``tables``.

    Raises:
        LookupError: one of them is a table of a model ormbridge does not watch.
    """
    covered_by, names = owners()
    labels: set[str] = set()
    for table in tables:
        found = covered_by.get(table, frozenset())
        if table in names and not found:
            raise LookupError(
                f"{what}: the query reads {names[table]}, which is not registered with "
                "ormbridge, so its changes would not invalidate the cached result."
            )
        labels |= found
    return labels


def _clear_caches() -> None:
    owners.cache_clear()
    _tables_finder.cache_clear()
    tables_in.cache_clear()


registry.on_change(_clear_caches)
