"""Misconfiguration is reported by system checks with a named id, never at import."""

from collections.abc import Iterator
from io import StringIO

import pytest
from celery import Celery, current_app
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from ormbridge.checks import check_settings, check_triggers


def ids(settings) -> list[str]:
    return [message.id for message in check_settings()]


def configure(settings, **values):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, **values}


def test_the_test_settings_are_clean(settings):
    assert check_settings() == []


def test_ormbridge_must_be_a_dict(settings):
    settings.ORMBRIDGE = ["REDIS_URL"]
    assert ids(settings) == ["ormbridge.E001"]


@pytest.mark.parametrize("key", ["FLUSH_DELAYS", "REDELIVER_AFTER"])  # a typo, a removed key
def test_unknown_key_is_a_warning_naming_it(settings, key):
    configure(settings, **{key: 1})
    [message] = check_settings()
    assert message.id == "ormbridge.W001"
    assert key in message.msg


@pytest.mark.parametrize(
    "key,value", [("RELAY_LEASE", 1), ("RELAY_POLL", 0.01), ("LOG_RETENTION", 0), ("RELAY", False)]
)
def test_numbers_at_their_minimum_are_fine(settings, key, value):
    configure(settings, **{key: value})
    assert check_settings() == []


@pytest.mark.parametrize("url", ["http://localhost", "localhost:6379", 6379, ""])
def test_redis_url_must_be_a_redis_url(settings, url):
    configure(settings, REDIS_URL=url)
    assert ids(settings) == ["ormbridge.E002"]


def test_the_retired_cache_alias_says_where_entries_live_now(settings):
    configure(settings, CACHE_ALIAS="default")
    [message] = check_settings()
    assert message.id == "ormbridge.W001"
    assert "REDIS_URL" in message.hint


@pytest.mark.parametrize(
    "key,value",
    [
        ("FLUSH_DELAY", -1),
        ("FLUSH_DELAY", "1"),
        ("FLUSH_BATCH_SIZE", 0),
        ("FLUSH_BATCH_SIZE", 1.5),
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


@pytest.mark.parametrize("key", ["KEY_PREFIX", "QUEUE"])
@pytest.mark.parametrize("value", ["", "two words", None])
def test_names_must_be_non_empty_strings(settings, key, value):
    configure(settings, **{key: value})
    assert ids(settings) == ["ormbridge.E005"]


@pytest.mark.parametrize("entry", ["shop.Nope", "nodot", "shop.DiscountedProduct"])
def test_models_must_name_concrete_models(settings, entry):
    configure(settings, MODELS=["shop.Order", entry])
    [message] = check_settings()
    assert message.id == "ormbridge.E006"
    assert entry in message.msg


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


@pytest.mark.parametrize("models", [["testapp.Seat"], {"testapp.Seat": {}}])
def test_models_naming_a_composite_primary_key_model_is_e009(settings, models):
    configure(settings, MODELS=models)
    [message] = check_settings()
    assert message.id == "ormbridge.E009"
    assert "testapp.Seat" in message.msg and "composite primary key" in message.msg
    assert "Remove" in message.hint


def test_emitters_must_import(settings):
    configure(settings, EMITTERS=["ormbridge.broadcast.NoSuchEmitter"])
    assert ids(settings) == ["ormbridge.E007"]


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


def test_pickle_accepted_through_a_celeryconfig_module_is_a_warning(settings, celery_app):
    celery_app.config_from_object(PickleConfig)
    [message] = check_settings()
    assert message.id == "ormbridge.W003"
    assert "accept_content" in message.msg


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


def test_a_json_only_celery_app_is_clean(settings, celery_app):
    celery_app.conf.accept_content = ["json", "msgpack"]
    assert check_settings() == []


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
