"""manage.py ormbridge_status: what the pipeline is doing, as text or JSON, as a health check."""

import json
import re
from datetime import timedelta
from pathlib import Path

import jsonschema
import pytest
from django.contrib.auth.models import User
from django.db import connections
from django.utils import timezone

import ormbridge
from ormbridge import capture, registry, status
from ormbridge.models import ChangeBatch
from tests import commands
from tests.factories import make_products, wait_delivered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "status.schema.json").read_text())


def status_json(*extra: str):
    done = commands.run("ormbridge_status", "--json", *extra)
    return done, json.loads(done.stdout)


# A test that needs the worker's answer gives it time on a busy machine (default: 1 s).
ANSWERED = ("--worker-timeout", "5")


def test_json_status_validates_against_the_documented_shape(worker):
    make_products(3)[0].save()
    wait_delivered()
    done, report = status_json(*ANSWERED)
    jsonschema.validate(report, SCHEMA)
    assert done.returncode == 0, done.stderr
    assert (report["healthy"], report["problems"]) == (True, [])
    assert report["services"]["redis"]["ok"] and report["services"]["broker"]["ok"]
    assert report["services"]["workers"]["ok"]
    product = next(m for m in report["models"] if m["model"] == "shop.product")
    assert product["registered"] is True
    assert product["triggers"] == "installed"
    assert product["change_log"] == {"pending": 0, "claimed": 0, "failed": 0}
    assert product["oldest_undelivered_age"] is None
    assert product["last_delivery"] is not None  # the relay delivered the save


def test_undelivered_rows_are_counted_by_state(no_relay):
    [product] = make_products(1)
    product.save()
    ChangeBatch.objects.create(model="shop.product", action="update", pks=[1], state="claimed",
                               claimed_by="a relay", lease_until=timezone.now())  # fmt: skip
    ChangeBatch.objects.create(model="shop.product", action="update", pks=[1], state="done")
    pending = ChangeBatch.objects.filter(model="shop.product", state="pending").count()
    _, report = status_json()
    jsonschema.validate(report, SCHEMA)
    product = next(m for m in report["models"] if m["model"] == "shop.product")
    assert product["change_log"] == {"pending": pending, "claimed": 1, "failed": 0}
    assert pending >= 2  # the insert and the save
    assert product["oldest_undelivered_age"] >= 0
    assert [p for p in report["problems"] if "worker" not in p] == []  # pending is no problem


def test_with_redis_stopped_status_still_answers_and_says_so(worker, redis_servers):
    redis_servers["ormbridge"].stop()
    done, report = status_json(*ANSWERED)
    jsonschema.validate(report, SCHEMA)
    assert report["services"]["redis"]["ok"] is False
    assert "Error" in report["services"]["redis"]["error"]
    assert all(m["last_delivery"] is None for m in report["models"])
    assert done.returncode == 0  # Redis being down is reported, the change log is healthy


def test_a_registered_table_without_triggers_makes_it_exit_non_zero(product_triggers_uninstalled):
    done, report = status_json()
    jsonschema.validate(report, SCHEMA)
    assert done.returncode == 1
    product = next(m for m in report["models"] if m["model"] == "shop.product")
    assert product["triggers"] == "missing"
    order = next(m for m in report["models"] if m["model"] == "shop.order")
    assert order["triggers"] == "installed"
    assert report["healthy"] is False
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("CommandError: unhealthy: capture triggers not installed or outdated")
    assert "shop.product" in line and "shop.order" not in line
    assert "manage.py ormbridge_triggers install" in line


def test_triggers_left_on_a_table_of_no_registered_model_make_it_exit_non_zero(no_relay):
    saved = dict(registry._registry)
    ormbridge.register(User)  # registered, installed, then no longer registered
    capture.install("default")
    registry._registry.clear()
    registry._registry.update(saved)
    for listener in registry._listeners:  # the caches of the registry forget it too
        listener()
    try:
        done, report = status_json()
    finally:
        capture.uninstall("default", ["auth.user"])
    jsonschema.validate(report, SCHEMA)
    assert done.returncode == 1
    [problem] = [p for p in report["problems"] if "no registered model" in p]
    assert problem == (
        "capture triggers left on tables of no registered model: auth_user, auth_user_groups, "
        "auth_user_user_permissions (run manage.py ormbridge_triggers prune)"
    )


def test_failed_rows_make_it_exit_non_zero(worker):
    ChangeBatch.objects.create(model="shop.product", action="update", pks=[1], state="failed",
                               last_error="boom")  # fmt: skip
    done, report = status_json(*ANSWERED)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "CommandError: unhealthy: 1 change-log rows failed in database 'default'"
    )
    assert report["healthy"] is False


def test_an_old_undelivered_row_makes_it_exit_non_zero(no_relay):
    batch = ChangeBatch.objects.create(model="shop.order", action="update", pks=[1])
    ChangeBatch.objects.filter(pk=batch.pk).update(created_at=timezone.now() - timedelta(hours=1))
    done, report = status_json()
    assert done.returncode == 1
    age = re.search(r"oldest undelivered change-log row is (\d+) s old", done.stderr)
    assert age is not None, done.stderr
    assert 3600 <= int(age.group(1)) < 3700
    order = next(m for m in report["models"] if m["model"] == "shop.order")
    assert order["oldest_undelivered_age"] >= 3600


def test_text_status_shows_models_services_and_pending_work(no_relay):
    [product] = make_products(1)
    product.save()
    pending = ChangeBatch.objects.filter(model="shop.product", state="pending").count()
    done = commands.run("ormbridge_status")
    assert done.returncode == 1, done.stderr  # no worker
    assert "redis    ok" in done.stdout
    assert "workers  DOWN no worker answered within 1 s" in done.stdout
    backlog = ChangeBatch.objects.filter(state="pending").count()  # of every model
    assert f"backlog  {backlog} rows; oldest pending " in done.stdout
    line = next(line for line in done.stdout.splitlines() if line.startswith("shop.product"))
    assert line.split()[1:3] == ["installed", f"{pending}/0/0"]  # triggers, log p/c/f
    assert done.stdout.strip().splitlines()[-1] == "unhealthy"


TWO_DATABASES = pytest.mark.django_db(transaction=True, databases=["default", "other"])


@TWO_DATABASES
def test_with_a_second_database_status_is_healthy_and_counts_both_logs(second_database, worker):
    """Issue 17, item 9: the tables routed to one database are not "missing" in the other."""
    now = timezone.now()
    ChangeBatch.objects.using("other").create(model="seconddb.item", action="update", pks=[1],
                                              state="claimed", claimed_by="a relay", claimed_at=now,
                                              lease_until=now + timedelta(hours=1))  # fmt: skip
    done, report = status_json(*ANSWERED)
    jsonschema.validate(report, SCHEMA)
    assert done.returncode == 0, done.stderr
    assert {m["model"]: m["triggers"] for m in report["models"]}["shop.product"] == "installed"
    item = next(m for m in report["models"] if m["model"] == "seconddb.item")
    assert item["change_log"] == {"pending": 0, "claimed": 1, "failed": 0}
    assert item["triggers"] == "installed"
    assert report["delivery"]["backlog"] == 1
    other = report["databases"]["other"]
    assert other["change_log"] == {"pending": 0, "claimed": 1, "failed": 0}
    assert other["log"] is True and "seconddb.item" in other["models"]
    assert report["databases"]["default"]["change_log"]["pending"] == 0


@TWO_DATABASES
def test_a_failed_row_in_a_second_databases_log_makes_it_exit_1_naming_the_database(
    second_database, worker
):
    """Issue 17, item 9: status read the "default" database's log alone and said healthy."""
    ChangeBatch.objects.using("other").create(model="seconddb.item", action="update", pks=[1],
                                              state="failed", last_error="boom")  # fmt: skip
    done, report = status_json(*ANSWERED)
    jsonschema.validate(report, SCHEMA)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (
        "CommandError: unhealthy: 1 change-log rows failed in database 'other'"
    )
    item = next(m for m in report["models"] if m["model"] == "seconddb.item")
    assert item["change_log"]["failed"] == 1
    assert report["databases"]["other"]["change_log"]["failed"] == 1
    text = commands.run("ormbridge_status", *ANSWERED)
    line = next(line for line in text.stdout.splitlines() if line.startswith("other "))
    assert line.split()[1] == "0/0/1", text.stdout  # the database's log p/c/f


@TWO_DATABASES
def test_an_old_row_in_a_second_databases_log_makes_it_exit_1_naming_the_database(
    second_database, no_relay
):
    batch = ChangeBatch.objects.using("other").create(
        model="seconddb.item", action="update", pks=[1]
    )
    ChangeBatch.objects.using("other").filter(pk=batch.pk).update(
        created_at=timezone.now() - timedelta(hours=1)
    )
    done, report = status_json()
    assert done.returncode == 1
    problem = next(p for p in report["problems"] if "oldest undelivered" in p)
    assert "database 'other'" in problem
    assert report["delivery"]["oldest_pending_age"] >= 3600


def test_a_database_with_registered_models_and_no_change_log_is_a_problem(no_relay, settings):
    """The router keeps the log out of "other", where seconddb.Item's rows are (W006)."""
    settings.DATABASE_ROUTERS = ["tests.routers.LogOnDefaultRouter"]
    report = status.collect(0.1)
    jsonschema.validate(report, SCHEMA)
    other = report["databases"]["other"]
    assert (other["log"], other["models"]) == (False, ["seconddb.item"])
    assert "ormbridge.W006" in other["error"]
    [problem] = [p for p in report["problems"] if "'other'" in p]
    assert problem.startswith("database 'other': no change log: the router keeps")


@TWO_DATABASES
def test_a_database_whose_change_log_table_is_missing_makes_it_exit_1_naming_it(
    second_database, worker
):
    other = connections[second_database]
    if other.vendor == "sqlite":  # renaming leaves the capture triggers' text alone
        with other.cursor() as cursor:
            cursor.execute("PRAGMA legacy_alter_table = ON")
    with other.cursor() as cursor:
        cursor.execute("ALTER TABLE ormbridge_changebatch RENAME TO ormbridge_changebatch_away")
    try:
        done, report = status_json(*ANSWERED)
    finally:
        with other.cursor() as cursor:
            cursor.execute("ALTER TABLE ormbridge_changebatch_away RENAME TO ormbridge_changebatch")
            if other.vendor == "sqlite":
                cursor.execute("PRAGMA legacy_alter_table = OFF")
    jsonschema.validate(report, SCHEMA)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (
        "CommandError: unhealthy: database 'other': no change-log table: run manage.py "
        "migrate --database other (until then, writes to its registered models are not "
        "captured)"
    )
    assert report["databases"]["other"]["log"] is False
