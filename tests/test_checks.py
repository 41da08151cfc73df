"""Misconfiguration is reported by system checks with a named id, never at import."""

from collections.abc import Iterator
from io import StringIO

import pytest
from celery import Celery, current_app
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connections
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from ormbridge import schedule
from ormbridge.checks import check_settings, check_triggers
from ormbridge.conf import settings as ormbridge_settings

# The tests that are not of the unit tier read the test database's triggers and log.
pytestmark = pytest.mark.databases


def ids(settings) -> list[str]:
    return [message.id for message in check_settings()]


def configure(settings, **values):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, **values}


@pytest.mark.unit
def test_the_test_settings_are_clean(settings):
    assert check_settings() == []


@pytest.mark.unit
def test_ormbridge_must_be_a_dict(settings):
    settings.ORMBRIDGE = ["REDIS_URL"]
    assert ids(settings) == ["ormbridge.E001"]


@pytest.mark.unit
@pytest.mark.parametrize("key", ["DELIVERY_DELAYS", "REDELIVER_AFTER"])  # a typo, a removed key
def test_unknown_key_is_a_warning_naming_it(settings, key):
    configure(settings, **{key: 1})
    [message] = check_settings()
    assert message.id == "ormbridge.W001"
    assert key in message.msg


@pytest.mark.unit
@pytest.mark.parametrize(
    "key,value", [("RELAY_LEASE", 1), ("RELAY_POLL", 0.01), ("LOG_RETENTION", 0), ("RELAY", False)]
)
def test_numbers_at_their_minimum_are_fine(settings, key, value):
    configure(settings, **{key: value})
    assert check_settings() == []


@pytest.mark.unit
@pytest.mark.parametrize("url", ["http://localhost", "localhost:6379", 6379, ""])
def test_redis_url_must_be_a_redis_url(settings, url):
    configure(settings, REDIS_URL=url)
    assert ids(settings) == ["ormbridge.E002"]


@pytest.mark.unit
def test_the_retired_cache_alias_says_where_entries_live_now(settings):
    configure(settings, CACHE_ALIAS="default")
    [message] = check_settings()
    assert message.id == "ormbridge.W001"
    assert "REDIS_URL" in message.hint


@pytest.mark.unit
@pytest.mark.parametrize(
    "old,new,value",
    [("FLUSH_DELAY", "DELIVERY_DELAY", 0.5), ("FLUSH_BATCH_SIZE", "DELIVERY_BATCH_SIZE", 7)],
)
def test_a_renamed_key_is_still_read_with_a_deprecation_warning_and_a_check_naming_the_new_key(
    settings, old, new, value
):
    configure(settings, **{old: value})
    with pytest.warns(DeprecationWarning, match=f"{old}.*renamed.*{new}"):
        assert getattr(ormbridge_settings, new) == value
    [message] = check_settings()  # W010, not "unknown key" (W001); no warning raised
    assert message.id == "ormbridge.W010"
    assert old in message.msg and new in message.hint


@pytest.mark.unit
@pytest.mark.parametrize(
    "old,new", [("FLUSH_DELAY", "DELIVERY_DELAY"), ("FLUSH_BATCH_SIZE", "DELIVERY_BATCH_SIZE")]
)
def test_the_new_key_wins_over_the_renamed_one(settings, recwarn, old, new):
    configure(settings, **{old: 3, new: 4})
    assert getattr(ormbridge_settings, new) == 4
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
    [message] = check_settings()
    assert message.id == "ormbridge.W010"
    assert "ignored" in message.msg


@pytest.mark.unit
def test_a_renamed_key_out_of_range_is_reported_under_the_new_name(settings):
    configure(settings, FLUSH_DELAY=-1)
    assert sorted(ids(settings)) == ["ormbridge.E004", "ormbridge.W010"]


@pytest.mark.parametrize(
    "key,value",
    [
        ("DELIVERY_DELAY", -1),
        ("DELIVERY_DELAY", "1"),
        ("DELIVERY_BATCH_SIZE", 0),
        ("DELIVERY_BATCH_SIZE", 1.5),
        ("RELAY_BATCH", 0),
        ("RELAY_BATCH", 2.5),
        ("RELAY_LEASE", 0.5),
        ("RELAY_LEASE", "10"),
        ("RELAY_POLL", 0),
        ("LOG_RETENTION", -1),
        ("LOG_RETENTION", None),
        ("COMMIT_TIMEOUT", 0),
        ("COMMIT_TIMEOUT", True),
        ("BREAKER_COOLDOWN", -1),
        ("BULK_CHUNK_SECONDS", 0),
        ("MAX_ATTEMPTS", 0),
        ("SWEEP_INTERVAL", 0.5),
        ("STATUS_MAX_PENDING_AGE", -1),
        ("CACHE_TIMEOUT", 0),
        ("CACHE_TIMEOUT", True),
    ],
)
def test_numbers_must_be_in_range(settings, key, value):
    configure(settings, **{key: value})
    [message] = check_settings()
    assert message.id == "ormbridge.E004"
    assert key in message.msg


@pytest.mark.unit
@pytest.mark.parametrize("key", ["KEY_PREFIX", "QUEUE"])
@pytest.mark.parametrize("value", ["", "two words", None])
def test_names_must_be_non_empty_strings(settings, key, value):
    configure(settings, **{key: value})
    assert ids(settings) == ["ormbridge.E005"]


@pytest.mark.unit
@pytest.mark.parametrize("entry", ["shop.Nope", "nodot", "shop.DiscountedProduct"])
def test_models_must_name_concrete_models(settings, entry):
    configure(settings, MODELS=["shop.Order", entry])
    [message] = check_settings()
    assert message.id == "ormbridge.E006"
    assert entry in message.msg


@pytest.mark.unit
@pytest.mark.parametrize(
    "options,named",
    [
        ({"cache_timeot": 60}, "cache_timeot"),
        ({"payload": "shop.nowhere.payload"}, "shop.nowhere"),
        ("fast", "'fast'"),
    ],
)
def test_models_as_a_dict_must_give_known_options(settings, options, named):
    configure(settings, MODELS={"shop.Order": {"cache_timeout": 60}, "shop.Tag": options})
    [message] = check_settings()
    assert message.id == "ormbridge.E006"
    assert "shop.Tag" in message.msg and named in message.msg


@pytest.mark.unit
@pytest.mark.parametrize("models", [["testapp.Seat"], {"testapp.Seat": {}}])
def test_models_naming_a_composite_primary_key_model_is_e009(settings, models):
    configure(settings, MODELS=models)
    [message] = check_settings()
    assert message.id == "ormbridge.E009"
    assert "testapp.Seat" in message.msg and "composite primary key" in message.msg
    assert "Remove" in message.hint


@pytest.mark.unit
def test_emitters_must_import(settings):
    configure(settings, EMITTERS=["ormbridge.broadcast.NoSuchEmitter"])
    assert ids(settings) == ["ormbridge.E007"]


@pytest.mark.unit
def test_pickle_is_a_warning(settings):
    settings.CELERY_ACCEPT_CONTENT = ["json", "pickle"]
    assert ids(settings) == ["ormbridge.W003"]


@pytest.fixture
def celery_app() -> Iterator[Celery]:
    """A project's Celery app configured outside Django settings, current for the test."""
    project = current_app._get_current_object()
    app = Celery("elsewhere", set_as_current=True)
    yield app
    project.set_current()


class PickleConfig:
    """A celeryconfig.py that lets pickle in."""

    task_serializer = "json"
    accept_content = ["json", "pickle"]


@pytest.mark.unit
def test_pickle_accepted_through_a_celeryconfig_module_is_a_warning(settings, celery_app):
    celery_app.config_from_object(PickleConfig)
    [message] = check_settings()
    assert message.id == "ormbridge.W003"
    assert "accept_content" in message.msg


@pytest.mark.unit
@pytest.mark.parametrize(
    "key,value",
    [
        ("accept_content", ["json", "application/x-python-serialize"]),  # pickle's MIME type
        ("task_serializer", "pickle"),
        ("result_serializer", "pickle"),
        ("result_accept_content", ["pickle"]),
    ],
)
def test_pickle_set_in_the_app_conf_is_a_warning(settings, celery_app, key, value):
    celery_app.conf[key] = value
    [message] = check_settings()
    assert message.id == "ormbridge.W003"
    assert key in message.msg


@pytest.mark.unit
def test_a_json_only_celery_app_is_clean(settings, celery_app):
    celery_app.conf.accept_content = ["json", "msgpack"]
    assert check_settings() == []


@pytest.mark.unit
def test_manage_py_check_fails_on_bad_configuration(settings):
    configure(settings, REDIS_URL="http://nope")
    with pytest.raises(SystemCheckError, match=r"ormbridge\.E002"):
        call_command("check")


@pytest.mark.django_db
def test_the_test_database_has_every_trigger():
    assert check_triggers(databases=["default"]) == []


@pytest.mark.django_db(transaction=True)
def test_a_registered_table_without_triggers_is_named_by_w005(product_triggers_uninstalled):
    messages = check_triggers(databases=["default"])
    assert {message.id for message in messages} == {"ormbridge.W005"}
    tables = {message.msg.split("'")[1]: message for message in messages}
    # the product table, and its m2m table with the tags, whose triggers log shop.product
    assert set(tables) == {"shop_product", "shop_product_tags"}
    message = tables["shop_product"]
    assert "shop.product" in message.msg and "missing" in message.msg
    assert "manage.py ormbridge_triggers install" in message.hint
    assert check_triggers() == []  # database checks run only when asked for


@pytest.mark.django_db(transaction=True)
def test_manage_py_check_database_warns_of_missing_triggers(product_triggers_uninstalled):
    out = StringIO()
    call_command("check", "--database", "default", stdout=out, stderr=out)
    assert "ormbridge.W005" in out.getvalue()


@pytest.mark.unit
def test_a_database_with_registered_models_that_the_router_keeps_the_log_out_of_is_w006(
    settings,
):
    """Issue 17, item 9: nothing said that writes to "other" are never captured."""
    settings.DATABASE_ROUTERS = ["tests.routers.LogOnDefaultRouter"]
    messages = [message for message in run_checks() if message.id.startswith("ormbridge.")]
    assert [message.id for message in messages] == ["ormbridge.W006"]
    [message] = messages
    assert "'other'" in message.msg and "seconddb.item" in message.msg
    assert "allow_migrate" in message.hint and "migrate --database other" in message.hint


@pytest.mark.unit
def test_databases_that_hold_a_log_or_no_registered_model_are_clean(settings):
    settings.DATABASE_ROUTERS = ["tests.routers.SecondDatabaseRouter"]  # a log in each
    assert [m for m in run_checks() if m.id == "ormbridge.W006"] == []
    settings.DATABASE_ROUTERS = []  # every table everywhere, the log too
    assert [m for m in run_checks() if m.id == "ormbridge.W006"] == []


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_a_database_with_registered_tables_and_no_change_log_table_is_w007(second_database):
    """A database the router gives a log to, but whose log table is not there (``migrate
    --database other`` never ran for ormbridge): its writes are not captured."""
    other = connections[second_database]
    if other.vendor == "sqlite":  # renaming leaves the capture triggers' text alone
        with other.cursor() as cursor:
            cursor.execute("PRAGMA legacy_alter_table = ON")
    with other.cursor() as cursor:
        cursor.execute("ALTER TABLE ormbridge_changebatch RENAME TO ormbridge_changebatch_away")
    try:
        messages = check_triggers(databases=[second_database])
        assert [message.id for message in messages] == ["ormbridge.W007"]
        [message] = messages
        assert "'other'" in message.msg and "seconddb.item" in message.msg
        assert "manage.py migrate --database other" in message.hint
        assert check_triggers(databases=["default"]) == []
    finally:
        with other.cursor() as cursor:
            cursor.execute("ALTER TABLE ormbridge_changebatch_away RENAME TO ormbridge_changebatch")
            if other.vendor == "sqlite":
                cursor.execute("PRAGMA legacy_alter_table = OFF")
    assert check_triggers(databases=[second_database]) == []


# The entry docs/operations.md showed before issue 17 (item 10): no kwargs, no KEY_PREFIX.
OLD_SNIPPET = {
    "ormbridge.sweep": {
        "task": "ormbridge.sweep",
        "schedule": 60.0,
        "options": {"queue": "ormbridge"},
    }
}


@pytest.mark.unit
@pytest.mark.parametrize("kwargs", [None, {}, {"key_prefix": "another"}])
def test_a_beat_schedule_sending_the_sweep_without_this_key_prefix_is_w008(settings, kwargs):
    """Issue 17, item 10: every worker refuses such a sweep and the log is never pruned."""
    entry = dict(OLD_SNIPPET["ormbridge.sweep"])
    if kwargs is not None:
        entry["kwargs"] = kwargs
    settings.CELERY_BEAT_SCHEDULE = {"prune the log": entry}
    [message] = check_settings()
    assert message.id == "ormbridge.W008"
    assert "'prune the log'" in message.msg and "ormbridge.sweep" in message.msg
    assert "'key_prefix': 'ormbridge'" in message.hint


@pytest.mark.unit
def test_a_beat_schedule_in_the_celery_apps_conf_is_checked_too(settings, celery_app):
    celery_app.conf.beat_schedule = OLD_SNIPPET
    assert ids(settings) == ["ormbridge.W008"]
    celery_app.conf.beat_schedule = {**schedule.beat_schedule(), "other": {"task": "x.y"}}
    assert check_settings() == []


@pytest.mark.django_db
def test_a_periodic_task_row_without_this_key_prefix_is_w008_until_ormbridge_schedule(settings):
    """A row an older ormbridge_schedule wrote (no kwargs), or one written by hand."""
    every = IntervalSchedule.objects.create(every=60, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name=schedule.PERIODIC_TASKS["ormbridge.sweep"],
                                task="ormbridge.sweep", interval=every)  # fmt: skip
    messages = check_triggers(databases=["default"])
    assert [message.id for message in messages] == ["ormbridge.W008"]
    assert "manage.py ormbridge_schedule" in messages[0].hint
    schedule.install()
    assert check_triggers(databases=["default"]) == []
    PeriodicTask.objects.filter(task="ormbridge.sweep").update(enabled=False)
    PeriodicTask.objects.create(name="by hand", task="ormbridge.sweep", interval=every,
                                kwargs='{"key_prefix": "another"}')  # fmt: skip
    [message] = check_triggers(databases=["default"])
    assert message.id == "ormbridge.W008" and "'by hand'" in message.msg
