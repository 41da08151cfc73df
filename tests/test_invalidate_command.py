"""manage.py ormbridge_invalidate: every cached entry of the named models, at once."""

import pytest
from django.core.management import CommandError, call_command

from ormbridge.cache import cached_instance
from ormbridge.models import ChangeBatch
from ormbridge.querysets import cached_queryset
from shop.models import Product, Tag
from tests import commands
from tests.factories import log_mark, logged_since, make_products

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]


def test_the_named_models_are_read_from_the_database_again(no_relay, django_assert_num_queries):
    [product] = make_products(1)
    tag = Tag.objects.create(name="sale")
    cached_instance(Product, product.pk)
    cached_queryset(Product.objects.all())
    cached_instance(Tag, tag.pk)
    mark = log_mark()
    call_command("ormbridge_invalidate", "shop.Product")
    with django_assert_num_queries(2):
        cached_instance(Product, product.pk)
        cached_queryset(Product.objects.all())
    with django_assert_num_queries(0):
        cached_instance(Tag, tag.pk)
    [row] = logged_since(mark)
    assert (row.model, row.action, row.pks) == ("shop.product", ChangeBatch.Action.INVALIDATE, None)


def test_all_invalidates_every_registered_model(no_relay):
    mark = log_mark()
    call_command("ormbridge_invalidate", "--all")
    assert {row.model for row in logged_since(mark)} >= {"shop.product", "shop.tag", "shop.order"}


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "name models as app_label.Model, or pass --all"),
        (["shop.Nope"], "unknown model 'shop.Nope'"),
        (["auth.Group"], "auth.Group is not registered with ormbridge"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(no_relay, args, message):
    mark = log_mark()
    with pytest.raises(CommandError, match=message):
        call_command("ormbridge_invalidate", *args)
    assert not logged_since(mark).exists()


def test_a_bad_model_exits_non_zero_with_one_line_on_stderr(no_relay):
    done = commands.run("ormbridge_invalidate", "shop.Nope")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "CommandError: unknown model 'shop.Nope'; use app_label.ModelName."
    )


def test_redis_down_is_reported_and_the_change_log_keeps_the_invalidation(no_relay, redis_servers):
    redis_servers["ormbridge"].stop()
    mark = log_mark()
    with pytest.raises(CommandError, match="Redis did not answer"):
        call_command("ormbridge_invalidate", "shop.Product")
    assert [row.model for row in logged_since(mark)] == ["shop.product"]
