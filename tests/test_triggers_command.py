"""manage.py ormbridge_triggers: install, uninstall and show the capture triggers."""

import subprocess
from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection

import ormbridge
from ormbridge import capture, registry
from ormbridge.checks import check_triggers
from shop.models import Category, Product
from tests import commands
from tests.factories import log_mark, logged_since
from tests.testapp.models import Seat

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases]

HINT = (
    "CommandError: some captured tables lack their triggers or have stale ones; "
    "run: manage.py ormbridge_triggers install --database default"
)


def triggers_per_table() -> int:
    """Triggers per captured table: insert, update, delete (and on PostgreSQL truncate, and
    the row trigger of updates that change a pk)."""
    return 5 if connection.vendor == "postgresql" else 3


@pytest.fixture(autouse=True)
def restore_triggers():
    """Every test leaves the triggers as migrate installed them."""
    yield
    capture.install("default")
    assert {state.state for state in capture.status("default")} == {"installed"}


def triggers(args: str = "status") -> subprocess.CompletedProcess:
    return commands.run("ormbridge_triggers", *args.split())


def states(stdout: str) -> dict[str, str]:
    """Table -> state, from the lines of ``status``."""
    return {line.split()[0]: line.split()[1] for line in stdout.splitlines() if line.strip()}


def all_tables() -> list[str]:
    return [table.name for table in capture.tables()]


def database_triggers() -> list[str]:
    """ormbridge's triggers in the schema, read from the catalogue itself."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE %s",
                [r"ormbridge\_%"],
            )
        else:
            cursor.execute(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE %s "
                "ESCAPE '\\'",
                [r"ormbridge\_%"],
            )
        return sorted(name for (name,) in cursor.fetchall())


def database_functions() -> list[str]:
    """ormbridge's trigger functions (PostgreSQL; SQLite triggers have none)."""
    if connection.vendor != "postgresql":
        return []
    with connection.cursor() as cursor:
        cursor.execute("SELECT proname FROM pg_proc WHERE proname LIKE %s", [r"ormbridge\_%"])
        return sorted(name for (name,) in cursor.fetchall())


def test_status_lists_every_captured_table_as_installed():
    done = triggers("status")
    assert done.returncode == 0, done.stderr
    assert states(done.stdout) == dict.fromkeys(all_tables(), "installed")
    assert {"shop_product", "shop_product_tags", "shop_order"} <= set(states(done.stdout))
    tags = next(line for line in done.stdout.splitlines() if line.startswith("shop_product_tags"))
    assert tags.split(maxsplit=2)[2] == "shop.product, shop.tag"  # both ends are logged
    assert len(database_triggers()) == triggers_per_table() * len(all_tables())


def test_uninstall_leaves_no_trigger_and_no_function():
    assert database_triggers() and (database_functions() or connection.vendor == "sqlite")
    done = triggers("uninstall --database default")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dropped {triggers_per_table() * len(all_tables())} triggers"
    assert database_triggers() == []
    assert database_functions() == []
    assert capture.installed("default") == {}
    mark = log_mark()
    Category.objects.create(name="not seen")
    assert not logged_since(mark).exists()


def test_install_is_idempotent():
    capture.uninstall("default")
    first = triggers("install")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == (
        f"installed triggers on {len(all_tables())} tables: {', '.join(all_tables())}"
    )
    second = triggers("install")
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "installed triggers on 0 tables (all up to date)"
    assert len(database_triggers()) == triggers_per_table() * len(all_tables())
    mark = log_mark()
    Category.objects.create(name="seen again")
    assert [(row.model, row.action) for row in logged_since(mark)] == [("shop.category", "create")]


def test_status_after_uninstall_exits_non_zero_with_one_readable_line():
    capture.uninstall("default")
    done = triggers("status")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [HINT]
    assert states(done.stdout) == dict.fromkeys(all_tables(), "missing")


def test_a_model_can_be_uninstalled_and_installed_alone():
    done = triggers("uninstall shop.Product")
    assert done.returncode == 0, done.stderr
    # its table and its m2m table
    assert done.stdout.strip() == f"dropped {2 * triggers_per_table()} triggers"
    status = triggers("status")
    assert status.returncode == 1
    expected = dict.fromkeys(all_tables(), "installed")
    expected.update(shop_product="missing", shop_product_tags="missing")
    assert states(status.stdout) == expected
    only = triggers("status shop.Order")
    assert (only.returncode, states(only.stdout)) == (0, {"shop_order": "installed"})

    done = triggers("install shop.Product")
    assert done.stdout.strip() == "installed triggers on 2 tables: shop_product, shop_product_tags"
    assert triggers("status").returncode == 0


def tamper_with(table: str, operation: str) -> None:
    """Make a trigger differ from what this version of ormbridge installs."""
    name = capture.trigger_name(table, operation)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"COMMENT ON FUNCTION \"{name}\"() IS 'ormbridge:an-older-version'")
        else:
            cursor.execute(f'DROP TRIGGER "{name}"')
            cursor.execute(
                f'CREATE TRIGGER "{name}" AFTER {operation} ON "{table}" FOR EACH ROW '
                "BEGIN SELECT 1; END"
            )


@pytest.mark.parametrize("every,state", [(False, "partial"), (True, "outdated")])
def test_an_outdated_trigger_is_reported_and_replaced_by_install(every, state):
    operations = list(capture.OPERATIONS)[: triggers_per_table()]
    for operation in operations if every else operations[:1]:
        tamper_with("shop_product", operation)
    status = triggers("status")
    assert status.returncode == 1
    assert states(status.stdout)["shop_product"] == state
    assert status.stderr.strip().splitlines() == [HINT]
    done = triggers("install")
    assert done.stdout.strip() == "installed triggers on 1 tables: shop_product"
    assert triggers("status").returncode == 0
    mark = log_mark()
    Category.objects.create(name="c")
    product = Product.objects.create(sku="s", name="n", category=Category.objects.get(), price=1)
    assert [(row.model, row.action, row.pks) for row in logged_since(mark, "shop.product")] == [
        ("shop.product", "create", [product.pk])
    ]


@pytest.mark.parametrize(
    "args,message",
    [
        ("install shop.Nope", "unknown model 'shop.Nope'; use app_label.ModelName."),
        ("uninstall nodot", "unknown model 'nodot'; use app_label.ModelName."),
        ("status auth.Group", "Group is not registered with ormbridge."),
        ("uninstall --database nope", "unknown database 'nope'; known: default."),
    ],
)
def test_bad_input_exits_with_one_line_and_changes_nothing(args, message):
    done = triggers(args)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("CommandError: ") and line.endswith(message), line
    assert {state.state for state in capture.status("default")} == {"installed"}


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_without_database_it_covers_every_database_holding_a_change_log(second_database):
    """Issue 17, item 9: only "default" was looked at; "other" holds seconddb.Item's rows
    and a change log, and tables it does not hold are not "missing" there."""
    capture.uninstall(second_database)
    try:
        done = triggers("status")
        assert done.returncode == 1, done.stdout
        assert done.stderr.strip().splitlines() == [
            "CommandError: some captured tables lack their triggers or have stale ones; "
            "run: manage.py ormbridge_triggers install --database other"
        ]
        lines = done.stdout.splitlines()
        other = lines[lines.index("database other:") + 1 :]
        assert states("\n".join(other)) == {"seconddb_item": "missing"}
        done = triggers("install")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            "default: installed triggers on 0 tables (all up to date)",
            "other: installed triggers on 1 tables: seconddb_item",
        ]
        assert triggers("status").returncode == 0
        assert triggers("status --database other").stdout.split() == [
            "seconddb_item", "installed", "seconddb.item"
        ]  # fmt: skip
    finally:
        capture.install(second_database)


@pytest.fixture
def seat_in_the_registry():
    """testapp.Seat (a composite primary key) in the registry past register()'s refusal,
    as an earlier version let it in."""
    registry._registry["testapp.seat"] = registry.Options()
    for listener in registry._listeners:
        listener()
    try:
        yield
    finally:
        del registry._registry["testapp.seat"]
        for listener in registry._listeners:
            listener()


def test_install_never_gives_a_composite_primary_key_table_triggers(seat_in_the_registry):
    capture.install("default")
    Seat.objects.create(row="A", number=1)  # its table's writes still work
    assert Seat.objects.count() == 1
    assert "testapp_seat" not in all_tables()
    assert not [name for name in database_triggers() if "testapp_seat" in name]


# -- triggers left behind by a model no longer registered -----------------------------

USER_TABLES = ["auth_user", "auth_user_groups", "auth_user_user_permissions"]


@pytest.fixture
def user_registered_then_not():
    """auth.User registered, its triggers installed, then registered no more (as after a
    change of ORMBRIDGE["MODELS"]): its tables keep the triggers."""
    saved = dict(registry._registry)
    ormbridge.register(User)
    capture.install("default")
    registry._registry.clear()
    registry._registry.update(saved)
    for listener in registry._listeners:
        listener()
    yield
    capture.uninstall("default", ["auth.user"])


def user_triggers() -> list[str]:
    return [name for name in database_triggers() if "auth_user" in name]


def test_triggers_of_an_unregistered_model_are_shown_as_orphaned(user_registered_then_not):
    assert len(user_triggers()) == 3 * triggers_per_table()
    status = triggers("status")
    assert status.returncode == 1
    assert {table: states(status.stdout)[table] for table in USER_TABLES} == dict.fromkeys(
        USER_TABLES, "orphaned"
    )
    [line] = status.stderr.strip().splitlines()
    assert "manage.py ormbridge_triggers prune" in line and "auth_user" in line


def test_triggers_of_an_unregistered_model_are_named_by_w009(user_registered_then_not):
    messages = check_triggers(databases=["default"])
    assert {message.id for message in messages} == {"ormbridge.W009"}
    assert sorted(message.msg.split("'")[1] for message in messages) == USER_TABLES
    assert all("ormbridge_triggers prune" in message.hint for message in messages)


def test_an_unregistered_models_triggers_can_be_uninstalled_by_its_label(user_registered_then_not):
    done = triggers("uninstall auth.User")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dropped {3 * triggers_per_table()} triggers"
    assert user_triggers() == []
    assert triggers("status").returncode == 0


def test_one_table_of_an_unregistered_model_can_be_uninstalled_alone(user_registered_then_not):
    done = triggers("uninstall --table auth_user_groups")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dropped {triggers_per_table()} triggers"
    orphaned = [table for table, state in states(triggers("status").stdout).items()
                if state == "orphaned"]  # fmt: skip
    assert sorted(orphaned) == ["auth_user", "auth_user_user_permissions"]


def test_uninstalling_a_table_that_does_not_exist_exits_with_one_line():
    done = triggers("uninstall --table no_such_table")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "CommandError: no table 'no_such_table' in database 'default'."
    ]


def test_prune_drops_the_triggers_of_tables_of_no_registered_model(user_registered_then_not):
    done = triggers("prune")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"dropped {3 * triggers_per_table()} triggers on {', '.join(USER_TABLES)}"
    )
    assert user_triggers() == []
    mark = log_mark()
    User.objects.create_user("ann")
    assert not logged_since(mark).exists()


def test_migrate_drops_orphaned_triggers_and_says_so(user_registered_then_not):
    out = StringIO()
    call_command("migrate", verbosity=1, stdout=out)
    assert user_triggers() == []
    assert (
        f"ormbridge: dropped {3 * triggers_per_table()} capture triggers left on tables of no "
        f"registered model ({', '.join(USER_TABLES)}) in database 'default'."
    ) in out.getvalue()
