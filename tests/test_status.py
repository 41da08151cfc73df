"""manage.py ormbridge_status: what the pipeline is doing, as text or JSON, as a health check."""

import json
from datetime import timedelta
from pathlib import Path

import jsonschema
import pytest
from django.utils import timezone

from ormbridge import store
from ormbridge.models import ChangeBatch
from tests import commands
from tests.factories import make_products

pytestmark = pytest.mark.django_db(transaction=True)

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "status.schema.json").read_text())


def status_json(*extra: str):
    done = commands.run("ormbridge_status", "--json", *extra)
    return done, json.loads(done.stdout)


def test_json_status_validates_against_the_documented_shape(worker):
    make_products(3)[0].save()
    ChangeBatch.objects.create(model="shop.product", action="update", pks=[1], rows=1,
                               state="done")  # fmt: skip
    done, report = status_json()
    jsonschema.validate(report, SCHEMA)
    assert done.returncode == 0
    assert report["healthy"] is True
    assert report["services"]["redis"]["ok"] and report["services"]["broker"]["ok"]
    assert report["services"]["workers"]["ok"]
    product = next(m for m in report["models"] if m["model"] == "shop.product")
    assert product["change_log"]["done"] == 1


def test_with_redis_stopped_status_still_answers_and_says_so(idle_queue, redis_servers):
    redis_servers["ormbridge"].stop()
    done, report = status_json()
    jsonschema.validate(report, SCHEMA)
    assert report["services"]["redis"]["ok"] is False
    assert "Error" in report["services"]["redis"]["error"]
    assert all(m["pending_invalidations"] is None for m in report["models"])
    assert done.returncode == 0  # Redis being down is reported, the change log is healthy


def test_failed_rows_make_it_exit_non_zero(idle_queue):
    ChangeBatch.objects.create(model="shop.product", action="update", pks=[1], state="failed",
                               last_error="boom")  # fmt: skip
    done, report = status_json()
    assert done.returncode == 1
    assert done.stderr.strip() == "CommandError: unhealthy: 1 change-log rows failed"
    assert report["healthy"] is False


def test_an_old_undelivered_row_makes_it_exit_non_zero(idle_queue):
    batch = ChangeBatch.objects.create(model="shop.order", action="update", pks=[1])
    ChangeBatch.objects.filter(pk=batch.pk).update(created_at=timezone.now() - timedelta(hours=1))
    done, report = status_json()
    assert done.returncode == 1
    assert "oldest undelivered change-log row is 3600 s old" in done.stderr
    order = next(m for m in report["models"] if m["model"] == "shop.order")
    assert order["oldest_undelivered_age"] >= 3600


def test_text_status_shows_models_services_and_pending_work(settings):
    # no flush must run (a queue nobody consumes), and the command reads the default prefix
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "QUEUE": "nobody-consumes-this"}
    [product] = make_products(1)
    product.save()
    done = commands.run("ormbridge_status")
    assert done.returncode == 0
    assert "redis    ok" in done.stdout
    line = next(line for line in done.stdout.splitlines() if line.startswith("shop.product"))
    assert line.split()[1] == "1"  # one pending invalidation
    assert store.get_redis().scard(store.pending_key("shop.product")) == 1
