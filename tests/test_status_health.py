"""ormbridge_status as a health check: a worker consumes ormbridge's queue, the backlog and
the age of the oldest pending and in-flight deliveries (issue 10, operations 9)."""

import json
import socket
import time
from datetime import timedelta
from pathlib import Path

import jsonschema
import pytest
from django.utils import timezone

from ormbridge import redis_store, tasks
from ormbridge.conf import settings
from ormbridge.models import ChangeBatch
from tests import commands
from tests.conftest import wait_until
from tests.factories import make_products, wait_delivered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.databases, pytest.mark.redis]

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "status.schema.json").read_text())


def status_json(*extra: str):
    process = commands.manage("ormbridge_status", "--json", *extra)
    stdout, stderr = process.communicate(timeout=60)  # bounded, whatever is down
    report = json.loads(stdout)
    jsonschema.validate(report, SCHEMA)
    return process.returncode, stderr, report


# A test that needs a worker's answer gives it time on a busy machine (default: 1 s).
ANSWERED = ("--worker-timeout", "5")


def worker_name(worker) -> str:
    return f"{worker.log.stem}@{socket.gethostname()}"


def test_a_worker_without_the_queue_still_delivers_changes(no_relay, start_worker):
    """What the health rule rests on: the relay runs in every worker, whatever it consumes."""
    start_worker(queue="celery")
    make_products(2)[0].save()
    wait_delivered()


def test_it_exits_1_naming_the_queue_when_the_only_worker_consumes_celery_alone(
    no_relay, start_worker
):
    only = start_worker(queue="celery")
    returncode, stderr, report = status_json(*ANSWERED)
    assert returncode == 1, stderr
    [line] = stderr.strip().splitlines()
    assert f"no worker consumes the queue '{settings.QUEUE}'" in line
    assert f"-Q celery,{settings.QUEUE}" in line  # the fix: its queues and ormbridge's
    workers = report["services"]["workers"]
    assert workers["ok"] is False
    assert workers["queue"] == settings.QUEUE
    assert workers["queues"] == {worker_name(only): ["celery"]}
    assert workers["consumers"] == []
    assert report["healthy"] is False


def test_it_exits_1_naming_the_queue_when_no_worker_runs(no_relay):
    returncode, stderr, report = status_json()
    assert returncode == 1, stderr
    [line] = stderr.strip().splitlines()
    assert "no Celery worker answered" in line
    assert f"queue '{settings.QUEUE}'" in line and f"-Q {settings.QUEUE}" in line
    workers = report["services"]["workers"]
    assert (workers["ok"], workers["names"], workers["consumers"]) == (False, [], [])


def test_it_exits_0_with_a_worker_consuming_the_queue(worker):
    returncode, stderr, report = status_json(*ANSWERED)
    assert returncode == 0, stderr
    workers = report["services"]["workers"]
    assert workers["ok"] is True
    assert workers["consumers"] == [worker_name(worker)]
    assert settings.QUEUE in workers["queues"][worker_name(worker)]
    assert (report["healthy"], report["problems"]) == (True, [])


def test_with_the_broker_down_it_answers_and_exits_1_naming_the_queue(no_relay, redis_servers):
    redis_servers["broker"].stop()
    returncode, stderr, report = status_json()
    assert returncode == 1, stderr
    assert report["services"]["broker"]["ok"] is False
    assert report["services"]["workers"]["consumers"] == []
    assert f"queue '{settings.QUEUE}'" in stderr and "broker" in stderr


def test_backlog_and_oldest_pending_and_in_flight_ages_are_reported(no_relay):
    now = timezone.now()
    old = ChangeBatch.objects.create(model="shop.order", action="update", pks=[1])
    ChangeBatch.objects.create(model="shop.product", action="update", pks=[2])
    flying = ChangeBatch.objects.create(model="shop.product", action="update", pks=[3],
                                        state="claimed", claimed_by="a relay",
                                        lease_until=now + timedelta(minutes=5))  # fmt: skip
    ChangeBatch.objects.create(model="shop.product", action="update", pks=[4], state="failed")
    ChangeBatch.objects.create(model="shop.product", action="update", pks=[5], state="done")
    ChangeBatch.objects.filter(pk=old.pk).update(created_at=now - timedelta(seconds=300))
    ChangeBatch.objects.filter(pk=flying.pk).update(
        created_at=now - timedelta(seconds=200), claimed_at=now - timedelta(seconds=100)
    )
    _, _, report = status_json()
    delivery = report["delivery"]
    assert delivery["backlog"] == 3  # pending and claimed; failed and done rows are not work
    assert 300 <= delivery["oldest_pending_age"] < 400  # since the oldest undelivered write
    assert 100 <= delivery["oldest_in_flight_age"] < 200  # since its claim


def test_nothing_undelivered_reports_an_empty_backlog_and_no_ages(worker):
    make_products(1)
    wait_delivered()
    _, _, report = status_json()
    assert report["delivery"] == {
        "backlog": 0,
        "oldest_pending_age": None,
        "oldest_in_flight_age": None,
    }


def test_a_delivery_in_flight_too_long_is_a_problem_naming_its_relay(worker):
    long_ago = timezone.now() - timedelta(seconds=settings.STATUS_MAX_PENDING_AGE + 60)
    stuck = ChangeBatch.objects.create(model="shop.order", action="update", pks=[1],
                                       state="claimed", claimed_by="relay-on-host-7",
                                       lease_until=timezone.now() + timedelta(hours=1))  # fmt: skip
    ChangeBatch.objects.filter(pk=stuck.pk).update(created_at=long_ago, claimed_at=long_ago)
    returncode, stderr, report = status_json()
    assert returncode == 1, stderr
    [problem] = [p for p in report["problems"] if "in flight" in p]
    assert "relay-on-host-7" in problem
    assert report["delivery"]["oldest_in_flight_age"] >= settings.STATUS_MAX_PENDING_AGE


def test_the_worker_timeout_option_is_how_long_workers_are_waited_for(no_relay):
    done = commands.run("ormbridge_status", "--worker-timeout", "2.5")
    assert done.returncode == 1
    assert "no Celery worker answered within 2.5 s" in done.stderr


@pytest.mark.parametrize("value", ["0", "-1", "nan", "61", "soon"])
def test_a_worker_timeout_out_of_range_is_refused_in_one_line(no_relay, value):
    done = commands.run("ormbridge_status", "--json", "--worker-timeout", value)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip() == (
        "CommandError: --worker-timeout takes seconds, more than 0 and at most 60 "
        f"(e.g. --worker-timeout 5), not {value!r}."
    )


def refused_by(worker, kwargs: dict, start: int) -> None:
    """Send the sweep to the worker's queue with ``kwargs``; wait until it refused it."""
    tasks.sweep.apply_async(kwargs=kwargs, queue=settings.QUEUE)
    wait_until(lambda: "refused ormbridge.sweep" in worker.log_text()[start:], 30, "a refusal")


@pytest.mark.parametrize(
    "kwargs", [{}, {"key_prefix": "another"}], ids=["no key_prefix", "another key_prefix"]
)
def test_a_refused_task_is_shown_and_makes_it_exit_1_while_recent(worker, kwargs):
    """Issue 17, item 10: refusals were only counts in --json, and status said healthy."""
    refused_by(worker, kwargs, len(worker.log_text()))
    done = commands.run("ormbridge_status", *ANSWERED)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    shown = next(line for line in lines if line.startswith("refused "))
    assert shown.split(None, 1)[1] == (
        "ormbridge.sweep: 1 in the last 600 s (ormbridge.sweep 1 since Redis started)"
    )
    last = lines[lines.index(shown) + 1].strip()
    assert last.startswith("last ") and "ormbridge.sweep[" in last
    assert ("no KEY_PREFIX" if not kwargs else "KEY_PREFIX 'another'") in last
    [problem] = done.stderr.strip().splitlines()
    assert problem.startswith(
        "CommandError: unhealthy: 1 task message refused by the workers in the last 600 s "
        "(ormbridge.sweep 1), the last "
    ), problem
    assert "dropped, not run" in problem
    _, _, report = status_json(*ANSWERED)
    recent = report["recent_refusals"]
    assert (recent["window"], recent["count"]) == (600, 1)
    assert recent["by_task"] == {"ormbridge.sweep": 1}
    [last] = recent["last"]
    assert last["task"] == "ormbridge.sweep" and last["age"] >= 0 and last["reason"]
    assert report["refused_tasks"] == {"ormbridge.sweep": 1}


def test_a_refusal_older_than_the_window_is_shown_but_healthy(worker):
    refused_by(worker, {}, len(worker.log_text()))
    time.sleep(1.5)
    window = {"ORMBRIDGE_TEST_SETTINGS": json.dumps({"STATUS_REFUSAL_WINDOW": 1})}
    done = commands.run("ormbridge_status", *ANSWERED, env=window)
    assert done.returncode == 0, done.stderr
    shown = next(line for line in done.stdout.splitlines() if line.startswith("refused "))
    assert shown.split(None, 1)[1] == "none in the last 1 s (ormbridge.sweep 1 since Redis started)"


def test_refusals_are_kept_under_the_prefix_pruned_to_the_window(worker, settings):
    """The sorted set of refusal times: older ones go as new ones come, at most 1,000."""
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "STATUS_REFUSAL_WINDOW": 600}
    client = redis_store.get_redis()
    old = json.dumps({"task": "ormbridge.sweep", "id": "old", "reason": "long ago"})
    client.zadd(redis_store.refusals_key(), {old: time.time() - 700})
    refused_by(worker, {}, len(worker.log_text()))
    members = client.zrange(redis_store.refusals_key(), 0, -1)
    assert len(members) == 1 and '"old"' not in members[0]
