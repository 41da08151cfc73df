"""What the commit path's execute wrapper notes for a statement (issue 16, item 9): the
classifier of ``ormbridge.commit``, called with a table of SQL texts and no database.

The unit tier's half of ``tests/test_commit_statements.py``, which checks on real
databases that every such write is read fresh right after its commit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ormbridge import capture, commit, redis_store

pytestmark = pytest.mark.unit


@pytest.fixture
def noted(monkeypatch) -> Callable[..., set[str]]:
    """``noted(sql, params)``: the keys the execute wrapper notes for ``sql``, run by nobody."""

    class Connection:
        alias = "default"

    keys: list[str] = []
    monkeypatch.setattr(commit, "note", lambda found, using: keys.extend(found))

    def run(sql: str, params: Any = None, many: bool = False) -> set[str]:
        keys.clear()
        commit.note_writes(lambda *args: None, sql, params, many, {"connection": Connection()})
        return set(keys)

    return run


def keys_of(kinds: dict[str, str | list[int]]) -> set[str]:
    """The keys noted for ``kinds``: model name -> ``"model"``, ``"querysets"`` or pks."""
    keys: set[str] = set()
    for name, kind in kinds.items():
        label = f"shop.{name}"
        keys.add(redis_store.generation_key(label))
        if kind == "model":  # every instance (the epoch) and queryset
            keys.add(redis_store.epoch_key(label))
        elif kind != "querysets":  # these rows' instances, and querysets
            keys.update(redis_store.token_key(label, pk) for pk in kind)
    return keys


def case(sql: str, params: list[Any] | None = None, **kinds: str | list[int]) -> Any:
    return pytest.param(sql, params, kinds, id=" ".join(sql.split())[:70])


M = "model"
Q = "querysets"

CLASSIFIED = [
    # the statements of save() and delete(): exact rows
    case(
        'UPDATE "shop_product" SET "price" = %s WHERE "shop_product"."id" = %s',
        ["2", 5],
        product=[5],
    ),
    case(
        'UPDATE "shop_product" SET "stock" = %s WHERE "shop_product"."id" IN (%s, %s)',
        [1, 5, 6],
        product=[5, 6],
    ),
    case('DELETE FROM "shop_order" WHERE "shop_order"."id" IN (%s, %s)', [7, 8], order=[7, 8]),
    case('DELETE FROM "shop_order" WHERE "shop_order"."id" = %s', [7], order=[7]),
    case(
        "UPDATE `shop_product` SET `price` = %s WHERE `shop_product`.`id` = %s",
        ["2", 5],
        product=[5],
    ),
    case(
        '/* a */ UPDATE "shop_product" SET "price" = %s WHERE "shop_product"."id" = %s',
        ["2", 5],
        product=[5],
    ),
    case(
        'UPDATE "shop_product" SET "price" = %s WHERE "shop_product"."id" = %s /*a=\'b\'*/;',
        ["2", 5],
        product=[5],
    ),
    case(
        'UPDATE "public"."shop_product" SET "price" = %s WHERE "public"."shop_product"."id" = %s',
        ["2", 5],
        product=[5],
    ),
    case(
        'UPDATE "shop_digitalproduct" SET "download_url" = %s '
        'WHERE "shop_digitalproduct"."product_ptr_id" = %s',
        ["u", 5],
        digitalproduct=[5],
    ),
    case(
        'UPDATE "shop_order" SET "quantity" = (SELECT U0."stock" FROM "shop_product" U0 '
        'WHERE U0."id" = %s) WHERE "shop_order"."id" = %s',
        [1, 2],
        order=[2],
    ),
    case(
        'EXPLAIN ANALYZE UPDATE "shop_product" SET "price" = %s WHERE "shop_product"."id" = %s',
        ["2", 5],
        product=[5],
    ),
    # any other update or delete: every instance and queryset of the model
    case(
        'UPDATE "shop_product" SET "price" = %s WHERE "shop_product"."sku" = %s',
        ["2", "a"],
        product=M,
    ),
    case(
        'UPDATE "shop_product" SET "price" = %s FROM "shop_order" WHERE "shop_order"."id" = %s',
        ["2", 5],
        product=M,
    ),
    case("UPDATE shop_product AS p SET price = %s WHERE p.id = %s", ["2", 5], product=M),
    case(
        'UPDATE ONLY "shop_product" SET "price" = %s WHERE "shop_product"."id" = %s',
        ["2", 5],
        product=M,
    ),
    case(
        'UPDATE OR REPLACE "shop_product" SET "sku" = %s WHERE "shop_product"."id" = %s',
        ["a", 5],
        product=M,
    ),
    case("update shop_product set price = %s where id = %s", ["2", 5], product=M),
    case('UPDATE "shop_product" SET "price" = 1 -- WHERE "shop_product"."id" = %s', [5], product=M),
    case("UPDATE `shop_product` SET `price` = 1 # WHERE `shop_product`.`id` = %s", [5], product=M),
    case('UPDATE "shop_product" SET "price" = 1 WHERE "shop_product"."id" = %s', [[5]], product=M),
    case("UPDATE [shop_product] SET price = 2", product=M),
    case("UPDATE public.shop_product SET price = 2", product=M),
    case("UPDATE main . shop_product SET price = 2", product=M),
    case("-- a\n-- b\n  /* c */ update\tshop_product\nset price = 2", product=M),
    case(
        'UPDATE "shop_order" SET "quantity" = %s WHERE "shop_order"."product_id" IN '
        '(SELECT U0."id" FROM "shop_product" U0 WHERE U0."sku" = %s)',
        [5, "a"],
        order=M,
    ),
    case(
        'DELETE FROM "shop_order" WHERE "shop_order"."product_id" IN '
        '(SELECT U0."id" FROM "shop_product" U0)',
        order=M,
    ),
    case('DELETE FROM "shop_order";', order=M),
    case(
        "DELETE FROM shop_order USING shop_product WHERE shop_order.product_id = shop_product.id",
        order=M,
    ),
    case("DELETE FROM ONLY shop_order WHERE id = 1", order=M),
    case("delete from main.shop_order", order=M),
    # MySQL's multi-table forms: every table they name
    case(
        "DELETE `shop_order` FROM `shop_order` INNER JOIN `shop_product` "
        "ON (`shop_order`.`product_id` = `shop_product`.`id`)",
        order=M,
        product=M,
    ),
    case(
        "UPDATE shop_order JOIN shop_product ON shop_order.product_id = shop_product.id "
        "SET shop_product.stock = 0",
        order=M,
        product=M,
    ),
    case("UPDATE shop_order, shop_product SET shop_product.stock = 0", order=M, product=M),
    case(
        "DELETE FROM shop_order, shop_product USING shop_order JOIN shop_product",
        order=M,
        product=M,
    ),
    # inserts: new rows, querysets only, unless a conflict clause can change existing rows
    case(
        'INSERT INTO "shop_product" ("sku", "price") VALUES (%s, %s) RETURNING "shop_product"."id"',
        ["a", "1"],
        product=Q,
    ),
    case(
        'INSERT INTO "shop_product" ("sku") SELECT * FROM UNNEST((%s)::varchar[])',
        [["a"]],
        product=Q,
    ),
    case("insert into shop_tag (name) values (%s)", ["a"], tag=Q),
    case('INSERT INTO "shop_order" ("product_id") SELECT U0."id" FROM "shop_product" U0', order=Q),
    case('INSERT INTO "shop_product" ("sku") VALUES (%s) ON CONFLICT DO NOTHING', ["a"], product=Q),
    case('INSERT OR IGNORE INTO "shop_product" ("sku") VALUES (%s)', ["a"], product=Q),
    case("INSERT IGNORE INTO `shop_product` (`sku`) VALUES (%s)", ["a"], product=Q),
    case(
        'INSERT INTO "shop_product" ("sku") VALUES (%s) ON CONFLICT DO/**/UPDATE SET sku = 1',
        ["a"],
        product=M,
    ),
    case(
        'INSERT INTO "shop_product" ("sku", "price") VALUES (%s, %s) '
        'ON CONFLICT("sku") DO UPDATE SET "price" = EXCLUDED."price"',
        ["a", "1"],
        product=M,
    ),
    case(
        'INSERT OR REPLACE INTO "shop_product" ("id", "sku") VALUES (%s, %s)', [5, "a"], product=M
    ),
    case("REPLACE INTO `shop_product` (`id`, `sku`) VALUES (%s, %s)", [5, "a"], product=M),
    case(
        "INSERT INTO `shop_product` (`sku`, `price`) VALUES (%s, %s) AS `new` "
        "ON DUPLICATE KEY UPDATE `price` = `new`.`price`",
        ["a", "1"],
        product=M,
    ),
    # m2m tables: both ends' querysets
    case(
        'INSERT OR IGNORE INTO "shop_product_tags" ("product_id", "tag_id") VALUES (%s, %s)',
        [1, 2],
        product=Q,
        tag=Q,
    ),
    case(
        'INSERT INTO "shop_product_tags" ("product_id", "tag_id") VALUES (%s, %s) '
        "ON CONFLICT DO NOTHING",
        [1, 2],
        product=Q,
        tag=Q,
    ),
    case(
        'DELETE FROM "shop_product_tags" WHERE ("shop_product_tags"."product_id" = %s '
        'AND "shop_product_tags"."tag_id" IN (%s))',
        [1, 2],
        product=Q,
        tag=Q,
    ),
    case(
        'DELETE FROM "shop_product_tags" WHERE "shop_product_tags"."id" IN (%s)',
        [1],
        product=Q,
        tag=Q,
    ),
    # TRUNCATE: every table it names
    case(
        'TRUNCATE "shop_order", "shop_tag", "shop_product_tags" RESTART IDENTITY;',
        order=M,
        tag=M,
        product=Q,
    ),
    case("truncate table only shop_tag", tag=M),
    case('TRUNCATE "django_session", "shop_note"', note=M),
    # MERGE, CTEs, several statements, EXPLAIN ANALYZE, DDL, blocks: every table they name
    case(
        "MERGE INTO shop_product p USING shop_order o ON p.id = o.product_id "
        "WHEN MATCHED THEN UPDATE SET stock = 0",
        product=M,
    ),
    case(
        "WITH u AS (UPDATE shop_product SET price = 1 RETURNING id) SELECT count(*) FROM u",
        product=M,
    ),
    case(
        "WITH d AS (DELETE FROM shop_order RETURNING product_id) "
        "UPDATE shop_product SET stock = 0 WHERE id IN (SELECT product_id FROM d)",
        order=M,
        product=M,
    ),
    case(
        "with x as (select %s as price) update shop_product set price = (select price from x)",
        ["1"],
        product=M,
    ),
    case(
        "(WITH i AS (INSERT INTO shop_tag (name) VALUES ('a') RETURNING id) SELECT id FROM i)",
        tag=M,
    ),
    case("SELECT 1; UPDATE shop_product SET price = 1", product=M),
    case("SELECT ';'; DELETE FROM shop_order", order=M),
    case("EXPLAIN (ANALYZE, BUFFERS) DELETE FROM shop_order", order=M),
    case('ALTER TABLE "shop_product" ADD COLUMN "x" integer DEFAULT 0', product=M),
    case("DO $$ BEGIN UPDATE shop_order SET quantity = 2; END $$", order=M),
    case("COPY shop_tag FROM STDIN", tag=M),
    # read-only statements: nothing
    case(
        'SELECT "shop_product"."id" FROM "shop_product" WHERE "shop_product"."id" = %s FOR UPDATE',
        [5],
    ),
    case('SELECT "shop_product"."id" FROM "shop_product" FOR NO KEY UPDATE OF "shop_product"'),
    case(
        '(SELECT "shop_product"."id" FROM "shop_product") '
        'UNION (SELECT "shop_tag"."id" FROM "shop_tag")'
    ),
    case("  -- the list\n select * from shop_product"),
    case("WITH RECURSIVE t(n) AS (SELECT 1) SELECT * FROM shop_product, t"),
    case("WITH p AS (SELECT * FROM shop_product FOR UPDATE) SELECT * FROM p"),
    case("EXPLAIN SELECT * FROM shop_product"),
    case("EXPLAIN UPDATE shop_product SET price = 1"),  # not run
    case("EXPLAIN QUERY PLAN DELETE FROM shop_order"),
    case('SAVEPOINT "s140_x1"'),
    case('RELEASE SAVEPOINT "s140_x1"'),
    case('ROLLBACK TO SAVEPOINT "s140_x1"'),
    case("SET LOCAL statement_timeout = 0"),
    case("SELECT set_config(%s, %s, true)", ["ormbridge.pause", ",shop.product,"]),
    case("SHOW search_path"),
    case('PRAGMA table_info("shop_product")'),
    case("PRAGMA foreign_keys = ON"),
    case("VALUES (1), (2)"),
    case("TABLE shop_product"),
    case("LOCK TABLE shop_product IN SHARE MODE"),
    case("BEGIN"),
    case("COMMIT"),
    # tables that are not captured, or only look like captured ones: nothing
    case(
        'UPDATE "auth_group" SET "name" = %s WHERE "auth_group"."id" IN '
        '(SELECT U0."stock" FROM "shop_product" U0)',
        ["a"],
    ),
    case('INSERT INTO "ormbridge_changebatch" ("model") VALUES (%s)', ["shop.product"]),
    case('UPDATE "shop_product_x" SET "a" = 1'),
    case("TRUNCATE shop_productx, xshop_product, shop_product_tagsx"),
    case("ALTER TABLE auth_group ADD COLUMN shop_productx integer"),
]


@pytest.mark.parametrize(("sql", "params", "kinds"), CLASSIFIED)
def test_each_statement_notes_what_it_writes(noted, sql, params, kinds):
    assert noted(sql, params) == keys_of(kinds)


def test_a_truncate_cascade_notes_every_captured_model(noted):
    labels = {target.label for table in capture.tables() for target in table.targets}
    assert len(labels) > 2
    keys = {redis_store.generation_key(label) for label in labels}
    keys |= {redis_store.epoch_key(label) for label in labels}
    assert noted('TRUNCATE "shop_tag" CASCADE') == keys


def test_an_executemany_of_the_save_statement_notes_the_whole_model(noted):
    sql = 'UPDATE "shop_product" SET "price" = %s WHERE "shop_product"."id" = %s'
    assert noted(sql, [["2", 5], ["3", 6]], many=True) == keys_of({"product": M})


def test_a_paused_model_is_left_to_its_bulk_helper_and_the_statements_others_are_noted(
    noted, monkeypatch
):
    monkeypatch.setattr(capture, "paused", lambda label: label == "shop.order")
    assert noted('TRUNCATE "shop_order", "shop_tag"') == keys_of({"tag": M})
    assert noted('UPDATE "shop_order" SET "quantity" = 1') == set()


@pytest.fixture
def odd_tables(monkeypatch) -> Iterator[None]:
    """Captured tables named with a space, and in a schema (``db_table = 'ledger"."entry'``)."""
    tables = [
        capture.Table("my table", (capture.Target("shop.note", "id"),)),
        capture.Table('ledger"."entry', (capture.Target("shop.order", "id"),)),
    ]
    monkeypatch.setattr(capture, "tables", lambda: tables)
    commit.tables_changed()
    yield
    monkeypatch.undo()
    commit.tables_changed()


ODD = [
    case('UPDATE "my table" SET "x" = %s WHERE "my table"."id" = %s', ["a", 3], note=[3]),
    case('UPDATE "my table" SET "x" = 1', note=M),
    case('update "MY TABLE" set x = 1', note=M),
    case('DELETE FROM "ledger"."entry" WHERE "ledger"."entry"."id" IN (%s)', [4], order=[4]),
    case("delete from ledger.entry", order=M),
    case("delete from entry", order=M),  # on the search path
    case('TRUNCATE "my table", ledger.entry', note=M, order=M),
    case('WITH u AS (UPDATE "my table" SET x = 1 RETURNING 1) SELECT 1', note=M),
    case('INSERT INTO "ledger"."entry" ("a") VALUES (1)', order=Q),
    case('UPDATE "my" SET "x" = 1'),
    case('UPDATE "table" SET "x" = 1'),
    case("UPDATE ledger.entries SET x = 1"),
    case('SELECT * FROM "my table"'),
]


@pytest.mark.parametrize(("sql", "params", "kinds"), ODD)
def test_tables_named_with_a_space_or_a_schema_are_recognised(
    odd_tables, noted, sql, params, kinds
):
    assert noted(sql, params) == keys_of(kinds)
